"""Checkpoints that survive preemption and load with ``torch.load(weights_only=True)``.

* :func:`save_checkpoint` writes atomically: a temporary file in the same directory, ``fsync``,
  then :func:`os.replace`. A job killed mid-save leaves the previous checkpoint intact.
* :func:`load_checkpoint` never unpickles code (``weights_only=True``), so a checkpoint must hold
  only tensors, numbers, strings, ``None`` and dicts / lists / tuples of them. ``state_dict()``
  of modules, optimizers, LR schedulers, ``GradScaler`` and densecontrast queues qualify;
  :func:`rng_state` turns the random generators' states into that form.
* :func:`resolve_resume` implements ``--resume auto``; :func:`export_backbone` writes the
  backbone in torchvision's key layout for downstream fine-tuning.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from densecontrast.distributed import is_distributed, rank, unwrap_model, world_size

__all__ = [
    "checkpoint_path",
    "export_backbone",
    "gather_rng_states",
    "load_checkpoint",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "save_on_main",
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


def save_on_main(state: Mapping[str, Any], path: str | os.PathLike[str]) -> bool:
    """``save_checkpoint(state, path, main_only=True)``: the torchvision ``save_on_master`` idiom.

    Examples:
        >>> import tempfile, os
        >>> save_on_main({"epoch": 0}, os.path.join(tempfile.mkdtemp(), "c.pth"))
        True
    """
    return save_checkpoint(state, path, main_only=True)


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


def checkpoint_path(output_dir: str | os.PathLike[str], epoch: int | None = None) -> Path:
    """The conventional file name: ``checkpoint.pth`` (latest) or ``checkpoint_{epoch:04d}.pth``.

    Examples:
        >>> checkpoint_path("runs/x", 7).name, checkpoint_path("runs/x").name
        ('checkpoint_0007.pth', 'checkpoint.pth')
    """
    if epoch is None:
        return Path(output_dir) / "checkpoint.pth"
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, but got {epoch}")
    return Path(output_dir) / f"checkpoint_{epoch:04d}.pth"


_CKPT_RE = re.compile(r"^checkpoint(?:_(\d+))?\.pth$")


def resolve_resume(resume: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None) -> Path | None:
    """Turn a ``--resume`` argument into a checkpoint path, or ``None`` to start fresh.

    * ``None`` or ``""``: start fresh.
    * ``"auto"``: the most recently written ``checkpoint.pth`` / ``checkpoint_NNNN.pth`` in
      ``output_dir`` (ties: ``checkpoint.pth``, then the highest epoch), or ``None`` when there
      is none. Temporary files of an interrupted save are ignored. This makes a requeued job
      resume where the preempted one stopped, and a first run start from scratch, with the same
      command line.
    * anything else: that path, which must exist.

    Args:
        resume: ``None``, ``""``, ``"auto"`` or a path.
        output_dir: the run directory searched by ``"auto"``.

    Returns:
        The path to load, or ``None``.

    Raises:
        FileNotFoundError: if an explicit path does not exist.

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> resolve_resume("auto", d) is None
        True
        >>> _ = save_checkpoint({"epoch": 0}, checkpoint_path(d))
        >>> resolve_resume("auto", d).name
        'checkpoint.pth'
    """
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        if output_dir is None or not Path(output_dir).is_dir():
            return None
        found: list[tuple[int, int, int, Path]] = []
        for p in Path(output_dir).iterdir():
            m = _CKPT_RE.match(p.name)
            if m is None or not p.is_file():
                continue
            is_latest = 1 if m.group(1) is None else 0
            epoch = int(m.group(1)) if m.group(1) is not None else -1
            found.append((p.stat().st_mtime_ns, is_latest, epoch, p))
        return max(found)[3] if found else None
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
        >>> from densecontrast.engine import build_backbone
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
