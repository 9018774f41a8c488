"""densecontrast.engine.metrics: meters vs naive statistics, the log_every generator, JSONL and TensorBoard writers."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
import torch

from densecontrast.engine import JsonlWriter, MetricLogger, SmoothedValue, TensorBoardWriter, progress_bar


@pytest.mark.parametrize("window", [1, 2, 5, 7])
def test_smoothed_value_matches_naive(window: int) -> None:
    g = torch.Generator().manual_seed(window)
    values = torch.randn(23, generator=g, dtype=torch.float64).tolist()
    weights = torch.randint(1, 6, (23,), generator=g).tolist()
    sv = SmoothedValue(window_size=window)
    for k, (v, n) in enumerate(zip(values, weights), start=1):
        sv.update(torch.tensor(v, dtype=torch.float64) if k % 2 else v, n=n)
        win = values[max(0, k - window) : k]
        assert sv.median == pytest.approx(statistics.median(win))
        assert sv.avg == pytest.approx(sum(win) / len(win))
        assert sv.max == pytest.approx(max(win))
        assert sv.value == pytest.approx(values[k - 1])
        num = sum(x * w for x, w in zip(values[:k], weights[:k]))
        assert sv.global_avg == pytest.approx(num / sum(weights[:k]))
    assert str(sv) == f"{sv.median:.4f} ({sv.global_avg:.4f})"


def test_smoothed_value_empty_and_errors() -> None:
    sv = SmoothedValue()
    assert all(math.isnan(x) for x in (sv.median, sv.avg, sv.global_avg, sv.max, sv.value))
    sv.synchronize_between_processes()  # no process group: no-op
    with pytest.raises(ValueError, match="window_size"):
        SmoothedValue(window_size=0)
    with pytest.raises(ValueError, match="n must be > 0"):
        sv.update(1.0, n=0)
    with pytest.raises(ValueError, match="one-element"):
        sv.update(torch.ones(2))


def test_metric_logger_meters_and_attributes() -> None:
    ml = MetricLogger(window_size=3)
    ml.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.1e}"))
    losses = [0.5, 1.5, 2.0, 4.0]
    for i, x in enumerate(losses):
        ml.update(n=2, loss=torch.tensor(x), lr=0.1 * (i + 1))
    assert ml.loss.avg == pytest.approx(sum(losses[-3:]) / 3)
    assert ml.global_averages()["loss"] == pytest.approx(sum(losses) / 4)
    assert ml.lr.value == pytest.approx(0.4)
    assert "lr: 4.0e-01" in str(ml)
    with pytest.raises(AttributeError, match="nope"):
        _ = ml.nope


class _NoLen:
    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_log_every_yields_all_and_prints_schedule() -> None:
    lines: list[str] = []
    ml = MetricLogger(print_fn=lines.append)
    batches = [(torch.zeros(3, 2), torch.ones(3)) for _ in range(7)]
    got = []
    for b in ml.log_every(batches, print_freq=3, header="Epoch [1]"):
        got.append(b)
        ml.update(loss=1.0)
    assert got == batches  # items unchanged, in order
    # prints at i = 0, 3, 6 (6 is also the last) + the total line
    assert [ln.split("]")[1].split("[")[1] for ln in lines[:-1]] == ["0/7", "3/7", "6/7"]
    assert all("eta:" in ln and "img/s:" in ln and "loss: 1.0000" in ln for ln in lines[:-1])
    assert lines[-1].startswith("Epoch [1] Total time:")
    assert ml.iter_time.count == 7 and ml.data_time.count == 7
    # no len(): no ETA, prints still happen; explicit batch size function
    lines.clear()
    out = list(ml.log_every(_NoLen(list(range(4))), print_freq=2, batch_size=lambda b: 8))
    assert out == [0, 1, 2, 3]
    assert len(lines) == 3 and "/?]" in lines[0] and "eta" not in lines[0] and "img/s" in lines[0]
    with pytest.raises(ValueError, match="print_freq"):
        list(ml.log_every([1], print_freq=0))


def test_jsonl_writer_lines_parse(tmp_path) -> None:
    path = tmp_path / "sub" / "log.jsonl"
    records = [
        {"epoch": 0, "loss": torch.tensor(0.25), "lrs": torch.tensor([0.1, 0.2]), "note": "x"},
        {"epoch": 1, "loss": float("nan"), "nested": {"a": torch.tensor(3)}},
    ]
    with JsonlWriter(path) as w:
        w.write(records[0])
    with JsonlWriter(path) as w:  # appends (a resumed run continues the log)
        w.write(records[1])
        w.write({"epoch": 2})
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    parsed = [json.loads(ln) for ln in lines]  # each line is valid JSON on its own
    assert parsed[0] == {"epoch": 0, "loss": 0.25, "lrs": [pytest.approx(0.1), pytest.approx(0.2)], "note": "x"}
    assert parsed[1] == {"epoch": 1, "loss": "nan", "nested": {"a": 3}}
    disabled = JsonlWriter(tmp_path / "off.jsonl", enabled=False)
    disabled.write({"a": 1})
    assert not (tmp_path / "off.jsonl").exists()
    with pytest.raises(ValueError, match="mapping"):
        JsonlWriter(tmp_path / "x.jsonl").write([1, 2])  # type: ignore[arg-type]


def test_tensorboard_writer_real_and_missing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    with TensorBoardWriter(tmp_path / "tb") as tb:
        assert tb.available
        tb.add_scalars({"loss": torch.tensor(1.0)}, step=3, prefix="train/")
        tb.flush()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with TensorBoardWriter(tmp_path / "tb2") as tb:
        assert not tb.available
        tb.add_scalar("loss", 1.0, step=0)  # silently ignored
    assert not (tmp_path / "tb2").exists()


def test_progress_bar_with_and_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    items = list(range(5))
    assert progress_bar(items, enabled=False) is items
    pytest.importorskip("tqdm")
    bar = progress_bar(items, disable=True)
    assert type(bar).__module__.startswith("tqdm") and list(bar) == items
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert progress_bar(items) is items
