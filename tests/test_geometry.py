"""Property tests of :mod:`densecontrast.geometry` against naive references written here.

Every reference below is computed from the stored pixel boxes in float64 Python arithmetic (loops, or
exact fractions where floor() makes the result discontinuous), never from the implementation's own
intermediate tensors. Tolerances are derived from the dtype's machine epsilon and the conditioning of
the map (dividing by a tiny box's extent amplifies rounding), not tuned to pass.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densecontrast.geometry import ViewGeometry, in_box_mask
from densecontrast.matching import coordinate_match, correspondence_match, nearest_coordinate_match

DTYPES = [torch.float32, torch.float64]
MAX_SIDE = 1200  # image sides are drawn in [2, MAX_SIDE] pixels, independently (non-square images)


# ---------------------------------------------------------------------------------------------- strategies
@st.composite
def _axis(draw: st.DrawFn, size: int, kind: str) -> tuple[float, float]:
    """One crop interval [lo, hi] inside [0, size] pixels."""
    if kind == "full":
        return 0.0, float(size)
    if kind == "integer":
        lo = draw(st.integers(0, size - 1))
        return float(lo), float(draw(st.integers(lo + 1, size)))
    ext = draw(st.floats(0.05, min(2.0, size))) if kind == "tiny" else draw(st.floats(min(1.0, size), size))
    lo = draw(st.floats(0.0, size - ext))
    return lo, min(lo + ext, float(size))


@st.composite
def _box(draw: st.DrawFn, w: int, h: int) -> list[float]:
    kind = draw(st.sampled_from(["random", "full", "tiny", "integer"]))
    x0, x1 = draw(_axis(w, kind))
    y0, y1 = draw(_axis(h, kind))
    return [x0, y0, x1, y1]


@st.composite
def geometries(draw: st.DrawFn, dtype: torch.dtype | None = None) -> ViewGeometry:
    """A batch of 1-5 views, each of its own image size, box (tiny, full, integer or random) and flips.

    Each view draws its horizontal and its vertical flip independently: no flip, either one, or both.
    """
    dtype = dtype if dtype is not None else draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 5))
    sizes, boxes, flips, vflips = [], [], [], []
    for _ in range(n):
        w, h = draw(st.integers(2, MAX_SIDE)), draw(st.integers(2, MAX_SIDE))
        sizes.append([float(w), float(h)])
        boxes.append(draw(_box(w, h)))
        flips.append(draw(st.booleans()))
        vflips.append(draw(st.booleans()))
    return ViewGeometry.from_crops(
        torch.tensor(boxes, dtype=torch.float64).to(dtype),
        torch.tensor(flips),
        torch.tensor(sizes, dtype=dtype),
        vflips=torch.tensor(vflips),
    )


@st.composite
def _second_axis(draw: st.DrawFn, size: int, lo: float, hi: float, kind: str) -> tuple[float, float]:
    """An interval related to [lo, hi]: disjoint, touching, identical, contained or random (at least 0.05 px wide)."""
    if kind == "same":
        return lo, hi
    if kind == "touching" and hi < size - 0.05:
        return hi, draw(st.floats(hi + 0.05, size))
    if kind == "touching" and lo > 0.05:
        return draw(st.floats(0.0, lo - 0.05)), lo
    if kind == "disjoint" and hi < size - 0.1:
        a = draw(st.floats(hi + 0.01, size - 0.05))
        return a, draw(st.floats(a + 0.05, size))
    if kind == "disjoint" and lo > 0.1:
        b = draw(st.floats(0.06, lo - 0.01))
        return draw(st.floats(0.0, b - 0.05)), b
    if kind == "contained" and hi - lo > 0.1:
        a = draw(st.floats(lo, hi - 0.05))
        return a, draw(st.floats(a + 0.05, hi))
    return draw(_axis(size, "random"))


@st.composite
def geometry_pairs(draw: st.DrawFn, dtype: torch.dtype | None = None) -> tuple[ViewGeometry, ViewGeometry]:
    """Two batches of views of the same images, with overlapping, touching, disjoint and identical pairs."""
    dtype = dtype if dtype is not None else draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 5))
    sizes, boxes_a, boxes_b, flips_a, flips_b, vflips_a, vflips_b = [], [], [], [], [], [], []
    kinds = ["random", "disjoint", "touching", "same", "contained"]
    for _ in range(n):
        w, h = draw(st.integers(2, MAX_SIDE)), draw(st.integers(2, MAX_SIDE))
        a = draw(_box(w, h))
        bx = draw(_second_axis(w, a[0], a[2], draw(st.sampled_from(kinds))))
        by = draw(_second_axis(h, a[1], a[3], draw(st.sampled_from(kinds))))
        sizes.append([float(w), float(h)])
        boxes_a.append(a)
        boxes_b.append([bx[0], by[0], bx[1], by[1]])
        flips_a.append(draw(st.booleans()))
        flips_b.append(draw(st.booleans()))
        vflips_a.append(draw(st.booleans()))
        vflips_b.append(draw(st.booleans()))
    size = torch.tensor(sizes, dtype=dtype)
    ga = ViewGeometry.from_crops(
        torch.tensor(boxes_a, dtype=torch.float64).to(dtype), torch.tensor(flips_a), size, vflips=torch.tensor(vflips_a)
    )
    gb = ViewGeometry.from_crops(
        torch.tensor(boxes_b, dtype=torch.float64).to(dtype), torch.tensor(flips_b), size, vflips=torch.tensor(vflips_b)
    )
    return ga, gb


seeds = st.integers(0, 2**31 - 1)
grid_sizes = st.tuples(st.integers(1, 9), st.integers(1, 9))


# ---------------------------------------------------------------------------------------------- helpers
def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _rows(g: ViewGeometry) -> list[tuple[float, float, float, float, bool, float, float, bool]]:
    """Per view, in float64 Python numbers: x0, y0, x1, y1 (px), flip, W, H, vflip."""
    out = []
    for box, flip, size, vflip in zip(
        g.boxes.double().tolist(), g.flips.tolist(), g.image_size.double().tolist(), g.vflips.tolist()
    ):
        out.append((*box, bool(flip), *size, bool(vflip)))
    return out


def _min_extent(g: ViewGeometry) -> float:
    """Smallest normalized box side in the batch: how much to_view amplifies absolute rounding errors."""
    nb = g.normalized_boxes.double()
    return float(torch.minimum(nb[:, 2] - nb[:, 0], nb[:, 3] - nb[:, 1]).min())


def _naive_to_image(row: tuple, u: float, v: float) -> tuple[float, float]:
    x0, y0, x1, y1, flip, w, h, vflip = row
    uu = 1.0 - u if flip else u
    vv = 1.0 - v if vflip else v
    return (x0 + uu * (x1 - x0)) / w, (y0 + vv * (y1 - y0)) / h


# ---------------------------------------------------------------------------------------------- affine maps
@given(g=geometries(), seed=seeds, n=st.integers(1, 20))
def test_round_trip_image_view_image(g: ViewGeometry, seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    eps = _eps(g.dtype)
    q = (torch.rand(len(g), n, 2, generator=gen, dtype=torch.float64) * 2 - 0.5).to(g.dtype)  # view space
    back = g.to_view(g.to_image(q))
    tol = 16 * eps / _min_extent(g)  # to_view divides by the box extent
    torch.testing.assert_close(back, q, atol=tol, rtol=0)

    p = torch.rand(len(g), n, 2, generator=gen, dtype=torch.float64).to(g.dtype)  # image space
    torch.testing.assert_close(g.to_image(g.to_view(p)), p, atol=16 * eps, rtol=0)


@given(g=geometries())
def test_affine_times_inverse_is_identity(g: ViewGeometry) -> None:
    def homogeneous(a: torch.Tensor) -> torch.Tensor:
        last = torch.tensor([0.0, 0.0, 1.0], dtype=a.dtype).expand(a.shape[0], 1, 3)
        return torch.cat([a, last], dim=1)

    eye = torch.eye(3, dtype=g.dtype).expand(len(g), 3, 3)
    a, ainv = homogeneous(g.affine), homogeneous(g.inverse_affine)
    eps = _eps(g.dtype)
    torch.testing.assert_close(a @ ainv, eye, atol=8 * eps, rtol=0)
    torch.testing.assert_close(ainv @ a, eye, atol=8 * eps / _min_extent(g), rtol=0)
    assert g.affine.shape == g.inverse_affine.shape == (len(g), 2, 3)


@given(g=geometries(), seed=seeds, n=st.integers(1, 10))
def test_affine_by_hand_equals_to_image_and_naive_map(g: ViewGeometry, seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(len(g), n, 2, generator=gen, dtype=torch.float64).to(g.dtype)
    out = g.to_image(q)
    a = g.affine.double().tolist()
    rows = _rows(g)
    tol = 8 * _eps(g.dtype)
    for b in range(len(g)):
        for k in range(n):
            u, v = q[b, k].double().tolist()
            by_hand = (a[b][0][0] * u + a[b][0][1] * v + a[b][0][2], a[b][1][0] * u + a[b][1][1] * v + a[b][1][2])
            naive = _naive_to_image(rows[b], u, v)
            for axis in range(2):
                assert abs(float(out[b, k, axis]) - by_hand[axis]) <= tol
                assert abs(float(out[b, k, axis]) - naive[axis]) <= tol


# ---------------------------------------------------------------------------------------------- grid
@given(g=geometries(), hw=grid_sizes)
def test_grid_matches_double_loop_and_lies_strictly_inside_the_box(g: ViewGeometry, hw: tuple[int, int]) -> None:
    h, w = hw
    grid = g.grid(h, w)
    assert grid.shape == (len(g), h * w, 2)
    assert grid.dtype == g.dtype
    tol = 8 * _eps(g.dtype)
    for b, (x0, y0, x1, y1, flip, big_w, big_h, vflip) in enumerate(_rows(g)):
        for i in range(h):
            for j in range(w):
                jj = w - 1 - j if flip else j
                ii = h - 1 - i if vflip else i
                x_px = x0 + (jj + 0.5) * (x1 - x0) / w
                y_px = y0 + (ii + 0.5) * (y1 - y0) / h
                gx, gy = grid[b, i * w + j].double().tolist()
                assert abs(gx - x_px / big_w) <= tol
                assert abs(gy - y_px / big_h) <= tol
                # strictly inside the crop box, in pixels
                assert x0 < gx * big_w < x1
                assert y0 < gy * big_h < y1


@given(g=geometries(), hw=grid_sizes)
def test_view_grid_is_the_half_cell_lattice(g: ViewGeometry, hw: tuple[int, int]) -> None:
    h, w = hw
    vg = ViewGeometry.view_grid(h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            assert vg[i * w + j].tolist() == pytest.approx([(j + 0.5) / w, (i + 0.5) / h], abs=1e-15)
    # grid() is to_image of the view grid
    torch.testing.assert_close(g.grid(h, w), g.to_image(vg.to(g.dtype).expand(len(g), -1, -1)), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- flips
def _flipped(g: ViewGeometry) -> ViewGeometry:
    """The same views with the horizontal flip toggled (the vertical flip kept)."""
    return ViewGeometry.from_crops(g.boxes, ~g.flips, g.image_size, vflips=g.vflips)


def _vflipped(g: ViewGeometry) -> ViewGeometry:
    """The same views with the vertical flip toggled (the horizontal flip kept)."""
    return ViewGeometry.from_crops(g.boxes, g.flips, g.image_size, vflips=~g.vflips)


@given(g=geometries(), seed=seeds, hw=grid_sizes)
def test_flip_is_an_involution_and_mirrors_view_space(g: ViewGeometry, seed: int, hw: tuple[int, int]) -> None:
    f = _flipped(g)
    ff = _flipped(f)
    assert torch.equal(ff.affine, g.affine)
    assert torch.equal(ff.inverse_affine, g.inverse_affine)
    assert torch.equal(ff.grid(*hw), g.grid(*hw))
    assert not torch.equal(f.flips, g.flips)

    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(len(g), 7, 2, generator=gen, dtype=torch.float64).to(g.dtype)
    mirrored = torch.stack([1 - q[..., 0], q[..., 1]], dim=-1)
    torch.testing.assert_close(f.to_image(q), g.to_image(mirrored), atol=8 * _eps(g.dtype), rtol=0)


@given(g=geometries(), hw=grid_sizes)
def test_flip_mirrors_grid_columns(g: ViewGeometry, hw: tuple[int, int]) -> None:
    h, w = hw
    grid = g.grid(h, w).reshape(len(g), h, w, 2)
    grid_f = _flipped(g).grid(h, w).reshape(len(g), h, w, 2)
    torch.testing.assert_close(grid_f, grid.flip(2), atol=8 * _eps(g.dtype), rtol=0)


@given(g=geometries(), seed=seeds, hw=grid_sizes)
def test_vertical_flip_is_an_involution_and_mirrors_view_space(g: ViewGeometry, seed: int, hw: tuple[int, int]) -> None:
    f = _vflipped(g)
    ff = _vflipped(f)
    assert torch.equal(ff.affine, g.affine)
    assert torch.equal(ff.inverse_affine, g.inverse_affine)
    assert torch.equal(ff.grid(*hw), g.grid(*hw))
    assert not torch.equal(f.vflips, g.vflips) and torch.equal(f.flips, g.flips)
    assert ((f.affine[:, 1, 1] < 0) == f.vflips).all() and ((f.affine[:, 0, 0] < 0) == f.flips).all()

    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(len(g), 7, 2, generator=gen, dtype=torch.float64).to(g.dtype)
    mirrored = torch.stack([q[..., 0], 1 - q[..., 1]], dim=-1)
    torch.testing.assert_close(f.to_image(q), g.to_image(mirrored), atol=8 * _eps(g.dtype), rtol=0)


@given(g=geometries(), hw=grid_sizes)
def test_vertical_flip_mirrors_grid_rows_and_both_flips_rotate_it(g: ViewGeometry, hw: tuple[int, int]) -> None:
    h, w = hw
    tol = 8 * _eps(g.dtype)
    grid = g.grid(h, w).reshape(len(g), h, w, 2)
    grid_v = _vflipped(g).grid(h, w).reshape(len(g), h, w, 2)
    torch.testing.assert_close(grid_v, grid.flip(1), atol=tol, rtol=0)
    both = _flipped(_vflipped(g))
    torch.testing.assert_close(both.grid(h, w).reshape(len(g), h, w, 2), grid.flip(1, 2), atol=tol, rtol=0)
    # the two flips commute: toggling them in either order gives the same geometry
    assert torch.equal(_vflipped(_flipped(g)).affine, both.affine)


@given(g=geometries(), hw=grid_sizes)
def test_cell_image_points_land_in_the_brute_force_cell(g: ViewGeometry, hw: tuple[int, int]) -> None:
    """Each cell's image point is the center of the pixel rectangle that a brute-force scan assigns to that cell.

    The scan makes the view the slow way: split the crop box into ``h x w`` rectangles in image order, then
    reverse the column order for a horizontal flip and the row order for a vertical one (what the flips do to
    the tensor). In units of each rectangle's own size (the Chebyshev distance ``d``), a point is inside a
    rectangle iff ``d <= 1/2``: the cell's point must be at ``d ~ 0`` of its own rectangle and ``d >= 1`` of
    every other one (rounding is far below a cell: the smallest cell is 0.05 / 9 px).
    """
    h, w = hw
    grid = g.grid(h, w).double()
    for b, (x0, y0, x1, y1, flip, big_w, big_h, vflip) in enumerate(_rows(g)):
        cw, ch = (x1 - x0) / w, (y1 - y0) / h
        centers = [[(x0 + (c + 0.5) * cw, y0 + (r + 0.5) * ch) for c in range(w)] for r in range(h)]  # image order
        if flip:
            centers = [row[::-1] for row in centers]
        if vflip:
            centers = centers[::-1]
        for i in range(h):
            for j in range(w):
                px, py = grid[b, i * w + j, 0].item() * big_w, grid[b, i * w + j, 1].item() * big_h
                for r in range(h):
                    for c in range(w):
                        d = max(abs(px - centers[r][c][0]) / cw, abs(py - centers[r][c][1]) / ch)
                        assert d < 0.25 if (r, c) == (i, j) else d > 0.75, (b, i, j, r, c, d)


# ---------------------------------------------------------------------------------------------- contains
@given(g=geometries(), seed=seeds)
def test_contains_matches_brute_force_including_borders(g: ViewGeometry, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    nb = g.normalized_boxes  # the box edges, in the geometry's dtype
    inf = torch.tensor(math.inf, dtype=g.dtype)
    ninf = -inf
    pts = []
    for b in range(len(g)):
        x0, y0, x1, y1 = nb[b]
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        just_out = [
            (torch.nextafter(x0, ninf), ym),
            (torch.nextafter(x1, inf), ym),
            (xm, torch.nextafter(y0, ninf)),
            (xm, torch.nextafter(y1, inf)),
        ]
        just_in = [
            (torch.nextafter(x0, inf), ym),
            (torch.nextafter(x1, ninf), ym),
            (xm, torch.nextafter(y0, inf)),
            (xm, torch.nextafter(y1, ninf)),
        ]
        border = [(x0, y0), (x1, y1), (x0, y1), (x1, y0), (x0, ym), (xm, y1)]
        rnd = [tuple(p) for p in (torch.rand(12, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1).to(g.dtype)]
        pts.append(torch.stack([torch.stack(list(p)) for p in border + just_out + just_in + rnd]))
    points = torch.stack(pts)
    got = g.contains(points)
    assert got.shape == points.shape[:2] and got.dtype == torch.bool

    edges = nb.tolist()
    for b in range(len(g)):
        x0, y0, x1, y1 = edges[b]
        for k in range(points.shape[1]):
            x, y = points[b, k].tolist()
            assert bool(got[b, k]) == (x0 <= x <= x1 and y0 <= y <= y1), (b, k, x, y, edges[b])
        assert got[b, :6].all()  # border points: the box is closed
        assert not got[b, 6:10].any()  # one ulp outside
        assert got[b, 10:14].all()  # one ulp inside

    # away from the edges the answer agrees with a test in pixels, in float64
    rows = _rows(g)
    for b in range(len(g)):
        x0, y0, x1, y1, _, big_w, big_h, _ = rows[b]
        for k in range(14, points.shape[1]):
            x, y = (points[b, k].double() * torch.tensor([big_w, big_h], dtype=torch.float64)).tolist()
            margin = min(abs(x - x0), abs(x - x1), abs(y - y0), abs(y - y1))
            if margin > 1e-3:
                assert bool(got[b, k]) == (x0 <= x <= x1 and y0 <= y <= y1)


# ---------------------------------------------------------------------------------------------- to_cells, cell_size
@given(g=geometries(), hw=grid_sizes)
def test_to_cells_of_own_grid_gives_integer_cell_indices(g: ViewGeometry, hw: tuple[int, int]) -> None:
    h, w = hw
    cells = g.to_cells(g.grid(h, w), h, w)
    assert cells.shape == (len(g), h * w, 2)
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    expected = torch.stack([jj.reshape(-1), ii.reshape(-1)], dim=-1).to(g.dtype).expand_as(cells)  # (u, v) = (j, i)
    tol = 32 * _eps(g.dtype) * max(h, w) / _min_extent(g)
    torch.testing.assert_close(cells, expected, atol=tol, rtol=0)


@given(g=geometries(), seed=seeds, hw=grid_sizes)
def test_to_cells_matches_naive_formula(g: ViewGeometry, seed: int, hw: tuple[int, int]) -> None:
    h, w = hw
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(len(g), 5, 2, generator=gen, dtype=torch.float64).to(g.dtype)
    cells = g.to_cells(p, h, w).double()
    tol = 32 * _eps(g.dtype) * max(h, w) / _min_extent(g)
    for b, (x0, y0, x1, y1, flip, big_w, big_h, vflip) in enumerate(_rows(g)):
        for k in range(5):
            x_px, y_px = p[b, k, 0].item() * big_w, p[b, k, 1].item() * big_h
            u = (x_px - x0) / (x1 - x0) * w - 0.5
            if flip:
                u = (w - 1) - u
            v = (y_px - y0) / (y1 - y0) * h - 0.5
            if vflip:
                v = (h - 1) - v
            assert abs(cells[b, k, 0].item() - u) <= tol * (1 + abs(u))
            assert abs(cells[b, k, 1].item() - v) <= tol * (1 + abs(v))


@given(g=geometries(), hw=grid_sizes)
def test_cell_size_is_box_size_over_grid_size(g: ViewGeometry, hw: tuple[int, int]) -> None:
    h, w = hw
    cs = g.cell_size(h, w)
    assert cs.shape == (len(g), 2)
    assert (cs > 0).all()
    for b, (x0, y0, x1, y1, _, big_w, big_h, _) in enumerate(_rows(g)):
        assert cs[b, 0].item() == pytest.approx((x1 - x0) / big_w / w, rel=16 * _eps(g.dtype) / _min_extent(g))
        assert cs[b, 1].item() == pytest.approx((y1 - y0) / big_h / h, rel=16 * _eps(g.dtype) / _min_extent(g))
    # flips do not change it
    assert torch.equal(_flipped(g).cell_size(h, w), cs)
    assert torch.equal(_vflipped(g).cell_size(h, w), cs)


# ---------------------------------------------------------------------------------------------- overlap
@given(pair=geometry_pairs())
def test_overlap_matches_brute_force(pair: tuple[ViewGeometry, ViewGeometry]) -> None:
    a, b = pair
    box, area = a.overlap(b)
    box_ba, area_ba = b.overlap(a)
    assert box.shape == (len(a), 4) and area.shape == (len(a),)
    assert torch.equal(box, box_ba) and torch.equal(area, area_ba)  # symmetric
    assert (box[:, 0] <= box[:, 2]).all() and (box[:, 1] <= box[:, 3]).all()  # never inverted
    assert (area >= 0).all()
    na, nb = a.normalized_boxes, b.normalized_boxes
    # where the closed boxes intersect (touching included), the result lies in both; disjoint boxes have no common
    # point, so there only the degenerate (zero-area) box is required
    meet = (na[:, 0] <= nb[:, 2]) & (nb[:, 0] <= na[:, 2]) & (na[:, 1] <= nb[:, 3]) & (nb[:, 1] <= na[:, 3])
    for k in range(4):
        for n in (na, nb):
            assert (box[meet, k] >= n[meet, 0 if k % 2 == 0 else 1]).all()
            assert (box[meet, k] <= n[meet, 2 if k % 2 == 0 else 3]).all()
    assert (area[~meet] == 0).all()

    tol = 8 * _eps(a.dtype)
    for i, (ra, rb) in enumerate(zip(_rows(a), _rows(b))):
        big_w, big_h = ra[5], ra[6]
        # 1-D interval intersection, in pixels
        lx, hx = max(ra[0], rb[0]), min(ra[2], rb[2])
        ly, hy = max(ra[1], rb[1]), min(ra[3], rb[3])
        ex, ey = max(hx - lx, 0.0), max(hy - ly, 0.0)
        expected_area = ex * ey / (big_w * big_h)
        assert area[i].item() == pytest.approx(expected_area, abs=4 * tol)
        if ex == 0.0 or ey == 0.0:  # disjoint or touching
            assert area[i].item() == 0.0
        else:
            assert box[i].tolist() == pytest.approx([lx / big_w, ly / big_h, hx / big_w, hy / big_h], abs=tol)


@given(g=geometries())
def test_overlap_with_itself_is_its_own_box(g: ViewGeometry) -> None:
    box, area = g.overlap(_flipped(g))
    assert torch.equal(box, g.normalized_boxes)
    assert torch.equal(g.overlap(_vflipped(_flipped(g)))[0], box)  # flips never change the box
    nb = g.normalized_boxes
    torch.testing.assert_close(area, (nb[:, 2] - nb[:, 0]) * (nb[:, 3] - nb[:, 1]))


def test_overlap_rejects_mismatched_batches() -> None:
    size = torch.tensor([10.0, 10.0])
    a = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 2), None, size)
    b = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), None, size)
    c = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 2), None, torch.tensor([20.0, 10.0]))
    with pytest.raises(ValueError, match="other"):
        a.overlap(b)
    with pytest.raises(ValueError, match="image_size"):
        a.overlap(c)


# ---------------------------------------------------------------------------------------------- batch handling
@given(g=geometries(), data=st.data())
def test_indexing_slicing_cat_len_to(g: ViewGeometry, data: st.DataObject) -> None:
    n = len(g)
    assert n == g.boxes.shape[0] == g.flips.shape[0] == g.image_size.shape[0] == g.vflips.shape[0]
    i = data.draw(st.integers(-n, n - 1))
    one = g[i]
    assert len(one) == 1 and one.boxes.shape == (1, 4) and one.flips.shape == (1,) and one.image_size.shape == (1, 2)
    k = i % n
    assert torch.equal(one.boxes, g.boxes[k : k + 1]) and torch.equal(one.flips, g.flips[k : k + 1])
    assert torch.equal(one.vflips, g.vflips[k : k + 1])
    assert torch.equal(one.grid(3, 2), g.grid(3, 2)[k : k + 1])
    with pytest.raises(IndexError):
        g[n]
    with pytest.raises(IndexError):
        g[-n - 1]

    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    part = g[start:stop]
    assert len(part) == stop - start
    assert torch.equal(part.affine, g.affine[start:stop])
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    assert torch.equal(g[mask].boxes, g.boxes[mask]) and torch.equal(g[mask].vflips, g.vflips[mask])
    order = data.draw(st.permutations(list(range(n))))
    assert torch.equal(g[order].image_size, g.image_size[order]) and torch.equal(g[order].vflips, g.vflips[order])

    pieces = [g[j] for j in range(n)]
    whole = ViewGeometry.cat(pieces)
    assert len(whole) == n
    assert torch.equal(whole.boxes, g.boxes) and torch.equal(whole.flips, g.flips)
    assert torch.equal(whole.vflips, g.vflips)
    assert torch.equal(whole.image_size, g.image_size)
    assert len(ViewGeometry.cat([g, g])) == 2 * n
    with pytest.raises(ValueError, match="geometries"):
        ViewGeometry.cat([])

    g64 = g.to(torch.float64)
    assert g64.dtype == g64.boxes.dtype == g64.image_size.dtype == torch.float64
    assert g64.flips.dtype == torch.bool and torch.equal(g64.flips, g.flips)
    assert g64.vflips.dtype == torch.bool and torch.equal(g64.vflips, g.vflips)
    assert g64.affine.dtype == torch.float64
    torch.testing.assert_close(g64.grid(2, 3).to(g.dtype), g.grid(2, 3), atol=8 * _eps(g.dtype), rtol=0)
    assert g.to("cpu").device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------- validation
def _valid() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 8.0], [2.0, 3.0, 20.0, 9.0]])
    return boxes, torch.tensor([False, True]), torch.tensor([[20.0, 10.0], [30.0, 12.0]])


@pytest.mark.parametrize(
    ("boxes", "flips", "size", "name"),
    [
        (torch.zeros(4), None, None, "boxes"),
        (torch.zeros(2, 3), None, None, "boxes"),
        (torch.zeros(2, 4, 1), None, None, "boxes"),
        (None, torch.tensor([True, False, True]), None, "flips"),
        (None, torch.tensor([[True], [False]]), None, "flips"),
        (None, None, torch.tensor([20.0, 10.0, 3.0]), "image_size"),
        (None, None, torch.tensor([[20.0, 10.0, 1.0], [30.0, 12.0, 1.0]]), "image_size"),
        (None, None, torch.tensor([[20.0, 10.0]] * 3), "image_size"),
        (torch.tensor([[5.0, 0.0, 5.0, 8.0], [2.0, 3.0, 20.0, 9.0]]), None, None, "boxes"),  # x1 == x0
        (torch.tensor([[6.0, 0.0, 5.0, 8.0], [2.0, 3.0, 20.0, 9.0]]), None, None, "boxes"),  # x1 < x0
        (torch.tensor([[0.0, 0.0, 10.0, 8.0], [2.0, 9.0, 20.0, 9.0]]), None, None, "boxes"),  # y1 == y0
        (torch.tensor([[0.0, 4.0, 10.0, 3.0], [2.0, 3.0, 20.0, 9.0]]), None, None, "boxes"),  # y1 < y0
        (torch.tensor([[0.0, 0.0, 20.5, 8.0], [2.0, 3.0, 20.0, 9.0]]), None, None, "boxes"),  # x1 > W
        (torch.tensor([[-0.5, 0.0, 10.0, 8.0], [2.0, 3.0, 20.0, 9.0]]), None, None, "boxes"),  # x0 < 0
        (torch.tensor([[0.0, -0.5, 10.0, 8.0], [2.0, 3.0, 20.0, 9.0]]), None, None, "boxes"),  # y0 < 0
        (torch.tensor([[0.0, 0.0, 10.0, 8.0], [2.0, 3.0, 20.0, 12.5]]), None, None, "boxes"),  # y1 > H
        (torch.tensor([[math.nan, 0.0, 10.0, 8.0], [2.0, 3.0, 20.0, 9.0]]), None, None, "boxes"),
        (torch.tensor([[0.0, 0.0, math.inf, 8.0], [2.0, 3.0, 20.0, 9.0]]), None, None, "boxes"),
        (None, None, torch.tensor([[20.0, math.nan], [30.0, 12.0]]), "image_size"),
        (None, None, torch.tensor([[-20.0, 10.0], [30.0, 12.0]]), "image_size"),
        (None, None, torch.tensor([[20.0, 10.0], [30.0, 0.0]]), "image_size"),
    ],
)
def test_from_crops_rejects_bad_input_naming_the_argument(
    boxes: torch.Tensor | None, flips: torch.Tensor | None, size: torch.Tensor | None, name: str
) -> None:
    b0, f0, s0 = _valid()
    with pytest.raises(ValueError, match=name):
        ViewGeometry.from_crops(
            b0 if boxes is None else boxes, f0 if flips is None else flips, s0 if size is None else size
        )


def test_from_crops_accepts_boxes_within_tolerance_and_defaults() -> None:
    boxes, flips, size = _valid()
    g = ViewGeometry.from_crops(torch.tensor([[-0.005, 0.0, 20.005, 10.0], [2.0, 3.0, 20.0, 9.0]]), flips, size)
    assert len(g) == 2
    g = ViewGeometry.from_crops(boxes, None, torch.tensor([30.0, 12.0]))  # (2,) image size broadcasts, no flips
    assert g.image_size.shape == (2, 2) and not g.flips.any()
    with pytest.raises(ValueError, match="image_size"):
        ViewGeometry.from_crops(boxes, flips, None)
    with pytest.raises(ValueError, match="boxes"):  # the tolerance is configurable
        ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 20.5, 8.0]]), None, torch.tensor([20.0, 10.0]), tolerance=0.1)
    assert len(ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 20.5, 8.0]]), None, size[0], tolerance=1.0)) == 1


@pytest.mark.parametrize("keyword", ["flips", "vflips"])
@pytest.mark.parametrize(
    "value",
    [
        0.7,  # issue 11: from_crops(flips=0.7) silently became True
        torch.tensor([0.7, 0.2]),
        [0.7, 0.2],
        torch.tensor([1, 0]),  # ints are refused too, even 0 and 1
        [1, 0],
        torch.tensor([1, 0], dtype=torch.uint8),
        ["yes", "no"],
    ],
)
def test_from_crops_rejects_flips_that_are_not_bools(keyword: str, value: object) -> None:
    boxes, _, size = _valid()
    message = rf"^{keyword} must hold bools \(a torch.bool tensor or Python bools\), but got"
    with pytest.raises(ValueError, match=message):
        ViewGeometry.from_crops(boxes, image_size=size, **{keyword: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("keyword", ["flips", "vflips"])
def test_from_crops_accepts_bool_flips_in_any_container(keyword: str) -> None:
    boxes, _, size = _valid()
    ref = ViewGeometry.from_crops(boxes, image_size=size, **{keyword: torch.tensor([True, False])})
    for value in ([True, False], (True, False), np.array([True, False]), [np.True_, np.False_]):
        g = ViewGeometry.from_crops(boxes, image_size=size, **{keyword: value})
        assert getattr(g, keyword).dtype == torch.bool and torch.equal(getattr(g, keyword), getattr(ref, keyword))
        assert torch.equal(g.affine, ref.affine)
    with pytest.raises(ValueError, match=rf"^{keyword} must have the shape \(B,\) = \(2,\) of boxes, but got \(3,\)$"):
        ViewGeometry.from_crops(boxes, image_size=size, **{keyword: [True, False, True]})
    with pytest.raises(ValueError, match=rf"^{keyword} must have the shape"):
        ViewGeometry.from_crops(boxes, image_size=size, **{keyword: True})  # one bool for B = 2 views


def test_a_geometry_built_without_vflips_has_none() -> None:
    boxes, flips, size = _valid()
    g = ViewGeometry(boxes, flips, size)  # the unvalidated dataclass, as transforms.crop_geometry builds it
    assert g.vflips.dtype == torch.bool and g.vflips.shape == (2,) and not g.vflips.any()
    assert torch.equal(g.affine, ViewGeometry.from_crops(boxes, flips, size).affine)
    assert not ViewGeometry.from_crops(boxes, flips, size).vflips.any()


@pytest.mark.parametrize("method", ["to_image", "to_view", "contains", "to_cells"])
@pytest.mark.parametrize("shape", [(2, 5, 3), (3, 5, 2), (5, 2), (2, 5, 2, 1)])
def test_point_maps_reject_bad_shapes(method: str, shape: tuple[int, ...]) -> None:
    g = ViewGeometry.from_crops(*_valid())
    fn = getattr(g, method)
    args = (3, 4) if method == "to_cells" else ()
    with pytest.raises(ValueError, match="points"):
        fn(torch.zeros(shape), *args)


@pytest.mark.parametrize("hw", [(0, 3), (3, 0), (-1, 2), (1.5, 7), (7, 2.5), (7.0, 7), (7, True), (None, 3)])
def test_grid_sizes_must_be_positive_ints(hw: tuple[object, object]) -> None:
    # issue 11: grid(1.5, 7) returned 14 cells; a non-integer size is now an error naming the argument
    g = ViewGeometry.from_crops(*_valid())
    name = "h" if not (isinstance(hw[0], int) and not isinstance(hw[0], bool) and hw[0] > 0) else "w"
    for call in (
        lambda: g.grid(*hw),
        lambda: g.cell_size(*hw),
        lambda: g.to_cells(torch.zeros(2, 1, 2), *hw),
        lambda: ViewGeometry.view_grid(*hw),
        lambda: in_box_mask(g, g, *hw),
        lambda: in_box_mask(g, g, *hw, rule="pixcon"),
    ):
        with pytest.raises(ValueError, match=rf"^{name} must be an int >= 1 \(feature-map \w+ in cells\), but got "):
            call()


def test_in_box_mask_rejects_unknown_rule() -> None:
    g = ViewGeometry.from_crops(*_valid())
    with pytest.raises(ValueError, match="rule"):
        in_box_mask(g, g, 3, 3, rule="corner")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- in-box masks
@given(pair=geometry_pairs(), hw=grid_sizes)
def test_in_box_center_rule_matches_brute_force(pair: tuple[ViewGeometry, ViewGeometry], hw: tuple[int, int]) -> None:
    query, key = pair
    h, w = hw
    mask = in_box_mask(query, key, h, w)
    assert mask.shape == (len(query), h * w) and mask.dtype == torch.bool
    checked = 0
    for b, (rq, rk) in enumerate(zip(_rows(query), _rows(key))):
        qx0, qy0, qx1, qy1, flip, _, _, vflip = rq
        kx0, ky0, kx1, ky1 = rk[:4]
        for i in range(h):
            for j in range(w):
                jj = w - 1 - j if flip else j
                ii = h - 1 - i if vflip else i
                x = qx0 + (jj + 0.5) * (qx1 - qx0) / w  # cell center, pixels
                y = qy0 + (ii + 0.5) * (qy1 - qy0) / h
                # a center within rounding of the key's edge may land either way: skip those ties
                slack = 64 * _eps(query.dtype) * max(rq[5], rq[6])
                if min(abs(x - kx0), abs(x - kx1), abs(y - ky0), abs(y - ky1)) <= slack:
                    continue
                checked += 1
                assert bool(mask[b, i * w + j]) == (kx0 <= x <= kx1 and ky0 <= y <= ky1), (b, i, j)
    assert checked > 0 or h * w * len(query) <= 4 * 9  # almost never everything is a tie


def _pixcon_naive(rq: tuple, rk: tuple, h: int, w: int, tol: float) -> tuple[list[list[bool]], set[int], set[int]]:
    """The upstream PixCon in-box rule, in exact rational arithmetic.

    Returns the (h, w) mask and the rows / columns whose membership hinges on floor() of a value within ``tol`` of an
    integer (floating point may round it either way).
    """
    qx0, qy0, qx1, qy1 = map(Fraction, rq[:4])
    flip, vflip = rq[4], rq[7]
    kx0, ky0, kx1, ky1 = map(Fraction, rk[:4])
    ix0, iy0, ix1, iy1 = max(qx0, kx0), max(qy0, ky0), min(qx1, kx1), min(qy1, ky1)
    mask = [[False] * w for _ in range(h)]
    if ix1 <= ix0 or iy1 <= iy0:  # no overlap (PixCon re-samples such crops; we return an empty mask)
        return mask, set(), set()
    # intersection box in the query crop's own normalized frame
    clip = [(ix0 - qx0) / (qx1 - qx0), (iy0 - qy0) / (qy1 - qy0), (ix1 - qx0) / (qx1 - qx0), (iy1 - qy0) / (qy1 - qy0)]
    if flip:  # the flip mirrors the box: x1' = 1 - x2, x2' = 1 - x1
        clip[0], clip[2] = 1 - clip[2], 1 - clip[0]
    if vflip:  # a vertical flip mirrors it in y: y1' = 1 - y2, y2' = 1 - y1
        clip[1], clip[3] = 1 - clip[3], 1 - clip[1]
    scaled = [w * clip[0], h * clip[1], w * clip[2], h * clip[3]]
    a = [math.floor(s) for s in scaled]
    for i in range(a[1], a[3]):
        for j in range(a[0], a[2]):
            mask[i][j] = True
    amb_cols = {round(s) - 1 for s in (scaled[0], scaled[2]) if abs(s - round(s)) <= tol}
    amb_rows = {round(s) - 1 for s in (scaled[1], scaled[3]) if abs(s - round(s)) <= tol}
    return mask, amb_rows, amb_cols


@given(pair=geometry_pairs(), hw=grid_sizes)
def test_in_box_pixcon_rule_matches_naive_upstream_rule(
    pair: tuple[ViewGeometry, ViewGeometry], hw: tuple[int, int]
) -> None:
    query, key = pair
    h, w = hw
    mask = in_box_mask(query, key, h, w, rule="pixcon")
    assert mask.shape == (len(query), h * w) and mask.dtype == torch.bool
    tol = 64 * _eps(query.dtype) * max(h, w) / _min_extent(query)
    for b, (rq, rk) in enumerate(zip(_rows(query), _rows(key))):
        expected, amb_rows, amb_cols = _pixcon_naive(rq, rk, h, w, tol)
        for i in range(h):
            for j in range(w):
                if i in amb_rows or j in amb_cols:
                    continue
                assert bool(mask[b, i * w + j]) == expected[i][j], (b, i, j, rq, rk)


def test_pixcon_rule_is_asymmetric_and_empties_for_thin_overlaps() -> None:
    size = torch.tensor([100.0, 100.0])
    query = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 70.0, 70.0]]), None, size)  # 7 cells of 10 px

    # A thin key: x in [34.5, 38] px is [0.493, 0.543] of the query. floor(7 * .) = 3 at both ends, so PixCon's
    # mask is empty, while the column of cell 3 (center 35 px) lies inside the key view.
    thin = ViewGeometry.from_crops(torch.tensor([[34.5, 0.0, 38.0, 70.0]]), None, size)
    center = in_box_mask(query, thin, 7, 7).reshape(7, 7)
    pixcon = in_box_mask(query, thin, 7, 7, rule="pixcon")
    assert not pixcon.any()
    assert center[:, 3].all() and center.sum() == 7

    # Left edge: a key starting at 58.6 px covers 14% of cell 5 (50-60 px). PixCon counts it (floor(5.86) = 5);
    # its center (55 px) is outside the key, so the center rule does not.
    left = ViewGeometry.from_crops(torch.tensor([[58.6, 0.0, 100.0, 70.0]]), None, size)
    assert in_box_mask(query, left, 1, 7, rule="pixcon")[0].tolist() == [False] * 5 + [True, True]
    assert in_box_mask(query, left, 1, 7)[0].tolist() == [False] * 6 + [True]

    # Right edge: a key ending at 19.3 px covers 93% of cell 1 (10-20 px). PixCon drops it (floor(1.93) = 1);
    # the center rule keeps it (center 15 px).
    right = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 19.3, 70.0]]), None, size)
    assert in_box_mask(query, right, 1, 7, rule="pixcon")[0].tolist() == [True] + [False] * 6
    assert in_box_mask(query, right, 1, 7)[0].tolist() == [True, True] + [False] * 5

    # Flipped query: the key is now on the right of the view. The center rule mirrors its columns; the PixCon rule
    # does not (the 93%-covered cell is now at the left end of the mirrored interval [5.07, 7] and counts).
    flipped = ViewGeometry.from_crops(query.boxes, torch.tensor([True]), size)
    assert in_box_mask(flipped, right, 1, 7)[0].tolist() == [False] * 5 + [True, True]
    assert in_box_mask(flipped, right, 1, 7, rule="pixcon")[0].tolist() == [False] * 5 + [True, True]
    assert in_box_mask(query, right, 1, 7, rule="pixcon")[0].flip(0).tolist() != [False] * 5 + [True, True]


@given(pair=geometry_pairs(), hw=grid_sizes)
@settings(max_examples=30)
def test_in_box_masks_are_empty_without_overlap(pair: tuple[ViewGeometry, ViewGeometry], hw: tuple[int, int]) -> None:
    # A zero-area intersection lies on the query's own edge, and grid centers are strictly inside the query box.
    query, key = pair
    _, area = query.overlap(key)
    for rule in ("center", "pixcon"):
        mask = in_box_mask(query, key, *hw, rule=rule)  # type: ignore[arg-type]
        assert not mask[area == 0].any()
        assert (mask.any(dim=1) <= (area > 0)).all()


# ---------------------------------------------------------------------------------------------- flips in the matchers
@given(pair=geometry_pairs(), qs=grid_sizes, ks=grid_sizes)
@settings(max_examples=30)
def test_coordinate_matching_stays_symmetric_with_vertical_and_both_flips(
    pair: tuple[ViewGeometry, ViewGeometry], qs: tuple[int, int], ks: tuple[int, int]
) -> None:
    # geometry_pairs draws both flips per view, so pairs with vertical and with both flips are covered
    query, key = pair
    d12 = coordinate_match(query, key, qs, ks).to_dense(ks[0] * ks[1])
    d21 = coordinate_match(key, query, ks, qs).to_dense(qs[0] * qs[1])
    assert torch.equal(d12, d21.transpose(1, 2))
    # each query cell's correspondence is its own image point, in the key view's (flipped) cells
    m = correspondence_match(query, key, qs, ks)
    torch.testing.assert_close(m.key_points, key.to_cells(query.grid(*qs), *ks), atol=0, rtol=0)


@pytest.mark.parametrize(("hflip", "vflip"), [(False, True), (True, True)])
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (7, 7), (4, 2)])
def test_correspondence_of_a_pure_flip_is_the_mirrored_cell(hflip: bool, vflip: bool, hw: tuple[int, int]) -> None:
    h, w = hw
    size = torch.tensor([120.0, 90.0])
    box = torch.tensor([[10.0, 5.0, 110.0, 80.0]])
    q = ViewGeometry.from_crops(box, None, size)
    k = ViewGeometry.from_crops(box, torch.tensor([hflip]), size, vflips=torch.tensor([vflip]))
    i, j = torch.arange(h * w) // w, torch.arange(h * w) % w
    ii, jj = (h - 1 - i if vflip else i), (w - 1 - j if hflip else j)
    m = correspondence_match(q, k, (h, w), (h, w))
    torch.testing.assert_close(m.key_points[0], torch.stack([jj, ii], -1).float(), atol=1e-4, rtol=0)
    assert bool(m.valid.all())
    fmap = torch.randn(1, 2, h, w)
    flipped = fmap.flip(-2) if vflip else fmap
    flipped = flipped.flip(-1) if hflip else flipped
    torch.testing.assert_close(m.gather(flipped), fmap.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)
    nearest = nearest_coordinate_match(q, k, (h, w), (h, w))
    assert torch.equal(nearest.key_index[0], ii * w + jj)
    # in-box masks see the same views: everything is inside, under both rules
    assert in_box_mask(q, k, h, w).all() and in_box_mask(k, q, h, w, rule="pixcon").all()
