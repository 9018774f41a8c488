"""examples/lightning: PixCon and PixPro LightningModules train on the CPU, checkpoint and resume exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning example needs the extra: pip install 'densecontrast[lightning]'")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning"
sys.path.insert(0, str(EXAMPLE))

import lightning as L  # noqa: E402
import train_lightning  # noqa: E402

TINY = ["--num-images", "12", "--image-size", "48", "--crop-size", "32", "--batch-size", "4", "--workers", "0",
        "--queue-size", "64", "--proj-hidden", "32", "--proj-dim", "16", "--log-every", "1"]


class Capture(L.Callback):
    """The module's state when training starts (after Lightning restored the checkpoint)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _fit(out: Path, *extra: str, ckpt_path: str | None = None) -> tuple[L.LightningModule, Capture]:
    args = train_lightning.get_args_parser().parse_args([*TINY, "--output-dir", str(out), *extra])
    trainer, module, data, _ = train_lightning.build(args)
    trainer.callbacks.append(capture := Capture())
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=False)
    return module, capture


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("method", ["pixcon", "pixpro"])
def test_two_steps_checkpoint_and_exact_resume(method: str, tmp_path: Path) -> None:
    common = ["--method", method, "--max-steps", "4", "--save-every", "1"]
    # 2 steps of a 4-step schedule; ModelCheckpoint saves at every step (in on_train_batch_end)
    _, first = _fit(tmp_path / "a", *common, "--stop-after", "2")
    assert first.step == 0
    ckpt_path = tmp_path / "a" / "checkpoints" / "step2.ckpt"
    ckpt = _load(ckpt_path)
    assert ckpt["global_step"] == 2
    saved = ckpt["state_dict"]
    assert int(saved["target.step_count"]) == 2  # the momentum target is in Lightning's checkpoint
    if method == "pixcon":
        assert int(saved["global_queue.ptr"]) == 8 and int(saved["dense_queue.ptr"]) == 8  # 2 steps x 4 keys
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())

    # resume from the mid-epoch checkpoint (3 batches per epoch) for the 2 remaining steps
    module, resumed = _fit(tmp_path / "a", *common, ckpt_path=str(ckpt_path))
    assert resumed.step == 2
    assert resumed.state.keys() == saved.keys()
    for k in saved:  # queues (queue, ptr), EMA weights and step_count, online weights: as saved
        assert torch.equal(resumed.state[k], saved[k]), k
    assert module.trainer.global_step == 4 and int(module.target.step_count) == 4
    if method == "pixcon":
        assert int(module.global_queue.ptr) == 16

    # bit-exact with an uninterrupted 4-step run: same batches, augmentations, queues and momentum
    uninterrupted, _ = _fit(tmp_path / "b", *common)
    a, b = module.state_dict(), uninterrupted.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_from_the_final_checkpoint_of_a_stopped_run(tmp_path: Path) -> None:
    common = ["--max-steps", "3"]
    _fit(tmp_path / "a", *common, "--stop-after", "2")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 2
    module, resumed = _fit(tmp_path / "a", *common, ckpt_path=str(last))
    assert resumed.step == 2 and module.trainer.global_step == 3
    uninterrupted, _ = _fit(tmp_path / "b", *common)
    a, b = module.state_dict(), uninterrupted.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_script_ddp_on_two_cpu_processes_and_export(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, str(EXAMPLE / "train_lightning.py"), *TINY, "--num-images", "16", "--max-steps", "2",
           "--devices", "2", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    state = _load(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert int(state["global_queue.ptr"]) == 2 * 2 * 4  # 2 steps x 2 ranks x 4 keys: the enqueue all-gathers
    exported = _load(out / "backbone.pth")
    assert exported["arch"] == "tiny" and exported["state_dict"]
