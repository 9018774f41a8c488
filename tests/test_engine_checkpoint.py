"""densecontrast.engine.checkpoint: atomic saves, weights-only loads with RNG state, training state, resume, export."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from densecontrast.backbones import build_backbone
from densecontrast.engine import (
    CHECKPOINT_NAME,
    RunError,
    export_backbone,
    load_checkpoint,
    load_training_state,
    resolve_resume,
    save_checkpoint,
    save_training_state,
    start_run,
)
from densecontrast.optim import LARS, WarmupCosineScheduler, param_groups_weight_decay
from densecontrast.queue import MomentumQueue
from densecontrast.random_state import rng_state, set_rng_state


def _draw() -> tuple:
    py = (random.random(), random.gauss(0, 1))
    return py, torch.rand(4).tolist(), torch.randn(2).tolist(), np.random.rand(3).tolist(), np.random.standard_normal()


def test_failure_mid_save_keeps_old_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "w": torch.arange(5)}, path)
    real_save = torch.save

    def exploding_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the temp file is fully written ...
        f.write(b"garbage")
        raise OSError("disk full")  # ... then the job dies before the rename

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    old = load_checkpoint(path)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # temp file cleaned up

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint({"epoch": 3}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_save_creates_dirs_and_rejects_pickled_objects(tmp_path) -> None:
    path = tmp_path / "a" / "b" / "c.pth"
    assert save_checkpoint({"x": [1, 2.0, "s", None, (torch.ones(1), {"y": torch.float16})]}, path)
    assert load_checkpoint(path)["x"][4][1]["y"] == torch.float16
    with pytest.raises(ValueError, match=r"state\['extra'\]\['fn'\].*weights_only"):
        save_checkpoint({"extra": {"fn": nn.Linear(1, 1)}}, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()
    with pytest.raises(ValueError, match="state must be a dict"):
        save_checkpoint([1], tmp_path / "bad.pth")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pth")


def test_rng_state_round_trip_through_weights_only_load(tmp_path) -> None:
    random.seed(3)
    torch.manual_seed(3)
    np.random.seed(3)
    _draw()
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and one in NumPy's
    save_checkpoint({"rng": rng_state()}, tmp_path / "c.pth")
    expected = _draw()
    _draw()  # move all generators on
    state = torch.load(tmp_path / "c.pth", weights_only=True)["rng"]
    set_rng_state(state)
    assert _draw() == expected
    with pytest.raises(ValueError, match="dict"):
        set_rng_state([1, 2])  # type: ignore[arg-type]


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _train(model, opt, sched, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_full_training_state_resumes_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = _tiny_model()
    opt = LARS(param_groups_weight_decay(model, 1e-4), lr=0.5)
    sched = WarmupCosineScheduler(opt, total_steps=10, warmup_steps=3)
    _train(model, opt, sched, 4)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": 0,
        "step": 4,
        "rng": rng_state(),
    }
    save_checkpoint(state, tmp_path / "checkpoint.pth")
    after = _train(model, opt, sched, 3)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    model2 = _tiny_model()
    opt2 = LARS(param_groups_weight_decay(model2, 1e-4), lr=0.5)
    sched2 = WarmupCosineScheduler(opt2, total_steps=10, warmup_steps=3)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["lr_scheduler"])
    set_rng_state(ckpt["rng"])
    assert _train(model2, opt2, sched2, 3) == after
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_resolve_resume(tmp_path) -> None:
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # empty dir: start fresh
    assert resolve_resume("auto", tmp_path / "not-yet") is None
    assert resolve_resume("auto", None) is None
    (tmp_path / ".checkpoint.pth.abc.tmp").write_bytes(b"partial")  # interrupted save: never picked
    assert resolve_resume("auto", tmp_path) is None
    latest = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"step": 1}, latest)
    assert resolve_resume("auto", tmp_path) == latest
    other = tmp_path / "elsewhere.pth"
    save_checkpoint({"step": 2}, other)
    assert resolve_resume(str(other), tmp_path) == other
    with pytest.raises(FileNotFoundError, match="resume"):
        resolve_resume(str(tmp_path / "nope.pth"), tmp_path)


def test_training_state_round_trip_continues_exactly(tmp_path) -> None:
    """save_training_state / load_training_state: same losses and weights as an uninterrupted run."""
    torch.manual_seed(0)
    model = _tiny_model()
    opt = LARS(param_groups_weight_decay(model, 1e-4), lr=0.5)
    sched = WarmupCosineScheduler(opt, total_steps=10, warmup_steps=3)
    queue = MomentumQueue(4, 8, seed=0)
    _train(model, opt, sched, 4)
    queue.enqueue(torch.nn.functional.normalize(torch.randn(3, 4), dim=1))
    objects = {"model": model, "optimizer": opt, "scheduler": sched, "queue": queue}
    save_training_state(tmp_path / CHECKPOINT_NAME, objects, step=4, args={"lr": 0.5})
    after = _train(model, opt, sched, 3)

    model2 = _tiny_model()
    opt2 = LARS(param_groups_weight_decay(model2, 1e-4), lr=0.5)
    sched2 = WarmupCosineScheduler(opt2, total_steps=10, warmup_steps=3)
    queue2 = MomentumQueue(4, 8, seed=1)
    step = load_training_state(tmp_path / CHECKPOINT_NAME, {"model": model2, "optimizer": opt2,
                                                            "scheduler": sched2, "queue": queue2})
    assert step == 4
    assert torch.equal(queue2.negatives(), queue.negatives())
    assert _train(model2, opt2, sched2, 3) == after
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["args"] == {"lr": 0.5}
    with pytest.raises(RunError, match=r"no entry for \[.target.\]"):
        load_training_state(tmp_path / CHECKPOINT_NAME, {"model": model2, "target": _tiny_model()})


def test_export_backbone_loads_into_torchvision(tmp_path) -> None:
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18")
    wrapped = nn.Module()
    wrapped.module = net  # looks like DDP to a state_dict: keys get a "module." prefix
    sd = wrapped.state_dict()
    assert all(k.startswith("module.") for k in sd)
    p = tmp_path / "backbone.pth"
    assert export_backbone(sd, p, arch="resnet18")
    ckpt = torch.load(p, weights_only=True)
    assert ckpt["arch"] == "resnet18"
    tv = torchvision.models.resnet18()
    res = tv.load_state_dict(ckpt["state_dict"], strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    for k, v in net.state_dict().items():
        assert torch.equal(tv.state_dict()[k], v), k
    # same features as our trunk
    net.eval()
    tv.eval()
    x = torch.randn(1, 3, 32, 32)
    trunk_out = net(x)
    tv_out = nn.Sequential(*list(tv.children())[:-2])(x)
    assert torch.allclose(trunk_out, tv_out)

    plain = tmp_path / "plain.pth"
    export_backbone(net, plain, arch="resnet18", plain=True, verify=False)
    assert set(torch.load(plain, weights_only=True)) == set(net.state_dict())
    broken = {k: v for k, v in net.state_dict().items() if k != "layer4.1.bn2.weight"}
    broken["layer1.0.conv1.weight"] = broken["layer1.0.conv1.weight"][:, :3]
    with pytest.raises(ValueError, match=r"resnet18.*layer4\.1\.bn2\.weight.*layer1\.0\.conv1\.weight"):
        export_backbone(broken, tmp_path / "wrong.pth", arch="resnet18")
    assert not (tmp_path / "wrong.pth").exists()
    tiny, _ = build_backbone("tiny")
    assert export_backbone(tiny, tmp_path / "tiny.pth", arch="tiny")  # not a torchvision name: no check
    with pytest.raises(ValueError, match="backbone must be"):
        export_backbone(3, tmp_path / "x.pth")  # type: ignore[arg-type]


def test_resume_with_other_arguments_or_method_is_refused(tmp_path) -> None:
    import argparse

    net = nn.Linear(2, 2)
    stored = {"method": "densecl", "batch_size": 8, "lr": 0.1, "workers": 2}
    save_training_state(tmp_path / CHECKPOINT_NAME, {"model": net}, step=1, args=stored)
    now = argparse.Namespace(method="pixcon", batch_size=4, lr=0.1, workers=0, force_resume=False)
    with pytest.raises(RunError, match="written by the densecl script, not by pixcon"):
        load_training_state(tmp_path / CHECKPOINT_NAME, {"model": net}, args=now)
    now.method = "densecl"
    with pytest.raises(RunError, match="--batch-size 8 \\(now 4\\)") as err:
        load_training_state(tmp_path / CHECKPOINT_NAME, {"model": net}, args=now)
    assert "--workers" not in str(err.value) and "--lr" not in str(err.value)  # workers may change; lr did not
    now.force_resume = True
    assert load_training_state(tmp_path / CHECKPOINT_NAME, {"model": net}, args=now) == 1
    with pytest.raises(RunError, match="'model' does not fit this run"):  # other weights: one line, not a key dump
        load_training_state(tmp_path / CHECKPOINT_NAME, {"model": nn.Linear(3, 2)}, args=now)


def test_checkpoints_respect_the_umask_and_stale_temporaries_are_removed(tmp_path) -> None:
    import argparse

    old = os.umask(0o022)
    try:
        save_checkpoint({"step": 1}, tmp_path / CHECKPOINT_NAME)
    finally:
        os.umask(old)
    assert (tmp_path / CHECKPOINT_NAME).stat().st_mode & 0o777 == 0o644  # readable by collaborators
    stale = tmp_path / ".checkpoint.pth.abc123.tmp"
    stale.write_bytes(b"partial write of a killed job")
    args = argparse.Namespace(output_dir=str(tmp_path), device="cpu", seed=0, deterministic=False)
    start_run(args, "demo")
    assert not stale.exists() and (tmp_path / CHECKPOINT_NAME).exists() and args.method == "demo"
