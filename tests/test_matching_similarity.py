"""Similarity matcher against full-matrix references written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_matching_helpers import view_pairs

from densecontrast.geometry import ViewGeometry
from densecontrast.matching import SimilarityMatcher, similarity_match


def full_scores(q, k, metric):
    """(B, N, M) float64: cosine similarity, or negative L2 distance."""
    q, k = q.double(), k.double()
    if metric == "cosine":
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2)
    return -torch.cdist(q, k)


def rows(x):
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


@settings(max_examples=30)
@given(
    st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6),
    st.integers(1, 40), st.sampled_from(["cosine", "l2"]), st.sampled_from([torch.float32, torch.float64]),
    st.booleans(), st.integers(0, 2**31 - 1),
)
def test_similarity_match_equals_full_matrix(b, hq, wq, hk, wk, chunk, metric, dtype, as_map, seed):
    gen = torch.Generator().manual_seed(seed)
    c = 5
    qmap = torch.randn(b, c, hq, wq, generator=gen, dtype=dtype)
    kmap = torch.randn(b, c, hk, wk, generator=gen, dtype=dtype)
    q, k = (qmap, kmap) if as_map else (rows(qmap), rows(kmap))
    m = similarity_match(q, k, chunk_size=chunk, metric=metric, layout=None if as_map else "BNC")
    s = full_scores(rows(qmap), rows(kmap), metric)
    best = s.max(-1).values
    chosen = torch.gather(s, 2, m.key_index[..., None])[..., 0]
    torch.testing.assert_close(chosen, best, atol=1e-4, rtol=0)
    if s.shape[-1] > 1:
        top2 = s.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-4
        assert torch.equal(m.key_index[clear], s.argmax(-1)[clear])
    cos = full_scores(rows(qmap), rows(kmap), "cosine")
    torch.testing.assert_close(m.similarity.double(), torch.gather(cos, 2, m.key_index[..., None])[..., 0],
                               atol=1e-5, rtol=0)
    assert m.similarity.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool(m.valid.all()) and m.valid.shape == (b, hq * wq)
    assert m.key_shape == ((hk, wk) if as_map else None)


@settings(max_examples=20)
@given(st.integers(1, 4), st.integers(2, 30), st.integers(2, 30), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_similarity_match_chunking_gives_identical_indices(b, n, m_keys, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, 16, generator=gen)
    k = torch.randn(b, m_keys, 16, generator=gen)
    naive = torch.bmm(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(1, 2)).argmax(-1)
    for metric in ("cosine", "l2"):
        one = similarity_match(q, k, chunk_size=b * n, metric=metric, layout="BNC")
        many = similarity_match(q, k, chunk_size=chunk, metric=metric, layout="BNC")
        assert torch.equal(one.key_index, many.key_index)
        # values may differ in the last ulp (matmul kernels differ by shape); indices only on exact-ulp ties
        torch.testing.assert_close(one.similarity, many.similarity, atol=1e-6, rtol=0)
    assert torch.equal(similarity_match(q, k, chunk_size=chunk, layout="BNC").key_index, naive)


def test_similarity_ties_take_the_first_key():
    k = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]]])  # keys 1, 2, 3 have the same direction
    q = torch.tensor([[[3.0, 0.0], [0.0, -1.0]]])
    for chunk in (1, 2, 10):
        m = similarity_match(q, k, chunk_size=chunk, layout="BNC")
        assert m.key_index.tolist() == [[1, 1]]  # query 1 has cosine 0 with keys 1-3 and -1 with key 0


def test_similarity_identical_views_match_themselves():
    f = torch.randn(3, 32, 5, 7, generator=torch.Generator().manual_seed(1))
    for metric in ("cosine", "l2"):
        m = SimilarityMatcher(chunk_size=8, metric=metric)(f, f)
        assert torch.equal(m.key_index, torch.arange(35).expand(3, -1))
        torch.testing.assert_close(m.similarity, torch.ones(3, 35))


def test_similarity_autocast_bf16_is_float32_and_no_grad():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 4, 4, generator=gen).requires_grad_()
    k = torch.randn(2, 8, 3, 5, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = similarity_match(q.bfloat16(), k.bfloat16())
    assert m.similarity.dtype == torch.float32 and not m.similarity.requires_grad
    assert bool(torch.isfinite(m.similarity).all())
    ref = full_scores(rows(q.detach().bfloat16()), rows(k.bfloat16()), "cosine")
    torch.testing.assert_close(m.similarity.double(), ref.max(-1).values, atol=1e-5, rtol=0)


@settings(max_examples=15)
@given(view_pairs(max_batch=2))
def test_similarity_in_box_from_geometry(pair):
    qg, kg = pair
    b = len(qg)
    f = torch.randn(b, 4, 3, 5)
    m = similarity_match(f, torch.randn(b, 4, 2, 2), query_geometry=qg, key_geometry=kg)
    assert torch.equal(m.in_box, kg.contains(qg.grid(3, 5)))
    m = similarity_match(rows(f), torch.randn(b, 4, 4), query_geometry=qg, key_geometry=kg, query_shape=(3, 5),
                         layout="BNC")
    assert torch.equal(m.in_box, kg.contains(qg.grid(3, 5)))


def test_similarity_bad_input():
    q, k = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3), None, torch.tensor([10.0, 10.0]))
    with pytest.raises(ValueError, match="chunk_size"):
        similarity_match(q, k, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        SimilarityMatcher(chunk_size=-1)
    with pytest.raises(ValueError, match="metric"):
        SimilarityMatcher(metric="dot")
    with pytest.raises(ValueError, match="key_features"):
        similarity_match(q, torch.randn(3, 4, 3, 3))
    with pytest.raises(ValueError, match="key_features"):
        similarity_match(q, torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="query_features"):
        similarity_match(torch.randn(4, 3), k)
    with pytest.raises(ValueError, match="query_geometry"):
        similarity_match(q, k, query_geometry=g, key_geometry=g)
    with pytest.raises(ValueError, match="query_shape"):
        similarity_match(rows(q), rows(k), query_geometry=g[:2], key_geometry=g[:2], layout="BNC")
    with pytest.raises(ValueError, match="query_shape"):
        similarity_match(q, k, query_shape=(9, 1))


def test_similarity_non_finite_queries_are_invalid() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, generator=gen)
    k = torch.randn(2, 6, 4, generator=gen)
    q[0, 1, 2] = float("nan")
    q[1, 3, 0] = float("inf")
    for metric in ("cosine", "l2"):
        m = similarity_match(q, k, chunk_size=3, metric=metric, layout="BNC")
        bad = torch.zeros(2, 5, dtype=torch.bool)
        bad[0, 1] = bad[1, 3] = True
        assert torch.equal(m.valid, ~bad)  # used to be all True, with key_index 0 for the NaN query
        assert bool(m.similarity[bad].isnan().all()) and bool(torch.isfinite(m.similarity[~bad]).all())
        s = full_scores(q, k, metric)
        assert torch.equal(m.key_index[~bad], s.argmax(-1)[~bad])
        assert bool(((m.key_index >= 0) & (m.key_index < 6)).all())


def test_similarity_non_finite_keys_are_never_matched() -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 3, 3, generator=gen)
    k = torch.randn(2, 4, 2, 3, generator=gen)
    k[0, 2, 0, 1] = float("nan")  # key cell 1 of image 0
    k[1] = float("inf")  # every key of image 1
    for metric in ("cosine", "l2"):
        m = similarity_match(q, k, chunk_size=4, metric=metric)
        assert bool(m.valid[0].all()) and not bool(m.valid[1].any())
        assert bool(torch.isfinite(m.similarity[0]).all()) and bool(m.similarity[1].isnan().all())
        s = full_scores(rows(q[:1]), rows(k[:1]), metric)[0]
        s[:, 1] = -float("inf")  # a NaN key used to be every query's match (torch.max propagates NaN)
        assert torch.equal(m.key_index[0], s.argmax(-1))


def test_similarity_rejects_integer_features() -> None:
    f = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"query_features must be a floating-point tensor, but got dtype torch.int64"):
        similarity_match(f.long(), f)
    with pytest.raises(ValueError, match=r"key_features must be a floating-point tensor, but got dtype torch.int32"):
        similarity_match(f, f.int())


def test_similarity_3d_features_need_an_explicit_layout() -> None:
    gen = torch.Generator().manual_seed(5)
    qmap, kmap = torch.randn(2, 8, 4, 4, generator=gen), torch.randn(2, 8, 4, 4, generator=gen)
    flat_q, flat_k = qmap.flatten(2), kmap.flatten(2)  # (2, 8, 16): channels first, as .flatten(2) gives
    with pytest.raises(ValueError, match=r"query_features.*3-D.*layout='BNC'.*layout='BCN'.*\(2, 8, 16\)"):
        similarity_match(flat_q, flat_k)  # used to be read as (B, N, C) = 8 cells of 16 channels
    ref = similarity_match(qmap, kmap)
    for layout, q, k in (("BCN", flat_q, flat_k), ("BNC", rows(qmap), rows(kmap))):
        m = similarity_match(q, k, layout=layout, key_shape=(4, 4))
        assert torch.equal(m.key_index, ref.key_index)
        torch.testing.assert_close(m.similarity, ref.similarity)
    with pytest.raises(ValueError, match="layout"):
        similarity_match(qmap, kmap, layout="BNC")  # maps are (B, C, h, w): no layout to choose
    with pytest.raises(ValueError, match="layout"):
        similarity_match(flat_q, flat_k, layout="NBC")
    assert torch.equal(SimilarityMatcher()(flat_q, flat_k, layout="BCN").key_index, ref.key_index)
