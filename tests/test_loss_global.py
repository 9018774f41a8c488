"""InfoNCE (MoCo v2), BYOLLoss, NegativeCosine against naive float64 references written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from densecontrast.losses.global_losses import BYOLLoss, InfoNCE, NegativeCosine, info_nce


def naive_moco(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Per-sample loss by loops over plain python-level sums (float64)."""
    out = []
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        pos = torch.dot(qi, k[i] / k[i].norm()) / tau
        if queue is None:
            negs = [torch.dot(qi, k[j] / k[j].norm()) / tau for j in range(k.shape[0]) if j != i]
        else:
            negs = [torch.dot(qi, queue[j]) / tau for j in range(queue.shape[0])]
        denom = torch.exp(pos) + sum((torch.exp(x) for x in negs), torch.zeros((), dtype=q.dtype))
        out.append(torch.log(denom) - pos)
    return torch.stack(out)


@pytest.mark.parametrize(("b", "d", "k"), [(1, 3, 4), (5, 8, 20), (6, 4, None), (1, 4, None)])
def test_infonce_matches_naive(b: int, d: int, k: int | None) -> None:
    gen = torch.Generator().manual_seed(b * 10 + d)
    q = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    queue = None if k is None else F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1)
    queue = None if queue is None else queue.requires_grad_()
    loss = InfoNCE(0.2)(q, key, queue)
    ref = naive_moco(q, key, queue, 0.2).mean()
    torch.testing.assert_close(loss, ref)
    inputs = (q, key) if queue is None else (q, key, queue)
    for g, r in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(g, r)
    if b == 1 and k is None:
        assert loss.item() == 0.0


def test_infonce_reductions_and_errors() -> None:
    q, k = torch.randn(4, 6), torch.randn(4, 6)
    per = InfoNCE(reduction="none")(q, k)
    assert per.shape == (4,)
    torch.testing.assert_close(InfoNCE(reduction="sum")(q, k), per.sum())
    torch.testing.assert_close(info_nce(q, k).mean(), InfoNCE()(q, k))
    with pytest.raises(ValueError, match="temperature"):
        InfoNCE(temperature=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCE(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"key must have shape \(4, 6\)"):
        InfoNCE()(q, torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"queue must have shape \(K, 6\)"):
        InfoNCE()(q, k, torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"query must have shape \(B, D\)"):
        InfoNCE()(torch.randn(2, 4, 6), k)


def test_infonce_bf16_autocast_close() -> None:
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(8, 16)
    x, key = torch.randn(6, 8, generator=gen), torch.randn(6, 16, generator=gen)
    queue = F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = InfoNCE()(lin(x), key, queue)
    ref = InfoNCE()(lin(x), key, queue)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)


def naive_cos(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    flat_p, flat_z = p.reshape(-1, p.shape[-1]), z.reshape(-1, z.shape[-1])
    vals = [torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(flat_p, flat_z)]
    return torch.stack(vals).reshape(p.shape[:-1])


@pytest.mark.parametrize("shape", [(4, 8), (1, 5), (2, 7, 3), (1, 1, 4)])
@pytest.mark.parametrize("weighted", [False, True])
def test_byol_and_negcos_match_naive(shape: tuple[int, ...], weighted: bool) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + weighted)
    p = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[:-1], generator=gen, dtype=torch.float64) if weighted else None
    cos = naive_cos(p, z.detach())
    ww = torch.ones(shape[:-1], dtype=torch.float64) if w is None else w
    for crit, per in ((BYOLLoss(), 2 - 2 * cos), (NegativeCosine(), -cos)):
        loss = crit(p, z, w)
        ref = (ww * per).sum() / ww.sum()
        torch.testing.assert_close(loss, ref)
        (g,) = torch.autograd.grad(loss, p)
        (gr,) = torch.autograd.grad(ref, p, retain_graph=True)
        torch.testing.assert_close(g, gr)
    loss = BYOLLoss()(p, z, w)
    loss.backward()
    assert z.grad is None  # stop-gradient on the target


def test_byol_equals_squared_distance_of_normalized() -> None:
    gen = torch.Generator().manual_seed(1)
    p, z = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    ref = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1)
    torch.testing.assert_close(BYOLLoss(reduction="none")(p, z), ref)


def test_masked_dense_and_degenerate() -> None:
    p = torch.randn(2, 3, 4, requires_grad=True)
    z = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    loss = NegativeCosine()(p, z, mask)
    ref = -naive_cos(p.detach().double(), z.double())[mask].mean()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    none = NegativeCosine()(p, z, torch.zeros(2, 3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p))
    # zero vectors: finite, no NaN
    zero = torch.zeros(2, 4, requires_grad=True)
    out = BYOLLoss()(zero, torch.zeros(2, 4))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(zero.grad).all()


def test_cosine_losses_bf16_and_errors() -> None:
    gen = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(8, 8)
    x, z = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = BYOLLoss()(lin(x), z)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, BYOLLoss()(lin(x), z), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="prediction must"):
        BYOLLoss()(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match=r"target must have shape \(3, 5, 8\)"):
        NegativeCosine()(x, torch.randn(3, 5, 7))
    with pytest.raises(ValueError, match=r"weight must have shape \(3, 5\)"):
        NegativeCosine()(x, z, torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        BYOLLoss(reduction="mean_valid")
