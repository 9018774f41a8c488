"""Coordinate matchers: positives from view geometry alone (PixPro / PixContrast, PixCon-Coord, VICRegL).

Convention:
    Queries are the ``N = h_q * w_q`` cells of the query view's feature map, keys the
    ``M = h_k * w_k`` cells of the key view's map, both flattened row-major. Cell centers are
    mapped to **image space** (normalized ``[0, 1]`` over the original image, see
    :mod:`densecontrast.geometry`) and compared there. Because both views are affine images of
    the same picture, the key cells near a query form a small window around the query's
    closed-form location in the key grid: the matchers build an ``(N, M)`` matrix only where
    that is cheaper (small grids, see :func:`coordinate_match`) or asked for
    (``max_positives``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast._checks import (
    _check_elementwise,
    check_geometry_pair,
    check_grid_shape,
    check_int,
    check_positive,
)
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


def _bin_diagonal(cell_size: Tensor) -> Tensor:
    """``(B,)`` bin diagonals from ``(B, 2)`` cell sizes (:meth:`ViewGeometry.cell_size`)."""
    return torch.linalg.vector_norm(cell_size, dim=-1)


def _axes(geometry: ViewGeometry, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Image-space x of the columns, y of the rows and the cell size of an ``h x w`` map over each view.

    One view -> image map for all three (the matchers' fixed cost at small grids): the floats of
    :meth:`ViewGeometry.grid`, whose cell ``(i, j)`` lies at ``(x[:, j], y[:, i])`` (view-space
    centers times ``scale`` plus ``offset``, as :meth:`ViewGeometry.to_image`), and of
    :meth:`ViewGeometry.cell_size` (``|scale| / (w, h)``: the crop extent over the cell count).

    Returns:
        ``x (B, w)``, ``y (B, h)`` and ``cell (B, 2)`` (width, height).
    """
    scale, offset = geometry._scale_offset()  # (B, 2) each: the map of ViewGeometry.to_image
    # view-space centers (j + 0.5) / w and (i + 0.5) / h, as ViewGeometry.view_grid
    xs = (torch.arange(w, device=scale.device, dtype=scale.dtype) + 0.5) / w
    ys = (torch.arange(h, device=scale.device, dtype=scale.dtype) + 0.5) / h
    x = xs * scale[:, 0:1] + offset[:, 0:1]
    y = ys * scale[:, 1:2] + offset[:, 1:2]
    return x, y, scale.abs() / scale.new_tensor([w, h])


def _grid(x: Tensor, y: Tensor) -> Tensor:
    """``(B, h * w, 2)`` cell centers from the column x ``(B, w)`` and row y ``(B, h)``, row-major (as ``grid``)."""
    return torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1).flatten(1, 2)


# ---------------------------------------------------------------------- PixPro threshold matcher
# Cost model of coordinate_match, in units of one tested (query, key cell) pair. A pair costs about
# a nanosecond on one CPU core; a group of tensor operations about 20 microseconds, whatever its size.
# benchmarks/matching.py prints the sweep these were read from and the crossover they give.
_DENSE_PAIRS = 1 << 17  # test every pair while the pairs the smallest windows save, B * N * (M - 16), are fewer
_MIN_WINDOW_CELLS = 16  # a window has at least 4 x 4 key cells (floor(2 r) + 4 per axis)
_WINDOW_SETUP_PAIRS = 1 << 16  # fixed cost of the windows: key-cell coordinates, sizes, one host read
_GROUP_PAIRS = 1 << 16  # fixed cost of one group of samples tested together
_WINDOW_PAIR_COST = 2  # a pair tested in a window costs about two of the dense test (gathered, shorter rows)
_CHUNK_PAIRS = 1 << 21  # at most this many pairs tested at once: bounds the temporaries (~10 bytes a pair)
_TOPK_PAIRS = 1 << 14  # pack by topk up to this many pairs, by nonzero above

_Samples = slice | list[int]
_Window = tuple[int, int] | None  # (k_x, k_y) key cells around each query, or None: the whole key grid


def _width(count: Tensor) -> int:
    """The packed width ``k``: the largest positive count, at least 1 (also for an empty batch)."""
    return max(int(count.max()), 1) if count.numel() else 1


def _hits(cq: Tensor, xs: Tensor, ys: Tensor, radius: Tensor) -> Tensor:
    """Exact positive test of every query against a ``k_y x k_x`` block of candidate key cells.

    Args:
        cq: ``(b, N, 2)`` image-space query centers.
        xs: ``(b, N, k_x)`` or ``(b, 1, k_x)`` image-space x of the candidate key columns.
        ys: ``(b, N, k_y)`` or ``(b, 1, k_y)`` image-space y of the candidate key rows.
        radius: ``(b,)`` positive radius.

    Returns:
        ``(b, N, k_y * k_x)`` bool, candidate ``(r, c)`` at ``r * k_x + c``: ``distance < radius``
        with the operations of :func:`center_distance` (``sqrt(dx * dx + dy * dy)``, the sum
        commutes), so the set is bit-identical to testing every pair.
    """
    dx = cq[..., 0:1] - xs
    dy = cq[..., 1:2] - ys
    d2 = (dy * dy)[..., :, None] + (dx * dx)[..., None, :]  # (b, N, k_y, k_x)
    return (d2.sqrt_() < radius[:, None, None, None]).flatten(2)


def _pack(hit: Tensor, window: tuple[Tensor, Tensor, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """The key cells of the True entries of every row, packed into ``k`` slots.

    Args:
        hit: ``(b, N, k_y * k_x)`` bool over a row-major window of key cells of each query.
        window: ``(x0, y0, k_x, w_k)``: the window's first key column and row ``(b, N)``, its
            width and the grid width; ``None`` when the window is the whole grid (positions are
            key indices). Window positions ascend with the key index.

    Returns:
        ``key_index (b, N, k)`` long (ascending, 0 in unused slots) and ``key_mask (b, N, k)``
        bool (``k = max(1, largest row count)``). Small inputs use ``topk``, large ones
        ``nonzero``, whose work after finding the True entries is proportional to their number.
    """
    b, n, w = hit.shape
    if hit.numel() <= _TOPK_PAIRS:
        k = _width(hit.sum(-1))
        pos = torch.where(hit, torch.arange(w, device=hit.device), w).topk(k, dim=-1, largest=False).values
        mask = pos < w
        if window is not None:
            x0, y0, kx, wk = window
            pos = (y0[..., None] + pos // kx) * wk + x0[..., None] + pos % kx
        return torch.where(mask, pos, 0), mask
    flat = hit.reshape(-1).nonzero().squeeze(1)  # ascending
    row = torch.div(flat, w, rounding_mode="floor")  # the query (of b * N)
    count = torch.bincount(row, minlength=b * n)
    k = _width(count)
    slot = torch.arange(flat.numel(), device=hit.device) - (count.cumsum(0) - count)[row]
    pos = flat - row * w
    if window is not None:
        x0, y0, kx, wk = window
        pos = (y0.reshape(-1)[row] + pos // kx) * wk + x0.reshape(-1)[row] + pos % kx
    index = torch.zeros(b * n * k, dtype=torch.long, device=hit.device)
    index[row * k + slot] = pos
    mask = torch.arange(k, device=hit.device) < count[:, None]
    return index.view(b, n, k), mask.view(b, n, k)


@torch.library.custom_op("densecontrast::coordinate_pair_hits", mutates_args=())
def _pair_hits(cq: Tensor, col_x: Tensor, row_y: Tensor, radius: Tensor) -> Tensor:
    """Every (key cell, query) pair tested: ``(B, M, N)`` bool, queries innermost.

    The operations of :func:`_hits` laid out along the long query axis. A custom operator, so
    ``torch.compile`` computes the cell centers and radius once and calls these kernels,
    instead of fusing the cell-center arithmetic into the loop over every pair.

    Args:
        cq: ``(B, N, 2)`` image-space query centers.
        col_x: ``(B, w_k)`` image-space x of the key columns.
        row_y: ``(B, h_k)`` image-space y of the key rows.
        radius: ``(B,)`` positive radius.
    """
    (b, n, _), m = cq.shape, row_y.shape[1] * col_x.shape[1]
    dx = cq[:, None, :, 0] - col_x[:, :, None]  # (B, w_k, N)
    dy = cq[:, None, :, 1] - row_y[:, :, None]  # (B, h_k, N)
    d2 = (dy * dy)[:, :, None, :] + (dx * dx)[:, None, :, :]  # (B, h_k, w_k, N)
    return (d2.sqrt_() < radius[:, None, None, None]).view(b, m, n)


@_pair_hits.register_fake
def _pair_hits_shape(cq: Tensor, col_x: Tensor, row_y: Tensor, radius: Tensor) -> Tensor:
    return cq.new_empty((cq.shape[0], row_y.shape[1] * col_x.shape[1], cq.shape[1]), dtype=torch.bool)


def _static(cq: Tensor, col_x: Tensor, row_y: Tensor, radius: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Every pair tested and packed into exactly ``k`` slots: fixed shapes, no host synchronization.

    Args:
        cq: ``(B, N, 2)`` image-space query centers.
        col_x: ``(B, w_k)`` image-space x of the key columns.
        row_y: ``(B, h_k)`` image-space y of the key rows.
        radius: ``(B,)`` positive radius.
        k: the number of slots; no query may have more positives (checked: ``ValueError``, or an
            asynchronous assert on CUDA and under ``torch.compile``).

    Returns:
        ``key_index (B, N, k)`` and ``key_mask (B, N, k)`` as :func:`coordinate_match`.
    """
    hit = _pair_hits(cq, col_x, row_y, radius)  # (B, M, N)
    m = hit.shape[1]
    count = hit.sum(1)
    _check_elementwise(
        count, count <= k, f"max_positives = {k} must be at least every query's number of positives",
        lambda bad: f"{int(bad.sum())} queries with more (up to {int(count.max())})",
    )
    key = torch.arange(m, device=cq.device, dtype=torch.int32)[:, None]  # int32: half the bytes to sort
    pos = torch.where(hit, key, m).topk(min(k, m), dim=1, largest=False).values.transpose(1, 2)  # (B, N, k)
    mask = pos < m
    pad = (0, k - pos.shape[-1])  # more slots than key cells: empty ones
    return F.pad(torch.where(mask, pos, 0).long(), pad), F.pad(mask, pad)


def _plan(sizes: list[list[int]], n: int, hk: int, wk: int) -> list[tuple[_Samples, _Window]]:
    """Split the batch into groups tested together, each with one window size, by the cost model.

    Costs are counted in pairs of the dense test; a pair tested in a window counts
    :data:`_WINDOW_PAIR_COST`. Samples sorted by window area are grouped greedily: a sample joins
    the current group unless enlarging the group's window would cost more than a new group
    (:data:`_GROUP_PAIRS`), or the group would exceed :data:`_CHUNK_PAIRS` pairs. The whole key
    grid is compared instead (in chunks of consecutive samples) when that costs less.

    Args:
        sizes: per sample ``[k_x, k_y]``, its window in key cells (capped at the grid).
        n: queries per sample.
        hk: key grid height.
        wk: key grid width.

    Returns:
        ``(samples, window)`` pairs; ``window`` is ``None`` for the whole grid.
    """
    b, m = len(sizes), hk * wk
    per = max(1, _CHUNK_PAIRS // (n * m))
    dense: list[tuple[_Samples, _Window]] = [(slice(s, min(b, s + per)), None) for s in range(0, b, per)]
    dense_cost = b * n * m + len(dense) * _GROUP_PAIRS
    groups: list[tuple[_Samples, _Window]] = []
    cost = _WINDOW_SETUP_PAIRS
    ids: list[int] = []
    kx = ky = 0
    for i in sorted(range(b), key=lambda j: sizes[j][0] * sizes[j][1]):
        sx, sy = sizes[i]
        gx, gy = max(kx, sx), max(ky, sy)
        grown = _WINDOW_PAIR_COST * n * ((len(ids) + 1) * gx * gy - len(ids) * kx * ky)
        if ids and (grown > _GROUP_PAIRS + _WINDOW_PAIR_COST * n * sx * sy
                    or (len(ids) + 1) * n * gx * gy > _CHUNK_PAIRS):
            groups.append((ids, (kx, ky)))
            cost += _GROUP_PAIRS + _WINDOW_PAIR_COST * len(ids) * n * kx * ky
            ids, gx, gy = [], sx, sy
        ids.append(i)
        kx, ky = gx, gy
    groups.append((ids, (kx, ky)))
    cost += _GROUP_PAIRS + _WINDOW_PAIR_COST * len(ids) * n * kx * ky
    if cost >= dense_cost:
        return dense
    if len(groups) == 1:  # the whole batch in one group: keep the batch order
        groups = [(slice(0, b), groups[0][1])]
    return [(s, None if w == (wk, hk) else w) for s, w in groups]


def _grouped(
    key_geometry: ViewGeometry, cq: Tensor, col_x: Tensor, row_y: Tensor, cell_k: Tensor, radius: Tensor
) -> tuple[Tensor, Tensor]:
    """Positives of a large problem, in the groups of :func:`_plan` (windows or the whole grid).

    Args:
        key_geometry: the B key views.
        cq: ``(B, N, 2)`` image-space query centers.
        col_x: ``(B, w_k)`` image-space x of the key columns.
        row_y: ``(B, h_k)`` image-space y of the key rows.
        cell_k: ``(B, 2)`` key cell size.
        radius: ``(B,)`` positive radius.

    Returns:
        ``key_index (B, N, k)`` and ``key_mask (B, N, k)`` as :func:`coordinate_match`.
    """
    (b, n, _), hk, wk = cq.shape, row_y.shape[1], col_x.shape[1]
    r_cells = radius[:, None] / cell_k  # (B, 2) radius in key cells (x, y)
    # k_x x k_y cells per sample: +4 = floor slack + a one-cell float margin each side
    size = torch.minimum(torch.floor(2 * r_cells).long() + 4, torch.tensor([wk, hk], device=cq.device))
    groups = _plan(size.tolist(), n, hk, wk)
    if any(window is not None for _, window in groups):
        uv = key_geometry.to_cells(cq, hk, wk)  # (B, N, 2) continuous key-cell coordinates
        first = torch.floor(uv - r_cells[:, None, :]).long() - 1  # (B, N, 2) window's first column, row
    parts = []
    for samples, window in groups:
        sel = samples if isinstance(samples, slice) else torch.tensor(samples, device=cq.device)
        if window is None:
            key, mask = _pack(_hits(cq[sel], col_x[sel, None, :], row_y[sel, None, :], radius[sel]))
        else:
            kx, ky = window
            x0 = first[sel, :, 0].clamp(0, wk - kx)  # (b, N)
            y0 = first[sel, :, 1].clamp(0, hk - ky)
            bs = x0.shape[0]
            cols = x0[..., None] + torch.arange(kx, device=cq.device)  # (b, N, k_x)
            rows = y0[..., None] + torch.arange(ky, device=cq.device)
            xs = torch.gather(col_x[sel], 1, cols.view(bs, -1)).view(bs, n, kx)
            ys = torch.gather(row_y[sel], 1, rows.view(bs, -1)).view(bs, n, ky)
            key, mask = _pack(_hits(cq[sel], xs, ys, radius[sel]), (x0, y0, kx, wk))
        parts.append((sel, key, mask))
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    k = max(key.shape[-1] for _, key, _ in parts)
    index = torch.zeros(b, n, k, dtype=torch.long, device=cq.device)
    mask = torch.zeros(b, n, k, dtype=torch.bool, device=cq.device)
    for sel, key, part_mask in parts:
        index[sel, :, : key.shape[-1]] = key
        mask[sel, :, : key.shape[-1]] = part_mask
    return index, mask


def coordinate_match(
    query_geometry: ViewGeometry,
    key_geometry: ViewGeometry,
    query_shape: tuple[int, int],
    key_shape: tuple[int, int],
    threshold: float = 0.7,
    *,
    max_positives: int | None = None,
) -> Matches:
    """PixPro / PixContrast positives: all key cells within a distance threshold of each query cell.

    Key cell ``j`` is a positive of query cell ``i`` iff
    ``||c_q(i) - c_k(j)|| < threshold * max(diag_q, diag_k)``, where ``c`` are the cells'
    image-space centers, the distance is :func:`center_distance` in normalized image
    coordinates (x over the image width, y over its height, as PixPro) and ``diag_v`` is the
    norm of :meth:`ViewGeometry.cell_size` (the bin diagonal, same units). The comparison is
    strict, as PixPro's. The result is bit-identical to testing every ``(i, j)`` pair.

    A cost model picks how, per batch (constants in this module, measured by
    ``benchmarks/matching.py``):

    * small problems compare every query with every key cell (nothing to set up): while even
      the smallest windows (4 x 4 cells) would save fewer than ``2**17`` pairs,
      ``B * N * (M - 16) <= 2**17``, about what setting windows up costs. A key cell's x
      depends on its column only and its y on its row only, so the distances are
      ``dy^2 + dx^2`` broadcast from ``(B, N, h_k)`` and ``(B, N, w_k)`` terms;
    * otherwise each query is compared with a ``k_y x k_x`` window of key cells around its
      closed-form location in the key grid (:meth:`ViewGeometry.to_cells`), sized per sample from
      its radius in key cells plus a one-cell margin and capped at the grid. Samples with
      similar windows are tested together, at most ``2**21`` pairs at a time (bounded memory);
      the whole grid is compared instead when the windows would cost more.

    Either way the test is one broadcast comparison (no loop over window rows) and the
    positives are packed into the largest positive count ``k`` of the batch. Time and memory
    are ``O(B N k_x k_y)``, about ``O(B N k)``, with one host synchronization for ``k``.

    With ``max_positives`` no shape depends on the data: every pair is compared and the result
    has exactly ``max_positives`` slots, without a host synchronization, so
    ``torch.compile(..., fullgraph=True)`` traces the matcher without a graph break (the
    window sizes and ``k`` of the default are data-dependent). It costs ``O(B N M)`` time and
    memory: meant for the small grids of compiled training steps (7 x 7, 14 x 14).

    Args:
        query_geometry: B query views (``B = 0`` gives an empty result).
        key_geometry: B key views of the same images.
        query_shape: ``(h_q, w_q)`` of the query feature map.
        key_shape: ``(h_k, w_k)`` of the key feature map.
        threshold: positive radius in units of the larger bin diagonal (PixPro's ``T = 0.7``).
        max_positives: the number of slots ``k`` of the result, at least the largest positive
            count of any query (a bound for the views of a training run), or ``None``: ``k`` is
            the largest count of the batch.

    Returns:
        :class:`Matches` in the multi-positive form: ``key_index (B, N, k)`` long and
        ``key_mask (B, N, k)`` bool (positives first, ascending key index, 0 in unused slots;
        ``k >= 1`` is the largest positive count in the batch, or ``max_positives``),
        ``valid = key_mask.any(-1)``, ``in_box (B, N)`` (the query center lies in the key view),
        ``weight`` ones (geometry dtype) and ``key_shape``.

    Raises:
        ValueError: ``threshold <= 0``, ``max_positives < 1``, bad shapes, geometries of different
            lengths, or a query with more than ``max_positives`` positives (on CUDA and under
            ``torch.compile`` that last check is an asynchronous assert: ``RuntimeError``).

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
        >>> coordinate_match(q[:0], k[:0], (2, 2), (2, 2)).key_index.shape  # an empty batch
        torch.Size([0, 4, 1])
        >>> coordinate_match(q, k, (2, 2), (2, 2), max_positives=3).key_index  # fixed width
        tensor([[[1, 0, 0],
                 [0, 0, 0],
                 [3, 0, 0],
                 [2, 0, 0]]])
    """
    query_geometry, key_geometry = check_geometry_pair(query_geometry, key_geometry)
    hq, wq = check_grid_shape(query_shape, "query_shape")
    hk, wk = check_grid_shape(key_shape, "key_shape")
    threshold = check_positive(threshold, "threshold", note="(bin diagonals)")
    check_int(max_positives, "max_positives", 1, allow_none=True)
    with torch.no_grad():
        b, n, m = len(query_geometry), hq * wq, hk * wk
        x_q, y_q, cell_q = _axes(query_geometry, hq, wq)
        cq = _grid(x_q, y_q)  # (B, N, 2) image space, = query_geometry.grid(h_q, w_q)
        # a key cell's x depends on its column only, its y on its row only
        col_x, row_y, cell_k = _axes(key_geometry, hk, wk)  # (B, w_k), (B, h_k), (B, 2)
        radius = threshold * torch.maximum(_bin_diagonal(cell_q), _bin_diagonal(cell_k))
        in_box = key_geometry.contains(cq)
        if max_positives is not None:  # every pair, into a fixed number of slots
            index, mask = _static(cq, col_x, row_y, radius, max_positives)
        elif b * n * (m - _MIN_WINDOW_CELLS) <= _DENSE_PAIRS:  # every pair; grid positions are key indices
            index, mask = _pack(_hits(cq, col_x[:, None, :], row_y[:, None, :], radius))
        else:
            index, mask = _grouped(key_geometry, cq, col_x, row_y, cell_k, radius)
    return Matches._trusted(  # key indices lie in the grid by construction
        valid=mask.any(-1),
        weight=torch.ones(b, n, dtype=cq.dtype, device=cq.device),
        key_index=index,
        key_mask=mask,
        in_box=in_box,
        key_shape=(hk, wk),
        num_keys=m,
    )


class CoordinateMatcher(nn.Module):
    """Module form of :func:`coordinate_match` (PixPro / PixContrast positives).

    Args:
        threshold: positive radius in units of the larger bin diagonal (``0.7`` as PixPro).
        max_positives: fixed number of positive slots (every pair compared, no data-dependent
            shape: for ``torch.compile``), or ``None`` (see :func:`coordinate_match`).

    Examples:
        >>> size = torch.tensor([64.0, 64.0])
        >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None, size)
        >>> m = CoordinateMatcher(0.7)(g, g, (7, 7), (14, 14))  # 4 key cells per query cell, plus 8 neighbours
        >>> m.key_index.shape, int(m.key_mask.sum(-1).max()), bool(m.valid.all())
        (torch.Size([1, 49, 12]), 12, True)
        >>> CoordinateMatcher(0.7, max_positives=16)(g, g, (7, 7), (14, 14)).key_index.shape
        torch.Size([1, 49, 16])
    """

    def __init__(self, threshold: float = 0.7, max_positives: int | None = None) -> None:
        super().__init__()
        self.threshold = check_positive(threshold, "threshold", note="(bin diagonals)")
        self.max_positives = check_int(max_positives, "max_positives", 1, allow_none=True)

    def forward(
        self,
        query_geometry: ViewGeometry,
        key_geometry: ViewGeometry,
        query_shape: tuple[int, int],
        key_shape: tuple[int, int],
    ) -> Matches:
        """See :func:`coordinate_match`."""
        return coordinate_match(
            query_geometry, key_geometry, query_shape, key_shape, self.threshold, max_positives=self.max_positives
        )

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, max_positives={self.max_positives}"


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
        cq = _grid(*_axes(query_geometry, hq, wq)[:2])  # = query_geometry.grid(h_q, w_q)
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
