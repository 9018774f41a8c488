"""Images/s of the scripts' default data pipeline against the training step rate of the demo configuration.

The pipeline is the scripts' own: :func:`densecontrast.engine.build_pretraining_loader` with the
arguments of :func:`densecontrast.engine.add_common_args` (96-px ``SyntheticScenes``, 2048
images, batch 32) and the method's two-view transform (PixCon: ``byol_views(64,
min_overlap=0.01)``; PixPro: ``byol_views(64)``; DenseCL and DenseSiam: ``mocov2_views(64)``;
LC-loss: ``lc_views(64)``), i.e. ``SeededViews(MultiViewDataset(SyntheticScenes, transform))``,
``ShardedSampler`` and ``collate_views``, for each ``--workers`` count.

Three measurements:

1. **loader alone**: wall-clock images/s over ``--batches`` batches, after the first batch
   (which includes starting the workers; its time is reported separately); for 0 workers also
   the process CPU time per image, i.e. the images/s one core produces (robust on a loaded
   machine, where wall-clock rates mostly measure the other processes);
2. **step alone**: images/s of the method's demo training step fed with ready random batches
   (``benchmarks/step_breakdown.py``'s step, median; ``--clock wall`` or ``cpu``);
3. **end to end** (``--end-to-end``, default PixCon-SR): the same step fed by the real loader,
   for each worker count, wall-clock: when data is not the bottleneck it runs at the
   step-alone rate.

The number of workers needed is ``ceil(step img/s / img/s of one core of loading)``: the loader
keeps up when its workers together produce images at least as fast as the step consumes them
(one core per worker besides the training process's cores).

Usage::

    python benchmarks/data_loading.py                          # all methods, 0 / 1 / 2 workers
    python benchmarks/data_loading.py --methods pixcon-sr --batches 4 --workers 0 1 --end-to-end none
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import step_breakdown as sb
import torch

from densecontrast.data.sampling import step_batches
from densecontrast.engine import add_common_args, build_pretraining_loader, init_distributed
from densecontrast.transforms import byol_views, lc_views, mocov2_views


def transform_for(method: str, crop_size: int) -> Any:
    """The two-view transform each script builds (``examples/<method>/train.py``)."""
    script = sb.METHODS[method][1]
    if script == "pixcon":
        return byol_views(crop_size, min_overlap=0.01)
    if script == "pixpro":
        return byol_views(crop_size)
    if script == "lcloss":
        return lc_views(crop_size, scale=(0.08, 1.0))
    return mocov2_views(crop_size)  # DenseCL, DenseSiam


def loader_args(workers: int, batch_size: int, extra: Sequence[str] = ()) -> argparse.Namespace:
    """The scripts' common arguments (their defaults), with ``--workers`` and ``--batch-size`` set."""
    parser = add_common_args(argparse.ArgumentParser(), lr=0.05, epochs=4, batch_size=32)
    return parser.parse_args(["--workers", str(workers), "--batch-size", str(batch_size), *extra])


def build_loader(method: str, workers: int, batch_size: int, extra: Sequence[str] = ()) -> Any:
    args = loader_args(workers, batch_size, extra)
    info = init_distributed(device="cpu")
    return build_pretraining_loader(args, transform_for(method, args.crop_size), info)


def loader_rate(method: str, workers: int, batches: int, batch_size: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Wall-clock images/s of the loader alone (first batch, with the worker start, apart)."""
    loader = build_loader(method, workers, batch_size, extra)
    t0 = time.perf_counter()
    it = step_batches(loader, 0, batches + 1)
    next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    n = 0
    for _, (views, _) in it:
        n += views[0].shape[0]
    t2, c2 = time.perf_counter(), time.process_time()
    del it, loader
    return {"method": method, "workers": workers, "first_batch_s": t1 - t0, "images": n,
            "images_per_s": n / (t2 - t1) if n else float("nan"),
            # with 0 workers all the work is in this process: images per CPU second = one core's rate
            "images_per_cpu_s": n / (c2 - c1) if n and workers == 0 else None}


def end_to_end(method: str, workers: int, steps: int, warmup: int, batch_size: int,
               extra: Sequence[str] = ()) -> dict[str, Any]:
    """Images/s of the demo step fed by the real loader, against the same step fed ready random batches.

    Both runs are timed back to back over ``steps`` steps after ``warmup`` steps, on the wall clock
    and on this process's CPU time (which excludes the workers' loading but includes receiving
    their batches).
    """
    crop = loader_args(0, batch_size, extra).crop_size
    m = sb.build_method(method, "demo", torch.device("cpu"), total_steps=2 * (steps + warmup) + 10,
                        batch_size=batch_size, crop_size=crop)
    gen = torch.Generator().manual_seed(0)

    def run(batches: Any, offset: int) -> tuple[float, float]:
        wall = cpu = 0.0
        for i, batch in enumerate(batches):
            if i == warmup:
                wall, cpu = time.perf_counter(), time.process_time()
            sb.run_step(m, batch, offset + i, timed=False)
        return time.perf_counter() - wall, time.process_time() - cpu

    ready = (sb.random_batch(method, m.hp, gen) for _ in range(warmup + steps))
    alone_wall, alone_cpu = run(ready, 0)
    loader = build_loader(method, workers, batch_size, extra)
    fed_wall, fed_cpu = run((b for _, b in step_batches(loader, 0, warmup + steps)), warmup + steps)
    n = steps * batch_size
    return {"method": method, "workers": workers, "steps": steps,
            "images_per_s": n / fed_wall, "alone_images_per_s": n / alone_wall,
            "images_per_cpu_s": n / fed_cpu, "alone_images_per_cpu_s": n / alone_cpu}


def step_rate(method: str, steps: int, warmup: int, batch_size: int, clock: str = "wall",
              extra: Sequence[str] = ()) -> dict[str, Any]:
    """The demo step alone (ready random batches, the loader's view size), as ``step_breakdown.py`` measures it."""
    crop = loader_args(0, batch_size, extra).crop_size
    r = sb.measure(method, "demo", torch.device("cpu"), steps=steps, warmup=warmup, memory=False,
                   batch_size=batch_size, crop_size=crop, clock=clock)
    return {"method": method, "step_ms": r["step_ms"], "images_per_s": r["images_per_s"], "clock": clock}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=list(sb.METHODS), default=list(sb.METHODS))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=16, help="timed batches per loader measurement")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps of the step-rate measurements")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--end-to-end", nargs="*", default=["pixcon-sr"],
                   help="methods whose step is also run on the real loader ('none' to skip)")
    p.add_argument("--clock", choices=list(sb.CLOCKS), default="wall",
                   help="clock of the step-alone rate (cpu: process CPU time, robust on a loaded machine)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the main process")
    p.add_argument("--loader-args", nargs=argparse.REMAINDER, default=[],
                   help="extra arguments of the scripts' common parser, e.g. --image-size 128 (must come last)")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    e2e = [m for m in args.end_to_end if m != "none"]
    for m in e2e:
        if m not in sb.METHODS:
            raise SystemExit(f"--end-to-end: unknown method {m!r}; choose from {', '.join(sb.METHODS)} or none")
    env = {"device": sb.device_name(torch.device("cpu")), "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu": sb.cpu_model()}
    print(f"device: {env['device']}, torch {env['torch']}, batch {args.batch_size}; loader: {args.batches} "
          f"batches after the first, wall-clock; step: {args.clock} clock", flush=True)
    loaders: list[dict[str, Any]] = []
    steps: dict[str, dict[str, Any]] = {}
    scripts_done: dict[str, str] = {}
    for method in args.methods:
        script = sb.METHODS[method][1]
        if script not in scripts_done:  # PixCon-SR and -Coord share their pipeline
            for w in args.workers:
                r = loader_rate(method, w, args.batches, args.batch_size, args.loader_args)
                r["pipeline"] = script
                loaders.append(r)
                print(f"  loader {script}, {w} workers: {r['images_per_s']:,.0f} img/s "
                      f"(first batch {r['first_batch_s']:.2f} s)", flush=True)
            scripts_done[script] = method
        steps[method] = step_rate(method, args.steps, args.warmup, args.batch_size, args.clock, args.loader_args)
        print(f"  step {method}: {steps[method]['images_per_s']:,.1f} img/s", flush=True)
    e2e_rows = []
    for method in e2e:
        if method not in steps:
            steps[method] = step_rate(method, args.steps, args.warmup, args.batch_size, args.clock, args.loader_args)
        for w in args.workers:
            r = end_to_end(method, w, args.steps, args.warmup, args.batch_size, args.loader_args)
            e2e_rows.append(r)
            print(f"  end to end {method}, {w} workers: {r['images_per_s']:,.1f} img/s "
                  f"(ready batches {r['alone_images_per_s']:,.1f} img/s)", flush=True)

    print()
    print("| pipeline | workers | loader img/s (wall) | img/s per CPU second | first batch s (wall) |")
    print("|---|---|---|---|---|")
    for r in loaders:
        cpu = "-" if r["images_per_cpu_s"] is None else f"{r['images_per_cpu_s']:,.0f}"
        print(f"| {r['pipeline']} | {r['workers']} | {r['images_per_s']:,.0f} | {cpu} | {r['first_batch_s']:.2f} |")
    print()
    print(f"| method | step img/s ({args.clock}) | loading img/s per core | workers needed | "
          "loading / step time at 0 workers |")
    print("|---|---|---|---|---|")
    summary = []
    for method, s in steps.items():
        script = sb.METHODS[method][1]
        rows = [r for r in loaders if r["pipeline"] == script]
        per_core = next((r["images_per_cpu_s"] for r in rows if r["images_per_cpu_s"]), None)
        if per_core is None:  # no 0-worker run: the wall-clock rate of the fewest workers, per worker
            r0 = min(rows, key=lambda r: r["workers"])
            per_core = r0["images_per_s"] / max(r0["workers"], 1)
        need = max(1, math.ceil(s["images_per_s"] / per_core))
        ratio = s["images_per_s"] / per_core  # seconds of loading per second of stepping, in the main process
        summary.append({"method": method, "step_images_per_s": s["images_per_s"],
                        "loading_images_per_core_s": per_core, "workers_needed": need,
                        "loading_over_step_at_0_workers": ratio,
                        "loader_rates": {r["workers"]: r["images_per_s"] for r in rows}})
        print(f"| {sb.METHODS[method][0]} | {s['images_per_s']:,.1f} | {per_core:,.0f} | {need} | {ratio:.2f} |")
    if e2e_rows:
        print()
        print("| method | workers | fed by the loader img/s (wall) | ready batches img/s (wall) | ratio (wall) | "
              "fed img/s (main-process CPU) | ready img/s (CPU) | ratio (CPU) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in e2e_rows:
            print(f"| {sb.METHODS[r['method']][0]} | {r['workers']} | {r['images_per_s']:,.1f} | "
                  f"{r['alone_images_per_s']:,.1f} | {r['images_per_s'] / r['alone_images_per_s']:.2f} | "
                  f"{r['images_per_cpu_s']:,.1f} | {r['alone_images_per_cpu_s']:,.1f} | "
                  f"{r['images_per_cpu_s'] / r['alone_images_per_cpu_s']:.2f} |")
    print()
    for row in summary:
        print(f"{sb.METHODS[row['method']][0]}: the demo step consumes {row['step_images_per_s']:,.0f} img/s, one "
              f"core of loading produces {row['loading_images_per_core_s']:,.0f} img/s: {row['workers_needed']} "
              f"worker(s) keep data off the critical path")
    out = {"environment": env, "argv": list(sys.argv if argv is None else argv), "loaders": loaders,
           "steps": list(steps.values()), "summary": summary, "end_to_end": e2e_rows,
           "median_step_images_per_s": statistics.median([s["images_per_s"] for s in steps.values()])}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
