"""Eager against ``torch.compile`` (inductor, ``fullgraph=True``) for the library's hot paths, on the CPU.

Every piece is compiled with ``fullgraph=True`` (so the run fails if any graph break is left) and
timed against the same eager call at several sizes (B views, ``g x g`` query and key grids, D
channels). Pieces with data-dependent shapes use their static options in both columns:
``coordinate_match(max_positives=k)`` with ``k`` the batch's largest positive count (a bound a
training run would fix once) and ``DenseInfoNCE(static_shapes=True)``. "eager default" is the eager
call without the static option, for reference. Losses are timed forward + backward (gradient with
respect to the online features), matchers and reweighting forward (they run without gradient).
Compiled values are asserted equal to eager's (``allclose``, rtol 1e-5).

View pairs are random-resized crops of 640 x 480 images with random flips (as
``benchmarks/matching.py``); features are standard normal, float32; the queue holds ``--queue``
unit vectors.

Time: the best call over ``--repeat`` rounds after two warm-up calls each (the first compiled call
compiles; its time is reported separately), eager and compiled alternating; a round repeats a
call back to back for 50 ms (at least once), in thread CPU seconds (``time.thread_time``: robust
to other processes on a shared machine) or wall-clock seconds with ``--wall``.

Usage::

    python benchmarks/compile.py --threads 1 --repeat 3
    python benchmarks/compile.py --sizes 8x7 32x14 --pieces DenseInfoNCE PixPro
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from matching import random_resized_crops

from densecontrast.losses import DenseInfoNCE, LocalContrastiveLoss, PixProConsistencyLoss
from densecontrast.matching import (
    Matches,
    coordinate_match,
    correspondence_match,
    nearest_coordinate_match,
    similarity_match,
)
from densecontrast.weighting import SemanticReweighting

CLOCK: Callable[[], float] = time.thread_time
ROUND_TIME = 0.05  # seconds of back-to-back calls per round (at least one call)
Call = Callable[[], object]


def loss_step(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Call:
    """Forward + backward with respect to a fresh leaf copy of ``x``; returns (loss, gradient)."""

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.detach().requires_grad_()
        loss = loss_fn(leaf)
        loss.backward()
        return loss.detach(), leaf.grad  # type: ignore[return-value]

    return step


def pieces(b: int, g: int, d: int, k: int) -> dict[str, tuple[Callable[..., object], tuple[object, ...], Call | None]]:
    """Per piece: the function to compile, its arguments, and an eager default call (or None)."""
    gen = torch.Generator().manual_seed(b * 1000 + g)
    qg, kg = random_resized_crops(b, gen), random_resized_crops(b, gen)
    query, key = torch.randn(b, d, g, g, generator=gen), torch.randn(b, d, g, g, generator=gen)
    queue = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    sim = similarity_match(query, key, query_geometry=qg, key_geometry=kg)
    coord = coordinate_match(qg, kg, (g, g), (g, g))
    width = coord.key_index.shape[-1]
    corr = correspondence_match(qg, kg, (g, g), (g, g))
    infonce, sr = DenseInfoNCE(static_shapes=True), SemanticReweighting()
    weighted = sr(sim, qg, kg, (g, g))
    pixpro, lc = PixProConsistencyLoss(), LocalContrastiveLoss(0.2)

    def infonce_fn(x: torch.Tensor) -> torch.Tensor:
        return infonce(x, key, weighted, queue)

    def pixpro_fn(x: torch.Tensor) -> torch.Tensor:
        return pixpro(x, key, coord)

    def lc_fn(x: torch.Tensor) -> torch.Tensor:
        return lc(key, x, corr)

    return {
        "coordinate_match": (lambda *a: coordinate_match(*a, max_positives=width), (qg, kg, (g, g), (g, g)),
                             lambda: coordinate_match(qg, kg, (g, g), (g, g))),
        "nearest_coordinate_match": (nearest_coordinate_match, (qg, kg, (g, g), (g, g)), None),
        "correspondence_match": (correspondence_match, (qg, kg, (g, g), (g, g)), None),
        "similarity_match": (similarity_match, (query, key), None),
        "SemanticReweighting": (sr, (sim, qg, kg, (g, g)), None),
        "DenseInfoNCE": (infonce_fn, (query,), lambda: loss_step(
            lambda x: DenseInfoNCE()(x, key, weighted, queue), query)()),
        "PixPro": (pixpro_fn, (query,), None),
        "LC-loss": (lc_fn, (query,), None),
    }


def is_loss(name: str) -> bool:
    return name in ("DenseInfoNCE", "PixPro", "LC-loss")


def flat_tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, Matches):
        return [t for t in (out.valid, out.weight, out.key_index, out.key_mask, out.key_points, out.in_box,
                            out.similarity) if t is not None]
    if isinstance(out, tuple):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return [out] if isinstance(out, torch.Tensor) else []


def best(calls: list[Call], repeat: int) -> list[float]:
    """Best call of each over ``repeat`` rounds, alternating; a round repeats a call for ``ROUND_TIME``."""
    for call in calls:
        call()
        call()
    times = [math.inf] * len(calls)
    for _ in range(repeat):
        for i, call in enumerate(calls):
            start = CLOCK()
            while True:
                t0 = CLOCK()
                call()
                t1 = CLOCK()
                times[i] = min(times[i], t1 - t0)
                if t1 - start >= ROUND_TIME:
                    break
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["8x7", "32x7", "32x14", "8x28"],
                        help="B x g: batch size and grid side")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queue", type=int, default=8192)
    parser.add_argument("--pieces", nargs="+", default=None, help="names of the pieces to run (default: all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of thread CPU time")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; D = {args.dim}, queue K = {args.queue}; {'wall-clock' if args.wall else 'thread CPU'}"
          f" time, best of {args.repeat}; losses forward + backward\n")
    print("| piece | B | grid | eager ms | compiled ms | speed-up | eager default ms | first call (compile) s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        b, g = (int(v) for v in size.split("x"))
        for name, (fn, fargs, default) in pieces(b, g, args.dim, args.queue).items():
            if args.pieces and name not in args.pieces:
                continue
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True)
            if is_loss(name):
                eager_call, compiled_call = loss_step(fn, fargs[0]), loss_step(compiled, fargs[0])
            else:
                eager_call, compiled_call = partial(fn, *fargs), partial(compiled, *fargs)
            t0 = time.perf_counter()
            out_c = compiled_call()
            first = time.perf_counter() - t0
            for a, c in zip(flat_tensors(eager_call()), flat_tensors(out_c)):
                torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"{name} at {size}")
            calls = [eager_call, compiled_call] + ([default] if default is not None else [])
            times = best(calls, args.repeat)
            t_default = f"{times[2] * 1e3:,.2f}" if default is not None else ""
            print(f"| {name} | {b} | {g}x{g} | {times[0] * 1e3:,.2f} | {times[1] * 1e3:,.2f} "
                  f"| **{times[0] / times[1]:.2f}x** | {t_default} | {first:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
