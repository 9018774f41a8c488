"""Small-scale reproduction of the papers' comparisons on CPU, scored on real photographs and synthetic scenes.

Every method gets the same budget: ``--steps`` optimiser steps of the method's reference script
``examples/<m>/train.py`` with its demo defaults (data, views, ``tiny`` backbone, batch, SGD), one
process with ``OMP_NUM_THREADS=1``, started as a subprocess; ``--jobs`` runs go in parallel. The
global-only baselines are the dense scripts with the dense loss switched off (MoCo v2 = DenseCL
with lambda = 0, BYOL = LC-loss with alpha = 0, and the demo's own twin: PixCon with lambda = 0).
The ``ablate_*`` runs undo one change of the demo each (input standardisation, output stride 16,
128-px scenes, dead leaves instead of shapes) and all of them at once (the former demo).

Every exported ``backbone.pth`` and the random-init twin of the architecture are scored with
the project's one evaluation protocol (:mod:`densecontrast.eval.protocol`, the same function as
the scripts' end-of-run report and ``python -m densecontrast.eval``):

* correspondence accuracy on the 17 scikit-image sample photographs and on held-out synthetic
  scenes, ``flip`` and ``crop`` modes, colour-augmented key, mean over the 3 evaluation seeds;
* dense linear probe mIoU (:func:`densecontrast.eval.dense_linear_probe`) on the scene masks,
  256 training images (seed 20000), 128 validation images (seed 30000), 128 px, 20 epochs.

Outputs under ``--out``: ``<method>/seed<k>/`` (the script's ``backbone.pth``, ``metrics.jsonl``,
``train.log``, and ``eval.json``), ``results.json`` (every run and the mean / std per method) and
``results.md`` (the table that is printed). Pictures go to ``--img-dir``.

    python benchmarks/reproduce.py --seeds 0 1 2 --jobs 2 --out runs/reproduce          # the comparison
    python benchmarks/reproduce.py --seeds 0 --out runs/reproduce --methods random pixcon_coord ablate_standardize \
        ablate_stride8 ablate_image96 ablate_shapes ablate_old_demo                         # the ablation
    python benchmarks/reproduce.py --out runs/reproduce --only-table   # table + pictures again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    """One row of the comparison: which script runs it, with which extra flags."""

    name: str
    label: str
    kind: str  # "none" (random init), "global" or "dense"
    script: str | None = None
    args: tuple[str, ...] = field(default_factory=tuple)


# All EMA methods start their momentum at 0.99 (the scripts' defaults are 0.99 for PixCon / PixPro,
# 0.996 for LC-loss / BYOL and a fixed 0.999 for DenseCL; at a few dozen steps 0.999 barely moves the
# key encoder). DenseCL / MoCo keep a fixed momentum, the others ascend 0.99 -> 1 (cosine), as in
# their papers. DenseSiam has no momentum encoder.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("random", "random init", "none"),
        # MoCo v2 = DenseCL's global branch alone: online encoder + projector (no predictor), momentum key
        # encoder, queue of negatives, InfoNCE at t = 0.2, MoCo v2 views. lambda = 0 gives exactly that
        # loss (the dense branch is still computed, with zero weight, so the compute is DenseCL's).
        Method("moco", "MoCo v2 (global only)", "global", "densecl", ("--dense-weight", "0", "--momentum", "0.99")),
        Method("byol", "BYOL (global only)", "global", "lcloss", ("--alpha", "0", "--momentum-base", "0.99")),
        # PixCon's image loss alone (lambda = 0): the demo's own global-only twin, same script and settings.
        Method("pixcon_global", "PixCon image loss (global only)", "global", "pixcon", ("--dense-weight", "0")),
        Method("densecl", "DenseCL", "dense", "densecl", ("--momentum", "0.99")),
        Method("pixcon_coord", "PixCon-Coord", "dense", "pixcon", ("--variant", "coord")),
        Method("pixcon_sim", "PixCon-Sim", "dense", "pixcon", ("--variant", "sim")),
        Method("pixcon_sr", "PixCon-SR", "dense", "pixcon", ("--variant", "sr")),
        Method("pixpro", "PixPro", "dense", "pixpro", ()),
        Method("lcloss", "LC-loss (BYOL + local)", "dense", "lcloss", ("--momentum-base", "0.99")),
        Method("densesiam", "DenseSiam", "dense", "densesiam", ()),
        # Ablations of the demo (PixCon-Coord with the scripts' defaults): each undoes one change that moved
        # the real-photograph numbers (see docs/results.md).
        Method("ablate_standardize", "demo, inputs not standardised", "ablation", "pixcon", ("--no-standardize",)),
        Method("ablate_stride8", "demo, output stride 8", "ablation", "pixcon", ("--output-stride", "8")),
        Method("ablate_image96", "demo, 96-px scenes", "ablation", "pixcon", ("--image-size", "96")),
        Method("ablate_shapes", "demo, shapes scenes", "ablation", "pixcon", ("--synthetic", "shapes")),
        Method("ablate_old_demo", "former demo (SR, 96 px, stride 8, raw, lr 0.05)", "ablation", "pixcon",
               ("--variant", "sr", "--image-size", "96", "--output-stride", "8", "--no-standardize", "--lr", "0.05")),
    )
}
COMPARISON: tuple[str, ...] = tuple(m for m, meta in METHODS.items() if meta.kind != "ablation")
"""The default ``--methods``: random init, the global-only baselines and the dense methods."""
DEMO_STEPS = 256
"""The demo's schedule: 4 epochs of 2048 scenes at batch 32 (``examples/pixcon/train.py`` defaults)."""
DEMO = "pixcon_coord"
"""The method of the Quick-start demo (``python examples/pixcon/train.py`` with no arguments)."""

METRICS: tuple[tuple[str, str], ...] = (
    ("photos_crop_within_one", "photos: crop ±1 cell"),
    ("photos_flip_exact", "photos: flip exact"),
    ("synthetic_crop_within_one", "synthetic: crop ±1 cell"),
    ("synthetic_flip_exact", "synthetic: flip exact"),
    ("probe_miou", "synthetic probe mIoU"),
)

EVAL = dict(  # the probe settings; correspondence follows densecontrast.eval.protocol.CorrespondenceProtocol()
    probe_train=256, probe_train_seed=20_000, probe_val=128, probe_val_seed=30_000, probe_epochs=20,
)
TRAIN = dict(arch="tiny")  # every other setting is the scripts' default (the demo configuration)


# ----------------------------------------------------------------------------------------------- runs


def train_command(method: Method, steps: int, seed: int, run_dir: Path) -> list[str]:
    """The subprocess command line that pre-trains ``method`` for ``steps`` steps (same budget for all)."""
    assert method.script is not None
    return [
        sys.executable, str(ROOT / "examples" / method.script / "train.py"), *method.args, "--arch", TRAIN["arch"],
        "--epochs", "100000", "--max-steps", str(steps), "--seed", str(seed),
        "--no-eval", "--workers", "1", "--device", "cpu", "--save-every", "1000000000", "--print-freq", "10",
        "--output-dir", str(run_dir),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_one(method: Method, seed: int, steps: int, out: Path) -> dict[str, Any]:
    """Train (unless ``backbone.pth`` of a finished run of ``steps`` steps exists) and evaluate one run."""
    run_dir = out / method.name / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "train_done.json"
    info: dict[str, Any] = {"method": method.name, "seed": seed}
    if method.script is not None:
        prev = json.loads(done.read_text()) if done.exists() else None
        if prev is None or prev.get("steps") != steps or not (run_dir / "backbone.pth").exists():
            cmd = train_command(method, steps, seed, run_dir)
            t0 = time.perf_counter()
            with open(run_dir / "train.log", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT).returncode
            if rc != 0:
                raise RuntimeError(f"{method.name} seed {seed}: training failed (rc={rc}), see {run_dir / 'train.log'}")
            prev = {"steps": steps, "train_seconds": time.perf_counter() - t0, "command": cmd[1:]}
            if not (run_dir / "backbone.pth").exists():  # --no-eval skips the scripts' export
                export_from_checkpoint(run_dir)
            done.write_text(json.dumps(prev, indent=1))
        info.update(steps=steps, train_seconds=prev["train_seconds"])
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--eval-run", str(run_dir), "--eval-seed", str(seed)]
    if method.script is None:
        cmd.append("--eval-random")
    with open(run_dir / "eval.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"{method.name} seed {seed}: evaluation failed (rc={rc}), see {run_dir / 'eval.log'}")
    info["eval_seconds"] = time.perf_counter() - t0
    print(f"done {method.name} seed {seed}: {json.dumps(info)}", flush=True)
    return info


def export_from_checkpoint(run_dir: Path) -> None:
    """Write ``run_dir/backbone.pth`` (``{"arch", "state_dict"}``) from the online backbone in ``checkpoint.pth``."""
    import torch

    from densecontrast.eval.__main__ import extract_backbone_state

    obj = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    state, _ = extract_backbone_state(obj)  # online weights (momentum / target copies are skipped)
    torch.save({"arch": TRAIN["arch"], "state_dict": state}, run_dir / "backbone.pth")


def load_run_backbone(run_dir: Path | None) -> Any:
    """The exported backbone of a run, or (``run_dir=None``) the protocol's random-init twin of the architecture."""
    import torch

    from densecontrast.eval.__main__ import load_backbone
    from densecontrast.eval.protocol import CorrespondenceProtocol, random_init_like

    if run_dir is not None:
        return load_backbone(run_dir / "backbone.pth", device="cpu")[0]
    from densecontrast.backbones import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net, _ = build_backbone(TRAIN["arch"])
    return random_init_like(net, CorrespondenceProtocol().random_init_seed).eval()


def protocol_result(backbone: Any, source: str) -> dict[str, Any]:
    """The project's correspondence protocol (trained numbers only) on ``"photos"`` or ``"synthetic"``."""
    from densecontrast.eval.protocol import CorrespondenceProtocol, evaluate_backbone, evaluation_images

    protocol = CorrespondenceProtocol()
    images, what = evaluation_images(source, size=protocol.size)
    return evaluate_backbone(backbone, images, protocol=protocol, images_description=what, baseline=False,
                             device="cpu")


def evaluate_run(run_dir: Path, seed: int, random_init: bool) -> dict[str, Any]:
    """Score one backbone with the project's protocol (photos and synthetic scenes) and the probe; writes eval.json."""
    import torch

    from densecontrast.data.synthetic import SyntheticScenes
    from densecontrast.eval import dense_linear_probe
    from densecontrast.eval.protocol import CorrespondenceProtocol

    torch.set_num_threads(1)
    backbone = load_run_backbone(None if random_init else run_dir)
    protocol = CorrespondenceProtocol()
    res: dict[str, Any] = {"random_init": random_init}
    for source in ("photos", "synthetic"):
        r = protocol_result(backbone, source)
        res[source] = r
        for m, stat in r["trained"].items():
            res[f"{source}_{m}"] = stat["mean"]
    train = SyntheticScenes(EVAL["probe_train"], protocol.size, seed=EVAL["probe_train_seed"])
    val = SyntheticScenes(EVAL["probe_val"], protocol.size, seed=EVAL["probe_val_seed"])
    p = dense_linear_probe(backbone, train, val, num_classes=train.num_labels, epochs=EVAL["probe_epochs"],
                           device="cpu", seed=0)
    res["probe_miou"], res["probe_pixel_accuracy"] = p["miou"], p["pixel_accuracy"]
    (run_dir / "eval.json").write_text(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def collect(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Read every ``<out>/<method>/seed<k>/eval.json`` (+ ``train_done.json``) and aggregate per method.

    Returns ``{"runs": [...], "summary": {method: {metric: {"mean", "std", "n", "values"}}}, "missing": [...]}``.
    """
    runs, missing = [], []
    summary: dict[str, Any] = {}
    for name in methods:
        per: dict[str, list[float]] = {k: [] for k, _ in METRICS}
        per["train_seconds"] = []
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            ev = run_dir / "eval.json"
            if not ev.exists():
                missing.append(f"{name}/seed{seed}")
                continue
            rec = {"method": name, "seed": seed, **json.loads(ev.read_text())}
            done = run_dir / "train_done.json"
            if done.exists():
                d = json.loads(done.read_text())
                rec["steps"], rec["train_seconds"] = d["steps"], d["train_seconds"]
                per["train_seconds"].append(d["train_seconds"])
            runs.append(rec)
            for k, _ in METRICS:
                per[k].append(float(rec[k]))
        summary[name] = {
            k: {"mean": m, "std": s, "n": len(v), "values": v} for k, v in per.items() for m, s in [mean_std(v)]
        }
    return {"runs": runs, "summary": summary, "missing": missing}


def _fmt(stat: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if stat["n"] == 0:
        return "n/a"
    if stat["n"] == 1:  # one training seed: no spread to show
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown_table(results: dict[str, Any], methods: Sequence[str]) -> str:
    """The results table: one row per method, mean ± std (sample) over seeds, accuracies in %."""
    head = ["method", "type", "n", *[label for _, label in METRICS], "train s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(METRICS) + 1)) + "|"]
    for name in methods:
        s, meta = results["summary"][name], METHODS[name]
        n = s[METRICS[0][0]]["n"]
        cells = [meta.label, meta.kind if meta.kind != "none" else "-", str(n)]
        cells += [_fmt(s[k]) for k, _ in METRICS]
        cells.append(_fmt(s["train_seconds"], scale=1.0, digits=0) if s["train_seconds"]["n"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(results: dict[str, Any], methods: Sequence[str], path: Path) -> None:
    """Grouped bars (mean, error bar = std over seeds) of the metrics per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2), sharey=False)
    colors = {"none": "#999999", "global": "#4c72b0", "dense": "#dd8452", "ablation": "#55a868"}
    for ax, (key, label) in zip(axes, METRICS, strict=True):
        means = [results["summary"][m][key]["mean"] * 100 for m in methods]
        stds = [results["summary"][m][key]["std"] * 100 for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3, color=[colors[METHODS[m].kind] for m in methods])
        ax.set_xticks(range(len(methods)), [METHODS[m].label.split(" (")[0] for m in methods], rotation=60,
                      ha="right", fontsize=8)
        ax.set_title(label + " (%)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("grey: random init, blue: global-only, orange: dense; mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matches_picture(run_dir: Path | None, path: Path, title: str, seed: int = 0) -> None:
    """Argmax-cosine matches between two crops of one held-out scene (green: within one cell of the truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from densecontrast.backbones import extract_features
    from densecontrast.data.photos import sample_photos
    from densecontrast.eval.correspondence import match_correctness, random_crops, render_views
    from densecontrast.matching import similarity_match
    from densecontrast.viz import plot_matches

    backbone = load_run_backbone(run_dir)
    backbone.eval()
    x = sample_photos(128, names=("coffee",))[0][None].float() / 255
    g = torch.Generator().manual_seed(0)
    qg = random_crops(tuple(x.shape[-2:]), 1, g, (0.4, 1.0))
    kg = random_crops(tuple(x.shape[-2:]), 1, g, (0.4, 1.0))
    vs = (128, 128)
    v1, v2 = render_views(x, qg, vs), render_views(x, kg, vs)
    with torch.no_grad():
        f1, f2 = extract_features(backbone, v1), extract_features(backbone, v2)
    m = similarity_match(f1, f2)
    res = match_correctness(f1, f2, qg, kg)
    m = m.replace(valid=res["valid"])
    fig = plot_matches(v1[0], v2[0], m, color_by="correct", correct=res["within_one"],
                       query_shape=tuple(f1.shape[-2:]), title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded in ``results.json``."""
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}


def build_outputs(args: argparse.Namespace) -> str:
    """Aggregate, write ``results.json`` / ``results.md`` / pictures, return the table text."""
    results = collect(args.out, args.methods, args.seeds)
    steps = sorted({r["steps"] for r in results["runs"] if "steps" in r})
    table = markdown_table(results, args.methods)
    budget = (f"steps per run: {', '.join(map(str, steps)) or '-'}; training seeds: {' '.join(map(str, args.seeds))}; "
              f"the scripts' demo defaults, backbone {TRAIN['arch']}, 1 thread per run; correspondence: mean over "
              "the protocol's 3 evaluation seeds per run, then mean ± std over training seeds")
    text = table + "\n\n" + budget + "\n"
    if results["missing"]:
        text += f"\nMISSING RUNS (table incomplete): {', '.join(results['missing'])}\n"
    results.update(budget=budget, train=TRAIN, eval=EVAL, environment=environment(),
                   methods={m: {"label": METHODS[m].label, "kind": METHODS[m].kind, "script": METHODS[m].script,
                                "args": list(METHODS[m].args)} for m in args.methods})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(text)
    if not args.no_pictures and results["runs"]:
        img = args.img_dir
        bar_chart(results, args.methods, img / "results_bars.png")
        if DEMO in args.methods and (args.out / DEMO / f"seed{args.seeds[0]}" / "backbone.pth").exists():
            matches_picture(args.out / DEMO / f"seed{args.seeds[0]}", img / "results_matches_demo.png",
                            f"{METHODS[DEMO].label}, seed {args.seeds[0]}: matches (green: within one cell)",
                            args.seeds[0])
        if "random" in args.methods:
            matches_picture(None, img / "results_matches_random.png",
                            f"random init, seed {args.seeds[0]}: matches (green: within one cell)", args.seeds[0])
    return text


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help="optimiser steps per run, the same for every method (default: the demo's schedule)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    p.add_argument("--methods", nargs="+", default=list(COMPARISON), choices=list(METHODS),
                   help="default: every method but the ablations (ablate_*)")
    p.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--only-table", action="store_true", help="no runs: rebuild table / json / pictures from --out")
    p.add_argument("--no-pictures", action="store_true")
    p.add_argument("--eval-run", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--eval-random", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> str:
    args = get_args_parser().parse_args(argv)
    if args.eval_run is not None:  # internal: evaluate one run in its own single-thread process
        print(json.dumps(evaluate_run(args.eval_run, args.eval_seed, args.eval_random)))
        return ""
    if not args.only_table:
        # longest runs first so that the parallel slots finish together
        jobs = [(METHODS[m], s) for s in args.seeds for m in args.methods]
        jobs.sort(key=lambda j: j[0].script is None)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_one, m, s, args.steps, args.out) for m, s in jobs]
            errors = []
            for f in futures:
                try:
                    f.result()
                except RuntimeError as error:
                    errors.append(str(error))
        print(f"all runs: {time.perf_counter() - t0:.0f} s wall-clock", flush=True)
        for e in errors:
            print("ERROR:", e, file=sys.stderr)
    text = build_outputs(args)
    print(text)
    return text


if __name__ == "__main__":
    main()
