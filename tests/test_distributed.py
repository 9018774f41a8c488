"""Distributed helpers, queue, EMA and DenseInfoNCE under a real 2-process gloo group vs one process.

One spawned run (module fixture) executes every distributed check and returns tensors; each test
compares them with a single-process reference computed here on the concatenated (global) batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_distributed
from torch import nn

from densecontrast import distributed as D
from densecontrast.ema import EMA
from densecontrast.queue import MomentumQueue

try:
    from densecontrast.losses.dense_infonce import DenseInfoNCE
    from densecontrast.matching import Matches
except ImportError:  # pragma: no cover - the loss module is optional for these tests
    DenseInfoNCE = None

WORLD = 2
GATHER_SIZES = [(3, 5), (0, 2), (4, 4), (1, 0)]  # per-rank dim-0 sizes of successive gathers
GRAD_SIZES = (3, 5)
QUEUE_SIZES = [(3, 5), (2, 0), (6, 4), (1, 1), (0, 0), (9, 7), (2, 3)]
QUEUE_DIM, QUEUE_LEN = 4, 7
NCE_SIZES = (2, 3)  # images per rank for the DenseInfoNCE check
NCE_STEPS = 2


def _split(x: torch.Tensor, sizes: tuple[int, ...], r: int) -> torch.Tensor:
    start = sum(sizes[:r])
    return x[start : start + sizes[r]]


# ----------------------------------------------------------------------------- problem generators
def _gather_inputs(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(sum(GATHER_SIZES[i]), 3, 2, generator=g)


def _grad_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = sum(GRAD_SIZES)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64)


def _grad_loss(x_local: torch.Tensor, xg: torch.Tensor, yg: torch.Tensor, offset: int) -> torch.Tensor:
    """Loss of one rank: InfoNCE of its queries against ALL gathered keys + a term on the gathered queries."""
    logits = F.normalize(x_local, dim=1) @ F.normalize(yg, dim=1).T / 0.3
    labels = torch.arange(x_local.shape[0]) + offset
    nce = F.cross_entropy(logits, labels, reduction="sum")
    return nce + 0.1 * (xg.sin() * torch.arange(1, xg.shape[0] + 1, dtype=xg.dtype)[:, None]).sum() * (offset + 1)


def _queue_batches(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(300 + i)
    return torch.randn(sum(QUEUE_SIZES[i]), QUEUE_DIM, generator=g)


def _ema_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(12)
    return model, torch.randn(2 * WORLD, 4, generator=g), torch.randn(2 * WORLD, 3, generator=g)


def _sgd_step(model: nn.Module, lr: float) -> None:
    """Plain SGD (torch.optim's first use imports dynamo, several seconds per process)."""
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)


def _nce_problem(step: int) -> dict:
    """Global batch of the DenseInfoNCE check at ``step``: inputs, keys, matches (5 images, 3 x 3 cells)."""
    g = torch.Generator().manual_seed(500 + step)
    b, c, d, h, w = sum(NCE_SIZES), 4, 8, 3, 3
    n = h * w
    valid = torch.rand(b, n, generator=g) > 0.3
    valid[0] = False  # one image with no valid query at all
    return {
        "x": torch.randn(b, c, h, w, generator=g, dtype=torch.float64),
        "key": torch.randn(b, d, h, w, generator=g, dtype=torch.float64),
        "valid": valid,
        "weight": torch.rand(b, n, generator=g, dtype=torch.float64) + 0.1,
        "key_index": torch.randint(0, n, (b, n), generator=g),
    }


def _nce_head() -> nn.Module:
    torch.manual_seed(21)
    return nn.Conv2d(4, 8, 1).double()


def _nce_matches(p: dict, sl: slice) -> Matches:
    return Matches(valid=p["valid"][sl], weight=p["weight"][sl], key_index=p["key_index"][sl], key_shape=(3, 3))


def _pooled(key: torch.Tensor) -> torch.Tensor:
    return F.normalize(key.mean(dim=(2, 3)), dim=1)


# ----------------------------------------------------------------------------- the worker
def _worker(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict = {
        "is_distributed": D.is_distributed(),
        "world_size": D.world_size(),
        "rank": D.rank(),
        "mean": D.all_reduce_mean(torch.tensor([float(rank), 2.0 * rank])),
    }

    # uneven all_gather without gradient
    out["gathers"] = []
    for i, sizes in enumerate(GATHER_SIZES):
        x = _split(_gather_inputs(i), sizes, rank).requires_grad_(True)
        y = D.all_gather(x)
        out["gathers"].append((y, y.requires_grad))
    # mismatched trailing dims: a ValueError on every rank, no hang; the group stays usable afterwards
    try:
        D.all_gather(torch.zeros(2, 3 + rank))
        out["mismatch_error"] = ""
    except ValueError as e:
        out["mismatch_error"] = str(e)

    # all_gather with gradient: per-rank losses on gathered tensors, summed over ranks
    x_full, y_full = _grad_inputs()
    x = _split(x_full, GRAD_SIZES, rank).clone().requires_grad_(True)
    y = _split(y_full, GRAD_SIZES, rank).clone().requires_grad_(True)
    loss = _grad_loss(x, D.all_gather(x, grad=True), D.all_gather(y, grad=True), sum(GRAD_SIZES[:rank]))
    loss.backward()
    out["grad_x"], out["grad_y"], out["grad_loss"] = x.grad, y.grad, loss.detach()

    # queue: uneven enqueues, gathered; plus a per-rank queue (gather=False) and a broadcast of seed=None queues
    q = MomentumQueue(QUEUE_DIM, QUEUE_LEN)
    q_local = MomentumQueue(QUEUE_DIM, QUEUE_LEN, gather=False)
    for i, sizes in enumerate(QUEUE_SIZES):
        keys = _split(_queue_batches(i), sizes, rank)
        q.enqueue(keys)
        q_local.enqueue(keys)
    out["queue"], out["queue_ptr"] = q.queue.clone(), int(q.ptr)
    out["queue_local"], out["queue_local_ptr"] = q_local.queue.clone(), int(q_local.ptr)
    torch.manual_seed(1000 + rank)  # different global RNG per rank -> different initial keys
    q_rand = MomentumQueue(QUEUE_DIM, QUEUE_LEN, seed=None)
    out["queue_rand_before"] = q_rand.queue.clone()
    q_rand.broadcast_()
    out["queue_rand_after"] = q_rand.queue.clone()

    # EMA of a DDP-wrapped model: unwrapped target, identical on every rank after a DDP step
    model, xs, ts = _ema_problem()
    ddp = DDP(model)
    ema = EMA(ddp, momentum=0.9)
    out["ema_target_type"] = type(ema.target).__name__
    F.mse_loss(ddp(xs[2 * rank : 2 * rank + 2]), ts[2 * rank : 2 * rank + 2]).backward()
    _sgd_step(ddp, lr=0.5)
    ema.update()
    out["ema_weight"], out["ema_bias"] = ema.target.weight.clone(), ema.target.bias.clone()

    # DenseInfoNCE + MomentumQueue + DDP head: loss/gradients match one process on the global batch
    if DenseInfoNCE is not None:
        head = DDP(_nce_head())
        crit = DenseInfoNCE(temperature=0.2, reduction="sum")
        queue = MomentumQueue(8, 6, dtype=torch.float64)
        sl = slice(sum(NCE_SIZES[:rank]), sum(NCE_SIZES[: rank + 1]))
        out["nce"] = []
        for step in range(NCE_STEPS):
            p = _nce_problem(step)
            head.zero_grad()
            matches = _nce_matches(p, sl)
            x = p["x"][sl].clone().requires_grad_(True)
            negatives = queue.negatives()
            weighted_sum = crit(head(x), p["key"][sl], matches, negatives)
            loss = D.global_weighted_mean(weighted_sum, matches.effective_weight.sum())
            loss.backward()
            queue.enqueue(_pooled(p["key"][sl]))
            out["nce"].append(
                {
                    "loss": D.all_reduce_mean(loss.detach()),
                    "x_grad": x.grad,
                    "w_grad": head.module.weight.grad.clone(),
                    "b_grad": head.module.bias.grad.clone(),
                    "negatives": negatives,
                }
            )
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, world_size=WORLD, timeout=180.0)


pytestmark = pytest.mark.distributed


# ----------------------------------------------------------------------------- tests
def test_rank_utilities(results: list[dict]) -> None:
    for r, res in enumerate(results):
        assert res["is_distributed"] is True
        assert res["world_size"] == WORLD and res["rank"] == r
        torch.testing.assert_close(res["mean"], torch.tensor([0.5, 1.0]))


def test_rank_utilities_without_process_group() -> None:
    assert not D.is_distributed()
    assert D.world_size() == 1 and D.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather(x, grad=True) is x
    y = D.all_gather(x)
    assert not y.requires_grad and torch.equal(y, x.detach())
    torch.testing.assert_close(D.all_reduce_mean(torch.tensor([2.0, 4.0])), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(D.all_reduce_sum(torch.tensor([2, 4])), torch.tensor([2, 4]))
    b = torch.tensor([1.0, 2.0])
    assert D.broadcast_(b) is b
    w = torch.tensor([1.0, 0.0, 3.0])
    l = torch.tensor([2.0, 5.0, 4.0], requires_grad=True)
    out = D.global_weighted_mean((w * l).sum(), w.sum())
    torch.testing.assert_close(out, torch.tensor(14.0 / 4.0))
    out.backward()
    torch.testing.assert_close(l.grad, w / 4.0)
    torch.testing.assert_close(D.global_weighted_mean(l.sum() * 0, torch.tensor(0.0)), torch.tensor(0.0))
    with pytest.raises(ValueError, match="at least one dim"):
        D.all_gather(torch.tensor(1.0))


def test_uneven_all_gather_without_grad(results: list[dict]) -> None:
    for i in range(len(GATHER_SIZES)):
        expected = _gather_inputs(i)
        for res in results:
            y, requires_grad = res["gathers"][i]
            assert not requires_grad
            assert torch.equal(y, expected)


def test_all_gather_shape_mismatch_raises_on_every_rank(results: list[dict]) -> None:
    for res in results:
        assert "same number of dims" in res["mismatch_error"]


def test_all_gather_grad_matches_single_process(results: list[dict]) -> None:
    x_full, y_full = _grad_inputs()
    x_full.requires_grad_(True)
    y_full.requires_grad_(True)
    total = sum(
        _grad_loss(_split(x_full, GRAD_SIZES, r), x_full, y_full, sum(GRAD_SIZES[:r])) for r in range(WORLD)
    )
    total.backward()
    for r, res in enumerate(results):
        torch.testing.assert_close(res["grad_loss"], _grad_loss(_split(x_full, GRAD_SIZES, r), x_full, y_full,
                                                                 sum(GRAD_SIZES[:r])).detach())
        torch.testing.assert_close(res["grad_x"], _split(x_full.grad, GRAD_SIZES, r), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res["grad_y"], _split(y_full.grad, GRAD_SIZES, r), rtol=1e-10, atol=1e-10)
    # the gradient reaching rank 0 depends on rank 1's loss: the local-only backward (no sum) differs
    x0 = _split(x_full, GRAD_SIZES, 0).detach().clone().requires_grad_(True)
    local_only = _grad_loss(x0, torch.cat([x0, _split(x_full, GRAD_SIZES, 1).detach()]), y_full.detach(), 0)
    (g_local,) = torch.autograd.grad(local_only, x0)
    assert not torch.allclose(g_local, results[0]["grad_x"])


def test_queue_identical_on_ranks_and_equal_to_single_process(results: list[dict]) -> None:
    ref = MomentumQueue(QUEUE_DIM, QUEUE_LEN)
    for i in range(len(QUEUE_SIZES)):
        ref.enqueue(_queue_batches(i))
    for res in results:
        torch.testing.assert_close(res["queue"], ref.queue, rtol=0, atol=0)
        assert res["queue_ptr"] == int(ref.ptr)


def test_queue_without_gather_is_per_rank(results: list[dict]) -> None:
    for r, res in enumerate(results):
        ref = MomentumQueue(QUEUE_DIM, QUEUE_LEN, gather=False)
        for i, sizes in enumerate(QUEUE_SIZES):
            ref.enqueue(_split(_queue_batches(i), sizes, r))
        torch.testing.assert_close(res["queue_local"], ref.queue, rtol=0, atol=0)
        assert res["queue_local_ptr"] == int(ref.ptr)
    assert not torch.equal(results[0]["queue_local"], results[1]["queue_local"])


def test_queue_broadcast(results: list[dict]) -> None:
    assert not torch.equal(results[0]["queue_rand_before"], results[1]["queue_rand_before"])
    for res in results:
        assert torch.equal(res["queue_rand_after"], results[0]["queue_rand_before"])


def test_ema_of_ddp_model(results: list[dict]) -> None:
    model, xs, ts = _ema_problem()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    F.mse_loss(model(xs), ts).backward()  # equal shards: DDP's gradient average == global-batch mean
    _sgd_step(model, lr=0.5)
    for res in results:
        assert res["ema_target_type"] == "Linear"
        torch.testing.assert_close(res["ema_weight"], 0.9 * w0 + 0.1 * model.weight.detach())
        torch.testing.assert_close(res["ema_bias"], 0.9 * b0 + 0.1 * model.bias.detach())


@pytest.mark.skipif(DenseInfoNCE is None, reason="densecontrast.losses.dense_infonce not available")
def test_dense_infonce_with_queue_matches_single_process(results: list[dict]) -> None:
    head = _nce_head()
    crit = DenseInfoNCE(temperature=0.2, reduction="mean")
    queue = MomentumQueue(8, 6, dtype=torch.float64)
    for step in range(NCE_STEPS):
        p = _nce_problem(step)
        head.zero_grad()
        x = p["x"].clone().requires_grad_(True)
        negatives = queue.negatives()
        loss = crit(head(x), p["key"], _nce_matches(p, slice(None)), negatives)
        loss.backward()
        queue.enqueue(_pooled(p["key"]))
        for r, res in enumerate(results):
            got = res["nce"][step]
            torch.testing.assert_close(got["negatives"], negatives, rtol=0, atol=0)
            # float64 inputs; effective weights (and so the weight sums) are float32: rtol 1e-6
            torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=1e-9)
            # DDP averaged the parameter gradients: they equal the global-batch gradient
            torch.testing.assert_close(got["w_grad"], head.weight.grad, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(got["b_grad"], head.bias.grad, rtol=1e-6, atol=1e-9)
            # input gradients are per rank, before DDP's 1/world_size average
            torch.testing.assert_close(got["x_grad"] / WORLD, _split(x.grad, NCE_SIZES, r), rtol=1e-6, atol=1e-9)
    # the per-rank plain means would NOT combine to the global mean (ranks hold different total weights)
    p = _nce_problem(0)
    m = _nce_matches(p, slice(None))
    w = m.effective_weight
    assert not torch.isclose(w[:2].sum() * WORLD, w.sum())
