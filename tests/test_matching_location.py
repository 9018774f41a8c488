"""Location (DenseSiam point sampling) and correspondence (LC-loss) matchers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_matching_helpers import cells_to_image, grid_shapes, view_pairs

from densecontrast.geometry import ViewGeometry
from densecontrast.matching import (
    CorrespondenceMatcher,
    LocationMatcher,
    correspondence_match,
    location_match,
    sample_points,
)


def overlap_box(qg, kg):
    """Intersection box in image space, written out with Python floats per image."""
    out = []
    for b in range(len(qg)):
        qa = (qg.boxes[b] / qg.image_size[b].repeat(2)).tolist()
        ka = (kg.boxes[b] / kg.image_size[b].repeat(2)).tolist()
        out.append([max(qa[0], ka[0]), max(qa[1], ka[1]), min(qa[2], ka[2]), min(qa[3], ka[3])])
    return out


def bilinear(fmap, u, v):
    """Reference bilinear sample of a (D, h, w) map at cell coords (u, v), border-clamped, float64."""
    _, h, w = fmap.shape
    u = min(max(u, 0.0), w - 1.0)
    v = min(max(v, 0.0), h - 1.0)
    j0, i0 = min(math.floor(u), w - 1), min(math.floor(v), h - 1)
    j1, i1 = min(j0 + 1, w - 1), min(i0 + 1, h - 1)
    a, c = u - j0, v - i0
    f = fmap.double()
    return ((1 - a) * (1 - c) * f[:, i0, j0] + a * (1 - c) * f[:, i0, j1]
            + (1 - a) * c * f[:, i1, j0] + a * c * f[:, i1, j1])


def check_points_in_both_views(m, qg, kg, qs, ks):
    pq = cells_to_image(qg, m.query_points, qs)
    pk = cells_to_image(kg, m.key_points, ks)
    torch.testing.assert_close(pq, pk, atol=1e-5, rtol=1e-5)
    box = torch.tensor(overlap_box(qg, kg), dtype=pq.dtype)
    tol = 1e-5
    inside = ((pq >= box[:, None, :2] - tol) & (pq <= box[:, None, 2:] + tol)).all(-1)
    assert bool(inside[m.valid].all())
    area = (box[:, 2] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 1]).clamp(min=0)
    assert torch.equal(m.valid, (area > 0)[:, None].expand_as(m.valid))


@settings(max_examples=30)
@given(view_pairs(), grid_shapes, grid_shapes, st.integers(1, 5), st.sampled_from(["grid", "random"]))
def test_location_points_lie_in_both_views_and_agree(pair, qs, ks, g, sampling):
    qg, kg = pair
    n = g * g
    m = location_match(qg, kg, n, sampling, qs, ks, generator=torch.Generator().manual_seed(0))
    assert m.query_points.shape == m.key_points.shape == (len(qg), n, 2)
    check_points_in_both_views(m, qg, kg, qs, ks)
    assert bool(torch.isfinite(m.query_points).all()) and bool(torch.isfinite(m.key_points).all())
    assert torch.equal(m.in_box, m.valid)


@settings(max_examples=20)
@given(view_pairs(), st.integers(1, 6))
def test_location_grid_is_regular_half_cell_grid_of_overlap(pair, g):
    qg, kg = pair
    m = location_match(qg, kg, g * g, "grid", (4, 4), (4, 4))
    pts = cells_to_image(qg, m.query_points, (4, 4))
    for b, (x0, y0, x1, y1) in enumerate(overlap_box(qg, kg)):
        x1, y1 = max(x1, x0), max(y1, y0)
        ref = [[x0 + (j + 0.5) / g * (x1 - x0), y0 + (i + 0.5) / g * (y1 - y0)] for i in range(g) for j in range(g)]
        torch.testing.assert_close(pts[b], torch.tensor(ref, dtype=pts.dtype), atol=1e-5, rtol=1e-5)


def test_location_disjoint_views_are_invalid_without_error():
    size = torch.tensor([100.0, 100.0])
    q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 50.0, 100.0], [0.0, 0.0, 60.0, 100.0]]), None, size)
    k = ViewGeometry.from_crops(torch.tensor([[50.0, 0.0, 100.0, 100.0], [40.0, 0.0, 100.0, 100.0]]), None, size)
    for sampling in ("grid", "random"):
        m = location_match(q, k, 9, sampling, (7, 7), (7, 7))
        assert m.valid.tolist() == [[False] * 9, [True] * 9]
        assert bool(torch.isfinite(m.key_points).all())
    emb = torch.randn(2, 4, 7, 7)
    m = location_match(q, k, 9, "hard", query_embeddings=emb, key_embeddings=emb)
    assert m.valid.tolist() == [[False] * 9, [True] * 9]


def check_hard_points(m, qg, kg, qe, ke, n, k, beta, seed, qs=(5, 4), ks=(3, 6), tol=1e-4):
    """The first round(beta * n) points are candidates of the replayed draw, the most dissimilar ones.

    Scores are recomputed in float64 with a loop reference. The library scores in float32, so the
    order is only checked up to ``tol``: candidates whose scores tie (exactly, e.g. several points
    clamped onto the same border cells, or within float32 rounding) may come in any order.
    Images without overlap (``valid`` False) only need finite candidate points.
    """
    b = len(qg)
    n_hard = round(beta * n)
    n_cand = max(n_hard, math.ceil(k * n))
    replay = torch.Generator().manual_seed(seed)
    t = torch.rand(b, n_cand, 2, generator=replay, dtype=qg.dtype)
    box = torch.tensor(overlap_box(qg, kg), dtype=qg.dtype)
    lo, hi = box[:, :2], torch.maximum(box[:, 2:], box[:, :2])
    cand = lo[:, None] + t * (hi - lo)[:, None]
    cq, ck = qg.to_cells(cand, *qs), kg.to_cells(cand, *ks)
    got = cells_to_image(qg, m.query_points, qs)[:, :n_hard]
    assert bool(torch.isfinite(m.query_points).all()) and bool(torch.isfinite(m.key_points).all())
    for bi in range(b):
        dist = (got[bi, :, None] - cand[bi, None]).abs().amax(-1)  # (n_hard, n_cand)
        nearest = dist.min(1)
        assert bool((nearest.values <= 1e-5).all()), "a hard point is not one of the candidates"
        if not bool(m.valid[bi].any()):
            continue  # no overlap: the points are meaningless (but finite candidates)
        kept = nearest.indices
        assert len(set(kept.tolist())) == n_hard, "a candidate was kept twice"
        scores = torch.stack([
            F.cosine_similarity(bilinear(qe[bi], *cq[bi, j].tolist()), bilinear(ke[bi], *ck[bi, j].tolist()), dim=0)
            for j in range(n_cand)
        ])
        kept_scores = scores[kept]
        assert bool((kept_scores[:-1] <= kept_scores[1:] + tol).all()), "hard points are not in ascending score"
        dropped = torch.ones(n_cand, dtype=torch.bool)
        dropped[kept] = False
        if n_hard and bool(dropped.any()):
            assert float(kept_scores.max()) <= float(scores[dropped].min()) + tol, "a more dissimilar point was dropped"


# The saved failing example: image 0 has disjoint views; all its candidates clamp onto the same
# border cells, so their scores tie exactly and float32 rounding orders them, not the draw.
_DISJOINT_TIED = (
    ViewGeometry.from_crops(torch.tensor([[6.5625, 0.0, 8.6172, 1.0], [0.0, 0.0, 1.0, 1.0]]),
                            torch.tensor([True, False]), torch.tensor([[16.0, 16.0], [16.0, 16.0]])),
    ViewGeometry.from_crops(torch.tensor([[8.4375, 15.0, 16.0, 16.0], [0.0, 0.0, 1.0, 1.0]]),
                            torch.tensor([False, False]), torch.tensor([[16.0, 16.0], [16.0, 16.0]])),
)


@settings(max_examples=15)
@given(view_pairs(max_batch=2), st.integers(1, 20), st.floats(1, 4), st.floats(0, 1), st.integers(0, 1000))
@example(pair=_DISJOINT_TIED, n=9, k=4.0, beta=1.0, seed=4)
def test_location_hard_sampling_keeps_most_dissimilar(pair, n, k, beta, seed):
    qg, kg = pair
    b = len(qg)
    gen = torch.Generator().manual_seed(seed)
    qe = torch.randn(b, 6, 5, 4, generator=gen)
    ke = torch.randn(b, 6, 3, 6, generator=gen)
    m = location_match(qg, kg, n, "hard", oversample=k, hard_fraction=beta, query_embeddings=qe,
                       key_embeddings=ke, generator=torch.Generator().manual_seed(seed))
    check_points_in_both_views(m, qg, kg, (5, 4), (3, 6))
    check_hard_points(m, qg, kg, qe, ke, n, k, beta, seed)


def test_location_hard_sampling_with_disjoint_views_is_invalid_and_finite() -> None:
    qg, kg = _DISJOINT_TIED
    gen = torch.Generator().manual_seed(4)
    qe, ke = torch.randn(2, 6, 5, 4, generator=gen), torch.randn(2, 6, 3, 6, generator=gen)
    m = location_match(qg, kg, 9, "hard", oversample=4.0, hard_fraction=1.0, query_embeddings=qe,
                       key_embeddings=ke, generator=torch.Generator().manual_seed(4))
    assert m.valid.tolist() == [[False] * 9, [True] * 9]
    check_points_in_both_views(m, qg, kg, (5, 4), (3, 6))
    check_hard_points(m, qg, kg, qe, ke, 9, 4.0, 1.0, 4)


def test_location_uses_sample_points_convention():
    size = torch.tensor([64.0, 64.0])
    q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None, size)
    k = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 64.0]]), torch.tensor([True]), size)
    m = LocationMatcher(num_points=16)(q, k, (4, 4), (4, 4))
    fmap = torch.randn(1, 3, 4, 4)
    mirrored = fmap.flip(-1)
    # a 4x4 grid over the full image hits the cell centers: features equal the mirrored map's cells
    torch.testing.assert_close(m.gather(mirrored), sample_points(fmap, m.query_points))
    torch.testing.assert_close(sample_points(fmap, m.query_points), fmap.flatten(2).transpose(1, 2))


def test_location_bad_input():
    g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), None, torch.tensor([10.0, 10.0]))
    with pytest.raises(ValueError, match="num_points"):
        location_match(g, g, 0, "random", (2, 2), (2, 2))
    with pytest.raises(ValueError, match="num_points"):
        LocationMatcher(num_points=10, sampling="grid")
    with pytest.raises(ValueError, match="sampling"):
        LocationMatcher(sampling="sobol")
    with pytest.raises(ValueError, match="hard_fraction"):
        LocationMatcher(hard_fraction=1.5)
    with pytest.raises(ValueError, match="oversample"):
        LocationMatcher(oversample=0.5)
    with pytest.raises(ValueError, match="query_shape"):
        location_match(g, g, 4)
    with pytest.raises(ValueError, match="embeddings"):
        location_match(g, g, 4, "hard", (2, 2), (2, 2))
    with pytest.raises(ValueError, match="query_embeddings"):
        location_match(g, g, 4, "hard", query_embeddings=torch.randn(2, 3, 2, 2),
                       key_embeddings=torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="key_shape"):
        location_match(g, g, 4, "hard", (2, 2), (3, 3), query_embeddings=torch.randn(1, 3, 2, 2),
                       key_embeddings=torch.randn(1, 3, 2, 2))


# ---------------------------------------------------------------------- correspondence
@settings(max_examples=30)
@given(view_pairs(), grid_shapes, grid_shapes)
def test_correspondence_maps_to_the_same_image_point(pair, qs, ks):
    qg, kg = pair
    m = correspondence_match(qg, kg, qs, ks)
    torch.testing.assert_close(cells_to_image(kg, m.key_points, ks), qg.grid(*qs))
    assert torch.equal(m.in_box, kg.contains(qg.grid(*qs)))
    assert torch.equal(m.valid, m.in_box)
    inner = correspondence_match(qg, kg, qs, ks, border="interior")
    h, w = ks
    u, v = m.key_points[..., 0], m.key_points[..., 1]
    expected = (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    assert torch.equal(inner.valid, expected)
    assert not bool((inner.valid & ~m.in_box).any())  # interior is stricter


@settings(max_examples=30)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(16, 300), st.integers(16, 300))
def test_correspondence_of_a_pure_flip_is_the_mirrored_column(h, w, iw, ih):
    size = torch.tensor([float(iw), float(ih)])
    box = torch.tensor([[0.0, 0.0, float(iw), float(ih)]])
    q = ViewGeometry.from_crops(box, None, size)
    k = ViewGeometry.from_crops(box, torch.tensor([True]), size)
    m = CorrespondenceMatcher()(q, k, (h, w), (h, w))
    i, j = torch.arange(h * w) // w, torch.arange(h * w) % w
    torch.testing.assert_close(m.key_points[0], torch.stack([w - 1 - j, i], -1).float(), atol=1e-4, rtol=0)
    assert bool(m.valid.all())
    fmap = torch.randn(1, 2, h, w)
    torch.testing.assert_close(m.gather(fmap), fmap.flip(-1).flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)


def test_correspondence_bad_input():
    g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), None, torch.tensor([10.0, 10.0]))
    with pytest.raises(ValueError, match="border"):
        CorrespondenceMatcher(border="zeros")
    with pytest.raises(ValueError, match="key_shape"):
        correspondence_match(g, g, (2, 2), (0, 2))
    with pytest.raises(ValueError, match="key_geometry"):
        correspondence_match(g, ViewGeometry.cat([g, g]), (2, 2), (2, 2))


def test_sample_features_matches_a_naive_bilinear_reference() -> None:
    from densecontrast.matching import LocationMatcher

    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    u = torch.rand(2, 7, generator=g, dtype=torch.float64) * 5  # inside [0, w - 1]
    v = torch.rand(2, 7, generator=g, dtype=torch.float64) * 3  # inside [0, h - 1]
    got = LocationMatcher.sample_features(fmap, torch.stack([u, v], -1))
    for b in range(2):
        for n in range(7):
            j0, i0 = int(u[b, n].floor().clamp(max=4)), int(v[b, n].floor().clamp(max=2))
            a, c = float(u[b, n]) - j0, float(v[b, n]) - i0
            want = ((1 - a) * (1 - c) * fmap[b, :, i0, j0] + a * (1 - c) * fmap[b, :, i0, j0 + 1]
                    + (1 - a) * c * fmap[b, :, i0 + 1, j0] + a * c * fmap[b, :, i0 + 1, j0 + 1])
            torch.testing.assert_close(got[b, n], want)
