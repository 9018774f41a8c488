"""PixContrastLoss against a naive float64 loop reference written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from densecontrast.losses.pixcontrast import PixContrastLoss, pix_contrast
from densecontrast.matching import Matches


def naive_pixcontrast(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, tau: float) -> torch.Tensor:
    """-log(sum_pos exp / sum_all exp) per query by loops, weighted mean over queries with positives."""
    b, n, _ = q.shape
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for bi in range(b):
        for i in range(n):
            if not pos[bi, i].any() or w[bi, i] == 0:
                continue
            qi = q[bi, i] / q[bi, i].norm()
            e = torch.stack([torch.exp(torch.dot(qi, kj / kj.norm()) / tau) for kj in k[bi]])
            li = -torch.log(e[pos[bi, i]].sum() / e.sum())
            num = num + w[bi, i] * li
            den += float(w[bi, i])
    return num / max(den, 1e-6)


def random_multi_matches(b: int, n: int, m: int, kk: int, gen: torch.Generator) -> Matches:
    idx = torch.randint(0, m, (b, n, kk), generator=gen)
    mask = torch.rand(b, n, kk, generator=gen) < 0.5
    valid = mask.any(-1) & (torch.rand(b, n, generator=gen) < 0.9)
    return Matches(valid=valid, weight=torch.rand(b, n, generator=gen) + 0.5, key_index=idx, key_mask=mask)


@pytest.mark.parametrize(("b", "h", "w", "hk", "wk", "d", "kk"), [(1, 2, 2, 2, 3, 4, 3), (3, 3, 4, 3, 3, 8, 4)])
def test_matches_naive_values_and_grads(b: int, h: int, w: int, hk: int, wk: int, d: int, kk: int) -> None:
    gen = torch.Generator().manual_seed(b + h + kk)
    q = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(b, d, hk, wk, generator=gen, dtype=torch.float64, requires_grad=True)
    m = random_multi_matches(b, h * w, hk * wk, kk, gen)
    loss = PixContrastLoss(0.3)(q, key, m)

    qf, kf = q.flatten(2).transpose(1, 2), key.flatten(2).transpose(1, 2)
    pos = torch.zeros(b, h * w, hk * wk, dtype=torch.bool)  # dense positive sets built by loop (deduplicated)
    for bi in range(b):
        for i in range(h * w):
            for s in range(kk):
                if m.key_mask[bi, i, s] and m.valid[bi, i]:
                    pos[bi, i, m.key_index[bi, i, s]] = True
    ref = naive_pixcontrast(qf, kf, pos, m.effective_weight.double(), 0.3)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(torch.autograd.grad(loss, (q, key)), torch.autograd.grad(ref, (q, key))):
        torch.testing.assert_close(g, r)


def test_dense_mask_input_and_single_positive_equals_infonce() -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    key = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 4, (2, 5), generator=gen)
    m = Matches(valid=torch.ones(2, 5, dtype=torch.bool), weight=torch.ones(2, 5), key_index=idx)
    loss_m = PixContrastLoss(0.3)(q, key, m)
    loss_mask = PixContrastLoss(0.3)(q, key, m.to_dense(4))
    torch.testing.assert_close(loss_m, loss_mask)
    # one positive: ordinary cross entropy over the other view's cells
    logits = torch.einsum("bnd,bmd->bnm", F.normalize(q, dim=-1), F.normalize(key, dim=-1)) / 0.3
    ce = F.cross_entropy(logits.reshape(-1, 4), idx.reshape(-1))
    torch.testing.assert_close(loss_m, ce)


def test_queries_without_positive_are_skipped_and_no_nan() -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 3, 4, generator=gen, requires_grad=True)
    key = torch.randn(1, 2, 4, generator=gen)
    mask = torch.tensor([[[True, False], [False, False], [True, True]]])
    loss = PixContrastLoss(reduction="none")(q, key, mask)
    assert loss[0, 1].item() == 0.0 and loss[0, 2].abs().item() < 1e-6  # all keys positive -> log 1
    mean = PixContrastLoss()(q, key, mask)
    assert math.isclose(mean.item(), loss.sum().item() / 2, rel_tol=1e-6)
    empty = PixContrastLoss()(q, key, torch.zeros(1, 3, 2, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(q.grad, torch.zeros_like(q))
    per, has = pix_contrast(q, key, mask)
    assert has.tolist() == [[True, False, True]] and torch.isfinite(per).all()


def test_zero_valid_matches_and_zero_weights() -> None:
    q = torch.randn(2, 4, 2, 2, requires_grad=True)
    key = torch.randn(2, 4, 2, 2)
    m = Matches(valid=torch.zeros(2, 4, dtype=torch.bool), weight=torch.ones(2, 4),
                key_index=torch.zeros(2, 4, 2, dtype=torch.long), key_mask=torch.ones(2, 4, 2, dtype=torch.bool))
    loss = PixContrastLoss()(q, key, m)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(q.grad, torch.zeros_like(q))
    m2 = m.replace(valid=torch.ones(2, 4, dtype=torch.bool), weight=torch.zeros(2, 4))
    assert PixContrastLoss()(q, key, m2).item() == 0.0


def test_bf16_autocast_close_to_float32() -> None:
    gen = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(8, 16)
    x, key = torch.randn(2, 9, 8, generator=gen), torch.randn(2, 9, 16, generator=gen)
    mask = torch.rand(2, 9, 9, generator=gen) < 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qa = lin(x)
        low = PixContrastLoss()(qa, key.bfloat16(), mask)
    assert qa.dtype == torch.bfloat16 and low.dtype == torch.float32
    torch.testing.assert_close(low, PixContrastLoss()(lin(x), key, mask), rtol=3e-2, atol=3e-2)
    low.backward()
    assert torch.isfinite(lin.weight.grad).all()


def test_errors() -> None:
    with pytest.raises(ValueError, match="temperature"):
        PixContrastLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        PixContrastLoss(reduction="batchmean")
    crit = PixContrastLoss()
    with pytest.raises(ValueError, match=r"positive_mask must have the shape \(B, N, M\) = \(1, 3, 2\), but got"):
        crit(torch.randn(1, 3, 4), torch.randn(1, 2, 4), torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positive_mask must be a bool tensor, but got dtype torch\.float32"):
        crit(torch.randn(1, 3, 4), torch.randn(1, 2, 4), torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match="key must have shape"):
        crit(torch.randn(1, 3, 4), torch.randn(1, 2, 5), torch.ones(1, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="query must have shape"):
        crit(torch.randn(3, 4), torch.randn(1, 2, 4), torch.ones(1, 3, 2, dtype=torch.bool))
    m = Matches(valid=torch.ones(1, 5, dtype=torch.bool), weight=torch.ones(1, 5),
                key_index=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="matches must have"):
        crit(torch.randn(1, 3, 4), torch.randn(1, 2, 4), m)
    with pytest.raises(ValueError, match="matches must be"):
        crit(torch.randn(1, 3, 4), torch.randn(1, 2, 4), [1, 2])
