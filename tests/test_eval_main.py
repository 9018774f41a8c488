from __future__ import annotations

import doctest
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

import densecontrast.eval.__main__ as cli
from densecontrast.backbones import build_backbone
from densecontrast.engine import export_backbone


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_docstring_examples() -> None:
    # pytest's --doctest-modules skips __main__.py; run its examples here.
    result = doctest.testmod(cli, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_infer_arch(arch: str) -> None:
    with torch.device("meta"):
        sd = getattr(torchvision.models, arch)().state_dict()
    assert cli.infer_arch(sd) == arch


def test_checkpoint_layouts_load_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18")
    sd = net.state_dict()
    export_backbone(net, tmp_path / "exported.pth", arch="resnet18")
    torch.save({"arch": "resnet18", "backbone": sd}, tmp_path / "wrapped.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "plain.pth")
    full = {f"encoder.backbone.{k}": v for k, v in sd.items()}
    full.update({f"momentum_encoder.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()})
    full["encoder.projector.0.weight"] = torch.zeros(3, 3)
    torch.save({"model": full, "epoch": 3}, tmp_path / "full.pth")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = net.eval()(x)
        for name in ("exported", "wrapped", "plain", "full"):
            loaded, arch = cli.load_backbone(tmp_path / f"{name}.pth")
            assert arch == "resnet18"
            assert torch.equal(loaded(x), ref), name


def test_wrong_arch_is_a_clear_error(tmp_path: Path) -> None:
    net, _ = build_backbone("resnet18")
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="resnet34"):
        cli.load_backbone(tmp_path / "r18.pth", arch="resnet34")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="no backbone keys"):
        cli.load_backbone(tmp_path / "junk.pth")


def test_cli_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    net, _ = build_backbone("tiny", width=8)
    export_backbone(net, tmp_path / "backbone.pth", arch="tiny")
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        for s in range(5):
            fh.write(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n")
    out = tmp_path / "eval"
    res = cli.main([str(tmp_path / "backbone.pth"), "--out", str(out), "--images", "synthetic",
                    "--probe-train", "8", "--probe-val", "4", "--epochs", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    stages = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(stages) == 4 and "random init: dense linear probe" in stages[2]  # a line per stage
    assert "correspondence accuracy on 64 held-out synthetic scenes" in captured.out
    text = (out / "report.md").read_text()
    assert "Correspondence accuracy" in text and "linear probe" in text.lower() and "random init" in text
    for f in ("matches.png", "attention.png", "training.png"):
        assert (out / f).stat().st_size > 2000 and f"]({f})" in text
    data = json.loads((out / "report.json").read_text())
    assert data["arch"] == "tiny"
    c = res["correspondence"]["trained"]["flip_exact"]
    assert len(c["values"]) == 3 and 0.0 <= c["mean"] <= 1.0
    assert res["correspondence"]["trained"]["flip_within_one"]["mean"] >= c["mean"]
    assert 0.0 <= res["linear_probe"]["trained"]["miou"] <= 1.0
    assert f"{c['mean']:.3f} ± {c['std']:.3f}" in text


def test_module_runs_as_a_command() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "densecontrast.eval", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage: python -m densecontrast.eval" in proc.stdout


def test_tiny_checkpoints_load_with_their_stride_and_standardization(tmp_path: Path) -> None:
    x = torch.rand(2, 3, 64, 64)
    for kwargs in ({}, {"output_stride": 8}, {"standardize": False, "width": 8}):
        torch.manual_seed(0)
        net, _ = build_backbone("tiny", **kwargs)
        export_backbone(net, tmp_path / "b.pth", arch="tiny")
        loaded, arch = cli.load_backbone(tmp_path / "b.pth")
        with torch.no_grad():
            assert arch == "tiny" and torch.equal(loaded(x), net.eval()(x)), kwargs
    # A checkpoint written before tiny had the flag: its inputs were never standardised.
    torch.manual_seed(0)
    old, _ = build_backbone("tiny", output_stride=8, standardize=False)
    sd = {k: v for k, v in old.state_dict().items() if k != "standardize"}
    torch.save({"arch": "tiny", "state_dict": sd}, tmp_path / "old.pth")
    loaded, _ = cli.load_backbone(tmp_path / "old.pth")
    with torch.no_grad():
        assert not bool(loaded.standardize) and torch.equal(loaded(x), old.eval()(x))
