"""Checkpoints that survive preemption and load with ``torch.load(weights_only=True)``.

* :func:`save_checkpoint` writes atomically: a temporary file in the same directory, ``fsync``,
  then :func:`os.replace`. A job killed mid-save leaves the previous checkpoint intact.
* :func:`load_checkpoint` never unpickles code (``weights_only=True``), so a checkpoint must hold
  only tensors, numbers, strings, ``None`` and dicts / lists / tuples of them. ``state_dict()``
  of modules, optimizers, LR schedulers, ``GradScaler`` and densecontrast queues qualify, and
  so do the generator states of :mod:`densecontrast.random_state`.
* :func:`save_training_state` / :func:`load_training_state` save and restore everything a
  training loop needs to continue bit-exactly (every ``state_dict``, the step, every rank's
  random generators, the arguments); :func:`resolve_resume` implements ``--resume auto``.
* :func:`export_backbone` writes the backbone in torchvision's key layout for fine-tuning.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

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

_ALLOWED_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise ValueError naming the first entry ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, _ALLOWED_LEAVES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"state keys must be str or int, but {where} has a key of type {type(k).__name__}")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
        "cannot read back; store tensors, numbers, strings and dicts/lists of them (e.g. obj.state_dict())"
    )


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> bool:
    """Write ``state`` to ``path`` atomically; when distributed only rank 0 writes (the others return at once).

    The bytes go to a temporary file next to ``path``, are ``fsync``-ed and renamed over ``path``
    with :func:`os.replace`: readers see the old file or the complete new one, and on any error
    the old file is left untouched. ``state`` is checked up front to hold only what
    ``torch.load(weights_only=True)`` reads back, so a bad entry fails now and not at resume.

    Returns:
        ``True`` if this process wrote the file.

    Raises:
        ValueError: naming the first entry that could not be loaded back.

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
    _check_weights_only(state, "state")
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
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); best effort elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
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

    ``None`` / ``""``: start fresh. ``"auto"``: ``<output_dir>/checkpoint.pth`` if it exists, else
    ``None`` (a requeued job resumes, a first run starts fresh, with one command line). Anything
    else: that path, which must exist.

    Raises:
        FileNotFoundError: if an explicit path does not exist.

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
    """Checkpoint a training loop: every object's ``state_dict``, the step, all ranks' RNG states, the arguments.

    A collective when distributed: call it on **every** rank at the same step; rank 0 writes
    ``path`` atomically (:func:`save_checkpoint`). BatchNorm running statistics are per process
    unless SyncBatchNorm is used: they are first broadcast from rank 0 — what DDP also does at
    every forward (``broadcast_buffers``) — so every rank continues from the checkpointed ones.

    Args:
        path: the checkpoint file (conventionally ``<output_dir>/checkpoint.pth``).
        objects: name -> anything with ``state_dict()`` / ``load_state_dict()`` (online model,
            momentum target, queues, optimiser, LR scheduler, ``GradScaler``). DDP / compile
            wrappers are unwrapped.
        step: the number of optimiser steps done.
        args: the run's arguments as primitives (``checkpointable_args``), stored under ``"args"``.
        rank_copy: also write ``rank<r>.pth`` (states without RNG and arguments) next to ``path``
            on every rank, to check that DDP ranks agree.

    Examples:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "checkpoint.pth")
        >>> net = nn.Linear(2, 2)
        >>> save_training_state(p, {"model": net}, step=3)
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

    With ``args`` the stored arguments are compared first (:func:`~densecontrast.engine.cli.check_resume_args`).
    RNG states are restored per rank; when the checkpoint was written by a different number of
    processes they cannot be (a warning says so) and the generators are re-seeded from the step.

    Raises:
        RunError: the checkpoint does not fit ``args`` or ``objects`` (another method, other arguments,
            missing entries or mismatched keys).
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
    """Write a backbone's weights in torchvision's key layout for downstream fine-tuning.

    ``module.`` / ``_orig_mod.`` prefixes (DDP, ``torch.compile``) are stripped and tensors moved
    to the CPU (:func:`~densecontrast.backbones.plain_state_dict`). A backbone from
    :func:`~densecontrast.backbones.build_backbone` ("resnet*") already
    uses torchvision's key names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), so the
    file loads into ``torchvision.models.<arch>()`` with ``strict=False`` and only the
    classifier ``fc.weight`` / ``fc.bias`` missing. ``SyncBatchNorm`` keys are identical to
    ``BatchNorm2d`` keys.

    File format: ``{"arch": arch, "state_dict": {...}}`` (the form MMDetection / MMSegmentation
    loaders read), or the bare state dict with ``plain=True``. Only rank 0 writes, atomically.

    Args:
        backbone: the module (possibly DDP-wrapped) or its state dict.
        path: destination file.
        arch: architecture name stored in the file, e.g. ``"resnet50"``.
        plain: write the bare state dict instead of the wrapper dict.
        verify: check keys and shapes with :func:`~densecontrast.backbones.check_torchvision_keys`.

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
