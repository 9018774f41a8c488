"""The reference scripts run end to end: a few steps, DDP on 2 processes, exact resume, preemption, bad files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densecontrast.backbones import build_backbone

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.parent.name for p in (ROOT / "examples").glob("*/train.py"))
TINY = [
    "--num-images", "24", "--image-size", "48", "--crop-size", "32", "--batch-size", "4", "--workers", "0",
    "--print-freq", "1",
]
QUEUES = {"densecl", "pixcon"}  # methods with negative queues: keep them small

pytestmark = pytest.mark.slow


def _tiny_args(method: str) -> list[str]:
    """Tiny sizes (and a 64-entry queue for the methods that have one)."""
    return [*TINY, *(["--queue-size", "64"] if method in QUEUES else [])]


def _run(method: str, out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "examples" / method / "train.py"), *_tiny_args(method),
           "--output-dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    return proc


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_state_equal(a: dict, b: dict, keys: list[str], atol: float = 0.0) -> None:
    for key in keys:
        sa, sb = a[key], b[key]
        assert sa.keys() == sb.keys(), key
        for name in sa:
            ta, tb = sa[name], sb[name]
            if not isinstance(ta, torch.Tensor):
                assert ta == tb, f"{key}.{name} differs"
            elif atol == 0.0 or not ta.is_floating_point():
                assert torch.equal(ta, tb), f"{key}.{name} differs"
            else:
                torch.testing.assert_close(ta, tb, atol=atol, rtol=0, msg=f"{key}.{name} differs")


@pytest.mark.parametrize("method", METHODS)
def test_script_runs_a_few_steps(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    _run(method, out, "--max-steps", "2", "--no-eval")
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    ckpt = _load(out / "checkpoint.pth")
    assert ckpt["step"] == 2 and "model" in ckpt and "optimizer" in ckpt and "rng" in ckpt
    exported = _load(out / "backbone.pth")  # written at the end of the schedule, even with --no-eval
    assert exported["arch"] == "tiny"
    backbone, _ = build_backbone("tiny")
    backbone.load_state_dict(exported["state_dict"])  # strict: exactly the backbone's keys
    assert torch.isfinite(backbone(torch.rand(2, 3, 32, 32))).all()
    # the exported weights are the trained online backbone's, as checkpointed
    for name, tensor in exported["state_dict"].items():
        assert any(k.endswith("." + name) and torch.equal(v, tensor) for k, v in ckpt["model"].items()), name


def test_report_with_pictures_and_export(tmp_path: Path) -> None:
    import torchvision  # noqa: F401  (the export check needs it)

    out = tmp_path / "pixcon"
    proc = _run("pixcon", out, "--max-steps", "2", "--variant", "sr")
    corr = json.loads((out / "report.json").read_text())["correspondence"]
    for model in ("trained", "random_init"):
        for metric in ("crop_within_one", "flip_exact"):
            assert 0.0 <= corr[model][metric]["mean"] <= 1.0 and len(corr[model][metric]["values"]) == 3
    assert corr["images"].startswith("17 real photographs")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("correspondence accuracy on 17 real photographs") and "vs random init" in last
    for name in ("loss.png", "matches.png"):
        assert (out / name).stat().st_size > 1000
    state = _load(out / "backbone.pth")
    assert any(k.endswith("weight") for k in state["state_dict"])


def test_resume_is_exact(tmp_path: Path) -> None:
    """4 steps straight == 2 steps, stop, resume, 2 more (bit-exact on CPU with deterministic settings)."""
    common = ("--max-steps", "4", "--no-eval", "--deterministic", "--variant", "sr")
    full, part = tmp_path / "full", tmp_path / "part"
    _run("pixcon", full, *common)
    _run("pixcon", part, *common, "--stop-after", "2")
    assert _load(part / "checkpoint.pth")["step"] == 2
    _run("pixcon", part, *common, "--resume", "auto")
    a, b = _load(full / "checkpoint.pth"), _load(part / "checkpoint.pth")
    assert a["step"] == b["step"] == 4
    _assert_state_equal(a, b, ["model", "target", "global_queue", "dense_queue", "scheduler"])
    assert _losses(full) == _losses(part)


def test_torchrun_two_processes_stay_identical(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "pixcon" / "train.py"), *_tiny_args("pixcon"), "--output-dir", str(out),
           "--max-steps", "2", "--no-eval", "--save-rank-states", "--variant", "sr"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 8" in proc.stdout + proc.stderr
    r0, r1 = _load(out / "rank0.pth"), _load(out / "rank1.pth")
    _assert_state_equal(r0, r1, ["model", "target", "global_queue", "dense_queue"])


def test_sigterm_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "sig"
    cmd = [sys.executable, str(ROOT / "examples" / "pixcon" / "train.py"), *_tiny_args("pixcon"),
           "--output-dir", str(out), "--epochs", "1000", "--max-steps", "500", "--no-eval", "--save-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 240
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until training is under way (the loop ends at EOF otherwise)
        if "step 1/500" in line:
            break
        assert time.time() < deadline, "the script did not start training"
    else:
        pytest.fail("the script ended before its first logged step")
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, rest[-3000:]
    assert "preemption signal received" in rest
    ckpt = _load(out / "checkpoint.pth")
    assert 1 <= ckpt["step"] < 500
    assert not (out / "backbone.pth").exists()  # an unfinished run exports nothing under the final name


def _image_folder(root: Path, n: int = 9) -> Path:
    from PIL import Image

    data = root / "images" / "sub"
    data.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"img{i}.png")
    return root / "images"


def test_corrupt_image_is_skipped_counted_and_warned_once_with_workers(tmp_path: Path) -> None:
    images = _image_folder(tmp_path)
    (images / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "run"
    proc = _run("pixcon", out, "--data", str(images), "--max-steps", "6", "--no-eval", "--workers", "2")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_images"] == 1  # counted in the main process although workers decode
    assert proc.stderr.count("skipping unreadable image") == 1  # 6 steps = 3 epochs: warned once


def test_user_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.jpg").write_bytes(b"garbage")
    for data, message in ((tmp_path / "missing", "existing directory"), (empty, "contains no images"),
                          (unreadable, "no readable image")):
        cmd = [sys.executable, str(ROOT / "examples" / "pixcon" / "train.py"), *_tiny_args("pixcon"),
               "--data", str(data), "--output-dir", str(tmp_path / "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr


def test_resume_with_other_arguments_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run("pixcon", out, "--max-steps", "4", "--stop-after", "1", "--no-eval")
    cmd = [sys.executable, str(ROOT / "examples" / "pixcon" / "train.py"), *_tiny_args("pixcon"),
           "--output-dir", str(out), "--max-steps", "4", "--no-eval", "--resume", "auto", "--batch-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--batch-size 4 (now 2)" in proc.stderr
    other = [c if c != "pixcon" else "densecl" for c in cmd]
    other[1] = str(ROOT / "examples" / "densecl" / "train.py")
    proc = subprocess.run([*other[:-2], "--batch-size", "4"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "written by the pixcon script, not by densecl" in proc.stderr
    _run("pixcon", out, "--max-steps", "4", "--no-eval", "--resume", "auto", "--batch-size", "2", "--force-resume")


def test_process_group_signal_with_workers_saves_and_resumes_exactly(tmp_path: Path) -> None:
    """SLURM / timeout signal the whole process group: the workers survive, the main process saves."""
    common = ("--max-steps", "12", "--no-eval", "--deterministic", "--workers", "2", "--save-every", "0")
    full, part = tmp_path / "full", tmp_path / "part"
    _run("pixcon", full, *common)
    cmd = [sys.executable, str(ROOT / "examples" / "pixcon" / "train.py"), *_tiny_args("pixcon"),
           "--output-dir", str(part), *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # its own process group, as under srun / timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        if "step 2/12" in line:
            break
    else:
        pytest.fail("the script ended before step 2")
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the group: main and DataLoader workers
    rest = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, rest[-3000:]
    assert "preemption signal received" in rest and "killed by signal" not in rest
    stopped = _load(part / "checkpoint.pth")["step"]
    assert 2 <= stopped < 12 and not (part / "backbone.pth").exists()
    _run("pixcon", part, *common, "--resume", "auto")
    a, b = _load(full / "checkpoint.pth"), _load(part / "checkpoint.pth")
    assert a["step"] == b["step"] == 12
    _assert_state_equal(a, b, ["model", "target", "global_queue", "dense_queue", "scheduler"])


@pytest.mark.parametrize("method", METHODS)
def test_help_shows_defaults_and_cites_papers(method: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / method / "train.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    lr = 0.2 if method == "pixcon" else 0.05  # the demo's learning rate (PixCon-Coord: docs/results.md)
    assert f"(default: {lr})" in text and "(default: tiny)" in text  # --lr and --arch
    assert "spec" not in text.lower()
