"""Throughput of SyntheticScenes generation on one CPU core.

Prints a table: image size, images per second (CPU time of this process, ``time.process_time``,
which is robust to other processes sharing the machine, and wall time), per-image time,
device and torch version. Peak memory is not measured: one 224 px scene allocates a few MB.

Run: ``python benchmarks/synthetic_speed.py [--num 300]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from densecontrast.data.synthetic import SyntheticScenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num", type=int, default=300, help="images per size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device cpu, threads {torch.get_num_threads()}")
    print(f"{'size':>6} {'img/s (cpu)':>12} {'img/s (wall)':>13} {'ms/img (cpu)':>13}")
    for size in (64, 128, 224):
        ds = SyntheticScenes(num_images=args.num, image_size=size)
        ds[0]  # warm-up
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(args.num):
            ds[i]
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        print(f"{size:>6} {args.num / cpu:>12.1f} {args.num / wall:>13.1f} {1000 * cpu / args.num:>13.2f}")


if __name__ == "__main__":
    main()
