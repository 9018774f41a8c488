"""The one evaluation protocol: statistics, random-init twin, identical numbers from the three entry points."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from densecontrast.backbones import build_backbone
from densecontrast.engine import export_backbone
from densecontrast.eval import __main__ as cli
from densecontrast.eval.protocol import (
    METRICS,
    CorrespondenceProtocol,
    evaluate_backbone,
    evaluation_images,
    random_init_like,
)
from densecontrast.eval.report import final_report

ROOT = Path(__file__).resolve().parents[1]


def test_random_init_twin_depends_on_the_architecture_and_seed_only() -> None:
    torch.manual_seed(0)
    a, _ = build_backbone("tiny", width=8)
    torch.manual_seed(1)
    b, _ = build_backbone("tiny", width=8)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)  # "trained" weights
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0)  # trained statistics
    ra, rb = random_init_like(a, 7), random_init_like(b, 7)
    for (name, pa), (_, pb) in zip(ra.state_dict().items(), rb.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    other = random_init_like(a, 8)
    assert any(not torch.equal(p, q) for p, q in zip(other.parameters(), ra.parameters()))  # the seed matters
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), ra.parameters()))  # really re-initialised


def test_mean_std_and_paired_margin_follow_their_definitions() -> None:
    torch.manual_seed(0)
    net, _ = build_backbone("tiny", width=8)
    images, _ = evaluation_images("synthetic", size=32, num_synthetic=6)
    res = evaluate_backbone(net, images, protocol=CorrespondenceProtocol(size=32, seeds=(0, 1, 2, 3)))
    for m in METRICS:
        t, r, d = res["trained"][m], res["random_init"][m], res["margin"][m]
        assert len(t["values"]) == 4
        assert t["mean"] == pytest.approx(statistics.fmean(t["values"]))
        assert t["std"] == pytest.approx(statistics.stdev(t["values"]))
        assert d["values"] == pytest.approx([a - b for a, b in zip(t["values"], r["values"])])
        assert d["within_noise"] == (abs(d["mean"]) <= 2 * statistics.stdev(d["values"]) / 2)
    same = evaluate_backbone(random_init_like(net, 12345), images, protocol=CorrespondenceProtocol(size=32))
    assert all(same["margin"][m]["mean"] == 0.0 and same["margin"][m]["within_noise"] for m in METRICS)


@pytest.mark.slow
def test_the_three_entry_points_give_identical_numbers(tmp_path: Path) -> None:
    """End-of-run report, python -m densecontrast.eval and benchmarks/reproduce.py on one backbone."""
    torch.manual_seed(0)
    net, _ = build_backbone("tiny")
    export_backbone(net, tmp_path / "backbone.pth", arch="tiny")
    loaded = cli.load_backbone(tmp_path / "backbone.pth", device="cpu")[0]
    report = final_report(loaded, output_dir=tmp_path, steps=0, final_loss=0.0, device="cpu")["correspondence"]
    cli_res = cli.main([str(tmp_path / "backbone.pth"), "--no-probe", "--no-figures", "--device", "cpu",
                        "--out", str(tmp_path / "eval")])["correspondence"]
    spec = importlib.util.spec_from_file_location("_reproduce_protocol", ROOT / "benchmarks" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    rep = importlib.util.module_from_spec(spec)
    sys.modules["_reproduce_protocol"] = rep
    spec.loader.exec_module(rep)
    repro = rep.protocol_result(rep.load_run_backbone(tmp_path), "photos")
    repro_random = rep.protocol_result(rep.load_run_backbone(None), "photos")
    assert report["images"] == cli_res["images"] == repro["images"]
    for m in METRICS:
        assert report["trained"][m]["values"] == cli_res["trained"][m]["values"] == repro["trained"][m]["values"]
        assert report["random_init"][m]["values"] == cli_res["random_init"][m]["values"]
        assert report["random_init"][m]["values"] == repro_random["trained"][m]["values"]
