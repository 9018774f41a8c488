"""Coordinate matchers against brute-force pairwise references written here."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_matching_helpers import grid_shapes, view_pairs

from densecontrast.geometry import ViewGeometry
from densecontrast.matching import (
    CoordinateMatcher,
    NearestCoordinateMatcher,
    coordinate,
    coordinate_match,
    nearest_coordinate_match,
)


def brute_force_positives(qg, kg, qs, ks, threshold):
    """All (i, j) pairs: ||c_q(i) - c_k(j)|| < T * max(diag_q, diag_k), same float ops as documented."""
    cq = qg.grid(*qs)
    ck = kg.grid(*ks)
    d = cq[:, :, None, :] - ck[:, None, :, :]
    dist = torch.sqrt(d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1])
    diag_q = torch.linalg.vector_norm(qg.cell_size(*qs), dim=-1)
    diag_k = torch.linalg.vector_norm(kg.cell_size(*ks), dim=-1)
    radius = threshold * torch.maximum(diag_q, diag_k)
    return dist < radius[:, None, None], dist, radius


thresholds = st.one_of(st.just(0.7), st.floats(0.05, 3.0))


@settings(max_examples=30)
@given(view_pairs(), grid_shapes, grid_shapes, thresholds)
def test_coordinate_match_equals_brute_force(pair, qs, ks, threshold):
    qg, kg = pair
    m = coordinate_match(qg, kg, qs, ks, threshold)
    dense, _, _ = brute_force_positives(qg, kg, qs, ks, threshold)
    assert torch.equal(m.to_dense(ks[0] * ks[1]), dense)
    assert torch.equal(m.valid, dense.any(-1))
    assert torch.equal(m.key_mask.sum(-1), dense.sum(-1))  # no duplicates
    assert m.key_index.shape[-1] == max(1, int(dense.sum(-1).max()))  # compacted
    assert torch.equal(m.in_box, kg.contains(qg.grid(*qs)))
    assert m.key_shape == ks
    assert int(m.key_index.min()) >= 0 and int(m.key_index.max()) < ks[0] * ks[1]


@settings(max_examples=20)
@given(view_pairs(max_batch=2), st.tuples(st.integers(10, 30), st.integers(10, 30)), grid_shapes)
def test_coordinate_match_large_grids_and_zooms(pair, qs, ks):
    qg, kg = pair
    for a, b, sa, sb in ((qg, kg, qs, ks), (kg, qg, ks, qs)):
        m = coordinate_match(a, b, sa, sb)
        dense, _, _ = brute_force_positives(a, b, sa, sb, 0.7)
        assert torch.equal(m.to_dense(sb[0] * sb[1]), dense)


@settings(max_examples=30)
@given(view_pairs(), grid_shapes, grid_shapes, thresholds)
def test_coordinate_match_is_symmetric(pair, qs, ks, threshold):
    qg, kg = pair
    d12 = coordinate_match(qg, kg, qs, ks, threshold).to_dense(ks[0] * ks[1])
    d21 = coordinate_match(kg, qg, ks, qs, threshold).to_dense(qs[0] * qs[1])
    assert torch.equal(d12, d21.transpose(1, 2))


@settings(max_examples=30)
@given(view_pairs(), grid_shapes, grid_shapes)
def test_coordinate_match_float64_reference_away_from_boundary(pair, qs, ks):
    qg, kg = pair
    m = coordinate_match(qg, kg, qs, ks)
    _, dist, radius = brute_force_positives(qg.to(torch.float64), kg.to(torch.float64), qs, ks, 0.7)
    clear = (dist - radius[:, None, None]).abs() > 1e-5 * radius[:, None, None]
    dense = m.to_dense(ks[0] * ks[1])
    assert torch.equal(dense[clear], (dist < radius[:, None, None])[clear])


# Cost-model settings that force each way of computing the positives (module constants patched).
PATHS = {
    "dense, topk packing": {"_DENSE_PAIRS": 1 << 40, "_TOPK_PAIRS": 1 << 40},
    "dense, nonzero packing": {"_DENSE_PAIRS": 1 << 40, "_TOPK_PAIRS": 0},
    "windows, one group": {"_DENSE_PAIRS": 0, "_WINDOW_SETUP_PAIRS": 0, "_GROUP_PAIRS": 1 << 40},
    "windows, a group per sample, nonzero": {"_DENSE_PAIRS": 0, "_WINDOW_SETUP_PAIRS": 0, "_GROUP_PAIRS": 0,
                                             "_TOPK_PAIRS": 0},
    "windows, tiny chunks": {"_DENSE_PAIRS": 0, "_WINDOW_SETUP_PAIRS": 0, "_GROUP_PAIRS": 0, "_CHUNK_PAIRS": 1},
}


def check_packed(m, dense):
    """The packed form of a dense positive matrix: ascending indices, positives first, 0 in unused slots."""
    count = dense.sum(-1)
    assert torch.equal(m.key_mask, torch.arange(m.key_index.shape[-1]) < count[..., None])
    assert m.key_index.shape[-1] == max(1, int(count.max()) if count.numel() else 1)
    assert not bool(m.key_index[~m.key_mask].any())
    steps = m.key_index.diff(dim=-1)
    assert bool((steps[m.key_mask[..., 1:]] > 0).all())
    assert torch.equal(m.to_dense(dense.shape[-1]), dense)
    assert torch.equal(m.valid, dense.any(-1))


@pytest.mark.parametrize("path", list(PATHS))
@settings(max_examples=15)
@given(pair=view_pairs(max_batch=4), qs=grid_shapes, ks=grid_shapes, threshold=thresholds)
def test_coordinate_match_every_path_equals_brute_force(path, pair, qs, ks, threshold):
    qg, kg = pair
    dense, _, _ = brute_force_positives(qg, kg, qs, ks, threshold)
    with mock.patch.multiple(coordinate, **PATHS[path]):
        m = coordinate_match(qg, kg, qs, ks, threshold)
    check_packed(m, dense)
    assert torch.equal(m.in_box, kg.contains(qg.grid(*qs)))


@pytest.mark.parametrize("path", ["windows, one group", "windows, tiny chunks"])
@settings(max_examples=10)
@given(pair=view_pairs(max_batch=3, kinds=("zoom", "random", "tiny")),
       qs=st.tuples(st.integers(8, 24), st.integers(8, 24)), ks=st.tuples(st.integers(8, 24), st.integers(8, 24)))
def test_coordinate_match_windows_on_large_grids_and_zooms(path, pair, qs, ks):
    qg, kg = pair
    for a, b, sa, sb in ((qg, kg, qs, ks), (kg, qg, ks, qs)):
        dense, _, _ = brute_force_positives(a, b, sa, sb, 0.7)
        with mock.patch.multiple(coordinate, **PATHS[path]):
            check_packed(coordinate_match(a, b, sa, sb), dense)


def test_coordinate_match_default_cost_model_on_a_realistic_batch():
    """Both default paths (dense for a small problem, windows for a large one) on random-resized crops."""
    gen = torch.Generator().manual_seed(0)
    size = torch.tensor([640.0, 480.0])
    wh = torch.rand(8, 2, generator=gen) * 0.8 + 0.2
    lo = torch.rand(8, 2, generator=gen) * (1 - wh)
    boxes = torch.cat([lo, lo + wh], 1) * size.repeat(2)
    qg = ViewGeometry.from_crops(boxes[:4], torch.tensor([True, False, True, False]), size)
    kg = ViewGeometry.from_crops(boxes[4:], torch.tensor([False, False, True, True]), size)
    calls = []
    plan = coordinate._plan
    with mock.patch.object(coordinate, "_plan", lambda *a: calls.append(plan(*a)) or calls[-1]):
        for g in (3, 20):
            dense, _, _ = brute_force_positives(qg, kg, (g, g), (g, g), 0.7)
            check_packed(coordinate_match(qg, kg, (g, g), (g, g)), dense)
    assert len(calls) == 1 and all(window is not None for _, window in calls[0])  # 3 x 3: dense, no plan


@mock.patch.multiple(coordinate, _WINDOW_SETUP_PAIRS=0, _GROUP_PAIRS=5000, _WINDOW_PAIR_COST=1, _CHUNK_PAIRS=1 << 21)
def test_coordinate_match_plan():
    sizes = [[3, 3], [12, 12], [3, 4], [4, 3], [12, 11]]
    groups = coordinate._plan(sizes, 100, 16, 16)
    members = sorted(i for s, _ in groups for i in (range(5)[s] if isinstance(s, slice) else s))
    assert members == list(range(5))
    for samples, window in groups:  # every window covers its samples' own windows
        for i in range(5)[samples] if isinstance(samples, slice) else samples:
            assert window is None or (window[0] >= sizes[i][0] and window[1] >= sizes[i][1])
    assert len(groups) == 2  # the small windows together, the large ones together
    # windows as large as the grid: the whole grid, in chunks of consecutive samples
    assert coordinate._plan([[4, 4]] * 3, 10, 4, 4) == [(slice(0, 3), None)]
    with mock.patch.object(coordinate, "_CHUNK_PAIRS", 20 * 16):
        assert coordinate._plan([[4, 4]] * 3, 10, 4, 4) == [(slice(0, 2), None), (slice(2, 3), None)]


@settings(max_examples=20)
@given(pair=view_pairs(max_batch=3), qs=grid_shapes, ks=grid_shapes, threshold=thresholds, extra=st.integers(0, 3))
def test_coordinate_match_max_positives_fixed_width(pair, qs, ks, threshold, extra):
    qg, kg = pair
    dense, _, _ = brute_force_positives(qg, kg, qs, ks, threshold)
    width = max(1, int(dense.sum(-1).max())) + extra  # may exceed M: empty slots
    m = coordinate_match(qg, kg, qs, ks, threshold, max_positives=width)
    assert m.key_index.shape == (len(qg), qs[0] * qs[1], width)
    padded = coordinate_match(qg, kg, qs, ks, threshold)
    k = padded.key_index.shape[-1]
    assert torch.equal(m.key_index[..., :k], padded.key_index) and torch.equal(m.key_mask[..., :k], padded.key_mask)
    assert not bool(m.key_mask[..., k:].any()) and not bool(m.key_index[..., k:].any())
    assert torch.equal(m.valid, padded.valid) and torch.equal(m.in_box, padded.in_box)


def test_coordinate_match_max_positives_too_small():
    size = torch.tensor([64.0, 64.0])
    g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None, size)
    with pytest.raises(ValueError, match=r"max_positives = 11 must be at least .* 25 queries with more \(up to 12\)"):
        CoordinateMatcher(max_positives=11)(g, g, (7, 7), (14, 14))
    with pytest.raises(ValueError, match="max_positives"):
        coordinate_match(g, g, (7, 7), (7, 7), max_positives=0)


@pytest.mark.parametrize("path", list(PATHS))
def test_coordinate_match_empty_batch(path):
    g = ViewGeometry.from_crops(torch.zeros(0, 4), None, torch.tensor([10.0, 10.0]))
    with mock.patch.multiple(coordinate, **PATHS[path]):
        m = CoordinateMatcher()(g, g, (2, 3), (4, 5))
    assert m.key_index.shape == m.key_mask.shape == (0, 6, 1)
    assert m.valid.shape == m.in_box.shape == m.weight.shape == (0, 6)
    assert m.key_shape == (4, 5) and m.key_index.dtype == torch.long


def test_coordinate_match_identical_square_views_is_identity():
    size = torch.tensor([90.0, 90.0])
    g = ViewGeometry.from_crops(torch.tensor([[10.0, 10.0, 80.0, 80.0], [0.0, 0.0, 90.0, 90.0]]),
                                torch.tensor([False, True]), size)
    m = coordinate_match(g, g, (7, 7), (7, 7))
    assert m.key_index.shape == (2, 49, 1)  # 0.7 * sqrt(2) < 1 cell: only the cell itself
    assert torch.equal(m.key_index[..., 0], torch.arange(49).expand(2, -1))
    assert bool(m.valid.all()) and bool(m.in_box.all())


def test_coordinate_match_disjoint_views_all_invalid():
    size = torch.tensor([100.0, 100.0])
    q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 40.0, 100.0]]), None, size)
    k = ViewGeometry.from_crops(torch.tensor([[60.0, 0.0, 100.0, 100.0]]), torch.tensor([True]), size)
    m = coordinate_match(q, k, (7, 7), (7, 7))
    assert not bool(m.valid.any()) and not bool(m.in_box.any())
    assert m.key_index.shape == (1, 49, 1)


def test_coordinate_matcher_module_and_bad_input():
    size = torch.tensor([100.0, 100.0])
    g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 100.0, 100.0]] * 2), None, size)
    m = CoordinateMatcher(threshold=1.5)(g, g, (3, 4), (5, 2))
    dense, _, _ = brute_force_positives(g, g, (3, 4), (5, 2), 1.5)
    assert torch.equal(m.to_dense(10), dense)
    with pytest.raises(ValueError, match="threshold"):
        CoordinateMatcher(threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        coordinate_match(g, g, (3, 3), (3, 3), threshold=-1.0)
    with pytest.raises(ValueError, match="query_shape"):
        coordinate_match(g, g, (3, 0), (3, 3))
    with pytest.raises(ValueError, match="key_shape"):
        coordinate_match(g, g, (3, 3), (3, 3, 3))
    with pytest.raises(ValueError, match="key_geometry"):
        coordinate_match(g, g[0], (3, 3), (3, 3))


# ---------------------------------------------------------------------- nearest coordinate
@settings(max_examples=30)
@given(view_pairs(), grid_shapes, grid_shapes)
def test_nearest_coordinate_match_equals_brute_force_argmin(pair, qs, ks):
    qg, kg = pair
    m = nearest_coordinate_match(qg, kg, qs, ks)
    q64, k64 = qg.to(torch.float64), kg.to(torch.float64)
    cq, ck = q64.grid(*qs), k64.grid(*ks)
    dist = ((cq[:, :, None, :] - ck[:, None, :, :]) ** 2).sum(-1).sqrt()  # (B, N, M) float64
    best = dist.min(-1).values
    chosen = torch.gather(dist, 2, m.key_index[..., None])[..., 0]
    torch.testing.assert_close(chosen, best, atol=1e-5 * float(ck.abs().max() + 1), rtol=0)
    top2 = dist.topk(min(2, dist.shape[-1]), dim=-1, largest=False).values
    clear = (top2[..., -1] - top2[..., 0]) > 1e-5 if dist.shape[-1] > 1 else torch.ones_like(best, dtype=torch.bool)
    assert torch.equal(m.key_index[clear], dist.argmin(-1)[clear])
    assert torch.equal(m.valid, kg.contains(qg.grid(*qs)))
    assert torch.equal(m.in_box, m.valid)
    # key_points are the exact location of the query's image point in the key grid
    h, w = ks
    view = torch.stack([(m.key_points[..., 0] + 0.5) / w, (m.key_points[..., 1] + 0.5) / h], -1)
    torch.testing.assert_close(kg.to_image(view), qg.grid(*qs))


@settings(max_examples=30)
@given(view_pairs(), grid_shapes, grid_shapes, st.integers(1, 12))
def test_nearest_coordinate_match_topk_keeps_closest(pair, qs, ks, topk):
    qg, kg = pair
    full = nearest_coordinate_match(qg, kg, qs, ks)
    m = nearest_coordinate_match(qg, kg, qs, ks, topk=topk)
    assert torch.equal(m.key_index, full.key_index)
    assert not bool((m.valid & ~full.valid).any())
    assert torch.equal(m.valid.sum(1), full.valid.sum(1).clamp(max=topk))
    # distances (pixels) of kept queries never exceed those of dropped in-box queries
    ck = kg.grid(*ks)
    matched = torch.gather(ck, 1, full.key_index[..., None].expand(-1, -1, 2))
    size = qg.image_size[:, None, :]
    d = (((qg.grid(*qs) - matched) * size) ** 2).sum(-1).sqrt()
    for b in range(len(qg)):
        kept, dropped = d[b][m.valid[b]], d[b][full.valid[b] & ~m.valid[b]]
        if kept.numel() and dropped.numel():
            assert float(kept.max()) <= float(dropped.min()) + 1e-4


def test_nearest_coordinate_identity_and_flip():
    size = torch.tensor([80.0, 60.0])
    g = ViewGeometry.from_crops(torch.tensor([[5.0, 5.0, 75.0, 55.0]]), None, size)
    f = ViewGeometry.from_crops(torch.tensor([[5.0, 5.0, 75.0, 55.0]]), torch.tensor([True]), size)
    m = NearestCoordinateMatcher()(g, g, (3, 5), (3, 5))
    assert torch.equal(m.key_index[0], torch.arange(15))
    m = nearest_coordinate_match(g, f, (3, 5), (3, 5))
    rows, cols = torch.arange(15) // 5, torch.arange(15) % 5
    assert torch.equal(m.key_index[0], rows * 5 + (4 - cols))
    assert bool(m.valid.all())


def test_nearest_coordinate_bad_input():
    g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), None, torch.tensor([10.0, 10.0]))
    with pytest.raises(ValueError, match="topk"):
        NearestCoordinateMatcher(topk=0)
    with pytest.raises(ValueError, match="topk"):
        nearest_coordinate_match(g, g, (2, 2), (2, 2), topk=-3)
    with pytest.raises(ValueError, match="query_shape"):
        nearest_coordinate_match(g, g, (2,), (2, 2))
