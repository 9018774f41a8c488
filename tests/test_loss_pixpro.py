"""PixProConsistencyLoss against naive float64 references (loops over images / queries / pairs)."""

from __future__ import annotations

import pytest
import torch

from densecontrast.geometry import ViewGeometry
from densecontrast.losses.pixpro import PixProConsistencyLoss, pixpro_consistency_loss
from densecontrast.matching import Matches, coordinate_match


def _random_multi(b: int, n: int, m: int, k: int, seed: int, p_pos: float = 0.5) -> Matches:
    g = torch.Generator().manual_seed(seed)
    key_index = torch.stack([torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)]) for _ in range(b)])
    key_mask = torch.rand(b, n, k, generator=g) < p_pos
    valid = key_mask.any(-1) & (torch.rand(b, n, generator=g) < 0.85)
    weight = torch.rand(b, n, generator=g) + 0.5
    return Matches(valid=valid, weight=weight, key_index=key_index, key_mask=key_mask)


def _naive(y: torch.Tensor, x: torch.Tensor, m: Matches, per_image: str = "pairs") -> torch.Tensor:
    """Explicit loops over images, queries and listed pairs, float64."""
    b = y.shape[0]
    ys, xs = y.double().flatten(2), x.double().detach().flatten(2)
    idx = m.key_index if m.key_index.dim() == 3 else m.key_index[..., None]
    mask = m.key_mask if m.key_mask is not None else torch.ones_like(idx, dtype=torch.bool)
    losses, has_pos = [], []
    for bi in range(b):
        num = torch.zeros((), dtype=torch.float64)
        den = 0.0
        for i in range(ys.shape[2]):
            if not m.valid[bi, i]:
                continue
            for kk in range(idx.shape[2]):
                if not mask[bi, i, kk]:
                    continue
                j = int(idx[bi, i, kk])
                yi, xj = ys[bi, :, i], xs[bi, :, j]
                w = float(m.weight[bi, i])
                num = num + w * (yi @ xj) / (yi.norm() * xj.norm())
                den += w
        losses.append(-2.0 * num / (den + 1e-6))
        has_pos.append(den > 0)
    per = torch.stack(losses)
    if per_image == "pairs":
        return per.mean()
    count = sum(has_pos)
    return per.sum() / max(count, 1e-6)


@pytest.mark.parametrize("per_image", ["pairs", "valid_images"])
@pytest.mark.parametrize(("b", "d", "hw", "hwk", "k"), [(2, 8, (3, 3), (3, 4), 4), (3, 5, (2, 4), (2, 2), 3)])
def test_matches_naive_value_and_grad(
    per_image: str, b: int, d: int, hw: tuple[int, int], hwk: tuple[int, int], k: int
) -> None:
    torch.manual_seed(0)
    n, m_ = hw[0] * hw[1], hwk[0] * hwk[1]
    matches = _random_multi(b, n, m_, k, seed=b * 10 + k)
    y = torch.randn(b, d, *hw, requires_grad=True)
    x = torch.randn(b, d, *hwk, requires_grad=True)
    loss = pixpro_consistency_loss(y, x, matches, per_image=per_image)
    loss.backward()
    y64 = y.detach().double().requires_grad_()
    ref = _naive(y64, x, matches, per_image)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=1e-4, atol=1e-6)
    assert x.grad is None  # the target is detached inside the loss


def test_per_image_modes_differ_only_by_denominator() -> None:
    torch.manual_seed(1)
    matches = _random_multi(3, 4, 4, 2, seed=3, p_pos=1.0)
    valid = matches.valid.clone()
    valid[1] = False  # image 1 has no positive at all
    matches = matches.replace(valid=valid)
    y, x = torch.randn(3, 6, 2, 2), torch.randn(3, 6, 2, 2)
    per = pixpro_consistency_loss(y, x, matches, reduction="none")
    assert per.shape == (3,) and per[1] == 0
    pairs = PixProConsistencyLoss()(y, x, matches)
    valid_images = PixProConsistencyLoss(per_image="valid_images")(y, x, matches)
    torch.testing.assert_close(pairs, per.sum() / 3)
    torch.testing.assert_close(valid_images, per.sum() / 2)
    torch.testing.assert_close(PixProConsistencyLoss(reduction="sum")(y, x, matches), per.sum())


def test_single_index_and_key_point_forms() -> None:
    torch.manual_seed(2)
    b, n = 2, 6
    y, x = torch.randn(b, 4, 2, 3), torch.randn(b, 4, 3, 2)
    idx = torch.randint(0, 6, (b, n))
    valid = torch.rand(b, n) < 0.7
    single = Matches(valid=valid, weight=torch.ones(b, n), key_index=idx)
    ref = _naive(y, x, single)
    torch.testing.assert_close(pixpro_consistency_loss(y, x, single).double(), ref, rtol=1e-5, atol=1e-6)
    # float64 weights (e.g. from float64 geometry) do not change the float32 compute dtype
    assert pixpro_consistency_loss(y, x, single.replace(weight=torch.ones(b, n, dtype=torch.float64))).dtype == (
        torch.float32
    )
    # integer key points (u = column, v = row) sample exactly the same cells
    pts = torch.stack([idx % 2, idx // 2], dim=-1).float()
    as_points = Matches(valid=valid, weight=torch.ones(b, n), key_points=pts, key_shape=(3, 2))
    torch.testing.assert_close(pixpro_consistency_loss(y, x, as_points).double(), ref, rtol=1e-5, atol=1e-6)


def test_with_coordinate_matcher_against_dense_matrix_reference() -> None:
    """Real PixPro positives from geometry; reference via the full (B, N, M) positive matrix."""
    torch.manual_seed(3)
    size = torch.tensor([200.0, 160.0])
    q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 120.0, 100.0], [30.0, 20.0, 190.0, 150.0]]),
                                torch.tensor([False, True]), size)
    kg = ViewGeometry.from_crops(torch.tensor([[40.0, 30.0, 200.0, 160.0], [0.0, 0.0, 110.0, 90.0]]),
                                 torch.tensor([True, False]), size)
    matches = coordinate_match(q, kg, (5, 5), (4, 4))
    assert matches.is_multi and matches.valid.any()
    y, x = torch.randn(2, 8, 5, 5, dtype=torch.float64), torch.randn(2, 8, 4, 4, dtype=torch.float64)
    a = matches.to_dense(16).double()  # (B, N, M)
    yn = torch.nn.functional.normalize(y.flatten(2), dim=1)
    xn = torch.nn.functional.normalize(x.flatten(2), dim=1)
    cos = torch.einsum("bdn,bdm->bnm", yn, xn)
    ref = (-2 * (a * cos).sum((1, 2)) / (a.sum((1, 2)) + 1e-6)).mean()
    torch.testing.assert_close(pixpro_consistency_loss(y, x, matches), ref)


def test_gradcheck_float64() -> None:
    torch.manual_seed(4)
    matches = _random_multi(2, 4, 4, 2, seed=5, p_pos=0.8)
    y = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: pixpro_consistency_loss(t, x, matches), (y,))
    assert torch.autograd.gradcheck(
        lambda t: pixpro_consistency_loss(t, x, matches, per_image="valid_images", reduction="none"), (y,)
    )


@pytest.mark.parametrize("per_image", ["pairs", "valid_images"])
def test_no_overlap_gives_zero_with_grad(per_image: str) -> None:
    b, n = 2, 9
    none = Matches(valid=torch.zeros(b, n, dtype=torch.bool), weight=torch.ones(b, n),
                   key_index=torch.zeros(b, n, 3, dtype=torch.long), key_mask=torch.zeros(b, n, 3, dtype=torch.bool))
    y = torch.randn(b, 4, 3, 3, requires_grad=True)
    loss = PixProConsistencyLoss(per_image=per_image)(y, torch.randn(b, 4, 3, 3), none)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(y.grad).all() and (y.grad == 0).all()


def test_one_pair_and_batch_of_one() -> None:
    torch.manual_seed(5)
    y, x = torch.randn(1, 5, 2, 2, requires_grad=True), torch.randn(1, 5, 2, 2)
    idx = torch.zeros(1, 4, 1, dtype=torch.long)
    idx[0, 2, 0] = 3
    mask = torch.zeros(1, 4, 1, dtype=torch.bool)
    mask[0, 2, 0] = True
    one = Matches(valid=mask[..., 0], weight=torch.ones(1, 4), key_index=idx, key_mask=mask)
    loss = pixpro_consistency_loss(y, x, one)
    yi, xj = y.detach().flatten(2)[0, :, 2].double(), x.flatten(2)[0, :, 3].double()
    expected = -2 * (yi @ xj) / (yi.norm() * xj.norm()) / (1 + 1e-6)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.flatten(2)[0, :, 2].abs().sum() > 0
    assert y.grad.flatten(2)[0, :, [0, 1, 3]].abs().sum() == 0  # only the one query gets gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_close_to_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    matches = _random_multi(2, 16, 16, 5, seed=7)
    y, x = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4)
    ref = pixpro_consistency_loss(y, x, matches)
    yl = y.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pixpro_consistency_loss(yl, x.to(dtype), matches)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
    out.backward()
    assert yl.grad is not None and torch.isfinite(yl.grad.float()).all()


def test_range_and_sign() -> None:
    """Aligned features give -2 (a negative loss is normal), opposite ones +2."""
    torch.manual_seed(8)
    x = torch.randn(2, 6, 3, 3)
    idx = torch.arange(9).expand(2, 9)[..., None].contiguous()
    m = Matches(valid=torch.ones(2, 9, dtype=torch.bool), weight=torch.ones(2, 9), key_index=idx,
                key_mask=torch.ones(2, 9, 1, dtype=torch.bool))
    torch.testing.assert_close(pixpro_consistency_loss(x, x, m), torch.tensor(-2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixpro_consistency_loss(-x, x, m), torch.tensor(2.0), atol=1e-5, rtol=0)


def test_value_errors() -> None:
    m = _random_multi(2, 4, 4, 2, seed=9)
    y, x = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="per_image"):
        PixProConsistencyLoss(per_image="images")
    with pytest.raises(ValueError, match="reduction"):
        PixProConsistencyLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"propagated must have shape \(B, D, h, w\), but got \(3, 4\)"):
        pixpro_consistency_loss(torch.randn(3, 4), x, m)
    with pytest.raises(ValueError, match=r"target must have shape \(B, D, h_k, w_k\) with \(B, D\) = \(2, 3\)"):
        pixpro_consistency_loss(y, torch.randn(2, 5, 2, 2), m)
    with pytest.raises(ValueError, match=r"matches must have B x N = 2 x 9 queries"):
        pixpro_consistency_loss(torch.randn(2, 3, 3, 3), x, m)
    with pytest.raises(ValueError, match=r"matches\.key_shape"):
        pixpro_consistency_loss(y, x, m.replace(key_shape=(4, 1)))
    with pytest.raises(ValueError, match=r"matches must be a densecontrast\.matching\.Matches"):
        pixpro_consistency_loss(y, x, {"valid": m.valid})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating-point"):
        pixpro_consistency_loss(y.long(), x, m)
