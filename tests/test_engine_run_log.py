"""densecontrast.engine.run_log.RunLog: JSON lines every print_freq steps, TensorBoard, rank-0 only, no extras."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from densecontrast.engine import RunLog


def test_lines_every_print_freq_and_at_the_stop_step(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with RunLog(tmp_path, total_steps=10, stop_step=7, print_freq=3, tensorboard=False, progress=False) as log:
        for step in range(1, 8):
            log.step(step, {"loss": torch.tensor(float(step)), "lr": 0.1}, epoch=step // 5, images=4)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 7]
    assert [r["loss"] for r in records] == [3.0, 6.0, 7.0]
    assert [r["epoch"] for r in records] == [0, 1, 1]
    assert all(r["img_per_s"] > 0 for r in records)
    assert capsys.readouterr().out.count("step ") == 3
    assert log.last["step"] == 7


def test_non_finite_values_stay_valid_json_and_runs_append(tmp_path) -> None:
    with RunLog(tmp_path, total_steps=2, print_freq=1, tensorboard=False, progress=False) as log:
        log.step(1, {"loss": float("nan")})
    with RunLog(tmp_path, total_steps=2, start_step=1, print_freq=1, tensorboard=False, progress=False) as log:
        log.step(2, {"loss": float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == ["nan", "inf"]
    with pytest.raises(ValueError, match="scalars"):
        RunLog(tmp_path, 1, tensorboard=False, progress=False).step(1, {"loss": torch.ones(2)})


def test_disabled_log_writes_nothing(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rank1"
    with RunLog(out, total_steps=1, print_freq=1, enabled=False) as log:
        log.step(1, {"loss": 1.0})
        log.print("hidden")
    assert not out.exists() and capsys.readouterr().out == ""
    assert log.last["loss"] == 1.0  # still tracked for the caller


def test_tensorboard_events_and_missing_tensorboard(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("tensorboard")
    with RunLog(tmp_path / "a", total_steps=1, print_freq=1, progress=False) as log:
        log.step(1, {"loss": 1.0})
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "a" / "tb").iterdir())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with RunLog(tmp_path / "b", total_steps=1, print_freq=1, progress=False) as log:
        log.step(1, {"loss": 1.0})
    assert not (tmp_path / "b" / "tb").exists()
    assert "TensorBoard events skipped: install tensorboard" in capsys.readouterr().out


def test_bad_print_freq() -> None:
    with pytest.raises(ValueError, match="print_freq"):
        RunLog("unused", 1, print_freq=0, enabled=False)
