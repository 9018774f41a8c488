"""Location matcher: points sampled in the overlap of two views (DenseSiam PixSim).

Convention:
    Points are drawn in **image space** inside the intersection box of the two views
    (:meth:`~densecontrast.geometry.ViewGeometry.overlap`) and returned in each view's
    continuous feature-cell space ``(u, v)`` (cell centers at integers, flips applied), ready
    for :func:`~densecontrast.matching.sample_points` (``grid_sample``, ``align_corners=False``).
    Query ``n`` of image ``b`` is the point pair ``(query_points[b, n], key_points[b, n])``;
    both map to the same image point.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from densecontrast._checks import (
    check_choice,
    check_geometry_pair,
    check_grid_shape,
    check_int,
    check_number,
    check_shape,
)
from densecontrast.geometry import ViewGeometry
from densecontrast.matching.matches import Matches, sample_points

__all__ = ["LocationMatcher", "location_match"]

_SAMPLINGS = ("grid", "random", "hard")


def _check_options(num_points: object, sampling: object, oversample: object, hard_fraction: object) -> None:
    check_int(num_points, "num_points", 1)
    check_choice(sampling, "sampling", _SAMPLINGS)
    if sampling == "grid" and math.isqrt(num_points) ** 2 != num_points:  # type: ignore[arg-type]
        raise ValueError(f"num_points must be a perfect square (g x g grid) for sampling='grid', but got {num_points}")
    check_number(oversample, "oversample", 1, finite=False, note="(candidates per kept point)")
    check_number(hard_fraction, "hard_fraction", 0, 1)


def _embedding_shape(name: str, emb: Tensor | None, b: int, given: object, given_name: str) -> tuple[int, int] | None:
    if emb is None:
        return None if given is None else check_grid_shape(given, given_name)
    _, _, h, w = check_shape(emb, name, ("B", "D", "h", "w"), sizes={"B": b})
    shape = (h, w)
    if given is not None and check_grid_shape(given, given_name) != shape:
        raise ValueError(f"{given_name} must agree with {name}'s spatial size {shape}, but got {given!r}")
    return shape


def _uniform(lo: Tensor, ext: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    t = torch.rand(lo.shape[0], count, 2, generator=generator, device=lo.device, dtype=lo.dtype)
    return lo[:, None, :] + t * ext[:, None, :]


def location_match(
    query_geometry: ViewGeometry,
    key_geometry: ViewGeometry,
    num_points: int = 49,
    sampling: Literal["grid", "random", "hard"] = "grid",
    query_shape: tuple[int, int] | None = None,
    key_shape: tuple[int, int] | None = None,
    *,
    oversample: float = 3,
    hard_fraction: float = 0.75,
    query_embeddings: Tensor | None = None,
    key_embeddings: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Matches:
    """DenseSiam PixSim points: ``num_points`` image points in the overlap, in both views' cell coords.

    Sampling strategies (DenseSiam supplementary, "grid sampling strategies"):

    * ``"grid"`` (default, best in DenseSiam): a regular ``g x g`` grid (``g = sqrt(num_points)``)
      of half-cell centers of the overlap box, row-major.
    * ``"random"``: uniform in the overlap box (uses ``generator``).
    * ``"hard"`` (PointRend-style): draw ``ceil(oversample * num_points)`` uniform candidates,
      score each by the cosine between ``query_embeddings`` and ``key_embeddings`` bilinearly
      sampled at it, keep the ``round(hard_fraction * num_points)`` most dissimilar (lowest
      cosine, ascending) first, then fill the rest with fresh uniform points. Scoring runs
      without gradient in float32; candidates whose scores tie (e.g. several points clamped
      onto the same border cells) come in no promised order among themselves.

    Images whose views do not overlap (zero-area intersection) get ``valid = False`` for all
    points (their points are finite but meaningless); this is not an error.

    Under ``torch.compile`` this matcher is not one graph: :meth:`ViewGeometry.overlap` checks that
    both geometries describe the same images with ``torch.allclose`` (a value read on the host), and
    a ``generator`` argument cannot be traced. It runs without gradient on ``(B, N, 2)`` points, so
    call it outside the compiled region (the losses that read its points compile).

    Args:
        query_geometry: B query views.
        key_geometry: B key views of the same images.
        num_points: points per image (a perfect square for ``"grid"``).
        sampling: ``"grid"``, ``"random"`` or ``"hard"``.
        query_shape: ``(h_q, w_q)`` of the query feature map (default: from ``query_embeddings``).
        key_shape: ``(h_k, w_k)`` of the key feature map (default: from ``key_embeddings``).
        oversample: candidates per kept point for ``"hard"`` (``k >= 1``).
        hard_fraction: fraction of hard points for ``"hard"`` (``beta`` in ``[0, 1]``).
        query_embeddings: ``(B, D, h_q, w_q)`` query-view embeddings (required for ``"hard"``).
        key_embeddings: ``(B, D, h_k, w_k)`` key-view embeddings (required for ``"hard"``).
        generator: random generator for ``"random"`` / ``"hard"`` (on the geometry's device).

    Returns:
        :class:`Matches` with ``query_points (B, N, 2)`` and ``key_points (B, N, 2)`` (feature-cell
        ``(u, v)`` of the query / key view, geometry dtype), ``valid`` and ``in_box`` (both: the
        overlap has positive area), ``weight`` ones and ``key_shape``. Extract features with
        ``sample_points(query_map, m.query_points)`` and ``m.gather(key_map)``.

    Raises:
        ValueError: ``num_points < 1``, unknown ``sampling``, a non-square ``num_points`` for
            ``"grid"``, missing shapes or embeddings, or mismatched batch sizes.

    Examples:
        >>> size = torch.tensor([100.0, 100.0])
        >>> q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 60.0, 60.0]]), None, size)
        >>> k = ViewGeometry.from_crops(torch.tensor([[20.0, 20.0, 100.0, 100.0]]), torch.tensor([True]), size)
        >>> m = location_match(q, k, num_points=4, query_shape=(4, 4), key_shape=(4, 4))
        >>> m.query_points[0, 0], m.key_points[0, 0].round(decimals=5) + 0.0  # image point (0.3, 0.3) in both
        (tensor([1.5000, 1.5000]), tensor([3., 0.]))
    """
    query_geometry, key_geometry = check_geometry_pair(query_geometry, key_geometry)
    _check_options(num_points, sampling, oversample, hard_fraction)
    b = len(query_geometry)
    q_shape = _embedding_shape("query_embeddings", query_embeddings, b, query_shape, "query_shape")
    k_shape = _embedding_shape("key_embeddings", key_embeddings, b, key_shape, "key_shape")
    if q_shape is None or k_shape is None:
        missing = "query_shape" if q_shape is None else "key_shape"
        raise ValueError(f"{missing} is required: a feature-map size (h, w) (or pass the embeddings), but got None")
    if sampling == "hard" and (query_embeddings is None or key_embeddings is None):
        raise ValueError("query_embeddings and key_embeddings are required for sampling='hard', but got None")

    with torch.no_grad():
        box, area = query_geometry.overlap(key_geometry)
        lo, ext = box[:, :2], box[:, 2:] - box[:, :2]
        if sampling == "grid":
            g = math.isqrt(num_points)
            t = ViewGeometry.view_grid(g, g, device=lo.device, dtype=lo.dtype)
            points = lo[:, None, :] + t[None] * ext[:, None, :]
        elif sampling == "random":
            points = _uniform(lo, ext, num_points, generator)
        else:
            assert query_embeddings is not None and key_embeddings is not None
            n_hard = round(hard_fraction * num_points)
            cand = _uniform(lo, ext, max(n_hard, math.ceil(oversample * num_points)), generator)
            with torch.autocast(device_type=lo.device.type, enabled=False):
                fq = sample_points(query_embeddings.detach().float(), query_geometry.to_cells(cand, *q_shape).float())
                fk = sample_points(key_embeddings.detach().float(), key_geometry.to_cells(cand, *k_shape).float())
                score = F.cosine_similarity(fq, fk, dim=-1)  # (B, kN)
            hard_idx = torch.sort(score, dim=1, stable=True).indices[:, :n_hard]
            hard = torch.gather(cand, 1, hard_idx[..., None].expand(-1, -1, 2))
            points = torch.cat([hard, _uniform(lo, ext, num_points - n_hard, generator)], dim=1)
        query_points = query_geometry.to_cells(points, *q_shape)
        key_points = key_geometry.to_cells(points, *k_shape)
        valid = repeat(area > 0, "b -> b n", n=num_points).clone()
    return Matches(
        valid=valid,
        weight=torch.ones(b, num_points, dtype=points.dtype, device=points.device),
        key_points=key_points,
        query_points=query_points,
        in_box=valid.clone(),
        key_shape=k_shape,
    )


class LocationMatcher(nn.Module):
    """Module form of :func:`location_match` (DenseSiam PixSim point sampling).

    Args:
        num_points: points per image (a perfect square for ``"grid"``).
        sampling: ``"grid"``, ``"random"`` or ``"hard"``.
        oversample: candidates per kept point for ``"hard"``.
        hard_fraction: fraction of hard points for ``"hard"``.

    Examples:
        >>> size = torch.tensor([100.0, 100.0])
        >>> q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 60.0, 60.0]]), None, size)
        >>> k = ViewGeometry.from_crops(torch.tensor([[70.0, 0.0, 100.0, 60.0]]), None, size)
        >>> m = LocationMatcher(num_points=9)(q, k, (7, 7), (7, 7))  # disjoint views: no valid points
        >>> m.query_points.shape, bool(m.valid.any())
        (torch.Size([1, 9, 2]), False)
    """

    def __init__(
        self,
        num_points: int = 49,
        sampling: Literal["grid", "random", "hard"] = "grid",
        oversample: float = 3,
        hard_fraction: float = 0.75,
    ) -> None:
        super().__init__()
        _check_options(num_points, sampling, oversample, hard_fraction)
        self.num_points = num_points
        self.sampling = sampling
        self.oversample = oversample
        self.hard_fraction = hard_fraction

    @staticmethod
    def sample_features(feature_map: Tensor, points: Tensor) -> Tensor:
        """Bilinear features at matched points: ``(B, D, h, w)``, ``(B, N, 2)`` ``(u, v)`` -> ``(B, N, D)``.

        ``points`` are feature-cell coordinates (cell centers at integers), e.g. ``query_points`` or
        ``key_points`` of the returned :class:`Matches`; sampling is
        ``grid_sample(align_corners=False, padding_mode="border")`` (see :func:`sample_points`).

        Examples:
            >>> fmap = torch.arange(6.0).reshape(1, 1, 2, 3)  # row 0: 0 1 2, row 1: 3 4 5
            >>> LocationMatcher.sample_features(fmap, torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]))
            tensor([[[1.],
                     [2.]]])
        """
        return sample_points(feature_map, points)

    def forward(
        self,
        query_geometry: ViewGeometry,
        key_geometry: ViewGeometry,
        query_shape: tuple[int, int] | None = None,
        key_shape: tuple[int, int] | None = None,
        *,
        query_embeddings: Tensor | None = None,
        key_embeddings: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Matches:
        """See :func:`location_match`."""
        return location_match(
            query_geometry, key_geometry, self.num_points, self.sampling, query_shape, key_shape,
            oversample=self.oversample, hard_fraction=self.hard_fraction,
            query_embeddings=query_embeddings, key_embeddings=key_embeddings, generator=generator,
        )

    def extra_repr(self) -> str:
        return (
            f"num_points={self.num_points}, sampling={self.sampling!r}, oversample={self.oversample}, "
            f"hard_fraction={self.hard_fraction}"
        )
