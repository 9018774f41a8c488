"""Throughput of the procedural datasets on one CPU thread: SyntheticScenes and DeadLeavesScenes.

For each generator and image size, the dataset is built and its first item drawn (DeadLeavesScenes
computes its shape and texture banks then, once per dataset and DataLoader worker; that one-off
time is printed separately), then ``--repeats`` runs of ``--num`` new items each are timed, the
configurations taking turns. Images per second are ``num / time`` of the best run, both in CPU time
of this process (``time.process_time``, less sensitive to other processes sharing the machine) and
in wall-clock time.

Run: ``python benchmarks/data_generation.py [--num 200] [--repeats 3] [--sizes 64 96 128]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from densecontrast.data.dead_leaves import DeadLeavesScenes
from densecontrast.data.synthetic import SyntheticScenes


def cpu_name() -> str:
    """The CPU model as the OS reports it (``lscpu``'s "Model name"), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed_run(dataset: object, start: int, num: int) -> tuple[float, float]:
    """CPU and wall seconds to draw items ``start .. start + num - 1``."""
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(start, start + num):
        dataset[i]  # type: ignore[index]
    return time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=200, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the best is kept)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128], help="image sizes in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"CPU {cpu_name()}, {os.cpu_count()} logical CPUs, load average {load:.1f}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); best of {args.repeats} runs of {args.num} images\n"
    )
    print("| generator | size | images/s (CPU time) | images/s (wall) | ms/image (CPU) | one-off setup (ms) |")
    print("|---|---|---|---|---|---|")
    n_total = 1 + args.repeats * args.num
    configs = []
    for name, cls in (("SyntheticScenes", SyntheticScenes), ("DeadLeavesScenes", DeadLeavesScenes)):
        for size in args.sizes:
            dataset = cls(num_images=n_total, image_size=size, seed=0)
            c0 = time.process_time()
            dataset[0]  # builds lazy state (DeadLeavesScenes: its shape and texture banks)
            configs.append((name, size, dataset, time.process_time() - c0, []))
    # Round robin: run r of every configuration before run r + 1 of any, so that a burst of load
    # from other processes does not fall on all the runs of one configuration.
    for r in range(args.repeats):
        for _, _, dataset, _, runs in configs:
            runs.append(timed_run(dataset, 1 + r * args.num, args.num))
    for name, size, _, setup, runs in configs:
        cpu = args.num / min(c for c, _ in runs)
        wall = args.num / min(w for _, w in runs)
        print(f"| {name} | {size} | {cpu:.0f} | {wall:.0f} | {1000 / cpu:.2f} | {1000 * setup:.0f} |")


if __name__ == "__main__":
    main()
