"""Checkpoints that survive preemption and load with ``torch.load(weights_only=True)`` (no unpickled code).

Atomic saves (:func:`save_checkpoint`), the full state of a training loop for bit-exact resume
(:func:`save_training_state` / :func:`load_training_state`, :func:`resolve_resume`) and the
backbone export in torchvision's key layout (:func:`export_backbone`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from densecontrast._checks import check_weights_only
from densecontrast.backbones import check_torchvision_keys, plain_state_dict
from densecontrast.distributed import is_distributed, rank, unwrap_model
from densecontrast.engine.cli import RunError, check_resume_args
from densecontrast.random_state import gather_rng_states, seed_everything, set_rng_state

__all__ = [
    "CHECKPOINT_NAME",
    "export_backbone",
    "load_checkpoint",
    "load_training_state",
    "resolve_resume",
    "save_checkpoint",
    "save_training_state",
]

def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> bool:
    """Write ``state`` to ``path`` atomically on rank 0 (returns whether this process wrote it).

    A temporary file next to ``path`` is ``fsync``-ed and renamed over it: readers see the old
    file or the complete new one. ``state`` must hold only what ``torch.load(weights_only=True)``
    reads back (:func:`~densecontrast._checks.check_weights_only`), so a bad entry fails now.

    Examples:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "checkpoint.pth")
        >>> save_checkpoint({"epoch": 3, "w": torch.ones(2)}, p)
        True
        >>> load_checkpoint(p)["epoch"]
        3
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a dict, but got {type(state).__name__}")
    if rank() != 0:
        return False
    check_weights_only(state, "state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); best effort where directories cannot be opened or synced."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(..., weights_only=True)`` (no arbitrary unpickling), onto the CPU by default.

    Raises:
        FileNotFoundError: if ``path`` does not exist.

    Examples:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "c.pth")
        >>> _ = save_checkpoint({"step": 7}, p)
        >>> load_checkpoint(p)["step"]
        7
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


CHECKPOINT_NAME = "checkpoint.pth"
"""The file name of a run's checkpoint inside its output directory (overwritten atomically)."""


def resolve_resume(resume: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None) -> Path | None:
    """Turn ``--resume`` into a checkpoint path, or ``None`` to start fresh.

    ``None`` / ``""``: fresh. ``"auto"``: ``<output_dir>/checkpoint.pth`` if it exists, else ``None``
    (one command line resumes a requeued job and starts a first run). Else that path, which must
    exist (``FileNotFoundError``).

    Examples:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> resolve_resume("auto", d) is None
        True
        >>> _ = save_checkpoint({"step": 0}, os.path.join(d, CHECKPOINT_NAME))
        >>> resolve_resume("auto", d).name
        'checkpoint.pth'
    """
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        if output_dir is None:
            return None
        path = Path(output_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume must be None, '', 'auto' or an existing checkpoint file, but {path} not found")
    return path


# --------------------------------------------------------------------------- training state


def _broadcast_batchnorm_stats(modules: list[nn.Module]) -> None:
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for buf in m.buffers(recurse=False):
                    dist.broadcast(buf, src=0)


def save_training_state(
    path: str | os.PathLike[str],
    objects: Mapping[str, Any],
    *,
    step: int,
    args: Mapping[str, Any] | None = None,
    rank_copy: bool = False,
) -> None:
    """Checkpoint a training loop: every object's ``state_dict``, the step, all ranks' RNG states, ``args``.

    A collective when distributed (call it on every rank at the same step); rank 0 writes ``path``
    atomically. BatchNorm running statistics are first broadcast from rank 0, as DDP does at
    every forward, so every rank continues from the checkpointed ones. ``objects`` maps names to
    anything with ``state_dict()`` (model, momentum target, queues, optimiser, scheduler,
    ``GradScaler``; DDP / compile wrappers are unwrapped). ``rank_copy`` also writes
    ``rank<r>.pth`` (states only) next to ``path`` on every rank, to check that ranks agree.

    Examples:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "checkpoint.pth")
        >>> save_training_state(p, {"model": nn.Linear(2, 2)}, step=3)
        >>> load_training_state(p, {"model": nn.Linear(2, 2)})
        3
    """
    modules = [unwrap_model(o) for o in objects.values() if isinstance(o, nn.Module)]
    if is_distributed():
        _broadcast_batchnorm_stats(modules)
    state: dict[str, Any] = {
        name: (unwrap_model(obj) if isinstance(obj, nn.Module) else obj).state_dict() for name, obj in objects.items()
    }
    state["step"] = int(step)
    state["rng"] = gather_rng_states()  # a collective: every rank's generators, restored per rank
    if args is not None:
        state["args"] = dict(args)
    save_checkpoint(state, path)
    if rank_copy:
        per_rank = {k: v for k, v in state.items() if k not in ("rng", "args")}
        torch.save(per_rank, Path(path).parent / f"rank{rank()}.pth")


def load_training_state(
    path: str | os.PathLike[str],
    objects: Mapping[str, Any],
    map_location: str | torch.device | None = "cpu",
    args: argparse.Namespace | None = None,
) -> int:
    """Restore a :func:`save_training_state` checkpoint into ``objects``; returns the step to continue from.

    With ``args`` the stored arguments are compared first (:func:`~densecontrast.engine.cli.check_resume_args`);
    a checkpoint that does not fit (another method, other arguments, missing entries or
    mismatched keys) raises ``RunError``. RNG states are restored per rank, or re-seeded from the
    step with a warning when the checkpoint was written by another number of processes.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    if args is not None:
        check_resume_args(ckpt.get("args", {}), args)
    missing = sorted(name for name in objects if name not in ckpt)
    if missing:
        raise RunError(f"checkpoint {path} has no entry for {missing}; it holds {sorted(ckpt)}")
    for name, obj in objects.items():
        try:
            (unwrap_model(obj) if isinstance(obj, nn.Module) else obj).load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:300]
            raise RunError(f"checkpoint {path}: its {name!r} does not fit this run ({first})") from None
    step = int(ckpt["step"])
    if "rng" in ckpt:
        try:
            set_rng_state(ckpt["rng"])
        except ValueError as err:  # resumed on a different number of processes
            warnings.warn(f"not restoring RNG states ({err}); re-seeding from the step instead", stacklevel=2)
            seed_everything((torch.initial_seed() + 1_000_003 * step) % 2**31)
    return step


# --------------------------------------------------------------------------- export


def export_backbone(
    backbone: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    arch: str | None = None,
    *,
    plain: bool = False,
    verify: bool = True,
) -> bool:
    """Write a backbone's weights (:func:`~densecontrast.backbones.plain_state_dict`) for fine-tuning; rank 0 only.

    A ResNet from :func:`~densecontrast.backbones.build_backbone` keeps torchvision's key names, so
    the file loads into ``torchvision.models.<arch>()`` with only ``fc.*`` missing (``verify``
    checks it with :func:`~densecontrast.backbones.check_torchvision_keys`). The file holds
    ``{"arch": arch, "state_dict": {...}}`` (the form MMDetection / MMSegmentation read), or the
    bare state dict with ``plain=True``; it is written atomically.

    Examples:
        >>> import tempfile, os, torchvision
        >>> from densecontrast.backbones import build_backbone
        >>> net, _ = build_backbone("resnet18")
        >>> p = os.path.join(tempfile.mkdtemp(), "backbone.pth")
        >>> export_backbone(net, p, arch="resnet18")
        True
        >>> sd = load_checkpoint(p)["state_dict"]
        >>> torchvision.models.resnet18().load_state_dict(sd, strict=False).missing_keys
        ['fc.weight', 'fc.bias']
    """
    sd = plain_state_dict(backbone)
    if verify and arch is not None:
        check_torchvision_keys(sd, arch)
    state: Mapping[str, Any] = sd if plain else {"arch": arch, "state_dict": sd}
    return save_checkpoint(state, path)
