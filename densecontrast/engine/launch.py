"""Process launch: distributed initialisation (torchrun / SLURM), DDP wrapping, preemption signals.

Everything degrades to one process on the CPU (or the one GPU) under plain ``python train.py``.
Rank and world-size queries come from :mod:`densecontrast.distributed`.
"""

from __future__ import annotations

import inspect
import os
import signal
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from densecontrast.distributed import broadcast_, is_distributed

__all__ = [
    "DistInfo",
    "PreemptionHandler",
    "cleanup",
    "ignore_preemption_signals",
    "init_distributed",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: global ``rank``, ``world_size``, ``local_rank`` (selects
    ``cuda:local_rank``), its ``device``, and whether a process group was initialised.

    Examples:
        >>> DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False).is_main
        True
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        """``True`` on global rank 0, the process that prints, logs and saves."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, but got {value!r}") from None


def _launch_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun, or from SLURM when srun started one task per GPU."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is not None and world is not None:
        return rank, world, local if local is not None else rank % max(torch.cuda.device_count(), 1)
    # `srun python train.py` with one task per GPU: SLURM sets its own variables; the rendezvous
    # address must still come from MASTER_ADDR / MASTER_PORT (see docs/training.md).
    rank, world, local = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID")
    if rank is not None and world is not None and world > 1 and "MASTER_ADDR" in os.environ:
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        os.environ["LOCAL_RANK"] = str(local if local is not None else 0)
        return rank, world, local if local is not None else 0
    return None


def init_distributed(
    backend: str | None = None,
    *,
    device: str | torch.device | None = None,
    timeout: timedelta | None = None,
) -> DistInfo:
    """Initialise ``torch.distributed`` from the launcher's environment, or fall back to one process.

    Reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``env://`` rendezvous), or under
    ``srun`` SLURM's ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` when ``MASTER_ADDR``
    is exported; with none of them, one process and no process group. The device is
    ``cuda:LOCAL_RANK`` when CUDA is available (made current) unless ``device`` forces one, else the
    CPU; the backend NCCL on CUDA and gloo on the CPU unless ``backend`` is given; ``timeout`` goes
    to :func:`torch.distributed.init_process_group`. An existing default group is reused.
    Inconsistent environment variables or an unknown backend raise ``ValueError``.

    Examples:
        >>> info = init_distributed(device="cpu")  # plain `python`, no launcher variables
        >>> info.world_size, info.rank, info.distributed
        (1, 0, False)
    """
    if backend is not None and backend not in ("nccl", "gloo", "mpi", "ucc"):
        raise ValueError(f"backend must be 'nccl', 'gloo', 'mpi', 'ucc' or None, but got {backend!r}")
    if is_distributed():
        rank_, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK")
        local = rank_ if local is None else local
        dev = _pick_device(device, local)
        return DistInfo(rank=rank_, world_size=world, local_rank=local, device=dev, distributed=True)

    env = _launch_env()
    if env is None:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=_pick_device(device, 0), distributed=False)

    rank, world, local = env
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK must lie in [0, WORLD_SIZE), but got RANK={rank} and WORLD_SIZE={world}")
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, but got {local}")
    dev = _pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world}
    if timeout is not None:
        kwargs["timeout"] = timeout
    accepts_device_id = "device_id" in inspect.signature(dist.init_process_group).parameters  # torch >= 2.3
    if dev.type == "cuda" and backend == "nccl" and accepts_device_id:
        kwargs["device_id"] = dev  # binds the communicator to this GPU, avoids a rank->GPU guess
    dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, distributed=True)


def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _default_signals() -> tuple[signal.Signals, ...]:
    return tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)  # no USR1 on Windows


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """Ignore SIGTERM / SIGUSR1 in this process: the ``worker_init_fn`` of DataLoader workers.

    SLURM (``scancel``, ``--signal``) and ``timeout`` signal the whole process group; workers that
    ignore it keep serving batches until the main process has saved and shuts them down.
    """
    for s in _default_signals():
        signal.signal(s, signal.SIG_IGN)


class PreemptionHandler:
    """Turn cluster preemption signals into a flag the training loop polls.

    SLURM sends ``SIGUSR1`` with ``#SBATCH --signal=USR1@120`` and ``SIGTERM`` at the time limit,
    Kubernetes and ``torchrun`` send ``SIGTERM``. Inside the ``with`` block a signal only sets the
    flag (no printing inside a signal handler); the loop calls :meth:`synchronize` after a step,
    saves and exits cleanly. ``signals`` default to ``SIGTERM`` and ``SIGUSR1``; the previous
    handlers are restored when the block exits. Only the main thread can install handlers.

    Examples:
        >>> import os, signal
        >>> with PreemptionHandler() as preempt:
        ...     os.kill(os.getpid(), signal.SIGTERM)  # the process survives
        ...     preempt.should_stop, preempt.received == signal.SIGTERM
        (True, True)
    """

    def __init__(self, signals: Iterable[int] | None = None) -> None:
        sigs = tuple(signals) if signals is not None else _default_signals()
        if len(sigs) == 0:
            raise ValueError("signals must name at least one signal, but got an empty sequence")
        self.signals: tuple[int, ...] = sigs
        self._flag = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def should_stop(self) -> bool:
        """``True`` once a signal arrived at this process (or :meth:`request_stop` was called)."""
        return self._flag

    def request_stop(self) -> None:
        """Set the flag by hand (e.g. from a time budget check)."""
        self._flag = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._flag = True
        self.received = signum

    def synchronize(self, device: torch.device | str | None = None) -> bool:
        """``True`` on every rank if any rank was signalled: a collective, called by all ranks at one step.

        ``device`` holds the one-element flag (default: the current CUDA device under NCCL, else
        the CPU). Without a process group it returns :attr:`should_stop`.

        Examples:
            >>> PreemptionHandler().synchronize()
            False
        """
        if not is_distributed():
            return self._flag
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl"
                else torch.device("cpu")
            )
        flag = torch.tensor([1.0 if self._flag else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self._flag = True
        return self._flag

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionHandler can only install signal handlers in the main thread; not installed",
                          RuntimeWarning, stacklevel=2)
            return self
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()


def cleanup() -> None:
    """Destroy the default process group if there is one (safe to call in any run)."""
    if is_distributed():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, *state_modules: nn.Module) -> nn.Module:
    """Wrap ``model`` (on ``info.device``) in ``DistributedDataParallel`` when distributed; returns what to call.

    DDP copies rank 0's weights to every rank; the method's other stateful modules (momentum
    target, queues), built from per-rank seeds, are broadcast from rank 0 here, so all ranks
    start identical. Without a process group ``model`` itself is returned.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> wrap_ddp(net, init_distributed(device="cpu")) is net
        True
    """
    if not info.distributed:
        return model
    for module in state_modules:
        for t in [*module.parameters(), *module.buffers()]:
            broadcast_(t.data, src=0)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
