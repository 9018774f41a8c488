"""densecontrast.engine.checkpoint: atomic saves, weights-only loads with RNG state, resume resolution, export."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from densecontrast.engine import (
    LARS,
    WarmupCosineScheduler,
    build_backbone,
    checkpoint_path,
    export_backbone,
    load_checkpoint,
    param_groups_weight_decay,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


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
    paths = {e: checkpoint_path(tmp_path, e) for e in (1, 2, 10)}
    latest = checkpoint_path(tmp_path)
    for p in [*paths.values(), latest]:
        save_checkpoint({"p": str(p)}, p)
    (tmp_path / ".checkpoint.pth.abc.tmp").write_bytes(b"partial")  # interrupted save
    (tmp_path / "checkpoint_old.pth.bak").write_bytes(b"x")
    base = 1_700_000_000
    mtimes = {paths[1]: base + 1, paths[2]: base + 3, paths[10]: base + 2, latest: base + 3}
    for p, t in mtimes.items():
        os.utime(p, (t, t))
    os.utime(tmp_path / ".checkpoint.pth.abc.tmp", (base + 9, base + 9))
    assert resolve_resume("auto", tmp_path) == latest  # newest; ties go to checkpoint.pth
    os.utime(paths[2], (base + 5, base + 5))
    assert resolve_resume("auto", tmp_path) == paths[2]
    latest.unlink()
    os.utime(paths[10], (base + 5, base + 5))
    assert resolve_resume("auto", tmp_path) == paths[10]  # tie between epochs: the higher epoch
    assert resolve_resume(str(paths[1]), tmp_path) == paths[1]
    with pytest.raises(FileNotFoundError, match="resume"):
        resolve_resume(str(tmp_path / "nope.pth"), tmp_path)
    with pytest.raises(ValueError, match="epoch"):
        checkpoint_path(tmp_path, -1)


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
