"""Checkpoints that survive preemption and load with ``torch.load(weights_only=True)``.

* :func:`save_checkpoint` writes atomically: a temporary file in the same directory, ``fsync``,
  then :func:`os.replace`. A job killed mid-save leaves the previous checkpoint intact.
* :func:`load_checkpoint` never unpickles code (``weights_only=True``), so a checkpoint must hold
  only tensors, numbers, strings, ``None`` and dicts / lists / tuples of them. ``state_dict()``
  of modules, optimizers, LR schedulers, ``GradScaler`` and densecontrast queues qualify;
  :func:`rng_state` turns the random generators' states into that form.
* :func:`save_training_state` / :func:`load_training_state` save and restore everything a
  training loop needs to continue bit-exactly (every ``state_dict``, the step, every rank's
  random generators, the arguments); :func:`resolve_resume` implements ``--resume auto``.
* :func:`export_backbone` writes the backbone in torchvision's key layout for fine-tuning.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from densecontrast.distributed import is_distributed, rank, unwrap_model, world_size

__all__ = [
    "CHECKPOINT_NAME",
    "export_backbone",
    "gather_rng_states",
    "load_checkpoint",
    "load_training_state",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "save_training_state",
    "set_rng_state",
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


def save_checkpoint(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    main_only: bool = True,
    validate: bool = True,
) -> bool:
    """Write ``state`` to ``path`` atomically, on rank 0 only when distributed.

    The bytes go to a temporary file next to ``path`` (same file system), are flushed and
    ``fsync``-ed, and the temporary file is then renamed over ``path`` with
    :func:`os.replace`. Readers see either the old file or the complete new one. On any error
    the temporary file is removed and the old file is left untouched. The parent directory is
    created if needed.

    Args:
        state: the checkpoint dict (see ``docs/training.md`` for the reference layout).
        path: destination file, conventionally ``.pth``.
        main_only: when a process group exists, only rank 0 writes (the others return ``False``
            immediately; they do not wait).
        validate: check up front that ``state`` holds only types that
            ``torch.load(weights_only=True)`` accepts, so a bad entry fails now and not at resume.

    Returns:
        ``True`` if this process wrote the file.

    Raises:
        ValueError: if ``validate`` finds an entry that could not be loaded back.

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
    if main_only and rank() != 0:
        return False
    if validate:
        _check_weights_only(state, "state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
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
    """Load a checkpoint with ``torch.load(..., weights_only=True)`` (no arbitrary unpickling).

    Args:
        path: a file written by :func:`save_checkpoint` (or any weights-only-safe ``.pth``).
        map_location: where tensors go; default the CPU (then ``load_state_dict`` copies them).

    Returns:
        The state dict.

    Raises:
        FileNotFoundError: if ``path`` does not exist.

    Examples:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "c.pth")
        >>> _ = save_checkpoint({"rng": rng_state()}, p)
        >>> sorted(load_checkpoint(p)["rng"])[:2]
        ['numpy', 'python']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


CHECKPOINT_NAME = "checkpoint.pth"
"""The file name of a run's checkpoint inside its output directory (overwritten atomically)."""


def resolve_resume(resume: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None) -> Path | None:
    """Turn a ``--resume`` argument into a checkpoint path, or ``None`` to start fresh.

    * ``None`` or ``""``: start fresh.
    * ``"auto"``: ``<output_dir>/checkpoint.pth`` if it exists, else ``None``. A requeued job
      resumes where the preempted one stopped, and a first run starts from scratch, with the
      same command line. Temporary files of an interrupted save are never picked.
    * anything else: that path, which must exist.

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


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """The state of every random generator of this process, loadable with ``weights_only=True``.

    Returns:
        A dict with the keys ``"python"`` (``{"version": int, "state": int64 tensor (625,),
        "gauss": float | None}`` from :func:`random.getstate`), ``"torch"`` (the CPU generator's
        ``uint8`` state tensor), ``"cuda"`` (a list of per-device ``uint8`` state tensors, only
        when CUDA is initialised) and ``"numpy"`` (the legacy global generator's state, only
        when NumPy is installed).

    Note:
        These are *this process's* generators. In a distributed run every rank has its own:
        gather them with :func:`densecontrast.engine.gather_rng_states` (collective) and store
        the list; :func:`set_rng_state` picks this rank's entry.

    Examples:
        >>> s = rng_state()
        >>> a = torch.rand(3); set_rng_state(s); bool((torch.rand(3) == a).all())
        True
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def gather_rng_states() -> dict[str, Any]:
    """Every rank's :func:`rng_state`, as ``{"per_rank": [state_0, state_1, ...]}``.

    A collective (``all_gather_object``): call it on **every** rank, then save on rank 0.
    Without a process group it returns a one-element list.

    Examples:
        >>> len(gather_rng_states()["per_rank"])
        1
    """
    mine = rng_state()
    if not is_distributed():
        return {"per_rank": [mine]}
    mine = {k: (v if k != "cuda" else [t.cpu() for t in v]) for k, v in mine.items()}
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, mine)
    return {"per_rank": out}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators from :func:`rng_state` (or :func:`gather_rng_states`) output.

    Entries that are absent are left alone (e.g. a checkpoint written without NumPy). CUDA
    states are restored only when the number of visible devices matches. For the
    ``{"per_rank": [...]}`` form, this rank's entry is used; if the world size changed it
    raises, because silently reusing another rank's stream would give two ranks the same
    augmentations (re-seed with :func:`densecontrast.engine.seed_everything` instead).

    Args:
        state: the saved dict.

    Raises:
        ValueError: if ``state`` is malformed or was gathered with a different world size.

    Examples:
        >>> s = rng_state()
        >>> import random; x = random.random(); set_rng_state(s); random.random() == x
        True
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a dict from rng_state(), but got {type(state).__name__}")
    if "per_rank" in state:
        per_rank = state["per_rank"]
        world = world_size()
        if len(per_rank) != world:
            raise ValueError(
                f"state holds RNG states of {len(per_rank)} ranks, but this job has world size {world}; "
                "re-seed instead of restoring"
            )
        state = per_rank[rank()]
    if "python" in state:
        py = state["python"]
        internal = tuple(int(x) for x in torch.as_tensor(py["state"]).tolist())
        gauss = py["gauss"]
        random.setstate((int(py["version"]), internal, None if gauss is None else float(gauss)))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(t, dtype=torch.uint8).cpu() for t in state["cuda"]])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            return
        npst = state["numpy"]
        keys = torch.as_tensor(npst["keys"]).cpu().numpy().astype(np.uint32)
        np.random.set_state(
            (npst["kind"], keys, int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"]))
        )


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
) -> int:
    """Restore a :func:`save_training_state` checkpoint into ``objects``; returns the step to continue from.

    Every process loads the same file. RNG states are restored per rank; when the checkpoint was
    written by a different number of processes they cannot be (a warning says so) and the
    generators are re-seeded from the step instead, so no two ranks share a stream.

    Raises:
        ValueError: if the checkpoint lacks an entry named in ``objects``.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    missing = sorted(name for name in objects if name not in ckpt)
    if missing:
        raise ValueError(f"checkpoint {path} has no entry for {missing}; it holds {sorted(ckpt)}")
    for name, obj in objects.items():
        (unwrap_model(obj) if isinstance(obj, nn.Module) else obj).load_state_dict(ckpt[name])
    step = int(ckpt["step"])
    if "rng" in ckpt:
        try:
            set_rng_state(ckpt["rng"])
        except ValueError as err:  # resumed on a different number of processes
            warnings.warn(f"not restoring RNG states ({err}); re-seeding from the step instead", stacklevel=2)
            seed = (torch.initial_seed() + 1_000_003 * step) % 2**31
            random.seed(seed)
            torch.manual_seed(seed)
    return step


# --------------------------------------------------------------------------- export


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre) :]
        out[k] = v.detach().cpu()
    return out


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
    to the CPU. A backbone from :func:`densecontrast.engine.build_backbone` ("resnet*") already
    uses torchvision's key names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), so the
    file loads into ``torchvision.models.<arch>()`` with ``strict=False`` and only the
    classifier ``fc.weight`` / ``fc.bias`` missing. ``SyncBatchNorm`` keys are identical to
    ``BatchNorm2d`` keys.

    File format: ``{"arch": arch, "state_dict": {...}}`` by default (self-describing; the form
    MMDetection / MMSegmentation loaders read), or the bare state dict with ``plain=True``::

        ckpt = torch.load("backbone.pth", weights_only=True)
        torchvision.models.resnet50().load_state_dict(ckpt["state_dict"], strict=False)

    Only rank 0 writes when distributed (atomically, via :func:`save_checkpoint`).

    Args:
        backbone: the module (possibly DDP-wrapped) or its state dict.
        path: destination file.
        arch: architecture name stored in the file, e.g. ``"resnet50"``.
        plain: write the bare state dict instead of the wrapper dict.
        verify: when ``arch`` names a torchvision classification model, build it (random init,
            no download) and check that the keys and shapes load with only ``fc.*`` missing.

    Returns:
        ``True`` if this process wrote the file.

    Raises:
        ValueError: if ``verify`` finds unexpected, missing or mis-shaped keys.

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
    if isinstance(backbone, nn.Module):
        sd = _strip_prefixes(unwrap_model(backbone).state_dict())
    elif isinstance(backbone, Mapping):
        sd = _strip_prefixes(backbone)
    else:
        raise ValueError(f"backbone must be an nn.Module or a state dict, but got {type(backbone).__name__}")
    if verify and arch is not None:
        _verify_torchvision(sd, arch)
    state: Mapping[str, Any] = sd if plain else {"arch": arch, "state_dict": sd}
    return save_checkpoint(state, path, main_only=True)


def _verify_torchvision(sd: Mapping[str, torch.Tensor], arch: str) -> None:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        return  # not a torchvision model name (e.g. "tiny"): nothing to compare against
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ref = builder(weights=None).state_dict()
    unexpected = sorted(set(sd) - set(ref))
    missing = sorted(k for k in set(ref) - set(sd) if not k.startswith("fc."))
    bad_shape = sorted(k for k in set(sd) & set(ref) if tuple(sd[k].shape) != tuple(ref[k].shape))
    if unexpected or missing or bad_shape:
        raise ValueError(
            f"backbone does not match torchvision.models.{arch}: unexpected keys {unexpected[:5]}, "
            f"missing keys {missing[:5]}, shape mismatches {bad_shape[:5]} (first 5 of each shown)"
        )
