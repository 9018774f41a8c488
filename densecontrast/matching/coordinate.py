"""Coordinate matchers: positives from view geometry alone (PixPro / PixContrast, PixCon-Coord, VICRegL).

Convention:
    Queries are the ``N = h_q * w_q`` cells of the query view's feature map, keys the
    ``M = h_k * w_k`` cells of the key view's map, both flattened row-major. Cell centers are
    mapped to **image space** (normalized ``[0, 1]`` over the original image, see
    :mod:`densecontrast.geometry`) and compared there. Because both views are affine images of
    the same picture, the key cells near a query form a small window around the query's
    closed-form location in the key grid, so neither matcher builds an ``(N, M)`` matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from densecontrast._checks import check_geometry_pair, check_grid_shape, check_int, check_positive
from densecontrast.geometry import ViewGeometry
from densecontrast.matching.matches import Matches

__all__ = [
    "CoordinateMatcher",
    "NearestCoordinateMatcher",
    "cell_distance",
    "coordinate_match",
    "nearest_coordinate_match",
]


# ---------------------------------------------------------------------- shared helpers
def center_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance between image-space points, elementwise over broadcast shapes.

    This is the single formula both the fast and any brute-force coordinate matcher must use
    for bit-identical positive sets: ``sqrt(dx * dx + dy * dy)`` with ``d = a - b``.

    Args:
        a: ``(..., 2)`` points ``(x, y)``.
        b: ``(..., 2)`` points, broadcastable against ``a``.

    Returns:
        ``(...)`` distances, in the units of the inputs.

    Examples:
        >>> center_distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.3, 0.4]]))
        tensor([0.5000])
    """
    d = a - b
    dx, dy = d[..., 0], d[..., 1]
    return torch.sqrt(dx * dx + dy * dy)


def _bin_diagonal(geometry: ViewGeometry, h: int, w: int) -> Tensor:
    return torch.linalg.vector_norm(geometry.cell_size(h, w), dim=-1)


# ---------------------------------------------------------------------- PixPro threshold matcher
def coordinate_match(
    query_geometry: ViewGeometry,
    key_geometry: ViewGeometry,
    query_shape: tuple[int, int],
    key_shape: tuple[int, int],
    threshold: float = 0.7,
) -> Matches:
    """PixPro / PixContrast positives: all key cells within a distance threshold of each query cell.

    Key cell ``j`` is a positive of query cell ``i`` iff
    ``||c_q(i) - c_k(j)|| < threshold * max(diag_q, diag_k)``, where ``c`` are the cells'
    image-space centers, the distance is :func:`center_distance` in normalized image
    coordinates (x over the image width, y over its height, as PixPro) and ``diag_v`` is the
    norm of :meth:`ViewGeometry.cell_size` (the bin diagonal, same units). The comparison is
    strict, as PixPro's.

    The set is found analytically in ``O(N k)`` time and memory: the query center is mapped
    into the key grid (:meth:`ViewGeometry.to_cells`), a ``k_y x k_x`` window of key cells around
    it (one size for the batch, from the largest radius in key cells plus a one-cell margin,
    capped at the grid) is tested exactly with the formula above, one window row at a time
    (along a row the positives are one run of consecutive columns), and the result is packed
    into the largest positive count ``k``. It is bit-identical to testing every ``(i, j)`` pair.

    Args:
        query_geometry: B query views.
        key_geometry: B key views of the same images.
        query_shape: ``(h_q, w_q)`` of the query feature map.
        key_shape: ``(h_k, w_k)`` of the key feature map.
        threshold: positive radius in units of the larger bin diagonal (PixPro's ``T = 0.7``).

    Returns:
        :class:`Matches` in the multi-positive form: ``key_index (B, N, k)`` long and
        ``key_mask (B, N, k)`` bool (positives first, ascending key index; ``k >= 1`` is the
        largest positive count in the batch), ``valid = key_mask.any(-1)``, ``in_box (B, N)``
        (the query center lies in the key view), ``weight`` ones (geometry dtype) and
        ``key_shape``.

    Raises:
        ValueError: ``threshold <= 0``, bad shapes, or geometries of different lengths.

    Convention:
        Distances and radii are in normalized image coordinates; flips are handled by the
        geometry (a flipped view's column 0 lies at the right of its crop).

    Examples:
        >>> size = torch.tensor([100.0, 100.0])
        >>> q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), None, size)
        >>> k = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([True]), size)
        >>> m = coordinate_match(q, k, (2, 2), (2, 2))
        >>> m.to_dense(4).int()[0]  # a mirrored view: query column 0 matches key column 1
        tensor([[0, 1, 0, 0],
                [1, 0, 0, 0],
                [0, 0, 0, 1],
                [0, 0, 1, 0]], dtype=torch.int32)
    """
    query_geometry, key_geometry = check_geometry_pair(query_geometry, key_geometry)
    hq, wq = check_grid_shape(query_shape, "query_shape")
    hk, wk = check_grid_shape(key_shape, "key_shape")
    threshold = check_positive(threshold, "threshold", note="(bin diagonals)")
    with torch.no_grad():
        b = len(query_geometry)
        n = hq * wq
        cq = query_geometry.grid(hq, wq)  # (B, N, 2) image space
        ck = key_geometry.grid(hk, wk)  # (B, M, 2)
        # a key cell's x depends on its column only, its y on its row only (the same floats as in ck)
        col_x = ck[:, :wk, 0]  # (B, w_k)
        row_y = ck[:, ::wk, 1]  # (B, h_k)
        radius = threshold * torch.maximum(_bin_diagonal(query_geometry, hq, wq), _bin_diagonal(key_geometry, hk, wk))
        uv = key_geometry.to_cells(cq, hk, wk)  # (B, N, 2) continuous key-cell coords
        r_cells = radius[:, None] / key_geometry.cell_size(hk, wk)  # (B, 2) radius in key cells (x, y)
        # window of kx x ky cells, one size for the batch; +4 = floor slack + a one-cell float margin each side
        kx = min(wk, math.floor(2 * float(r_cells[:, 0].max())) + 4)
        ky = min(hk, math.floor(2 * float(r_cells[:, 1].max())) + 4)
        x0 = (torch.floor(uv[..., 0] - r_cells[:, None, 0]).long() - 1).clamp(0, wk - kx)  # (B, N)
        y0 = (torch.floor(uv[..., 1] - r_cells[:, None, 1]).long() - 1).clamp(0, hk - ky)
        cols = x0[..., None] + torch.arange(kx, device=x0.device)  # (B, N, kx)
        dx = cq[..., 0:1] - torch.gather(col_x, 1, cols.reshape(b, -1)).reshape(b, n, kx)
        dx2 = dx * dx
        del dx, cols
        r2 = radius[:, None, None]
        # Per window row, the positives are one run of consecutive columns (the distance is
        # unimodal along a row, also in floating point): keep its length and first column.
        counts, starts = [], []
        for r in range(ky):
            dy = cq[..., 1] - torch.gather(row_y, 1, y0 + r)  # (B, N)
            hit = torch.sqrt(dx2 + (dy * dy)[..., None]) < r2  # the same ops as center_distance
            counts.append(hit.sum(-1))
            starts.append(hit.to(torch.uint8).argmax(-1))  # first positive column (0 if none)
            del hit
        count = torch.stack(counts, -1)  # (B, N, ky)
        start = torch.stack(starts, -1)
        del counts, starts, dx2
        total = count.sum(-1)  # (B, N)
        kmax = max(int(total.max()) if total.numel() else 0, 1)
        before = torch.cumsum(count, -1) - count  # slots used by earlier rows
        slot = torch.arange(kmax, device=x0.device)
        index = torch.zeros(b, n, kmax, dtype=torch.long, device=x0.device)
        for r in range(ky):
            lo, cnt = before[..., r, None], count[..., r, None]
            first = ((y0 + r) * wk + x0 + start[..., r])[..., None]  # key index of the run's first cell
            take = (slot >= lo) & (slot < lo + cnt)
            index = torch.where(take, first + (slot - lo), index)
        mask = slot < total[..., None]
        in_box = key_geometry.contains(cq)
    return Matches(
        valid=mask.any(-1),
        weight=torch.ones(b, n, dtype=cq.dtype, device=cq.device),
        key_index=index,
        key_mask=mask,
        in_box=in_box,
        key_shape=(hk, wk),
    )


class CoordinateMatcher(nn.Module):
    """Module form of :func:`coordinate_match` (PixPro / PixContrast positives).

    Args:
        threshold: positive radius in units of the larger bin diagonal (``0.7`` as PixPro).

    Examples:
        >>> size = torch.tensor([64.0, 64.0])
        >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None, size)
        >>> m = CoordinateMatcher(0.7)(g, g, (7, 7), (14, 14))  # 4 key cells per query cell, plus 8 neighbours
        >>> m.key_index.shape, int(m.key_mask.sum(-1).max()), bool(m.valid.all())
        (torch.Size([1, 49, 12]), 12, True)
    """

    def __init__(self, threshold: float = 0.7) -> None:
        super().__init__()
        self.threshold = check_positive(threshold, "threshold", note="(bin diagonals)")

    def forward(
        self,
        query_geometry: ViewGeometry,
        key_geometry: ViewGeometry,
        query_shape: tuple[int, int],
        key_shape: tuple[int, int],
    ) -> Matches:
        """See :func:`coordinate_match`."""
        return coordinate_match(query_geometry, key_geometry, query_shape, key_shape, threshold=self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


# ---------------------------------------------------------------------- nearest-cell matcher
def nearest_coordinate_match(
    query_geometry: ViewGeometry,
    key_geometry: ViewGeometry,
    query_shape: tuple[int, int],
    key_shape: tuple[int, int],
    topk: int | None = None,
) -> Matches:
    """Location matching: the key cell nearest to each query cell's image point (PixCon-Coord, VICRegL).

    For query cell ``i`` with image-space center ``c_q(i)``, the positive is the key cell whose
    center is closest to ``c_q(i)``. Key cells form an axis-aligned lattice in image space, so
    this is the per-axis nearest cell: ``round`` of :meth:`ViewGeometry.to_cells`, clamped to the
    grid (no ``(N, M)`` matrix). A query is valid iff its image point lies in the key view
    (``in_box``, closed box). With ``topk``, only the ``topk`` valid queries of each image whose
    point is closest to its matched key-cell center stay valid (VICRegL's ``num_matches``);
    distances are measured in original-image **pixels**, ties go to the lower query index.

    Args:
        query_geometry: B query views.
        key_geometry: B key views of the same images.
        query_shape: ``(h_q, w_q)`` of the query feature map.
        key_shape: ``(h_k, w_k)`` of the key feature map.
        topk: keep at most this many valid queries per image (``None``: all in-box queries).

    Returns:
        :class:`Matches` with ``key_index (B, N)`` long, ``key_points (B, N, 2)`` (the exact
        continuous key-cell ``(u, v)`` of each query point, for bilinear resampling with
        :func:`~densecontrast.matching.sample_points`), ``valid``, ``in_box`` and ``key_shape``.
        :meth:`Matches.gather` uses ``key_index`` (the nearest cell).

    Raises:
        ValueError: bad shapes, ``topk < 1``, or geometries of different lengths.

    Convention:
        Exact halfway points are rounded half-to-even (``torch.round``).

    Examples:
        >>> size = torch.tensor([100.0, 100.0])
        >>> q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), None, size)
        >>> k = ViewGeometry.from_crops(torch.tensor([[50.0, 0.0, 100.0, 100.0]]), None, size)
        >>> m = nearest_coordinate_match(q, k, (1, 4), (1, 2))
        >>> m.valid, m.key_index
        (tensor([[False, False,  True,  True]]), tensor([[0, 0, 0, 1]]))
    """
    query_geometry, key_geometry = check_geometry_pair(query_geometry, key_geometry)
    hq, wq = check_grid_shape(query_shape, "query_shape")
    hk, wk = check_grid_shape(key_shape, "key_shape")
    check_int(topk, "topk", 1, allow_none=True)
    with torch.no_grad():
        cq = query_geometry.grid(hq, wq)
        uv = key_geometry.to_cells(cq, hk, wk)
        col = torch.round(uv[..., 0]).clamp(0, wk - 1).long()
        row = torch.round(uv[..., 1]).clamp(0, hk - 1).long()
        key_index = row * wk + col
        in_box = key_geometry.contains(cq)
        valid = in_box
        if topk is not None and topk < hq * wq:
            ck = key_geometry.grid(hk, wk)
            matched = torch.gather(ck, 1, key_index[..., None].expand(-1, -1, 2))
            size = query_geometry.image_size[:, None, :]
            dist = center_distance(cq * size, matched * size)
            dist = dist.masked_fill(~valid, math.inf)
            order = torch.sort(dist, dim=1, stable=True).indices[:, :topk]
            keep = torch.zeros_like(valid).scatter_(1, order, True)
            valid = valid & keep
    b, n = valid.shape
    return Matches(
        valid=valid,
        weight=torch.ones(b, n, dtype=cq.dtype, device=cq.device),
        key_index=key_index,
        key_points=uv,
        in_box=in_box,
        key_shape=(hk, wk),
    )


class NearestCoordinateMatcher(nn.Module):
    """Module form of :func:`nearest_coordinate_match` (PixCon-Coord, VICRegL location matching).

    Args:
        topk: keep at most this many valid queries per image (VICRegL ``num_matches``), or None.

    Examples:
        >>> size = torch.tensor([64.0, 64.0])
        >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None, size)
        >>> m = NearestCoordinateMatcher(topk=20)(g, g, (7, 7), (7, 7))
        >>> int(m.valid.sum()), bool((m.key_index == torch.arange(49)).all())
        (20, True)
    """

    def __init__(self, topk: int | None = None) -> None:
        super().__init__()
        self.topk = check_int(topk, "topk", 1, allow_none=True)

    def forward(
        self,
        query_geometry: ViewGeometry,
        key_geometry: ViewGeometry,
        query_shape: tuple[int, int],
        key_shape: tuple[int, int],
    ) -> Matches:
        """See :func:`nearest_coordinate_match`."""
        return nearest_coordinate_match(query_geometry, key_geometry, query_shape, key_shape, topk=self.topk)

    def extra_repr(self) -> str:
        return f"topk={self.topk}"


def cell_distance(index: Tensor, other: Tensor, width: int) -> Tensor:
    """Chebyshev distance in cells between flat (row-major) cell indices of a ``width``-wide grid.

    Examples:
        >>> cell_distance(torch.tensor([0, 5]), torch.tensor([4, 5]), width=3)  # (0,0)-(1,1), same cell
        tensor([1, 0])
    """
    return torch.maximum((index // width - other // width).abs(), (index % width - other % width).abs())
