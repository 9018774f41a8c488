"""Matchers against their brute-force formulations, over a sweep of grid sizes and batch sizes.

Each matcher is timed against the simplest correct code that computes the same
:class:`~densecontrast.matching.Matches` from the full ``(B, N, M)`` query-key matrix:

(a) :func:`~densecontrast.matching.coordinate_match` (PixPro positives, ``T = 0.7``). Brute force: every
    distance with the documented formula (:func:`~densecontrast.matching.center_distance` on the
    ``(B, N, M, 2)`` differences), ``< radius``, then packed (a stable ``sort`` puts the positives
    first, ``[..., :k]``), ``in_box`` from ``contains`` and the public ``Matches`` constructor.
    "mask only" is the bare ``(B, N, M)`` boolean matrix of the same distances, without packing,
    ``in_box`` or ``Matches``: a lower bound of any brute force, reported for reference. The
    positive sets are asserted identical (key indices and masks) wherever the brute force runs.
(b) :func:`~densecontrast.matching.nearest_coordinate_match`. Brute force: the ``argmin`` of every
    distance, ``key_points`` from ``to_cells``, ``in_box``, ``Matches``. The matched cells are
    asserted equal except where two cells are equally near up to 1e-6 (float ties).
(c) :func:`~densecontrast.matching.similarity_match` (cosine, ``chunk_size=1024``, C = ``--channels``
    float32 channels). Brute force: one ``bmm`` of the normalized features, NaN scores (non-finite
    features) set to ``-inf``, its ``max``, then ``Matches``. Indices are asserted identical.

View pairs are random-resized crops (scale (0.08, 1), ratio (3/4, 4/3)) of 640 x 480 images with
random flips; query and key grids are both ``g x g``.

Time: the best call over ``--repeat`` rounds (after one warm-up call of each), the brute force and
ours alternating; a round calls a function back to back for 50 ms (at least once) and keeps its
fastest call, in thread CPU seconds (``time.thread_time``: what one core spends, robust to other
processes on a shared machine) or wall-clock seconds with ``--wall``. Peak
memory: the most bytes of live tensors created during one call, counted by
:class:`live_memory.LiveTensorBytes` (inputs excluded, outputs included), in a separate call.
A brute force that would exceed ``--max-pairs`` query-key pairs runs on the largest sub-batch
that fits and its time and memory are scaled by ``B / b`` (both are linear in the batch); such
entries are marked ``~``. The similarity matcher does the same arithmetic as its brute force, so
above ``--max-pairs`` both run on the sub-batch.

The table for (a) also names the path the cost model of ``coordinate_match`` took ("dense": every
pair; "windows (G)": per-sample key-cell windows in G groups) and the script ends with the
crossover: per batch size, the smallest grid that uses windows.

Usage::

    python benchmarks/matching.py --threads 1 --repeat 3            # the full sweep, about 30 minutes
    python benchmarks/matching.py --batches 64 --grids 7 14 28 56 --matchers coordinate
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from live_memory import LiveTensorBytes

from densecontrast.geometry import ViewGeometry
from densecontrast.matching import (
    Matches,
    center_distance,
    coordinate,
    coordinate_match,
    nearest_coordinate_match,
    similarity_match,
)

GRIDS = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
CLOCK: Callable[[], float] = time.thread_time
ROUND_TIME = 0.05  # seconds of back-to-back calls per round (at least one call)


def random_resized_crops(b: int, gen: torch.Generator, width: float = 640.0, height: float = 480.0) -> ViewGeometry:
    """Random-resized-crop boxes (scale (0.08, 1), log-uniform ratio (3/4, 4/3)) with random flips."""
    area = width * height
    scale = 0.08 + 0.92 * torch.rand(b, generator=gen, dtype=torch.float64)
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(b, generator=gen, dtype=torch.float64))
    w = torch.sqrt(area * scale * ratio).clamp(max=width)
    h = torch.sqrt(area * scale / ratio).clamp(max=height)
    x0 = torch.rand(b, generator=gen, dtype=torch.float64) * (width - w)
    y0 = torch.rand(b, generator=gen, dtype=torch.float64) * (height - h)
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], -1).float()
    flips = torch.rand(b, generator=gen) < 0.5
    return ViewGeometry.from_crops(boxes, flips, torch.tensor([width, height]))


# ---------------------------------------------------------------------- brute forces
def _radius(qg: ViewGeometry, kg: ViewGeometry, g: int, threshold: float) -> torch.Tensor:
    diag_q = torch.linalg.vector_norm(qg.cell_size(g, g), dim=-1)
    diag_k = torch.linalg.vector_norm(kg.cell_size(g, g), dim=-1)
    return threshold * torch.maximum(diag_q, diag_k)


def mask_only_coordinate(qg: ViewGeometry, kg: ViewGeometry, g: int, threshold: float = 0.7) -> torch.Tensor:
    """The bare ``(B, N, M)`` positive matrix: every distance, ``< T * max bin diagonal``."""
    dist = center_distance(qg.grid(g, g)[:, :, None, :], kg.grid(g, g)[:, None, :, :])
    return dist < _radius(qg, kg, g, threshold)[:, None, None]


def brute_force_coordinate(qg: ViewGeometry, kg: ViewGeometry, g: int, threshold: float = 0.7) -> Matches:
    """``coordinate_match`` from the full matrix: the mask, packed by a stable sort, and ``in_box``."""
    cq, ck = qg.grid(g, g), kg.grid(g, g)
    dense = center_distance(cq[:, :, None, :], ck[:, None, :, :]) < _radius(qg, kg, g, threshold)[:, None, None]
    count = dense.sum(-1)
    k = max(int(count.max()), 1) if count.numel() else 1
    index = torch.sort(dense.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.arange(k) < count[..., None]
    b, n = count.shape
    return Matches(valid=count > 0, weight=torch.ones(b, n, dtype=cq.dtype), key_index=torch.where(mask, index, 0),
                   key_mask=mask, in_box=kg.contains(cq), key_shape=(g, g))


def brute_force_nearest(qg: ViewGeometry, kg: ViewGeometry, g: int) -> Matches:
    """``nearest_coordinate_match`` from the full matrix: the ``argmin`` of every distance."""
    cq, ck = qg.grid(g, g), kg.grid(g, g)
    index = center_distance(cq[:, :, None, :], ck[:, None, :, :]).argmin(-1)
    in_box = kg.contains(cq)
    b, n = in_box.shape
    return Matches(valid=in_box, weight=torch.ones(b, n, dtype=cq.dtype), key_index=index,
                   key_points=kg.to_cells(cq, g, g), in_box=in_box, key_shape=(g, g))


def brute_force_similarity(q: torch.Tensor, k: torch.Tensor) -> Matches:
    """``similarity_match`` from the full ``(B, N, M)`` cosine matrix (one ``bmm``) and its ``max``.

    With the matcher's rule for non-finite features: their NaN scores never win, and a query whose
    best score is not finite is invalid with similarity NaN.
    """
    qn = F.normalize(q.flatten(2).transpose(1, 2), dim=-1)
    kn = F.normalize(k.flatten(2), dim=1)
    scores = torch.bmm(qn, kn).nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    sim, index = scores.max(-1)
    valid = torch.isfinite(sim)
    b, n = index.shape
    return Matches(valid=valid, weight=torch.ones(b, n), key_index=index,
                   similarity=sim.masked_fill(~valid, math.nan), key_shape=tuple(k.shape[2:]))


# ---------------------------------------------------------------------- measurement
def best_times(fns: list[Callable[[], object]], repeat: int, round_time: float = ROUND_TIME) -> list[float]:
    """Best time of one call of each function over ``repeat`` rounds, the functions alternating.

    After one warm-up call each, a round calls a function back to back until ``round_time``
    seconds have passed (at least once) and keeps its fastest call: for sub-millisecond calls one
    call is too easily slowed by other processes.
    """
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            gc.collect()
            start = CLOCK()
            while True:
                t0 = CLOCK()
                out = fn()
                t1 = CLOCK()
                del out
                best[i] = min(best[i], t1 - t0)
                if t1 - start >= round_time:
                    break
    return best


def peak_bytes(fn: Callable[[], object], inputs: tuple[torch.Tensor, ...] = ()) -> int:
    gc.collect()
    with LiveTensorBytes(*inputs) as mode:
        out = fn()
    del out
    gc.collect()
    return mode.peak


def sub_batch(b: int, pairs_per_sample: int, max_pairs: int) -> int:
    """The largest batch ``<= b`` with at most ``max_pairs`` pairs (at least 1)."""
    return max(1, min(b, max_pairs // max(pairs_per_sample, 1)))


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f}" if n < 2**20 else f"{n / 2**20:,.1f}"


def ms(t: float) -> str:
    return f"{t * 1e3:,.3f}" if t < 0.01 else f"{t * 1e3:,.1f}"


def coordinate_path(qg: ViewGeometry, kg: ViewGeometry, g: int) -> str:
    """The path the cost model of ``coordinate_match`` takes: "dense" or "windows (groups)"."""
    plans = []
    plan = coordinate._plan

    def record(*args: object) -> list:
        plans.append(plan(*args))  # type: ignore[arg-type]
        return plans[-1]

    coordinate._plan = record
    try:
        coordinate_match(qg, kg, (g, g), (g, g))
    finally:
        coordinate._plan = plan
    if not plans or all(window is None for _, window in plans[0]):
        return "dense"
    return f"windows ({len(plans[0])})"


# ---------------------------------------------------------------------- sections
def run_coordinate(batches: list[int], grids: list[int], repeat: int, max_pairs: int) -> None:
    print("(a) coordinate_match (T = 0.7) against the brute force; query and key grids g x g\n")
    print("| grid | B | path | brute force ms | mask only ms | ours ms | speed-up | vs mask only "
          "| brute force peak MiB | ours peak MiB | memory ratio | k |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    crossover: dict[int, int | None] = {}
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        qg, kg = random_resized_crops(b, gen), random_resized_crops(b, gen)
        crossover[b] = None
        for g in grids:
            nb = sub_batch(b, g**4, max_pairs)
            scale, mark = b / nb, "~" if nb < b else ""
            qs, ks = qg[:nb] if nb < b else qg, kg[:nb] if nb < b else kg
            ours = coordinate_match(qg, kg, (g, g), (g, g))
            part = ours if nb == b else coordinate_match(qs, ks, (g, g), (g, g))
            ref = brute_force_coordinate(qs, ks, g)
            k = ref.key_index.shape[-1]
            assert torch.equal(part.key_index[..., :k], ref.key_index), f"indices differ at {g}x{g}, B={b}"
            assert torch.equal(part.key_mask[..., :k], ref.key_mask) and not bool(part.key_mask[..., k:].any())
            del ref, part
            brute = partial(brute_force_coordinate, qs, ks, g)
            ours_call = partial(coordinate_match, qg, kg, (g, g), (g, g))
            t_brute, t_mask, t_ours = best_times([brute, partial(mask_only_coordinate, qs, ks, g), ours_call], repeat)
            t_brute, t_mask = t_brute * scale, t_mask * scale
            m_brute = peak_bytes(brute) * scale
            m_ours = peak_bytes(ours_call)
            path = coordinate_path(qg, kg, g)
            if crossover[b] is None and path != "dense":
                crossover[b] = g
            print(f"| {g}x{g} | {b} | {path} | {mark}{ms(t_brute)} | {mark}{ms(t_mask)} | {ms(t_ours)} "
                  f"| **{t_brute / t_ours:,.2f}x** | {t_mask / t_ours:,.2f}x | {mark}{mib(m_brute)} | {mib(m_ours)} "
                  f"| {m_brute / max(m_ours, 1):,.1f}x | {ours.key_index.shape[-1]} |", flush=True)
    print("\nCost model of coordinate_match (pairs = query-key pairs tested): every pair is tested while the "
          f"smallest windows ({coordinate._MIN_WINDOW_CELLS} cells) would save at most "
          f"{coordinate._DENSE_PAIRS:,} pairs; above, windows when they cost less, counting "
          f"{coordinate._WINDOW_SETUP_PAIRS:,} pairs to set them up, {coordinate._GROUP_PAIRS:,} per group and "
          f"{coordinate._WINDOW_PAIR_COST} per pair tested in a window "
          f"(at most {coordinate._CHUNK_PAIRS:,} pairs a group); packing by topk up to "
          f"{coordinate._TOPK_PAIRS:,} pairs, by nonzero above.")
    print("Crossover (smallest grid that uses windows): " + ", ".join(
        f"B={b}: {'none' if g is None else f'{g}x{g}'}" for b, g in crossover.items()) + "\n")


def run_nearest(batches: list[int], grids: list[int], repeat: int, max_pairs: int) -> None:
    print("(b) nearest_coordinate_match against the brute force (argmin over every key cell)\n")
    print("| grid | B | brute force ms | ours ms | speed-up | brute force peak MiB | ours peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        qg, kg = random_resized_crops(b, gen), random_resized_crops(b, gen)
        for g in grids:
            nb = sub_batch(b, g**4, max_pairs)
            scale, mark = b / nb, "~" if nb < b else ""
            qs, ks = qg[:nb] if nb < b else qg, kg[:nb] if nb < b else kg
            ref = brute_force_nearest(qs, ks, g)
            got = nearest_coordinate_match(qs, ks, (g, g), (g, g))
            if not torch.equal(got.key_index, ref.key_index):  # only float ties may differ
                cq, ck = qs.grid(g, g), ks.grid(g, g)
                pick = [torch.gather(ck, 1, m.key_index[..., None].expand(-1, -1, 2)) for m in (got, ref)]
                gap = center_distance(cq, pick[0]) - center_distance(cq, pick[1])
                assert float(gap.abs().max()) < 1e-6, f"nearest cells differ at {g}x{g}, B={b}"
            del ref, got
            brute = partial(brute_force_nearest, qs, ks, g)
            ours_call = partial(nearest_coordinate_match, qg, kg, (g, g), (g, g))
            t_brute, t_ours = best_times([brute, ours_call], repeat)
            t_brute *= scale
            m_brute = peak_bytes(brute) * scale
            m_ours = peak_bytes(ours_call)
            print(f"| {g}x{g} | {b} | {mark}{ms(t_brute)} | {ms(t_ours)} | **{t_brute / t_ours:,.2f}x** "
                  f"| {mark}{mib(m_brute)} | {mib(m_ours)} | {m_brute / max(m_ours, 1):,.1f}x |", flush=True)
    print()


def run_similarity(batches: list[int], grids: list[int], repeat: int, max_pairs: int, channels: int) -> None:
    print(f"(c) similarity_match (cosine, C = {channels} float32 channels, chunk_size 1024) against the brute "
          "force (one bmm and its max)\n")
    print("| grid | B | brute force ms | ours ms | speed-up | brute force peak MiB | ours peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for b in batches:
        for g in grids:
            nb = sub_batch(b, g**4, max_pairs)
            scale, mark = b / nb, "~" if nb < b else ""
            fgen = torch.Generator().manual_seed(g)
            q = torch.randn(nb, channels, g, g, generator=fgen)
            k = torch.randn(nb, channels, g, g, generator=fgen)
            assert torch.equal(similarity_match(q, k).key_index, brute_force_similarity(q, k).key_index)
            brute, ours_call = partial(brute_force_similarity, q, k), partial(similarity_match, q, k)
            t_brute, t_ours = best_times([brute, ours_call], repeat)
            m_brute = peak_bytes(brute, (q, k)) * scale
            m_ours = peak_bytes(ours_call, (q, k)) * scale
            print(f"| {g}x{g} | {b} | {mark}{ms(t_brute * scale)} | {mark}{ms(t_ours * scale)} "
                  f"| **{t_brute / t_ours:,.2f}x** | {mark}{mib(m_brute)} | {mark}{mib(m_ours)} "
                  f"| {m_brute / max(m_ours, 1):,.1f}x |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--grids", type=int, nargs="+", default=GRIDS)
    parser.add_argument("--matchers", nargs="+", choices=["coordinate", "nearest", "similarity"],
                        default=["coordinate", "nearest", "similarity"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--max-pairs", type=int, default=1 << 24,
                        help="largest brute force run (B * N * M pairs); larger ones run a sub-batch and scale")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of thread CPU time")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {'wall-clock' if args.wall else 'thread CPU'} time, best of {args.repeat}\n")
    if "coordinate" in args.matchers:
        run_coordinate(args.batches, args.grids, args.repeat, args.max_pairs)
    if "nearest" in args.matchers:
        run_nearest(args.batches, args.grids, args.repeat, args.max_pairs)
    if "similarity" in args.matchers:
        run_similarity(args.batches, args.grids, args.repeat, args.max_pairs, args.channels)


if __name__ == "__main__":
    main()
