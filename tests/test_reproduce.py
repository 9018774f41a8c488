"""Smoke tests of ``benchmarks/reproduce.py``: commands, aggregation and table on fake run outputs (no training)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rep():
    return _load(ROOT / "benchmarks" / "reproduce.py", "_reproduce_under_test")


def _fake_runs(rep, out: Path, methods: dict[str, list[float]], seeds: list[int], steps: int = 7) -> None:
    """Write eval.json (+ train_done.json for trained methods) with metric value base + 0.01 * seed^2."""
    for name, bases in methods.items():
        for seed in seeds:
            d = out / name / f"seed{seed}"
            d.mkdir(parents=True)
            ev = {key: base + 0.01 * seed**2 for (key, _), base in zip(rep.METRICS, bases, strict=True)}
            (d / "eval.json").write_text(json.dumps(ev))
            if rep.METHODS[name].script is not None:
                (d / "train_done.json").write_text(json.dumps({"steps": steps, "train_seconds": 10.0 + seed}))


def test_same_budget_and_valid_flags(rep, tmp_path):
    """Every trained method gets the same budget flags, and its extra flags parse with its script's parser."""
    budget = ["--arch", "--max-steps", "--seed", "--workers"]
    seen = {}
    for m in rep.METHODS.values():
        if m.script is None:
            continue
        cmd = rep.train_command(m, 11, 3, tmp_path / m.name)
        assert "--no-eval" in cmd
        vals = tuple(cmd[cmd.index(flag) + 1] for flag in budget)
        seen[m.name] = vals
        script = _load(ROOT / "examples" / m.script / "train.py", f"_train_{m.script}")
        args = script.get_args_parser().parse_args(cmd[2:])
        assert args.max_steps == 11 and args.seed == 3 and args.batch_size == 32 and args.arch == "tiny"
    assert len(set(seen.values())) == 1
    assert seen["moco"] == seen["pixcon_sr"]


def test_default_budget_is_the_demo_schedule(rep):
    script = _load(ROOT / "examples" / "pixcon" / "train.py", "_train_pixcon_defaults")
    demo = script.get_args_parser().parse_args([])
    assert rep.DEMO_STEPS == demo.epochs * demo.num_images // demo.batch_size
    assert rep.get_args_parser().parse_args([]).steps == rep.DEMO_STEPS
    assert rep.METHODS[rep.DEMO].args == ("--variant", demo.variant)
    assert "ablate_stride8" not in rep.COMPARISON and "pixcon_global" in rep.COMPARISON


def test_global_only_baselines_switch_off_the_dense_loss(rep, tmp_path):
    moco = rep.train_command(rep.METHODS["moco"], 5, 0, tmp_path)
    byol = rep.train_command(rep.METHODS["byol"], 5, 0, tmp_path)
    assert moco[moco.index("--dense-weight") + 1] == "0"
    assert byol[byol.index("--alpha") + 1] == "0"
    own = rep.train_command(rep.METHODS["pixcon_global"], 5, 0, tmp_path)
    assert own[own.index("--dense-weight") + 1] == "0" and "--variant" not in own


def test_mean_std_matches_statistics(rep):
    for values in ([0.1, 0.4, 0.35], [2.0, 2.0], [0.7]):
        mean, std = rep.mean_std(values)
        assert mean == pytest.approx(statistics.fmean(values))
        assert std == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)


def test_collect_and_table_on_fake_runs(rep, tmp_path):
    seeds = [0, 1, 2]
    fake = {"random": [0.05, 0.1, 0.4, 0.5, 0.3], "moco": [0.06, 0.12, 0.42, 0.55, 0.3],
            "pixcon_sr": [0.2, 0.3, 0.6, 0.7, 0.4]}
    _fake_runs(rep, tmp_path, fake, seeds)
    res = rep.collect(tmp_path, list(fake), seeds)
    assert res["missing"] == [] and len(res["runs"]) == 9
    for name, bases in fake.items():
        for (key, _), base in zip(rep.METRICS, bases, strict=True):
            vals = [base + 0.01 * s**2 for s in seeds]
            assert res["summary"][name][key]["mean"] == pytest.approx(statistics.fmean(vals))
            assert res["summary"][name][key]["std"] == pytest.approx(statistics.stdev(vals))
    table = rep.markdown_table(res, list(fake))
    lines = table.splitlines()
    assert len(lines) == 2 + len(fake)
    pix = next(line for line in lines if line.startswith("| PixCon-SR"))
    mean = statistics.fmean([0.2 + 0.01 * s**2 for s in seeds]) * 100
    std = statistics.stdev([0.2 + 0.01 * s**2 for s in seeds]) * 100
    assert f"{mean:.1f} ± {std:.1f}" in pix
    assert pix.count("|") == lines[0].count("|")


def test_missing_runs_are_reported(rep, tmp_path, capsys):
    _fake_runs(rep, tmp_path, {"moco": [0.1, 0.2, 0.3, 0.4, 0.5]}, [0, 1])
    text = rep.main(["--only-table", "--no-pictures", "--out", str(tmp_path), "--methods", "moco", "byol",
                     "--seeds", "0", "1", "2"])
    assert "MISSING RUNS" in text and "moco/seed2" in text and "byol/seed0" in text
    assert "| BYOL (global only) | global | 0 | n/a" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["moco"]["photos_flip_exact"]["n"] == 2
    assert (tmp_path / "results.md").read_text() == text
    assert text in capsys.readouterr().out
