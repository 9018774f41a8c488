"""DenseInfoNCE / dense_info_nce against naive float64 references written here."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from densecontrast.losses.dense_infonce import DenseInfoNCE, default_chunk_size, dense_info_nce
from densecontrast.losses.reduction import reduce, weighted_mean
from densecontrast.matching import Matches


def naive_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Loop over queries: -log softmax([q.k, q.Q] / tau)_0, float64."""
    out = []
    for i in range(q.shape[0]):
        logits = torch.cat([(q[i] * k[i]).sum()[None], queue @ q[i]]) / tau
        out.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(out)


def unit(*shape: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)


@pytest.mark.parametrize(("p", "d", "k", "chunk"), [(1, 4, 3, None), (7, 5, 11, 3), (20, 8, 64, 6), (33, 16, 5, 32)])
def test_functional_matches_naive_values_and_grads(p: int, d: int, k: int, chunk: int | None) -> None:
    gen = torch.Generator().manual_seed(p * 100 + k)
    tau = 0.2 if p % 2 else 0.07
    q = unit(p, d, gen=gen).requires_grad_()
    pos = unit(p, d, gen=gen).requires_grad_()
    queue = unit(k, d, gen=gen).requires_grad_()
    upstream = torch.rand(p, generator=gen, dtype=torch.float64)

    out = dense_info_nce(q, pos, queue, tau, chunk_size=chunk)
    grads = torch.autograd.grad((out * upstream).sum(), (q, pos, queue))
    ref = naive_infonce(q, pos, queue, tau)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, pos, queue))

    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_float32_inputs_match_float64_reference_with_chunk_not_dividing() -> None:
    gen = torch.Generator().manual_seed(3)
    q64, k64, n64 = unit(50, 32, gen=gen), unit(50, 32, gen=gen), unit(300, 32, gen=gen)
    q = q64.float().requires_grad_()
    out = dense_info_nce(q, k64.float(), n64.float(), 0.2, chunk_size=7)
    out.sum().backward()
    q64r = q64.clone().requires_grad_()
    ref = naive_infonce(q64r, k64, n64, 0.2)
    ref.sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.grad.double(), q64r.grad, rtol=1e-4, atol=1e-5)


def test_gradcheck_custom_function() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    n = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: dense_info_nce(a, b, c, 0.5, chunk_size=2), (q, k, n))


def test_unnormalized_large_logits_are_stable() -> None:
    gen = torch.Generator().manual_seed(2)
    q = (30 * torch.randn(6, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    k = 30 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
    n = 30 * torch.randn(9, 4, generator=gen, dtype=torch.float64)
    out = dense_info_nce(q, k, n, 0.1, chunk_size=4)
    torch.testing.assert_close(out, naive_infonce(q, k, n, 0.1))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_empty_queue_and_empty_queries() -> None:
    q = torch.randn(3, 4, requires_grad=True)
    out = dense_info_nce(q, torch.randn(3, 4), torch.zeros(0, 4))
    assert torch.equal(out, torch.zeros(3))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros(3, 4))
    empty = dense_info_nce(torch.zeros(0, 4), torch.zeros(0, 4), torch.randn(5, 4))
    assert empty.shape == (0,)


def test_no_logits_saved_for_backward() -> None:
    """The autograd graph must hold only O(P*D + K*D) tensors, not the (P, K) logits."""
    p, d, k = 64, 8, 4096
    q = torch.randn(p, d, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = dense_info_nce(q, torch.randn(p, d), torch.randn(k, d), 0.2, chunk_size=16)
    assert max(saved) <= k * d
    assert sum(saved) < p * k  # far less than one full logit matrix
    out.sum().backward()
    assert q.grad is not None


def test_default_chunk_size_budget() -> None:
    assert default_chunk_size(65536) * 65536 * 4 <= 64 * 2**20
    assert default_chunk_size(10**9) == 1


# --------------------------------------------------------------------------- module


def make_matches(b: int, n: int, m: int, gen: torch.Generator, p_valid: float = 0.7) -> Matches:
    valid = torch.rand(b, n, generator=gen) < p_valid
    weight = torch.rand(b, n, generator=gen) + 0.1
    key_index = torch.randint(0, m, (b, n), generator=gen)
    return Matches(valid=valid, weight=weight, key_index=key_index)


def naive_module(q_map, k_flat, matches, queue, tau):
    """Full float64 reference of DenseInfoNCE: normalize, gather by loop, weighted mean."""
    b, n, _ = q_map.shape
    num, den = 0.0, 0.0
    w = matches.weight.double() * matches.valid.double()
    for bi in range(b):
        for i in range(n):
            qi = F.normalize(q_map[bi, i], dim=0)
            ki = F.normalize(k_flat[bi, matches.key_index[bi, i]], dim=0)
            logits = torch.cat([(qi * ki).sum()[None], queue @ qi]) / tau
            num = num + w[bi, i] * -torch.log_softmax(logits, 0)[0]
            den = den + w[bi, i]
    return num / max(float(den), 1e-6)


@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize(("b", "h", "w", "hk", "wk", "d", "k"), [(1, 2, 3, 2, 2, 4, 6), (3, 3, 3, 4, 2, 8, 17)])
def test_module_matches_naive(b: int, h: int, w: int, hk: int, wk: int, d: int, k: int, static_shapes: bool) -> None:
    gen = torch.Generator().manual_seed(b * h * k)
    q = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(b, d, hk, wk, generator=gen, dtype=torch.float64, requires_grad=True)
    queue = unit(k, d, gen=gen).requires_grad_()
    m = make_matches(b, h * w, hk * wk, gen)
    loss = DenseInfoNCE(0.2, chunk_size=4, static_shapes=static_shapes)(q, key, m, queue)
    grads = torch.autograd.grad(loss, (q, key, queue))

    q_flat = q.flatten(2).transpose(1, 2)
    k_flat = key.flatten(2).transpose(1, 2)
    ref = naive_module(q_flat, k_flat, m, queue, 0.2)
    ref_grads = torch.autograd.grad(ref, (q, key, queue))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_module_reduction_none_and_sum() -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 4, generator=gen)
    key = torch.randn(2, 5, 4, generator=gen)
    queue = unit(9, 4, gen=gen, dtype=torch.float32)
    m = make_matches(2, 6, 5, gen)
    per = DenseInfoNCE(0.3, reduction="none")(q, key, m, queue)
    total = DenseInfoNCE(0.3, reduction="sum")(q, key, m, queue)
    mean = DenseInfoNCE(0.3)(q, key, m, queue)
    w = m.effective_weight
    assert per.shape == (2, 6)
    assert torch.equal(per[w == 0], torch.zeros(int((w == 0).sum())))
    torch.testing.assert_close(per.sum(), total)
    torch.testing.assert_close(mean, total / w.sum())


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_static_shapes_gives_the_default_value(reduction: str) -> None:
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(3, 7, 4, generator=gen)
    key = torch.randn(3, 5, 4, generator=gen)
    queue = unit(11, 4, gen=gen, dtype=torch.float32)
    m = make_matches(3, 7, 5, gen)
    default = DenseInfoNCE(0.3, reduction=reduction, chunk_size=3)(q, key, m, queue)
    static = DenseInfoNCE(0.3, reduction=reduction, chunk_size=3, static_shapes=True)(q, key, m, queue)
    torch.testing.assert_close(static, default, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="static_shapes must be a bool"):
        DenseInfoNCE(static_shapes=1)  # type: ignore[arg-type]


def test_module_key_points_resampled() -> None:
    gen = torch.Generator().manual_seed(6)
    b, d, hk, wk = 2, 4, 3, 3
    q = torch.randn(b, 5, d, generator=gen, dtype=torch.float64)
    key = torch.randn(b, d, hk, wk, generator=gen, dtype=torch.float64)
    queue = unit(7, d, gen=gen)
    pts = torch.rand(b, 5, 2, generator=gen, dtype=torch.float64) * 2
    m = Matches(valid=torch.ones(b, 5, dtype=torch.bool), weight=torch.ones(b, 5), key_points=pts)
    loss = DenseInfoNCE(0.2)(q, key, m, queue)
    # bilinear reference by hand: cell centers at integers
    ref_pos = torch.empty(b, 5, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(5):
            u, v = pts[bi, i].tolist()
            u0, v0 = int(u), int(v)
            fu, fv = u - u0, v - v0
            u1, v1 = min(u0 + 1, wk - 1), min(v0 + 1, hk - 1)
            ref_pos[bi, i] = ((1 - fu) * (1 - fv) * key[bi, :, v0, u0] + fu * (1 - fv) * key[bi, :, v0, u1]
                              + (1 - fu) * fv * key[bi, :, v1, u0] + fu * fv * key[bi, :, v1, u1])
    ref = naive_infonce(F.normalize(q.reshape(-1, d), dim=1), F.normalize(ref_pos.reshape(-1, d), dim=1), queue, 0.2)
    torch.testing.assert_close(loss, ref.mean())


def test_in_batch_negatives_without_queue() -> None:
    gen = torch.Generator().manual_seed(7)
    b, n, m, d = 3, 4, 5, 6
    q = torch.randn(b, n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(b, m, d, generator=gen, dtype=torch.float64)
    mt = make_matches(b, n, m, gen, p_valid=1.0)
    loss = DenseInfoNCE(0.2)(q, key, mt)
    pooled = F.normalize(key.mean(1), dim=1)
    num = den = 0.0
    for bi in range(b):
        others = torch.cat([pooled[:bi], pooled[bi + 1:]])
        for i in range(n):
            qi = F.normalize(q[bi, i], dim=0)
            ki = F.normalize(key[bi, mt.key_index[bi, i]], dim=0)
            li = naive_infonce(qi[None], ki[None], others, 0.2)[0]
            num, den = num + mt.weight[bi, i] * li, den + mt.weight[bi, i]
    torch.testing.assert_close(loss, num / den)
    with pytest.warns(UserWarning, match="no negatives"):
        one = DenseInfoNCE()(q[:1], key[:1], Matches(valid=mt.valid[:1], weight=mt.weight[:1],
                                                     key_index=mt.key_index[:1]))
    assert one.item() == 0.0


def test_without_queue_a_batch_of_one_warns_once_that_there_are_no_negatives() -> None:
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 3, 3, generator=gen, requires_grad=True)
    key = torch.randn(1, 4, 3, 3, generator=gen)
    m = Matches(valid=torch.ones(1, 9, dtype=torch.bool), weight=torch.ones(1, 9),
                key_index=torch.arange(9)[None], key_shape=(3, 3))
    criterion = DenseInfoNCE()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [criterion(q, key, m) for _ in range(3)]
        DenseInfoNCE()(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), m.replace(  # B = 2: negatives exist
            valid=m.valid.expand(2, -1), weight=m.weight.expand(2, -1), key_index=m.key_index.expand(2, -1)))
        criterion(q, key, m, F.normalize(torch.randn(5, 4, generator=gen), dim=1))  # a queue: no warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # used to be silent: loss 0, zero gradient
    assert "no negatives" in messages[0] and "queue" in messages[0] and issubclass(caught[0].category, UserWarning)
    losses[0].backward()  # still a correct, finite result with a gradient (of zeros)
    assert losses[0].item() == 0.0 and torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("queue_none", [False, True])
def test_zero_valid_queries_gives_zero_with_gradient(queue_none: bool) -> None:
    q = torch.randn(2, 4, 3, 3, requires_grad=True)
    key = torch.randn(2, 4, 3, 3)
    m = Matches(valid=torch.zeros(2, 9, dtype=torch.bool), weight=torch.ones(2, 9),
                key_index=torch.zeros(2, 9, dtype=torch.long))
    loss = DenseInfoNCE()(q, key, m, None if queue_none else F.normalize(torch.randn(8, 4), dim=1))
    assert loss.item() == 0.0
    loss.backward()
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))
    # all weights zero while valid: same outcome
    q.grad = None
    m0 = m.replace(valid=torch.ones(2, 9, dtype=torch.bool), weight=torch.zeros(2, 9))
    loss0 = DenseInfoNCE()(q, key, m0, F.normalize(torch.randn(8, 4), dim=1))
    loss0.backward()
    assert loss0.item() == 0.0 and torch.equal(q.grad, torch.zeros_like(q))


def test_single_valid_query_equals_its_own_loss() -> None:
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 6, 4, generator=gen, dtype=torch.float64)
    key = torch.randn(1, 6, 4, generator=gen, dtype=torch.float64)
    queue = unit(10, 4, gen=gen)
    valid = torch.zeros(1, 6, dtype=torch.bool)
    valid[0, 3] = True
    m = Matches(valid=valid, weight=torch.full((1, 6), 2.5), key_index=torch.arange(6)[None].flip(1))
    loss = DenseInfoNCE(0.2)(q, key, m, queue)
    ref = naive_infonce(F.normalize(q[0, 3:4], dim=1), F.normalize(key[0, 2:3], dim=1), queue, 0.2)[0]
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision_close_to_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, generator=gen)
    lin = torch.nn.Linear(16, 32 * 4)
    key = torch.randn(2, 32, 2, 2, generator=gen)
    queue = unit(200, 32, gen=gen, dtype=torch.float32)
    m = make_matches(2, 4, 4, gen, p_valid=1.0)
    crit = DenseInfoNCE(0.2)

    def run(ac: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype, enabled=ac):
            q = lin(x).reshape(2, 32, 2, 2)
            assert (q.dtype == dtype) == ac
            return crit(q, key.to(q.dtype), m, queue)

    low, ref = run(True), run(False)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)
    low.backward()
    assert torch.isfinite(lin.weight.grad).all()


def test_module_validation_errors() -> None:
    with pytest.raises(ValueError, match="temperature"):
        DenseInfoNCE(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        DenseInfoNCE(reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        DenseInfoNCE(chunk_size=0)
    crit = DenseInfoNCE()
    m = Matches(valid=torch.ones(1, 4, dtype=torch.bool), weight=torch.ones(1, 4),
                key_index=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"query must have shape"):
        crit(torch.randn(4, 8), torch.randn(1, 4, 8), m)
    with pytest.raises(ValueError, match=r"queue must have shape \(K, 8\)"):
        crit(torch.randn(1, 4, 8), torch.randn(1, 4, 8), m, torch.randn(5, 7))
    with pytest.raises(ValueError, match="matches must have"):
        crit(torch.randn(1, 5, 8), torch.randn(1, 4, 8), m)
    with pytest.raises(ValueError, match="key must"):
        crit(torch.randn(1, 4, 8), torch.randn(1, 4, 6), m)
    multi = Matches(valid=torch.ones(1, 4, dtype=torch.bool), weight=torch.ones(1, 4),
                    key_index=torch.zeros(1, 4, 2, dtype=torch.long), key_mask=torch.ones(1, 4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="single positive"):
        crit(torch.randn(1, 4, 8), torch.randn(1, 4, 8), multi)
    with pytest.raises(ValueError, match="positive must have shape"):
        dense_info_nce(torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="temperature"):
        dense_info_nce(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4), temperature=-1)


# --------------------------------------------------------------------------- reduction helpers


def test_weighted_mean_and_reduce() -> None:
    gen = torch.Generator().manual_seed(10)
    loss = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 5, generator=gen)
    out = weighted_mean(loss, w)
    torch.testing.assert_close(out.double(), (w.double() * loss).sum() / w.double().sum())
    bad = torch.tensor([float("inf"), 1.0], requires_grad=True)
    out2 = weighted_mean(bad, torch.tensor([0.0, 1.0]))
    out2.backward()
    assert out2.item() == 1.0 and torch.isfinite(bad.grad).all()
    assert reduce(loss, w, "none").shape == (3, 5)
    with pytest.raises(ValueError, match="reduction"):
        reduce(loss, w, "max")
    with pytest.raises(ValueError, match="weight must have the shape"):
        weighted_mean(loss, torch.ones(5))


def test_weighted_mean_rejects_negative_and_non_finite_weights() -> None:
    loss = torch.tensor([1.0, 2.0, 3.0])
    w = torch.tensor([1.0, -0.999999, 0.0])
    with pytest.raises(ValueError, match=r"weight must be finite and >= 0, but got 1 negative or non-finite values "
                                         r"\(first -0.99\d* at index \[1\]\)"):
        weighted_mean(loss, w)  # used to be (1 - 1.999998) / 1e-6, a loss of about -1e6
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight must be finite and >= 0"):
            weighted_mean(loss, torch.tensor([1.0, bad, 1.0]))
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="weight must be finite and >= 0"):
            reduce(loss, w, reduction)
    # through a loss: a user-built Matches with a negative weight
    m = Matches(valid=torch.ones(1, 4, dtype=torch.bool), weight=torch.tensor([[1.0, -1.0, 1.0, 1.0]]),
                key_index=torch.arange(4)[None], key_shape=(2, 2))
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        DenseInfoNCE()(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), m, F.normalize(torch.randn(4, 3), dim=1))
    # zero and positive weights, bool weights: unchanged
    assert weighted_mean(loss, torch.tensor([1.0, 0.0, 1.0])).item() == 2.0
    assert weighted_mean(loss, torch.tensor([True, False, True])).item() == 2.0


def test_no_grad_forward_equals_grad_forward() -> None:
    gen = torch.Generator().manual_seed(11)
    q, k, n = unit(9, 4, gen=gen), unit(9, 4, gen=gen), unit(13, 4, gen=gen)
    with torch.no_grad():
        a = dense_info_nce(q.requires_grad_(), k, n, 0.2, chunk_size=4)
    b = dense_info_nce(q, k, n, 0.2, chunk_size=4)
    assert not a.requires_grad and b.requires_grad
    torch.testing.assert_close(a, b.detach())
