"""The step-breakdown, data-loading and GPU-check benchmark scripts run on the CPU in their tiny / quick forms."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
LABELS = ["PixCon-SR", "PixCon-Coord", "DenseCL", "PixPro", "LC-loss", "DenseSiam"]

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: int = 600, ok: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(BENCH / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def bench_modules():
    """Import the benchmark scripts as modules (they import each other by file name)."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
        import step_breakdown

        yield step_breakdown, gpu_check
    finally:
        sys.path.remove(str(BENCH))


def test_step_breakdown_tiny(tmp_path: Path) -> None:
    out = tmp_path / "steps.json"
    proc = _run("step_breakdown.py", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                "--crop-size", "32", "--no-memory", "--threads", "1", "--json", str(out))
    assert "| method | config | amp | grid | step ms | library ms | library % |" in proc.stdout
    for label in LABELS:
        assert f"| {label} | demo | none | 2x2 |" in proc.stdout  # 32-px views, tiny's stride 16
        assert f"{label} (demo): " in proc.stdout and "the 5 % goal" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["label"] for r in results] == LABELS
    for r in results:
        assert r["step_ms"] > 0 and 0 < r["library_fraction"] < 1, r
        assert r["library_ms"] == pytest.approx(sum(r["parts_ms"][k] for k in
                                                     ("geometry", "matching", "reweighting", "loss_fwd", "loss_bwd",
                                                      "queue", "ema")), rel=1e-6)
    by = {r["label"]: r for r in results}
    assert by["PixCon-SR"]["parts_ms"]["reweighting"] > 0 and by["PixCon-Coord"]["parts_ms"]["reweighting"] == 0
    assert by["DenseSiam"]["parts_ms"]["ema"] == 0 and by["DenseSiam"]["parts_ms"]["target_fwd"] == 0
    assert by["DenseCL"]["parts_ms"]["queue"] > 0 and by["PixPro"]["parts_ms"]["queue"] == 0


@pytest.mark.parametrize("method", ["pixcon-sr", "densesiam"])
def test_split_backward_equals_fused(bench_modules, method: str) -> None:
    """Cutting the graph at the network outputs gives the same update as one fused backward."""
    sb, _ = bench_modules
    cpu = torch.device("cpu")
    models = [sb.build_method(method, "demo", cpu, batch_size=2, crop_size=32, seed=3) for _ in range(2)]
    batch = sb.random_batch(method, models[0].hp, torch.Generator().manual_seed(0))
    for m, split in zip(models, (True, False)):
        sb.run_step(m, batch, 0, split=split)
    for (name, a), (_, b) in zip(models[0].online.named_parameters(), models[1].online.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_data_loading_tiny(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    proc = _run("data_loading.py", "--methods", "pixcon-sr", "--workers", "0", "1", "--batches", "1", "--steps", "1",
                "--warmup", "0", "--batch-size", "4", "--clock", "cpu", "--threads", "1", "--json", str(out),
                "--loader-args", "--num-images", "16", "--image-size", "48", "--crop-size", "32")
    assert "| pipeline | workers | loader img/s (wall) |" in proc.stdout
    assert "| method | step img/s (cpu) | loading img/s per core | workers needed |" in proc.stdout
    assert "| PixCon-SR | 0 |" in proc.stdout and "| PixCon-SR | 1 |" in proc.stdout  # end to end, both counts
    data = json.loads(out.read_text())
    assert [r["workers"] for r in data["loaders"]] == [0, 1]
    assert data["loaders"][0]["images_per_cpu_s"] > 0
    (row,) = data["summary"]
    assert row["workers_needed"] >= 1 and row["step_images_per_s"] > 0


def test_gpu_check_quick_passes_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run("gpu_check.py", "--quick", "--device", "auto", "--parts", "a", "b", "c", "--methods", "pixcon-sr",
                "lcloss", "--json", str(out))
    text = proc.stdout
    if not torch.cuda.is_available():
        assert "no CUDA device: running on the CPU" in text
        assert "--quick: the demo configuration" in text and "--quick: B=2, 7x7" in text
    assert "correctness: ALL PASS" in text
    assert "| ours (DenseInfoNCE) |" in text and "| floor: q @ Q^T" in text
    report = json.loads(out.read_text())
    assert report["status"] == "PASS"
    cases = {r["case"] for r in report["correctness"]["rows"]}
    assert {"coordinate_match", "nearest_coordinate_match", "similarity_match", "location_match",
            "correspondence_match", "SemanticReweighting", "DenseInfoNCE (queue)", "PixContrastLoss",
            "PixProConsistencyLoss", "LocalContrastiveLoss", "DenseSimSiamLoss", "RegionSimLoss", "BYOLLoss",
            "InfoNCE", "NegativeCosine"} <= cases
    assert all(r["status"] in ("PASS", "info") for r in report["correctness"]["rows"])
    grads = [r for r in report["correctness"]["rows"] if r["output"].startswith("grad")]
    assert len(grads) >= 15
    amps = [(r["label"], r["amp"]) for r in report["step_breakdown"]["results"]]
    assert amps == [("PixCon-SR", "bf16"), ("LC-loss", "bf16"), ("PixCon-SR", "fp16"), ("LC-loss", "fp16")]
    assert all(math.isfinite(r["step_ms"]) for r in report["step_breakdown"]["results"])


def test_gpu_check_reports_wrong_results_as_fail(tmp_path: Path) -> None:
    """The comparison can fail: a perturbed device input fails its rows (and only those), exit status 1."""
    proc = _run("gpu_check.py", "--quick", "--device", "cpu", "--parts", "a", "--perturb", "PixProConsistencyLoss",
                "coordinate_match", "--json", str(tmp_path / "bad.json"), ok=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "bad.json").read_text())["correctness"]["rows"]
    failed = {(r["case"], r["output"]) for r in rows if r["status"] == "FAIL"}
    assert ("PixProConsistencyLoss", "loss") in failed and ("PixProConsistencyLoss", "grad y") in failed
    assert ("coordinate_match", "positives") in failed
    assert {case for case, _ in failed} == {"PixProConsistencyLoss", "coordinate_match"}
    assert "| PixProConsistencyLoss | loss |" in proc.stdout and "| FAIL |" in proc.stdout


def test_gpu_check_zero_tolerance_fails(bench_modules) -> None:
    """With every tolerance scaled to 0, float32 cannot match float64: the float rows FAIL, exact rows PASS."""
    _, gc = bench_modules
    rows = gc.run_correctness(torch.device("cpu"), gc.Sizes(batch=2, grid=4, dim=8, queue=64), tol_scale=0.0)
    floats = [r for r in rows if r["rule"].startswith("relative") and r["error"] > 0]
    assert floats and all(r["status"] == "FAIL" for r in floats)
    exact = [r for r in rows if r["rule"] == "identical"]
    assert exact and all(r["status"] == "PASS" for r in exact)
    ok = gc.run_correctness(torch.device("cpu"), gc.Sizes(batch=2, grid=4, dim=8, queue=64))
    assert all(r["status"] in ("PASS", "info") for r in ok)


def test_gpu_check_compare_rules(bench_modules) -> None:
    _, gc = bench_modules
    case = gc.Case("toy", lambda x: x, {}, tol={"v": 1e-3})
    ref = {"v": torch.tensor([1.0, -2.0], dtype=torch.float64), "i": torch.tensor([1, 2])}
    good = {"v": torch.tensor([1.0005, -2.0], dtype=torch.float64), "i": torch.tensor([1, 2])}
    bad = {"v": torch.tensor([1.01, -2.0], dtype=torch.float64), "i": torch.tensor([1, 3])}
    nan = {"v": torch.tensor([math.nan, -2.0], dtype=torch.float64), "i": torch.tensor([1, 2])}
    assert [r["status"] for r in gc.compare(case, ref, good)] == ["PASS", "PASS"]
    assert [r["status"] for r in gc.compare(case, ref, bad)] == ["FAIL", "FAIL"]
    assert [r["status"] for r in gc.compare(case, ref, nan)] == ["FAIL", "PASS"]
    assert gc.relative_error(good["v"], ref["v"]) == pytest.approx(0.00025)


def test_gpu_check_example_part(tmp_path: Path) -> None:
    """Part d runs the PixCon script (fp16 on CUDA; a few bf16 steps on the CPU) and checks its losses."""
    out = tmp_path / "d.json"
    proc = _run("gpu_check.py", "--quick", "--parts", "d", "--json", str(out))
    res = json.loads(out.read_text())["example"]
    assert res["status"] == "PASS" and res["finite"] and res["returncode"] == 0, proc.stdout
    assert len(res["losses"]) == (20 if torch.cuda.is_available() else 3)


def test_colour_sensitivity_rows_are_the_protocol_under_each_colour_setting(tmp_path: Path) -> None:
    from densecontrast.backbones import build_backbone
    from densecontrast.engine import export_backbone
    from densecontrast.eval.protocol import CorrespondenceProtocol, evaluate_backbone, evaluation_images

    torch.manual_seed(0)
    net, _ = build_backbone("tiny", width=8)
    export_backbone(net, tmp_path / "b.pth", arch="tiny")
    out = tmp_path / "colour.json"
    proc = _run("colour_sensitivity.py", str(tmp_path / "b.pth"), "--images", "synthetic", "--size", "32",
                "--threads", "1", "--json", str(out))
    rows = json.loads(out.read_text())
    settings = ["protocol (all)", "none", "brightness", "contrast", "saturation", "hue", "grayscale", "blur"]
    assert [r["setting"] for r in rows] == settings
    label = f"{tmp_path.parent.name}/{tmp_path.name}"
    assert proc.stdout.count(f"| {label} |") == len(settings)
    images, what = evaluation_images("synthetic", size=32)
    for setting, color in (("protocol (all)", True), ("none", False)):
        ref = evaluate_backbone(net, images, protocol=CorrespondenceProtocol(size=32, color=color),
                                images_description=what)
        got = next(r["result"] for r in rows if r["setting"] == setting)
        assert got["trained"] == ref["trained"] and got["margin"] == ref["margin"], setting
    brightness = next(r["result"] for r in rows if r["setting"] == "brightness")
    assert brightness["protocol"]["color"] == {"jitter": [0.4, 0, 0, 0], "gray_p": 0.0, "blur_p": 0.0}
