"""Launcher for multi-process (gloo, CPU) tests.

Usage from a test module (the worker must be a module-level function so it can be pickled)::

    from dist_helpers import run_distributed

    def _worker(rank: int, world_size: int, **kwargs) -> dict:
        ...  # a gloo process group is initialized here
        return {"value": tensor}

    results = run_distributed(_worker, world_size=2, some_kwarg=1)  # [rank0_result, rank1_result]

Processes start with ``fork`` where the platform has it (well under a second; each child sets
one intra-op thread before touching torch, so the parent's thread pools are never re-entered),
else with ``spawn`` (a fresh interpreter each: several seconds). Set
``DENSECONTRAST_TEST_START_METHOD=spawn`` to force spawn. Batch many checks into one run.
The process group is initialized through a temporary file (no port to pick). A worker exception
is re-raised in the parent; a run that exceeds ``timeout`` seconds (a hung collective) is
terminated and raises ``TimeoutError`` instead of hanging the test session.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, init_file: str, out_dir: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, **kwargs)
        torch.save(result, os.path.join(out_dir, f"result_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _default_start_method() -> str:
    env = os.environ.get("DENSECONTRAST_TEST_START_METHOD")
    if env:
        return env
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def run_distributed(fn: Callable[..., Any], world_size: int = 2, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, **kwargs)`` in ``world_size`` gloo processes; return their results by rank.

    Results must be picklable by ``torch.save`` and loadable with ``weights_only=True`` (tensors,
    numbers, strings, lists, tuples, dicts).
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, init_file, tmp, kwargs),
            nprocs=world_size,
            join=False,
            start_method=_default_start_method(),
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                for p in ctx.processes:
                    p.join(5)
                raise TimeoutError(f"distributed run of {fn.__name__} did not finish within {timeout} s")
        return [torch.load(os.path.join(tmp, f"result_{r}.pt"), weights_only=True) for r in range(world_size)]
