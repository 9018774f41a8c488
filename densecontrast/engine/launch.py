"""Process launch helpers: distributed initialisation, per-rank seeding, DDP wrapping, preemption.

A reference script calls these in this order::

    info = init_distributed()                 # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    seed_everything(args.seed, info.rank)     # different augmentations per rank, reproducible
    model = wrap_ddp(online, info, target)    # DDP; rank 0's target / queues copied to every rank
    with PreemptionHandler() as preempt:      # SIGTERM / SIGUSR1 -> preempt.should_stop
        for step, batch in ...:
            ...
            if preempt.synchronize(info.device): save a checkpoint, break
    cleanup()

Everything degrades to a single process on the CPU (or the one GPU) when the script is started
with plain ``python train.py``: no environment variables, no process group.

Rank and world-size queries come from :mod:`densecontrast.distributed`.
"""

from __future__ import annotations

import inspect
import os
import random
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
    "init_distributed",
    "seed_everything",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: total number of processes (GPUs) in the job.
        local_rank: rank on this machine; selects the GPU ``cuda:local_rank``.
        device: the device this process computes on.
        distributed: ``True`` when a default process group was initialised.

    Examples:
        >>> info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
        >>> info.is_main
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

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as set by ``torchrun`` (``env://``
    rendezvous through ``MASTER_ADDR`` / ``MASTER_PORT``). Under ``srun`` without torchrun it
    reads ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` instead, provided
    ``MASTER_ADDR`` is exported. With none of these it returns a single-process
    :class:`DistInfo` and creates no process group.

    The device is ``cuda:LOCAL_RANK`` when CUDA is available (and made the current device),
    else the CPU. The backend defaults to NCCL on CUDA and gloo on the CPU. If a default
    process group already exists it is reused.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (pick from the device).
        device: force a device, e.g. ``"cpu"`` to run on the CPU on a GPU machine.
        timeout: collective timeout handed to :func:`torch.distributed.init_process_group`.

    Returns:
        The :class:`DistInfo` of this process.

    Raises:
        ValueError: if the environment variables are inconsistent, or ``backend`` is unknown.

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


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python's ``random``, torch (CPU and every CUDA device) and NumPy (if installed).

    Each rank gets ``seed + rank`` so the processes of a job draw different augmentations while
    the run as a whole stays reproducible.

    Args:
        seed: the base seed (non-negative).
        rank: this process's global rank.

    Returns:
        The effective seed ``seed + rank``.

    Raises:
        ValueError: if ``seed`` or ``rank`` is negative.

    Examples:
        >>> seed_everything(0, rank=1)
        1
        >>> a = torch.rand(2); _ = seed_everything(0, rank=1); bool((a == torch.rand(2)).all())
        True
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, but got {seed}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, but got {rank}")
    s = int(seed) + int(rank)
    random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    else:
        np.random.seed(s % 2**32)
    return s


def _default_signals() -> tuple[signal.Signals, ...]:
    sigs = [signal.SIGTERM]
    usr1 = getattr(signal, "SIGUSR1", None)  # absent on Windows
    if usr1 is not None:
        sigs.append(usr1)
    return tuple(sigs)


class PreemptionHandler:
    """Turn cluster preemption signals into a flag the training loop polls.

    Schedulers announce preemption with a signal some time before killing the job: SLURM sends
    ``SIGUSR1`` with ``#SBATCH --signal=USR1@120`` and ``SIGTERM`` at the time limit,
    Kubernetes sends ``SIGTERM``, and ``torchrun`` forwards ``SIGTERM`` to its workers. Inside
    the context the handler records the signal instead of dying; the loop checks
    :attr:`should_stop` (cheap) after each step, saves a checkpoint and exits cleanly.
    The previous handlers are restored when the context exits.

    In a distributed job a signal may reach only some ranks. Call :meth:`synchronize` (one
    tiny ``all_reduce``) every few steps so that all ranks stop at the same step.

    Args:
        signals: the signals to catch; default ``SIGTERM`` and ``SIGUSR1``.

    Raises:
        ValueError: if ``signals`` is empty.

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
        self._installed = False

    @property
    def should_stop(self) -> bool:
        """``True`` once one of the signals arrived at this process (or :meth:`request_stop` was called)."""
        return self._flag

    def request_stop(self) -> None:
        """Set the flag by hand (e.g. from a time budget check)."""
        self._flag = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set state here: printing from a signal handler can hit a re-entrant stdout write.
        self._flag = True
        self.received = signum

    def install(self) -> PreemptionHandler:
        """Install the handlers (the context manager calls this). Only possible in the main thread."""
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "PreemptionHandler can only install signal handlers in the main thread; not installed",
                RuntimeWarning,
                stacklevel=2,
            )
            return self
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before :meth:`install`."""
        if not self._installed:
            return
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self._installed = False

    def synchronize(self, device: torch.device | str | None = None) -> bool:
        """Agree across ranks: ``True`` on every rank if any rank was signalled.

        A collective: every rank must call it at the same step. Without a process group it
        returns :attr:`should_stop`.

        Args:
            device: where the one-element flag tensor lives; must be a CUDA device with NCCL.
                Default: the current CUDA device with NCCL, else the CPU.

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
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()


def cleanup() -> None:
    """Destroy the default process group if there is one (safe to call in any run).

    Examples:
        >>> cleanup()
    """
    if is_distributed():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, *state_modules: nn.Module) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` when distributed; start ``state_modules`` from rank 0.

    DDP copies rank 0's weights to every rank. The other stateful modules of a method (momentum
    target, queues), built before from per-rank seeds, are broadcast from rank 0 here so that all
    ranks start identical. Without a process group ``model`` is returned unchanged.

    Args:
        model: the online (trained) network, already on ``info.device``.
        info: from :func:`init_distributed`.
        *state_modules: modules not trained by the optimiser whose parameters and buffers must
            agree across ranks.

    Returns:
        The module to call in the training loop (DDP-wrapped or ``model`` itself).

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
