"""Sub-pixel correspondence matcher: where each query cell lands in the key view (LC-loss).

Convention:
    Query ``i`` is cell ``i`` of the query view's ``h_q x w_q`` map (row-major). Its image-space
    center is mapped into the key view's continuous feature-cell space ``(u, v)`` (cell centers
    at integers, flips applied; :meth:`~densecontrast.geometry.ViewGeometry.to_cells`). The
    key view spans ``[-0.5, w_k - 0.5] x [-0.5, h_k - 0.5]`` there, its outermost cell centers
    span ``[0, w_k - 1] x [0, h_k - 1]``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from densecontrast._checks import check_choice, check_geometry_pair, check_grid_shape
from densecontrast.geometry import ViewGeometry
from densecontrast.matching.matches import Matches

__all__ = ["CorrespondenceMatcher", "correspondence_match"]

_BORDERS = ("view", "interior")


def correspondence_match(
    query_geometry: ViewGeometry,
    key_geometry: ViewGeometry,
    query_shape: tuple[int, int],
    key_shape: tuple[int, int],
    border: Literal["view", "interior"] = "view",
) -> Matches:
    """LC-loss correspondences: the continuous key-view location of every query cell.

    The positive of query cell ``i`` is the exact point ``p_sc`` in the key view's feature-cell
    space; a loss samples there bilinearly (features, or LC-loss's NLL map) with
    :func:`~densecontrast.matching.sample_points` / :meth:`Matches.gather`.

    Border rule (the LC-loss validity set ``P``), chosen by ``border``:

    * ``"view"`` (default, the paper's "inside the bounds of the view"): valid iff the image
      point lies inside the key view (closed box, ``valid == in_box``). Points in the half-cell
      band outside the outermost cell centers are sampled with border clamping
      (``padding_mode="border"``), i.e. they take the edge cells' values.
    * ``"interior"``: valid iff the whole bilinear footprint lies on the grid,
      ``0 <= u <= w_k - 1`` and ``0 <= v <= h_k - 1``, so no clamping ever happens.

    Args:
        query_geometry: B query views.
        key_geometry: B key views of the same images.
        query_shape: ``(h_q, w_q)`` of the query feature map.
        key_shape: ``(h_k, w_k)`` of the key feature map.
        border: ``"view"`` or ``"interior"``.

    Returns:
        :class:`Matches` with ``key_points (B, N, 2)`` (geometry dtype), ``valid``, ``in_box``
        (image point inside the key view), ``weight`` ones and ``key_shape``.

    Raises:
        ValueError: bad shapes, an unknown ``border``, or geometries of different lengths.

    Examples:
        >>> size = torch.tensor([100.0, 100.0])
        >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), None, size)
        >>> f = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([True]), size)
        >>> correspondence_match(g, f, (1, 3), (1, 3)).key_points.round(decimals=5) + 0.0  # a flip mirrors columns
        tensor([[[2., 0.],
                 [1., 0.],
                 [0., 0.]]])
    """
    query_geometry, key_geometry = check_geometry_pair(query_geometry, key_geometry)
    hq, wq = check_grid_shape(query_shape, "query_shape")
    hk, wk = check_grid_shape(key_shape, "key_shape")
    check_choice(border, "border", _BORDERS)
    with torch.no_grad():
        cq = query_geometry.grid(hq, wq)
        uv = key_geometry.to_cells(cq, hk, wk)
        in_box = key_geometry.contains(cq)
        if border == "view":
            valid = in_box.clone()
        else:
            u, v = uv[..., 0], uv[..., 1]
            valid = (u >= 0) & (u <= wk - 1) & (v >= 0) & (v <= hk - 1)
    b, n = valid.shape
    return Matches(
        valid=valid,
        weight=torch.ones(b, n, dtype=uv.dtype, device=uv.device),
        key_points=uv,
        in_box=in_box,
        key_shape=(hk, wk),
    )


class CorrespondenceMatcher(nn.Module):
    """Module form of :func:`correspondence_match` (LC-loss analytic correspondences).

    Args:
        border: ``"view"`` (valid inside the key view) or ``"interior"`` (inside the cell centers).

    Examples:
        >>> size = torch.tensor([100.0, 100.0])
        >>> q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), None, size)
        >>> k = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 50.0, 100.0]]), None, size)
        >>> CorrespondenceMatcher()(q, k, (1, 4), (1, 2)).valid
        tensor([[ True,  True, False, False]])
    """

    def __init__(self, border: Literal["view", "interior"] = "view") -> None:
        super().__init__()
        self.border = check_choice(border, "border", _BORDERS)

    def forward(
        self,
        query_geometry: ViewGeometry,
        key_geometry: ViewGeometry,
        query_shape: tuple[int, int],
        key_shape: tuple[int, int],
    ) -> Matches:
        """See :func:`correspondence_match`."""
        return correspondence_match(query_geometry, key_geometry, query_shape, key_shape, border=self.border)

    def extra_repr(self) -> str:
        return f"border={self.border!r}"
