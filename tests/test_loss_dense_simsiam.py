"""DenseSimSiamLoss, region_embeddings and RegionSimLoss against naive float64 loops."""

from __future__ import annotations

import pytest
import torch

from densecontrast.geometry import ViewGeometry
from densecontrast.losses.dense_simsiam import (
    DenseSimSiamLoss,
    RegionSimLoss,
    dense_simsiam_loss,
    region_embeddings,
    region_sim_loss,
)
from densecontrast.matching import location_match, sample_points


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / (a.norm() * b.norm())


def _naive_pixsim(p1, z2, p2, z1, valid) -> torch.Tensor:  # type: ignore[no-untyped-def]
    b, n, _ = p1.shape
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for bi in range(b):
        for i in range(n):
            w = 1.0 if valid is None else float(valid[bi, i])
            if w == 0:
                continue
            d = -0.5 * _cos(p1[bi, i], z2[bi, i].detach()) - 0.5 * _cos(p2[bi, i], z1[bi, i].detach())
            num = num + w * d
            den += w
    return num / max(den, 1e-6)


def _four(b: int, n: int, d: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(b, n, d, dtype=dtype, requires_grad=True) for _ in range(4)]


@pytest.mark.parametrize(("b", "n", "d"), [(2, 9, 8), (1, 4, 3), (3, 5, 16)])
@pytest.mark.parametrize("valid_kind", ["none", "bool", "float"])
def test_pixsim_matches_naive_value_and_grad(b: int, n: int, d: int, valid_kind: str) -> None:
    torch.manual_seed(b * n)
    p1, z2, p2, z1 = _four(b, n, d)
    valid = {"none": None, "bool": torch.rand(b, n) < 0.7, "float": torch.rand(b, n)}[valid_kind]
    loss = DenseSimSiamLoss()(p1, z2, p2, z1, valid=valid)
    loss.backward()
    ins64 = [t.detach().double().requires_grad_() for t in (p1, z2, p2, z1)]
    ref = _naive_pixsim(*ins64, valid)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1.grad.double(), ins64[0].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p2.grad.double(), ins64[2].grad, rtol=1e-4, atol=1e-6)
    assert z1.grad is None and z2.grad is None  # stop-gradient


def test_pixsim_with_location_matcher_points() -> None:
    """Features sampled at the location matcher's points (the intended use)."""
    torch.manual_seed(1)
    size = torch.tensor([100.0, 100.0])
    g1 = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 70.0, 70.0]]), torch.tensor([True]), size)
    g2 = ViewGeometry.from_crops(torch.tensor([[20.0, 30.0, 100.0, 100.0]]), None, size)
    m = location_match(g1, g2, num_points=9, query_shape=(4, 4), key_shape=(5, 5))
    maps = [torch.randn(1, 6, 4, 4), torch.randn(1, 6, 5, 5), torch.randn(1, 6, 5, 5), torch.randn(1, 6, 4, 4)]
    p1, z1 = (sample_points(t, m.query_points) for t in (maps[0], maps[3]))
    p2, z2 = (sample_points(t, m.key_points) for t in (maps[2], maps[1]))
    loss = dense_simsiam_loss(p1, z2, p2, z1, valid=m.valid)
    torch.testing.assert_close(loss.double(), _naive_pixsim(p1, z2, p2, z1, m.valid), rtol=1e-5, atol=1e-6)


def test_pixsim_gradcheck_float64() -> None:
    torch.manual_seed(2)
    p1, z2, p2, z1 = (t.detach() for t in _four(2, 3, 4, torch.float64))
    valid = torch.tensor([[True, False, True], [True, True, False]])
    p1.requires_grad_()
    p2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: dense_simsiam_loss(a, z2, c, z1, valid), (p1, p2))


def test_pixsim_degenerate() -> None:
    p1, z2, p2, z1 = _four(2, 4, 3)
    loss = dense_simsiam_loss(p1, z2, p2, z1, valid=torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(p1.grad).all() and (p1.grad == 0).all()
    # identical directions give -1, opposite +1
    z = torch.randn(1, 5, 7)
    torch.testing.assert_close(dense_simsiam_loss(z, 2 * z, z, z), torch.tensor(-1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense_simsiam_loss(-z, z, -z, z), torch.tensor(1.0), atol=1e-6, rtol=0)
    per = DenseSimSiamLoss(reduction="none")(z, z, z, z, valid=torch.tensor([[1, 1, 0, 1, 0]]).bool())
    assert per.shape == (1, 5) and per[0, 2] == 0 and per[0, 0] < -0.99


def test_pixsim_bf16_autocast() -> None:
    torch.manual_seed(3)
    p1, z2, p2, z1 = (t.detach() for t in _four(2, 16, 32))
    ref = dense_simsiam_loss(p1, z2, p2, z1)
    lp = [t.bfloat16().requires_grad_() for t in (p1, z2, p2, z1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense_simsiam_loss(*lp)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=0)
    out.backward()
    assert torch.isfinite(lp[0].grad.float()).all()


# ---------------------------------------------------------------------------------------------
# RegionSim


def test_region_embeddings_matches_loops() -> None:
    torch.manual_seed(4)
    logits, feats = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 6, 4, 5, dtype=torch.float64)
    out = region_embeddings(logits, feats)
    ref = torch.zeros(2, 3, 6, dtype=torch.float64)
    for b in range(2):
        for y in range(4):
            for x in range(5):
                e = torch.exp(logits[b, :, y, x])
                mask = e / e.sum()  # softmax over the K regions at this pixel
                for k in range(3):
                    ref[b, k] += mask[k] * feats[b, :, y, x]  # unnormalized weighted sum
    torch.testing.assert_close(out, ref)
    # masks sum to one per pixel, so the regions sum to the plain feature sum
    torch.testing.assert_close(out.sum(1), feats.sum((2, 3)))
    lg = logits[:1, :, :2, :2].clone().requires_grad_()
    ft = feats[:1, :2, :2, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(region_embeddings, (lg, ft))


def _naive_region(p1, z2, p2, z1, tau: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    b, k, _ = p1.shape
    total = torch.zeros((), dtype=torch.float64)
    for p, z in ((p1, z2), (p2, z1)):
        for bi in range(b):
            for i in range(k):
                logits = torch.stack([_cos(p[bi, i], z[bi, j]) / tau for j in range(k)])
                total = total - 0.5 * (logits[i] - torch.logsumexp(logits, 0)) / (b * k)
    return total


@pytest.mark.parametrize(("b", "k", "d", "tau"), [(2, 4, 8, 0.1), (1, 3, 5, 0.5), (3, 1, 4, 0.2)])
@pytest.mark.parametrize("stop_gradient", [False, True])
def test_region_sim_matches_naive(b: int, k: int, d: int, tau: float, stop_gradient: bool) -> None:
    torch.manual_seed(b + k)
    p1, z2, p2, z1 = _four(b, k, d)
    loss = RegionSimLoss(temperature=tau, stop_gradient=stop_gradient)(p1, z2, p2, z1)
    loss.backward()
    ins64 = [t.detach().double().requires_grad_() for t in (p1, z2, p2, z1)]
    ref = _naive_region(*ins64, tau)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1.grad.double(), ins64[0].grad, rtol=1e-4, atol=1e-6)
    if stop_gradient:
        assert z1.grad is None and z2.grad is None
    else:  # gradient reaches the projections too (as in DenseSiam's released code)
        torch.testing.assert_close(z2.grad.double(), ins64[1].grad, rtol=1e-4, atol=1e-6)


def test_region_sim_gradcheck_and_reductions() -> None:
    torch.manual_seed(5)
    ins = [t.detach().requires_grad_() for t in _four(2, 3, 4, torch.float64)]
    small = tuple(t[:1, :, :3].detach().requires_grad_() for t in ins)
    assert torch.autograd.gradcheck(lambda *t: region_sim_loss(*t, temperature=0.3), small)
    per = region_sim_loss(*ins, reduction="none")
    assert per.shape == (2, 3) and (per > 0).all()
    torch.testing.assert_close(region_sim_loss(*ins, reduction="sum"), per.sum())
    torch.testing.assert_close(region_sim_loss(*ins), per.mean())


def test_region_sim_bf16_autocast() -> None:
    torch.manual_seed(6)
    p1, z2, p2, z1 = (t.detach() for t in _four(2, 8, 32))
    ref = region_sim_loss(p1, z2, p2, z1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = region_sim_loss(p1.bfloat16(), z2.bfloat16(), p2.bfloat16(), z1.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=1e-2)


def test_value_errors() -> None:
    a = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="reduction"):
        DenseSimSiamLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"p1 must have shape \(B, N, D\), but got \(3, 4\)"):
        dense_simsiam_loss(torch.randn(3, 4), a, a, a)
    with pytest.raises(ValueError, match=r"z1 must have the shape \(B, N, D\) = \(2, 4, 8\) of p1, but got \(2, 5"):
        dense_simsiam_loss(a, a, a, torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"valid must have shape \(2, 4\)"):
        dense_simsiam_loss(a, a, a, a, valid=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        RegionSimLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"z2 must have the shape \(B, K, D\)"):
        region_sim_loss(a, torch.randn(2, 3, 8), a, a)
    with pytest.raises(ValueError, match=r"mask_logits must have shape \(B, K, h, w\)"):
        region_embeddings(torch.randn(2, 3, 4), torch.randn(2, 5, 3, 4))
    with pytest.raises(ValueError, match=r"features must have shape \(B, C, h, w\) with \(B, h, w\) = \(2, 3, 4\)"):
        region_embeddings(torch.randn(2, 4, 3, 4), torch.randn(2, 5, 4, 4))
