from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

pytest.importorskip("matplotlib")

from densecontrast.matching import Matches
from densecontrast.transforms import IMAGENET_MEAN, IMAGENET_STD
from densecontrast.viz import plot_attention, plot_matches, plot_training, plot_weights, to_display


def _check_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 2000
    img = TF.pil_to_tensor(Image.open(path).convert("RGB")).float()
    assert img.shape[1] > 100 and img.shape[2] > 100
    assert img.std() > 10  # not a blank canvas
    assert torch.unique(img.reshape(3, -1), dim=1).shape[1] > 50  # many distinct colours


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 48, 64, generator=g), torch.rand(3, 48, 64, generator=g)


def test_plot_matches_key_index_weight(tmp_path: Path) -> None:
    v1, v2 = _views()
    m = Matches(valid=torch.rand(2, 12) > 0.2, weight=torch.rand(2, 12), key_index=torch.randint(0, 12, (2, 12)),
                key_shape=(3, 4))
    fig = plot_matches(v1, v2, m, index=1, save=tmp_path / "m.png", title="matches")
    _check_png(tmp_path / "m.png")
    assert len(fig.axes) == 3


def test_plot_matches_key_points_correct_and_normalized(tmp_path: Path) -> None:
    v1, v2 = _views()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    m = Matches(valid=torch.ones(1, 12, dtype=torch.bool), weight=torch.ones(1, 12),
                key_points=torch.rand(1, 12, 2) * torch.tensor([3.0, 2.0]), key_shape=(3, 4))
    correct = torch.rand(1, 12) > 0.5
    plot_matches((v1 - mean) / std, (v2 - mean) / std, m, color_by="correct", correct=correct, unnormalize=True,
                 query_shape=(3, 4), max_lines=5, save=tmp_path / "c.png")
    _check_png(tmp_path / "c.png")


def test_plot_matches_multi_positive_and_errors(tmp_path: Path) -> None:
    v1, v2 = _views()
    m = Matches(valid=torch.ones(1, 12, dtype=torch.bool), weight=torch.ones(1, 12),
                key_index=torch.randint(0, 12, (1, 12, 3)), key_mask=torch.rand(1, 12, 3) > 0.3, key_shape=(3, 4))
    plot_matches(v1, v2, m, color_by="none", save=tmp_path / "k.png")
    _check_png(tmp_path / "k.png")
    with pytest.raises(ValueError, match="correct"):
        plot_matches(v1, v2, m, color_by="correct")
    with pytest.raises(ValueError, match="color_by"):
        plot_matches(v1, v2, m, color_by="rainbow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query_shape"):
        plot_matches(v1, v2, m, query_shape=(5, 5))


def test_plot_weights(tmp_path: Path) -> None:
    v1, _ = _views()
    plot_weights(v1, torch.linspace(0, 1, 12).reshape(3, 4), save=tmp_path / "w.png")
    _check_png(tmp_path / "w.png")
    fig = plot_weights((v1 * 255).to(torch.uint8), torch.rand(1, 12))  # flat (1, N) weights
    assert len(fig.axes) == 3
    with pytest.raises(ValueError, match="weights"):
        plot_weights(v1, torch.rand(2, 3, 4))


def test_plot_attention(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU())
    backbone.train()
    fig = plot_attention(backbone, torch.rand(3, 48, 48), torch.tensor([[0.2, 0.3], [0.8, 0.7]]),
                         save=tmp_path / "a.png")
    _check_png(tmp_path / "a.png")
    assert len(fig.axes) == 3 and backbone.training
    with pytest.raises(ValueError, match="points"):
        plot_attention(backbone, torch.rand(3, 16, 16), torch.rand(3))


def test_plot_training_from_jsonl_and_list(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as fh:
        for s in range(30):
            rec = {"step": s, "loss": 2.0 / (s + 1), "lr": 0.1 * (1 - s / 30), "note": "text", "flag": True}
            if s % 5 == 0:
                rec["eval/exact"] = s / 30
            fh.write(json.dumps(rec) + "\n")
        fh.write("\n")
    fig = plot_training(path, save=tmp_path / "t.png")
    _check_png(tmp_path / "t.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "lr", "eval/exact"]
    line = fig.axes[2].get_lines()[0]
    assert list(line.get_xdata()) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    fig = plot_training([{"loss": 1.0}, {"loss": 0.5}], keys=["loss"])
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0.0, 1.0]
    with pytest.raises(ValueError, match="empty"):
        plot_training([])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(ValueError, match="line 1"):
        plot_training(bad)


def test_to_display() -> None:
    x = torch.rand(3, 5, 6)
    assert torch.allclose(to_display(x), x.permute(1, 2, 0))
    assert to_display(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)).eq(1).all()
    with pytest.raises(ValueError, match="image"):
        to_display(torch.rand(4, 5, 6))
