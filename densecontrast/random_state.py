"""Random generator states: per-rank seeding, and capture / restore for exact resume.

Every process of a job has its own generators (Python's ``random``, torch's CPU and CUDA
generators, NumPy's legacy global one). :func:`seed_everything` seeds them with ``seed + rank``;
:func:`rng_state` captures them in a form ``torch.load(weights_only=True)`` reads back;
:func:`gather_rng_states` collects every rank's (a collective) so that a checkpoint restores each
rank's own stream with :func:`set_rng_state`. Usable from any training loop.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from densecontrast.distributed import is_distributed, rank, world_size

__all__ = ["gather_rng_states", "rng_state", "seed_everything", "set_rng_state"]


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
        gather them with :func:`gather_rng_states` (collective) and store
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
    augmentations (re-seed with :func:`seed_everything` instead).

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
