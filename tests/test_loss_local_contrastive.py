"""LocalContrastiveLoss against a naive float64 reference with hand-written bilinear interpolation."""

from __future__ import annotations

import math

import pytest
import torch

from densecontrast.geometry import ViewGeometry
from densecontrast.losses.local_contrastive import LocalContrastiveLoss, local_contrastive_loss
from densecontrast.matching import Matches, correspondence_match


def _naive(query: torch.Tensor, key: torch.Tensor, m: Matches, tau: float) -> torch.Tensor:
    """Loops over images and queries; the NLL of the 4 neighbouring key cells is interpolated by hand."""
    b, _, h, w = query.shape
    hk, wk = key.shape[2:]
    qs, ks = query.double().flatten(2), key.double().flatten(2)
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for bi in range(b):
        for i in range(h * w):
            if not m.valid[bi, i]:
                continue
            qi = qs[bi, :, i]
            cos = torch.stack([qi @ ks[bi, :, j] / (qi.norm() * ks[bi, :, j].norm()) for j in range(hk * wk)])
            logits = cos / tau
            nll = -(logits - torch.logsumexp(logits, 0))
            u, v = (float(c) for c in m.key_points[bi, i])
            u, v = min(max(u, 0.0), wk - 1.0), min(max(v, 0.0), hk - 1.0)  # border padding clamps
            u0, v0 = math.floor(u), math.floor(v)
            u1, v1 = min(u0 + 1, wk - 1), min(v0 + 1, hk - 1)
            a, c = u - u0, v - v0

            def at(r: int, col: int, nll: torch.Tensor = nll) -> torch.Tensor:
                return nll[r * wk + col]

            val = (1 - a) * (1 - c) * at(v0, u0) + a * (1 - c) * at(v0, u1) + (1 - a) * c * at(v1, u0) \
                + a * c * at(v1, u1)
            wgt = float(m.weight[bi, i])
            num = num + wgt * val
            den += wgt
    return num / max(den, 1e-6)


def _random_matches(b: int, n: int, hk: int, wk: int, seed: int) -> Matches:
    g = torch.Generator().manual_seed(seed)
    # points mostly inside the grid, some in the half-cell band outside (border clamping)
    pts = torch.rand(b, n, 2, generator=g) * torch.tensor([wk, hk]) - 0.5
    valid = torch.rand(b, n, generator=g) < 0.8
    weight = torch.rand(b, n, generator=g) + 0.25
    return Matches(valid=valid, weight=weight, key_points=pts, key_shape=(hk, wk))


@pytest.mark.parametrize(("b", "d", "hw", "hwk", "tau"), [(2, 8, (3, 3), (3, 4), 0.2), (1, 5, (2, 4), (4, 2), 0.07),
                                                          (3, 4, (2, 2), (2, 3), 1.0)])
def test_matches_naive_value_and_grad(b: int, d: int, hw: tuple[int, int], hwk: tuple[int, int], tau: float) -> None:
    torch.manual_seed(0)
    n = hw[0] * hw[1]
    m = _random_matches(b, n, *hwk, seed=b + d)
    q = torch.randn(b, d, *hw, requires_grad=True)
    k = torch.randn(b, d, *hwk, requires_grad=True)
    loss = LocalContrastiveLoss(temperature=tau)(q, k, m)
    loss.backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = _naive(q64, k64, m, tau)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-4, atol=1e-5)


def test_integer_points_pick_the_discrete_nll() -> None:
    """At a cell center the sample equals -log softmax of that cell exactly (no half-cell shift)."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 6, 2, 2), torch.randn(1, 6, 3, 4)
    cells = torch.tensor([[5, 0, 11, 6]])  # flattened key cells, row-major over 3 x 4
    pts = torch.stack([cells % 4, cells // 4], dim=-1).float()
    m = Matches(valid=torch.ones(1, 4, dtype=torch.bool), weight=torch.ones(1, 4), key_points=pts)
    per = local_contrastive_loss(q, k, m, temperature=0.3, reduction="none")
    qn = torch.nn.functional.normalize(q.flatten(2), dim=1)
    kn = torch.nn.functional.normalize(k.flatten(2), dim=1)
    logp = torch.log_softmax(torch.einsum("bdn,bdm->bnm", qn, kn) / 0.3, dim=-1)
    expected = -logp[0, torch.arange(4), cells[0]]
    torch.testing.assert_close(per[0], expected)


def test_with_correspondence_matcher() -> None:
    """Colour-only view (whole image) as query, a flipped crop as key; reference by the naive loops."""
    torch.manual_seed(2)
    size = torch.tensor([96.0, 96.0])
    full = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 96.0, 96.0]] * 2), None, size)
    crop = ViewGeometry.from_crops(torch.tensor([[10.0, 20.0, 70.0, 80.0], [40.0, 0.0, 96.0, 60.0]]),
                                   torch.tensor([True, False]), size)
    m = correspondence_match(full, crop, (4, 4), (3, 3))
    assert m.valid.any() and not m.valid.all()
    q, k = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 3, 3)
    loss = local_contrastive_loss(q, k, m, temperature=0.15)
    torch.testing.assert_close(loss.double(), _naive(q, k, m, 0.15), rtol=1e-5, atol=1e-5)


def test_gradcheck_float64() -> None:
    torch.manual_seed(3)
    m = _random_matches(2, 4, 2, 3, seed=4)
    q = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: local_contrastive_loss(a, c, m, temperature=0.5), (q, k))


def test_reductions() -> None:
    torch.manual_seed(4)
    m = _random_matches(2, 4, 2, 2, seed=5)
    q, k = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    per = local_contrastive_loss(q, k, m, 0.2, reduction="none")
    assert per.shape == (2, 4) and (per[~m.valid] == 0).all()
    w = m.effective_weight
    torch.testing.assert_close(local_contrastive_loss(q, k, m, 0.2, reduction="sum"), per.sum())
    torch.testing.assert_close(local_contrastive_loss(q, k, m, 0.2), per.sum() / w.sum())


def test_zero_valid_gives_zero_with_grad() -> None:
    m = Matches(valid=torch.zeros(2, 4, dtype=torch.bool), weight=torch.ones(2, 4),
                key_points=torch.full((2, 4, 2), float("nan")))  # invalid points may hold garbage
    q = torch.randn(2, 3, 2, 2, requires_grad=True)
    k = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = LocalContrastiveLoss(0.1)(q, k, m)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and (k.grad == 0).all()


def test_one_valid_query_batch_of_one() -> None:
    torch.manual_seed(5)
    valid = torch.tensor([[False, True, False, False]])
    pts = torch.tensor([[[0.0, 0.0], [0.25, 0.75], [9.0, 9.0], [0.0, 0.0]]])
    m = Matches(valid=valid, weight=torch.ones(1, 4), key_points=pts)
    q, k = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2, requires_grad=True)
    loss = local_contrastive_loss(q, k, m, 0.2)
    torch.testing.assert_close(loss.double(), _naive(q, k, m, 0.2), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(k.grad).all() and k.grad.abs().sum() > 0


def test_bf16_autocast_close_to_float32() -> None:
    torch.manual_seed(6)
    m = _random_matches(2, 16, 4, 4, seed=7)
    q, k = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4)
    ref = local_contrastive_loss(q, k, m, 0.2)
    kb = k.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local_contrastive_loss(q.bfloat16(), kb, m, 0.2)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=1e-2)
    out.backward()
    assert torch.isfinite(kb.grad.float()).all()


def test_value_errors() -> None:
    m = _random_matches(2, 4, 2, 2, seed=8)
    q, k = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    with pytest.raises(TypeError):
        LocalContrastiveLoss()  # type: ignore[call-arg]  # temperature is required
    for bad in (0.0, -0.1, float("inf"), "x"):
        with pytest.raises(ValueError, match="temperature"):
            LocalContrastiveLoss(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        LocalContrastiveLoss(0.1, reduction="avg")
    with pytest.raises(ValueError, match=r"query must have shape \(B, D, h, w\), but got \(3, 4\)"):
        local_contrastive_loss(torch.randn(3, 4), k, m, 0.1)
    with pytest.raises(ValueError, match=r"key must have shape \(B, D, h_k, w_k\) with \(B, D\) = \(2, 3\)"):
        local_contrastive_loss(q, torch.randn(1, 3, 2, 2), m, 0.1)
    with pytest.raises(ValueError, match=r"matches must have B x N = 2 x 9"):
        local_contrastive_loss(torch.randn(2, 3, 3, 3), k, m, 0.1)
    with pytest.raises(ValueError, match="key_points"):
        idx = Matches(valid=m.valid, weight=m.weight, key_index=torch.zeros(2, 4, dtype=torch.long))
        local_contrastive_loss(q, k, idx, 0.1)
    with pytest.raises(ValueError, match=r"matches\.key_shape"):
        local_contrastive_loss(q, k, m.replace(key_shape=(4, 1)), 0.1)
