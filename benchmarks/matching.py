"""Benchmark of the coordinate and similarity matchers against their naive full-matrix paths.

(a) :func:`densecontrast.matching.coordinate_match` (analytic window, ``O(N k)``) against the
PixPro-style brute force: the full ``(B, N, M)`` distance matrix between all query and key cell
centers, then the threshold. Both use the same float operations, and the positive sets are
asserted identical at every grid size up to ``--check-max`` (``to_dense``).

(b) :func:`densecontrast.matching.similarity_match` (query chunks, ``chunk_size`` rows at once)
against the naive path: the full ``(B, N, M)`` cosine-similarity matrix (one ``bmm``) and its
``max`` over keys. Features are ``C = --channels`` (default 256) channels, float32. Indices are
asserted identical at grids up to ``--check-max``.

View pairs are random-resized crops (scale (0.08, 1), ratio (3/4, 4/3)) of 640 x 480 images with
random flips; query and key grids have the same size ``g x g``.

Time: the minimum wall-clock time over ``--repeat`` runs (after one warm-up run on small grids).
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before the
call; on CPU, :class:`LiveTensorBytes`, a ``TorchDispatchMode`` that adds the bytes of every
tensor storage an operator creates inside the call and subtracts them when the last tensor using
the storage is freed (weak-reference finalizers), and reports the maximum. Storages of the inputs
are not counted. Memory is measured in a separate run from timing (the mode slows ops down).

Usage::

    python benchmarks/matching.py --device cpu --batch 64 --grids 7 14 28 56 --repeat 3 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from live_memory import LiveTensorBytes

from densecontrast.geometry import ViewGeometry
from densecontrast.matching import coordinate_match, similarity_match


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


def brute_force_coordinate(qg: ViewGeometry, kg: ViewGeometry, g: int, threshold: float = 0.7) -> torch.Tensor:
    """PixPro-style positives: full (B, N, M) distances, then ``< T * max bin diagonal``."""
    cq, ck = qg.grid(g, g), kg.grid(g, g)

    def sq(t: torch.Tensor) -> torch.Tensor:
        return t * t

    dist = torch.sqrt(sq(cq[:, :, None, 0] - ck[:, None, :, 0]) + sq(cq[:, :, None, 1] - ck[:, None, :, 1]))
    diag = torch.maximum(torch.linalg.vector_norm(qg.cell_size(g, g), dim=-1),
                         torch.linalg.vector_norm(kg.cell_size(g, g), dim=-1))
    return dist < (threshold * diag)[:, None, None]


def naive_similarity(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (B, N, M) cosine similarity, then max over keys."""
    qn = F.normalize(q.flatten(2).transpose(1, 2), dim=-1)
    kn = F.normalize(k.flatten(2), dim=1)
    return torch.bmm(qn, kn).max(-1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int, warmup: bool) -> float:
    if warmup:
        fn()
    best = math.inf
    for _ in range(repeat):
        gc.collect()
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        del out
    return best


def peak_bytes(fn: Callable[[], object], device: torch.device, inputs: list[torch.Tensor]) -> int:
    gc.collect()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    with LiveTensorBytes(*inputs) as mode:
        out = fn()
    del out
    gc.collect()
    return mode.peak


def fmt_mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--grids", type=int, nargs="+", default=[7, 14, 28, 56])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--check-max", type=int, default=28, help="assert identical results up to this grid")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip", choices=["coordinate", "similarity"], nargs="*", default=[])
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    b = args.batch
    qg = random_resized_crops(b, gen).to(device)
    kg = random_resized_crops(b, gen).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {device.type} ({name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"batch {b}, repeat {args.repeat}\n")

    if "coordinate" not in args.skip:
        print("(a) coordinate matching, threshold 0.7, query and key grids g x g\n")
        print("| grid | B | brute force ms | ours ms | speed-up | brute force peak MiB | ours peak MiB "
              "| memory ratio | k | identical |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for g in args.grids:
            def fast(g: int = g) -> object:
                return coordinate_match(qg, kg, (g, g), (g, g))

            def brute(g: int = g) -> object:
                return brute_force_coordinate(qg, kg, g)

            same = "not checked"
            if g <= args.check_max:
                m = fast()
                ok = torch.equal(m.to_dense(g * g), brute())
                assert ok, f"positive sets differ at grid {g}"
                same = "yes"
            k = fast().key_index.shape[-1]
            t_fast = timed(fast, device, args.repeat, warmup=g <= 28)
            t_brute = timed(brute, device, args.repeat, warmup=g <= 28)
            m_fast = peak_bytes(fast, device, [])
            m_brute = peak_bytes(brute, device, [])
            print(f"| {g}x{g} | {b} | {t_brute * 1e3:,.1f} | {t_fast * 1e3:,.1f} | {t_brute / t_fast:,.1f}x "
                  f"| {fmt_mb(m_brute)} | {fmt_mb(m_fast)} | {m_brute / max(m_fast, 1):,.1f}x | {k} | {same} |",
                  flush=True)
        print()

    if "similarity" not in args.skip:
        print(f"(b) similarity matching, C = {args.channels} float32 features, chunk_size {args.chunk_size}\n")
        print("| grid | B | naive ms | ours ms | time ratio (ours / naive) | naive peak MiB | ours peak MiB "
              "| memory ratio (ours / naive) | identical |")
        print("|---|---|---|---|---|---|---|---|---|")
        for g in args.grids:
            fgen = torch.Generator().manual_seed(g)
            q = torch.randn(b, args.channels, g, g, generator=fgen).to(device)
            k = torch.randn(b, args.channels, g, g, generator=fgen).to(device)

            def ours(q: torch.Tensor = q, k: torch.Tensor = k) -> object:
                return similarity_match(q, k, chunk_size=args.chunk_size)

            def naive(q: torch.Tensor = q, k: torch.Tensor = k) -> object:
                return naive_similarity(q, k)

            same = "not checked"
            if g <= args.check_max:
                ok = torch.equal(ours().key_index, naive()[1])
                assert ok, f"indices differ at grid {g}"
                same = "yes"
            t_ours = timed(ours, device, args.repeat, warmup=g <= 28)
            t_naive = timed(naive, device, args.repeat, warmup=g <= 28)
            m_ours = peak_bytes(ours, device, [q, k])
            m_naive = peak_bytes(naive, device, [q, k])
            print(f"| {g}x{g} | {b} | {t_naive * 1e3:,.1f} | {t_ours * 1e3:,.1f} | {t_ours / t_naive:.2f} "
                  f"| {fmt_mb(m_naive)} | {fmt_mb(m_ours)} | {m_ours / max(m_naive, 1):.3f} | {same} |", flush=True)
            del q, k


if __name__ == "__main__":
    main()
