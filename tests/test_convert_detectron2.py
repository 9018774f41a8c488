"""examples/convert_to_detectron2.py maps torchvision ResNet keys to Detectron2's names."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from convert_to_detectron2 import detectron2_name  # noqa: E402


def test_resnet50_names_are_unique_and_complete() -> None:
    state = torchvision.models.resnet50().state_dict()
    mapped = {k: detectron2_name(k) for k in state}
    kept = {k: v for k, v in mapped.items() if v is not None}
    dropped = sorted(k for k, v in mapped.items() if v is None)
    assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in dropped)
    assert len(set(kept.values())) == len(kept)
    # Names Detectron2's ResNet-50 (BottleneckBlock, stride in 1x1) defines for its stem, stages and shortcuts.
    for name in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.shortcut.weight",
                 "res2.0.shortcut.norm.bias", "res3.3.conv2.weight", "res4.5.conv3.norm.weight",
                 "res5.2.conv1.norm.running_mean"):
        assert name in kept.values(), name
    stages = {v.split(".")[0] for v in kept.values()}
    assert stages == {"stem", "res2", "res3", "res4", "res5"}


def test_cli_converts_an_exported_backbone(tmp_path: Path) -> None:
    net = torchvision.models.resnet18()
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    src = tmp_path / "backbone.pth"
    torch.save({"arch": "resnet18", "state_dict": state}, src)
    dst = tmp_path / "out.pkl"
    subprocess.run([sys.executable, str(ROOT / "examples" / "convert_to_detectron2.py"), str(src), str(dst)],
                   check=True, capture_output=True)
    with open(dst, "rb") as f:
        out = pickle.load(f)
    model = out["model"]
    assert out["matching_heuristics"] is True
    assert len(model) == sum(1 for k in state if not k.endswith("num_batches_tracked"))
    torch.testing.assert_close(torch.from_numpy(model["res3.0.shortcut.norm.running_mean"]),
                               state["layer2.0.downsample.1.running_mean"])
    torch.testing.assert_close(torch.from_numpy(model["stem.conv1.weight"]), state["conv1.weight"])
