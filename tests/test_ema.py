"""EMA vs a naive per-parameter loop (float64), buffers, unwrapping, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from densecontrast.ema import EMA, ema_update_
from densecontrast.schedules import CosineMomentum


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids thread-pool contention on a busy machine (10x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).double()


def _perturb(model: nn.Module, g: torch.Generator) -> None:
    """Change every parameter and, through a train-mode forward, the BN running statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.train()
        model(torch.randn(7, 3, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("buffers", ["copy", "average", "none"])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_update_matches_naive_loop(buffers: str, schedule: str) -> None:
    online = _net()
    g = torch.Generator().manual_seed(1)
    _perturb(online, g)
    sched = 0.9 if schedule == "constant" else CosineMomentum(total_steps=6, base=0.7)
    ema = EMA(online, momentum=sched, buffers=buffers)
    ref_p = {n: p.detach().clone() for n, p in online.named_parameters()}
    ref_b = {n: b.clone() for n, b in online.named_buffers()}
    for t in range(8):
        _perturb(online, g)
        m = 0.9 if schedule == "constant" else 1 - (1 - 0.7) * (math.cos(math.pi * min(t, 6) / 6) + 1) / 2
        assert ema.momentum == pytest.approx(m, abs=1e-12)
        assert ema.update() == pytest.approx(m, abs=1e-12)
        on_p, on_b = dict(online.named_parameters()), dict(online.named_buffers())
        for name in ref_p:
            ref_p[name] = m * ref_p[name] + (1 - m) * on_p[name].detach()
        for name in ref_b:
            if buffers == "copy" or (buffers == "average" and not ref_b[name].is_floating_point()):
                ref_b[name] = on_b[name].clone()
            elif buffers == "average":
                ref_b[name] = m * ref_b[name] + (1 - m) * on_b[name]
        for name, p in ema.target.named_parameters():
            torch.testing.assert_close(p, ref_p[name], rtol=1e-12, atol=1e-12)
        for name, b in ema.target.named_buffers():
            torch.testing.assert_close(b, ref_b[name], rtol=1e-12, atol=1e-12)
    assert ema.step == 8
    nbt = dict(ema.target.named_buffers())["1.num_batches_tracked"]
    assert int(nbt) == (1 if buffers == "none" else int(online[1].num_batches_tracked))


def test_target_is_frozen_independent_copy() -> None:
    online = _net()
    online(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    ema = EMA(online, 0.99)
    assert ema.target is not online and ema.online is online
    assert all(not p.requires_grad and p.grad is None for p in ema.target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    assert set(ema.state_dict()) == {f"target.{k}" for k in online.state_dict()} | {"step_count"}
    # the target's mode is the user's, independent of the online model, and update() keeps it
    ema.eval()
    assert online.training and not ema.target.training
    ema.update()
    assert not ema.target.training
    ema.train()
    assert ema.target.training
    x = torch.randn(4, 3, dtype=torch.float64)
    y = ema(x)
    assert not y.requires_grad
    ema.eval()
    torch.testing.assert_close(ema(x), ema.target(x))


class DistributedDataParallel(nn.Module):  # look-alike wrapper (recognised by class name)
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class OptimizedModule(nn.Module):  # look-alike of torch.compile's wrapper (importing dynamo costs seconds)
    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self._orig_mod = mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


@pytest.mark.parametrize("wrap", ["ddp_like", "data_parallel", "compile", "nested"])
def test_unwraps_wrappers(wrap: str) -> None:
    online = _net()
    wrapped: nn.Module
    if wrap == "ddp_like":
        wrapped = DistributedDataParallel(online)
    elif wrap == "data_parallel":
        wrapped = nn.DataParallel(online)
    elif wrap == "compile":
        wrapped = OptimizedModule(online)
    else:
        wrapped = DistributedDataParallel(OptimizedModule(nn.DataParallel(online)))
    ema = EMA(wrapped, 0.5)
    assert type(ema.target) is nn.Sequential and ema.online is online
    assert set(ema.target.state_dict()) == set(online.state_dict())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(2.0)
    before = {n: p.clone() for n, p in ema.target.named_parameters()}
    ema.update(model=wrapped)  # an explicitly passed wrapped model is unwrapped too
    for n, p in online.named_parameters():
        torch.testing.assert_close(ema.target.get_parameter(n), 0.5 * before[n] + 0.5 * p.detach())


def test_update_after_step_copies_then_averages() -> None:
    online = _net()
    g = torch.Generator().manual_seed(2)
    ema = EMA(online, 0.8, update_after_step=3)
    for t in range(5):
        _perturb(online, g)
        prev = copy.deepcopy(ema.target)
        m = ema.update()
        assert m == (0.0 if t < 3 else 0.8)
        for (n, p), q in zip(ema.target.named_parameters(), prev.parameters()):
            expected = online.get_parameter(n) if t < 3 else 0.8 * q + 0.2 * online.get_parameter(n)
            torch.testing.assert_close(p, expected.detach(), rtol=1e-12, atol=1e-12)


def test_explicit_step_drives_schedule_and_counter() -> None:
    sched = CosineMomentum(total_steps=10, base=0.9)
    ema = EMA(_net(), sched)
    assert ema.update(step=4) == pytest.approx(sched(4))
    assert ema.step == 5 and ema.momentum == pytest.approx(sched(5))
    assert ema.update() == pytest.approx(sched(5)) and ema.step == 6
    assert ema.momentum_at(100) == 1.0


@pytest.mark.parametrize("placement", ["before_keys", "after_step"])
def test_state_dict_round_trip_resumes_identically(placement: str) -> None:
    total, stop = 9, 4
    data = torch.randn(total, 6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def make(seed: int) -> tuple[nn.Module, EMA]:
        model = _net(seed)
        return model, EMA(model, CosineMomentum(total, base=0.9), buffers="average")

    def train_step(model: nn.Module, ema: EMA, t: int) -> None:
        if placement == "before_keys":
            ema.update()
        target_out = ema(data[t])  # "keys"
        loss = ((model(data[t]) - target_out) ** 2).mean() + model(data[t]).pow(2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():  # plain SGD step (torch.optim's first use imports dynamo: seconds)
            for p, g in zip(model.parameters(), grads):
                p.sub_(0.1 * g)
        if placement == "after_step":
            ema.update()

    model, ema = make(0)
    for t in range(total):
        train_step(model, ema, t)

    model2, ema2 = make(0)
    for t in range(stop):
        train_step(model2, ema2, t)
    ckpt = copy.deepcopy({"model": model2.state_dict(), "ema": ema2.state_dict()})
    model3, ema3 = make(123)  # different initial weights, all overwritten by the checkpoint
    model3.load_state_dict(ckpt["model"])
    ema3.load_state_dict(ckpt["ema"])
    assert ema3.step == stop
    for t in range(stop, total):
        train_step(model3, ema3, t)
    for (n, a), b in zip(ema.state_dict().items(), ema3.state_dict().values()):
        assert torch.equal(a, b), n
    # and the target really moved away from the online model (the check is not vacuous)
    assert not torch.allclose(ema.target[0].weight, model[0].weight)


def test_functional_update_edges() -> None:
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = target.weight.detach().clone()
    ema_update_(target, online, 1.0)
    assert torch.equal(target.weight, before)
    ema_update_(target, online, 0.0)
    assert torch.equal(target.weight, online.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
        ({"buffers": "mean"}, "buffers must be one of"),
        ({"update_after_step": -1}, "update_after_step must be an int >= 0"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EMA(nn.Linear(2, 2), **kwargs)


def test_runtime_validation() -> None:
    with pytest.raises(ValueError, match=r"model must be an nn\.Module"):
        EMA("net")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schedule must return values in"):
        EMA(nn.Linear(2, 2), lambda t: 1.5).update()
    with pytest.raises(ValueError, match="same parameters"):
        EMA(nn.Linear(2, 2)).update(model=nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="has shape"):
        EMA(nn.Linear(2, 2)).update(model=nn.Linear(3, 2))
    with pytest.raises(ValueError, match="momentum must be in"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2), -0.1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        EMA(nn.Linear(2, 2)).update(step=-1)
