"""densecontrast.optim: LARS vs a naive float64 update, weight-decay groups, LR scaling, warm-up + cosine."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from densecontrast.optim import LARS, WarmupCosineScheduler, param_groups_weight_decay, scale_lr


def _model() -> nn.Module:
    m = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3, bias=False))
    return m.double()


def _naive_lars_step(params, grads, bufs, lr, mu, wd, c, excluded):
    """Textbook LARS on lists of float64 tensors (no in-place tricks)."""
    new = []
    for i, (w, g) in enumerate(zip(params, grads)):
        if not excluded[i]:
            g = g + wd * w
            wn, gn = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
            eta = c * wn / gn if wn > 0 and gn > 0 else 1.0
            g = eta * g
        bufs[i] = g.clone() if bufs[i] is None else mu * bufs[i] + g
        new.append(w - lr * bufs[i])
    return new


@pytest.mark.parametrize(
    ("exclude", "use_groups", "wd", "mu"),
    [(True, False, 1e-2, 0.9), (False, False, 1e-2, 0.9), (True, True, 5e-2, 0.0), (True, False, 0.0, 0.5)],
)
def test_lars_matches_naive(exclude: bool, use_groups: bool, wd: float, mu: float) -> None:
    torch.manual_seed(int(exclude) + 2 * int(use_groups) + int(wd * 100))
    model = _model()
    with torch.no_grad():
        model[3].weight.zero_()  # zero weight norm: trust ratio falls back to 1
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    if use_groups:
        groups = param_groups_weight_decay(model, wd)
        opt = LARS(groups, lr=0.3, momentum=mu, trust_coefficient=0.02)
        no_decay = {id(p) for p in groups[1]["params"]}
        excluded = [id(p) in no_decay for p in params]
    else:
        kw = {"momentum": mu, "weight_decay": wd, "trust_coefficient": 0.02, "exclude_bias_and_norm": exclude}
        opt = LARS(model.parameters(), lr=0.3, **kw)
        excluded = [exclude and p.ndim <= 1 for p in params]
    assert excluded == [exclude and ("bias" in n or n.startswith("1.")) for n in names]
    ref = [p.detach().clone() for p in params]
    bufs: list = [None] * len(params)
    for step in range(4):
        x = torch.randn(6, 5, dtype=torch.float64)
        opt.zero_grad()
        model(x).sin().sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        ref = _naive_lars_step(ref, grads, bufs, 0.3, mu, wd, 0.02, excluded)
        opt.step()
        for n, p, r in zip(names, params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14, msg=f"{n} at step {step}")
        with torch.no_grad():
            for p, r in zip(params, ref):
                p.copy_(r)  # keep the model on the reference trajectory


def test_lars_validation_and_closure() -> None:
    p = nn.Parameter(torch.ones(3))
    cases = [
        ({"lr": -1}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"trust_coefficient": 0}, "trust_coefficient"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            LARS([p], **{"lr": 0.1, **kwargs})
    opt = LARS([p], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(3.0)
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.8))  # 1-D: excluded, plain SGD step 0.1 * 2


def test_param_groups_weight_decay() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1, bias=False))
    model.register_parameter("pos_embed", nn.Parameter(torch.zeros(1, 4, 2, 2)))
    model[2].weight.requires_grad_(False)
    groups = param_groups_weight_decay(model, 0.05, skip=["pos_embed"])
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    decay = sorted(by_id[id(p)] for p in groups[0]["params"])
    no_decay = sorted(by_id[id(p)] for p in groups[1]["params"])
    assert decay == ["0.weight"]
    assert no_decay == ["0.bias", "1.bias", "1.weight", "pos_embed"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["lars_exclude"] is True and groups[0]["lars_exclude"] is False
    sgd = torch.optim.SGD(groups, lr=0.1)  # extra keys are harmless for other optimisers
    assert len(sgd.param_groups) == 2
    assert len(param_groups_weight_decay(nn.Linear(2, 2, bias=False), 0.1)) == 1  # empty group dropped
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups_weight_decay(model, -1.0)


def test_scale_lr() -> None:
    for base, batch, ref in [(0.3, 4096, 256), (0.05, 512, 256), (1.0, 64, 128)]:
        assert scale_lr(base, batch, ref) == pytest.approx(base * batch / ref)
    assert scale_lr(0.3, 4096) == pytest.approx(4.8)
    for args, name in [((-1.0, 256), "base_lr"), ((0.1, 0), "global_batch"), ((0.1, 256, 0), "base_batch")]:
        with pytest.raises(ValueError, match=name):
            scale_lr(*args)


def _formula(t: int, total: int, warm: int, r0: float, r1: float) -> float:
    if t < warm:
        return r0 + (1 - r0) * t / warm
    if t >= total:
        return r1
    return r1 + (1 - r1) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))


@pytest.mark.parametrize(("total", "warm", "r0", "r1"), [(50, 5, 0.0, 0.0), (37, 0, 1e-4, 0.1), (20, 19, 0.5, 0.0)])
def test_warmup_cosine_values_and_state_dict(total: int, warm: int, r0: float, r1: float) -> None:
    base = [0.4, 0.01]
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": base[0]}, {"params": [params[1]], "lr": base[1]}], lr=1.0)
    sched = WarmupCosineScheduler(opt, total_steps=total, warmup_steps=warm, warmup_start_ratio=r0, final_ratio=r1)
    half = total // 2
    saved = None
    for t in range(total + 3):
        for g, b in zip(opt.param_groups, base):
            assert g["lr"] == pytest.approx(b * _formula(t, total, warm, r0, r1), abs=1e-15)
        if t == half:
            buf = io.BytesIO()
            torch.save(sched.state_dict(), buf)
            saved = buf.getvalue()
        opt.step()
        sched.step()
    # resume from the middle: a fresh optimiser + scheduler continue on the same curve
    opt2 = torch.optim.SGD([{"params": [params[0]], "lr": base[0]}, {"params": [params[1]], "lr": base[1]}], lr=1.0)
    sched2 = WarmupCosineScheduler(opt2, total_steps=total, warmup_steps=warm)  # other ratios: the state wins
    sched2.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
    opt2.step()
    sched2.step()
    for g, b in zip(opt2.param_groups, base):
        assert g["lr"] == pytest.approx(b * _formula(half + 1, total, warm, r0, r1), abs=1e-15)


def test_warmup_cosine_validation() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    cases = [
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 10}, "warmup_steps"),
        ({"warmup_start_ratio": 2.0}, "warmup_start_ratio"),
        ({"final_ratio": -0.1}, "final_ratio"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            WarmupCosineScheduler(opt, **{"total_steps": 10, **kwargs})
