"""Benchmark of the dense InfoNCE loss against a queue: time (forward + backward) and peak memory.

Three implementations of the same per-query loss ``-log softmax([q.k+, q.Q] / tau)_0`` with
``P = B * h * w`` queries, ``K`` queue negatives and dimension ``D``; the gradient is taken with
respect to the queries only (the queue is a buffer, the keys come from the momentum encoder):

* ``naive``: ``logits = cat([l_pos, q @ Q^T], 1) / tau`` then ``cross_entropy(logits, 0)`` and
  ``.mean().backward()`` — what DenseCL / PixCon do. Keeps several ``(P, K + 1)`` float32 matrices.
* ``floor``: the bare work any exact implementation has to do, written by hand without autograd:
  forward ``L = q @ Q^T`` (one ``(P x D) @ (D x K)`` product) and ``lse = logsumexp(L, 1)``;
  backward ``S = exp(L - lse)`` (the softmax, from the kept ``L``) and ``grad_q = S @ Q`` (one
  ``(P x K) @ (K x D)`` product). It ignores the positive logit and the temperature. It runs in
  query chunks of the same size as ours so that it fits in memory at every size (the arithmetic is
  the same as unchunked; only the memory differs, so its memory column is not meaningful).
* ``matmuls``: only the two products ``L = q @ Q^T`` and ``L @ Q`` per chunk, no exponentials —
  the pure arithmetic lower bound (no exact implementation can be faster).
* ``ours``: :func:`densecontrast.losses.dense_infonce.dense_info_nce` (custom autograd function,
  query chunks of about 64 MiB of logits, softmax-weighted negatives accumulated in the forward).

Time is the minimum over ``--repeats`` runs of forward + backward, in wall-clock seconds or, with
``--cpu-time``, in process CPU seconds summed over threads (much less sensitive to other processes
on an oversubscribed machine). Peak memory is
measured by :class:`LiveTensorBytes`, a ``TorchDispatchMode`` that counts the bytes of every tensor
storage created by an operator while it is alive (a weak-reference finalizer subtracts it when its
last tensor dies) and records the maximum, relative to the inputs that exist before the call. It
sees every tensor allocated by ATen operators on any device, including those kept for backward.

Usage::

    python benchmarks/losses.py                 # 7x7 and 14x14 (naive included), 28x28 (no naive)
    python benchmarks/losses.py --naive-28      # also the naive path at 28x28 (needs ~20 GB)
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from live_memory import LiveTensorBytes

from densecontrast.losses.dense_infonce import default_chunk_size, dense_info_nce

#: Report process CPU time (all threads) instead of wall-clock time; set by ``--cpu-time``.
CPU_TIME = False


def naive(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    l_pos = (q * k).sum(1, keepdim=True)
    logits = torch.cat([l_pos, q @ queue.t()], dim=1) / tau
    target = torch.zeros(q.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, target)


def floor_fwd_bwd(q: torch.Tensor, queue: torch.Tensor, chunk: int) -> None:
    for start in range(0, q.shape[0], chunk):
        logits = q[start:start + chunk] @ queue.t()
        lse = torch.logsumexp(logits, dim=1)
        (logits - lse[:, None]).exp_() @ queue


def matmuls_only(q: torch.Tensor, queue: torch.Tensor, chunk: int) -> None:
    for start in range(0, q.shape[0], chunk):
        (q[start:start + chunk] @ queue.t()) @ queue


def measure(fn: Callable[[], None], repeats: int, inputs: tuple[torch.Tensor, ...]) -> tuple[float, int]:
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.process_time() if CPU_TIME else time.perf_counter()
        fn()
        times.append((time.process_time() if CPU_TIME else time.perf_counter()) - t0)
    gc.collect()
    mode = LiveTensorBytes(*inputs)
    with mode:
        fn()
    gc.collect()
    return min(times), mode.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 28])
    parser.add_argument("--naive-max", type=int, default=14, help="largest grid side for which naive runs")
    parser.add_argument("--naive-28", action="store_true", help="also run naive at 28x28 (about 20 GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU seconds (robust on a shared, oversubscribed CPU)")
    args = parser.parse_args()
    global CPU_TIME
    CPU_TIME = args.cpu_time
    torch.manual_seed(0)
    tau = 0.2
    queue = F.normalize(torch.randn(args.queue, args.dim), dim=1)
    chunk = default_chunk_size(args.queue)

    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, float32, B={args.batch}, K={args.queue}, D={args.dim}, tau={tau}, "
          f"chunk={chunk} rows\n")
    print(f"timing: min of {args.repeats} runs, {'process CPU' if CPU_TIME else 'wall-clock'} seconds\n")
    print("| grid | P queries | impl | time fwd+bwd (s) | peak memory (MiB) | time / floor | time / naive "
          "| memory / naive |")
    print("|---|---|---|---|---|---|---|---|")
    for side in args.sizes:
        p = args.batch * side * side
        q = F.normalize(torch.randn(p, args.dim), dim=1)
        k = F.normalize(torch.randn(p, args.dim), dim=1)

        def run_ours(q: torch.Tensor = q, k: torch.Tensor = k) -> None:
            qq = q.detach().requires_grad_()
            dense_info_nce(qq, k, queue, tau).mean().backward()

        def run_naive(q: torch.Tensor = q, k: torch.Tensor = k) -> None:
            qq = q.detach().requires_grad_()
            naive(qq, k, queue, tau).backward()

        def run_floor(q: torch.Tensor = q) -> None:
            floor_fwd_bwd(q, queue, chunk)

        def run_matmuls(q: torch.Tensor = q) -> None:
            matmuls_only(q, queue, chunk)

        results: dict[str, tuple[float, int] | None] = {}
        results["matmuls"] = measure(run_matmuls, args.repeats, (q, k, queue))
        results["floor"] = measure(run_floor, args.repeats, (q, k, queue))
        results["ours"] = measure(run_ours, args.repeats, (q, k, queue))
        if side <= args.naive_max or (side == 28 and args.naive_28):
            results["naive"] = measure(run_naive, 1 if side >= 28 else args.repeats, (q, k, queue))
            # correctness check at the same time
            a = dense_info_nce(q, k, queue, tau).mean()
            b = naive(q, k, queue, tau)
            assert torch.allclose(a, b, rtol=1e-4), (a, b)
        else:
            results["naive"] = None
        floor_t = results["floor"][0]  # type: ignore[index]
        nv = results["naive"]
        for name in ("naive", "floor", "matmuls", "ours"):
            r = results[name]
            if r is None:

                print(f"| {side}x{side} | {p} | naive | not run | not run | | | |")
                continue
            t, mem = r
            tn = f"{t / nv[0]:.2f}" if nv else ""
            mn = f"{mem / nv[1]:.4f}" if nv else ""
            print(f"| {side}x{side} | {p} | {name} | {t:.3f} | {mem / 2**20:.1f} | {t / floor_t:.2f} | {tn} | {mn} |")


if __name__ == "__main__":
    main()
