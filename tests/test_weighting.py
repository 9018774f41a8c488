"""PixCon semantic reweighting against a naive per-image loop of Eq. 7."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_matching_helpers import view_pairs

from densecontrast.geometry import ViewGeometry, in_box_mask
from densecontrast.matching import Matches, similarity_match
from densecontrast.weighting import SemanticReweighting, semantic_reweighting


def naive_eq7(s, in_box, gamma, degenerate="one", eps=1e-6):
    """Loops over images and queries, float64."""
    out = []
    for srow, mrow in zip(s.double().tolist(), in_box.tolist()):
        s_min = min(srow)
        outside = [x for x, m in zip(srow, mrow) if not m]
        den = (max(outside) - s_min) if outside else None
        row = []
        for x, m in zip(srow, mrow):
            if m:
                row.append(1.0)
            elif den is None or den <= eps:
                row.append(1.0 if degenerate == "one" else 0.0)
            else:
                row.append(min(max((x - s_min) / den, 0.0), 1.0) ** gamma)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@st.composite
def similarity_cases(draw):
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(b, n, generator=gen) * 2 - 1
    in_box = torch.rand(b, n, generator=gen) < draw(st.floats(0, 1))
    case = draw(st.sampled_from(["random", "all_in", "all_out", "one_out_min", "out_equal_min", "ties"]))
    for i in range(b):
        if case == "all_in":
            in_box[i] = True
        elif case == "all_out":
            in_box[i] = False
        elif case == "one_out_min":  # single out-of-box query holding the image minimum: 0/0 upstream
            in_box[i] = True
            j = draw(st.integers(0, n - 1))
            in_box[i, j] = False
            s[i, j] = s[i].min() - 0.1
        elif case == "out_equal_min":
            s[i, ~in_box[i]] = s[i].min()
        elif case == "ties":
            s[i] = torch.round(s[i] * 2) / 2
    return s, in_box


@settings(max_examples=40)
@given(similarity_cases(), st.sampled_from([0.0, 1.0, 2.0, 3.0, 0.5]), st.sampled_from(["one", "zero"]))
def test_sr_weights_equal_naive_eq7(case, gamma, degenerate):
    s, in_box = case
    w = semantic_reweighting(s, in_box, gamma=gamma, degenerate=degenerate)
    ref = naive_eq7(s, in_box, gamma, degenerate)
    torch.testing.assert_close(w.double(), ref, atol=1e-6, rtol=1e-5)
    assert w.dtype == torch.float32
    assert bool(torch.isfinite(w).all()) and bool(((w >= 0) & (w <= 1)).all())
    assert bool((w[in_box] == 1).all())


def test_sr_upstream_nan_cases_are_finite():
    s = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.3, 0.3], [0.2, 0.8, 0.5]])
    in_box = torch.tensor([[True, True, False], [False, True, False], [True, True, True]])
    w1 = semantic_reweighting(s, in_box, degenerate="one")
    w0 = semantic_reweighting(s, in_box, degenerate="zero")
    # image 0: the only out-of-box query holds the minimum; image 1: all equal; image 2: none outside
    assert w1.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert w0.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_ablation_modes():
    s = torch.tensor([[0.9, -0.9, 0.5, -0.2]])
    in_box = torch.tensor([[True, False, True, False]])
    torch.testing.assert_close(semantic_reweighting(s, in_box, mode="spatial"), in_box.float())
    torch.testing.assert_close(semantic_reweighting(None, in_box, mode="spatial"), in_box.float())
    sim = semantic_reweighting(s, None, gamma=2.0, mode="similarity")
    torch.testing.assert_close(sim, torch.tensor([[0.81, 0.0, 0.25, 0.0]]))  # negative cosines clamp to 0


@settings(max_examples=20)
@given(similarity_cases(), st.sampled_from(["sr", "similarity"]))
def test_bf16_autocast_is_float32_finite_and_detached(case, mode):
    s, in_box = case
    s16 = s.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = semantic_reweighting(s16 * 1, in_box, mode=mode)
    assert w.dtype == torch.float32 and not w.requires_grad
    assert bool(torch.isfinite(w).all())
    ref = naive_eq7(s16.detach().float(), in_box, 2.0) if mode == "sr" else s16.detach().double().clamp(min=0) ** 2
    torch.testing.assert_close(w.double(), ref, atol=1e-6, rtol=1e-5)


@settings(max_examples=20)
@given(view_pairs(max_batch=3), st.sampled_from(["center", "pixcon"]))
def test_module_uses_geometry_in_box_and_multiplies_weight(pair, rule):
    qg, kg = pair
    b = len(qg)
    gen = torch.Generator().manual_seed(0)
    m = similarity_match(torch.randn(b, 8, 3, 4, generator=gen), torch.randn(b, 8, 3, 3, generator=gen))
    prior = torch.rand(b, 12, generator=gen)
    m = m.with_weight(prior)
    out = SemanticReweighting(gamma=2.0, in_box_rule=rule)(m, qg, kg, (3, 4))
    mask = in_box_mask(qg, kg, 3, 4, rule=rule)
    assert torch.equal(out.in_box, mask)
    expected = prior.double() * naive_eq7(m.similarity, mask, 2.0)
    torch.testing.assert_close(out.weight.double(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.key_index, m.key_index)


def test_module_falls_back_to_matches_in_box():
    s = torch.tensor([[0.1, 0.7, 0.4]])
    m = Matches(valid=torch.ones(1, 3, dtype=torch.bool), weight=torch.ones(1, 3), key_index=torch.zeros(1, 3).long(),
                in_box=torch.tensor([[False, True, False]]), similarity=s)
    out = SemanticReweighting(gamma=1.0)(m)
    torch.testing.assert_close(out.weight, torch.tensor([[0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="in_box"):
        SemanticReweighting()(m.replace(in_box=None))
    with pytest.raises(ValueError, match="similarity"):
        SemanticReweighting()(m.replace(similarity=None))
    out = SemanticReweighting(mode="spatial")(m.replace(similarity=None))
    torch.testing.assert_close(out.weight, torch.tensor([[0.0, 1.0, 0.0]]))


def test_weighting_bad_input():
    s, in_box = torch.rand(2, 5), torch.rand(2, 5) > 0.5
    with pytest.raises(ValueError, match="in_box"):
        semantic_reweighting(s, in_box[:, :4])
    with pytest.raises(ValueError, match="in_box"):
        semantic_reweighting(s, in_box.float())
    with pytest.raises(ValueError, match="similarity"):
        semantic_reweighting(torch.rand(10), torch.rand(10) > 0.5)
    with pytest.raises(ValueError, match="mode"):
        semantic_reweighting(s, in_box, mode="soft")
    with pytest.raises(ValueError, match="degenerate"):
        SemanticReweighting(degenerate="nan")
    with pytest.raises(ValueError, match="gamma"):
        SemanticReweighting(gamma=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        semantic_reweighting(s, in_box, gamma=math.inf)
    with pytest.raises(ValueError, match="in_box_rule"):
        SemanticReweighting(in_box_rule="corner")
    g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2), None, torch.tensor([10.0, 10.0]))
    m = similarity_match(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="query_shape"):
        SemanticReweighting()(m, g, g)
    with pytest.raises(ValueError, match="query_shape"):
        SemanticReweighting()(m, g, g, (3, 3))
    with pytest.raises(ValueError, match="query_geometry"):
        SemanticReweighting()(m, g[0], g[0], (2, 2))


def naive_eq7_finite(s, in_box, gamma, degenerate="one", eps=1e-6):
    """Eq. 7 over the finite similarities of each image only; a non-finite similarity weighs 0."""
    out = torch.zeros(s.shape, dtype=torch.float64)
    for i in range(s.shape[0]):
        keep = torch.isfinite(s[i])
        if keep.any():
            out[i, keep] = naive_eq7(s[i, keep][None], in_box[i, keep][None], gamma, degenerate, eps)[0]
    return out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("degenerate", ["one", "zero"])
def test_sr_non_finite_similarities_weigh_zero_and_leave_the_others_alone(bad: float, degenerate: str) -> None:
    s = torch.tensor([[0.9, bad, 0.2, 0.6, 0.4], [bad, bad, bad, bad, bad], [0.1, 0.5, bad, 0.3, 0.3]])
    in_box = torch.tensor([[True, True, False, False, False], [True, False, True, False, False],
                           [True, False, False, False, True]])
    w = semantic_reweighting(s, in_box, gamma=2.0, degenerate=degenerate)
    # NaN used to make every weight of the image 1.0 (min and max were NaN: a "degenerate" image)
    torch.testing.assert_close(w.double(), naive_eq7_finite(s, in_box, 2.0, degenerate))
    assert bool(torch.isfinite(w).all()) and bool((w[~torch.isfinite(s)] == 0).all())
    ws = semantic_reweighting(s, in_box, gamma=2.0, mode="similarity")
    ref = torch.where(torch.isfinite(s), s.clamp_min(0) ** 2, torch.zeros_like(s))
    torch.testing.assert_close(ws, ref)
    assert torch.equal(semantic_reweighting(s, in_box, mode="spatial"), in_box.float())  # similarity unused


def test_module_marks_non_finite_similarities_invalid() -> None:
    s = torch.tensor([[0.9, math.nan, 0.2, 0.6]])
    m = Matches(valid=torch.ones(1, 4, dtype=torch.bool), weight=torch.ones(1, 4),
                key_index=torch.zeros(1, 4, dtype=torch.long), similarity=s,
                in_box=torch.tensor([[True, True, False, False]]))
    out = SemanticReweighting()(m)
    assert out.valid.tolist() == [[True, False, True, True]]
    assert out.effective_weight[0, 1] == 0 and bool(torch.isfinite(out.weight).all())


def test_no_queries_give_an_empty_result() -> None:
    m = Matches(valid=torch.zeros(2, 0, dtype=torch.bool), weight=torch.ones(2, 0),
                key_index=torch.zeros(2, 0, dtype=torch.long), similarity=torch.zeros(2, 0),
                in_box=torch.zeros(2, 0, dtype=torch.bool))
    for mode in ("sr", "spatial", "similarity"):  # "sr" used to raise from the min over no queries
        for dtype in (torch.float32, torch.float64):
            w = semantic_reweighting(torch.zeros(3, 0, dtype=dtype), torch.zeros(3, 0, dtype=torch.bool), mode=mode)
            assert w.shape == (3, 0) and w.dtype == dtype
        assert SemanticReweighting(mode=mode)(m).weight.shape == (2, 0)
