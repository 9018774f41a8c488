"""Distributed helpers: rank utilities and all-gathers that are correct with and without gradients.

Every function here works unchanged without a process group: ranks are ``0`` of ``1`` and the
gathers return their input. Under ``torch.distributed`` (any backend, e.g. ``gloo`` on CPU or
``nccl`` on GPU) they are collectives, so **every rank of the group must call them**, in the same
order, or the job hangs.

Convention:
    Gathers concatenate along dim 0 in **rank order**: the result of :func:`all_gather` on rank
    ``r`` is ``cat([x_0, x_1, ..., x_{W-1}])`` on every rank, where ``x_i`` is rank ``i``'s input.
    Ranks may hold *different* sizes along dim 0 (uneven last batches, per-rank variable numbers
    of keys); all other dims and the dtype must agree.

Gradient semantics of ``all_gather(x, grad=True)``:
    Each rank computes its own loss ``L_r`` from the gathered tensor. The objective the ranks
    jointly minimise is ``L = sum_r L_r``; the backward therefore gives rank ``r`` the gradient
    ``dL/dx_r = sum_s dL_s/dx_r``: the full gradient of the gathered tensor is summed over
    ranks (``all_reduce``) and rank ``r`` keeps its own slice. Under
    :class:`~torch.nn.parallel.DistributedDataParallel`, which *averages* parameter gradients
    over ranks, the effective objective is ``mean_r L_r``. A backward that returns only the local
    slice of the local gradient (without the sum) silently drops every other rank's contribution.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_gather",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast_",
    "global_weighted_mean",
    "is_distributed",
    "rank",
    "unwrap_model",
    "world_size",
]

# Dtype codes exchanged with the shapes so that mismatched ranks fail with a ValueError on every
# rank (instead of hanging or exchanging garbage bytes).
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_MAX_DIMS = 8


def is_distributed() -> bool:
    """Whether a default process group is initialized (``torch.distributed`` is usable).

    Examples:
        >>> is_distributed()  # no process group in a plain Python session
        False
    """
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (the default group when ``None``); ``1`` without a process group.

    Examples:
        >>> world_size()
        1
    """
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """Rank of this process in ``group``; ``0`` without a process group.

    Examples:
        >>> rank()
        0
    """
    return dist.get_rank(group) if is_distributed() else 0


def _exchange_shapes(x: Tensor, group: dist.ProcessGroup | None) -> list[int]:
    """All-gather the shapes/dtypes of ``x``; return the dim-0 sizes, raising on mismatch everywhere."""
    if x.dim() == 0 or x.dim() > _MAX_DIMS:
        # Every rank is expected to pass the same number of dims, so every rank raises here.
        raise ValueError(f"x must have between 1 and {_MAX_DIMS} dims to be gathered, but got shape {tuple(x.shape)}")
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    meta = torch.full((2 + _MAX_DIMS,), -1, dtype=torch.long)
    meta[0], meta[1] = x.dim(), code
    meta[2 : 2 + x.dim()] = torch.tensor(x.shape, dtype=torch.long)
    meta = meta.to(x.device)
    metas = [torch.empty_like(meta) for _ in range(world_size(group))]
    dist.all_gather(metas, meta, group=group)
    rows = torch.stack(metas).cpu()
    # Compare everything except dim 0 (sizes may differ across ranks).
    rest = torch.cat([rows[:, :2], rows[:, 3:]], dim=1)
    if not bool((rest == rest[0]).all()):
        shapes = [(tuple(int(s) for s in r[2 : 2 + int(r[0])]), int(r[1])) for r in rows]
        raise ValueError(
            "all_gather needs the same number of dims, the same sizes beyond dim 0 and the same dtype on every "
            f"rank, but got (shape, dtype code) per rank {shapes}"
        )
    return [int(s) for s in rows[:, 2]]


def _gather_padded(x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Gather ``x`` (dim-0 size ``sizes[rank]``) from every rank, padding to the max size and unpadding."""
    n_max = max(sizes)
    x = x.contiguous()
    if x.shape[0] < n_max:
        x = torch.cat([x, x.new_zeros((n_max - x.shape[0], *x.shape[1:]))])
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x, group=group)
    if all(s == n_max for s in sizes):
        return torch.cat(bufs)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Gather along dim 0; backward all-reduces (sums) the full gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        sizes = _exchange_shapes(x, group)
        ctx.group = group
        ctx.sizes = sizes
        ctx.rank = dist.get_rank(group)
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather(x: Tensor, grad: bool = False, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order); sizes along dim 0 may differ.

    Args:
        x: ``(n_r, *)`` tensor on this rank. ``n_r`` may differ between ranks (the sizes are
            exchanged first, the tensors padded to the largest size, gathered, and unpadded);
            the trailing dims and the dtype must agree, otherwise every rank raises
            ``ValueError`` (no hang).
        grad: ``False`` — the result is detached (also without a process group, so that one
            process and many processes behave the same). ``True`` — the result is differentiable:
            rank ``r`` receives ``sum_s dL_s / dx_r``, the gradient of its own slice summed over
            all ranks' losses (see the module docstring). Every rank must then run ``backward``
            through the gathered tensor, since the backward is itself a collective; the
            differentiable path is taken when ``x.requires_grad`` (and grad mode is on), so keep
            that the same on every rank.
        group: process group (default group when ``None``).

    Returns:
        ``(sum_r n_r, *)`` tensor with ``x``'s dtype and device. Without a process group: ``x``
        itself (``grad=True``) or ``x.detach()`` (``grad=False``).

    Examples:
        >>> import torch
        >>> x = torch.randn(3, 4, requires_grad=True)
        >>> y = all_gather(x, grad=True)  # single process: identity, gradient flows
        >>> y.shape, y.requires_grad
        (torch.Size([3, 4]), True)
        >>> all_gather(x).requires_grad
        False
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        got = "a 0-dim tensor" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor with at least one dim (n, *), but got {got}")
    if not is_distributed():
        return x if grad else x.detach()
    if grad and x.requires_grad and torch.is_grad_enabled():
        return _AllGatherWithGrad.apply(x, group)
    with torch.no_grad():
        sizes = _exchange_shapes(x, group)
        return _gather_padded(x.detach(), sizes, group)


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of ``x`` over ranks, detached (a new tensor; ``x`` is untouched). Identity copy without a group.

    Use it for metrics and normalisers, not for values that must carry a gradient.

    Examples:
        >>> import torch
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_mean(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean of ``x`` over ranks, detached (for logging a loss or an accuracy). Identity copy without a group.

    Examples:
        >>> import torch
        >>> all_reduce_mean(torch.tensor(3.0))
        tensor(3.)
    """
    out = all_reduce_sum(x if x.is_floating_point() else x.double(), group)
    return out / world_size(group)


def global_weighted_mean(
    weighted_sum: Tensor, weight_sum: Tensor, eps: float = 1e-6, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Per-rank loss whose DDP-averaged gradient is that of the weighted mean over the GLOBAL batch.

    A dense loss reduces per-query losses ``l`` with weights ``w`` as ``sum(w l) / sum(w)``.
    Run on shards, each rank's mean uses only its own weights; DDP then averages the ranks'
    gradients, which equals the global weighted mean only when every rank holds the same total
    weight. This helper returns, on rank ``r``::

        world_size * weighted_sum_r / max(sum_s weight_sum_s, eps)

    with the denominator all-reduced and detached. DDP's gradient average ``(1 / W) sum_r``
    then yields exactly ``d/dθ [sum_r weighted_sum_r / sum_s weight_sum_s]``, the gradient of the
    global weighted mean (exact when the weights carry no gradient, as ``Matches.weight`` does).
    The *value* differs per rank; log ``all_reduce_mean(loss.detach())`` to get the global mean.
    Without a process group it is simply ``weighted_sum / max(weight_sum, eps)``.

    Args:
        weighted_sum: scalar ``sum(w * l)`` of this rank (carries the gradient).
        weight_sum: scalar ``sum(w)`` of this rank (treated as a constant).
        eps: lower bound of the global denominator.
        group: process group.

    Returns:
        A scalar tensor (dtype of ``weighted_sum``).

    Examples:
        >>> import torch
        >>> l = torch.tensor([1.0, 3.0], requires_grad=True); w = torch.tensor([1.0, 0.5])
        >>> global_weighted_mean((w * l).sum(), w.sum())  # one process: the plain weighted mean
        tensor(1.6667, grad_fn=<DivBackward0>)
    """
    total = all_reduce_sum(weight_sum.to(weighted_sum.dtype), group).clamp_min(eps)
    return weighted_sum * world_size(group) / total


def broadcast_(x: Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> Tensor:
    """Overwrite ``x`` in place with rank ``src``'s values (no-op without a process group); returns ``x``.

    Examples:
        >>> import torch
        >>> broadcast_(torch.ones(2))
        tensor([1., 1.])
    """
    if is_distributed():
        with torch.no_grad():
            dist.broadcast(x, src=src, group=group)
    return x


def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile`` wrappers.

    The wrapper classes are recognised by type (``torch.nn.parallel.DistributedDataParallel``,
    ``torch.nn.DataParallel``, and any class with one of those names, e.g. a subclass or a
    look-alike) and, for compiled modules, by the ``_orig_mod`` attribute. Wrappers nested in any
    order are removed. Any other module is returned as is.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    seen = 0
    while seen < 16:
        seen += 1
        names = {c.__name__ for c in type(module).__mro__}
        inner = getattr(module, "module", None)
        if names & {"DistributedDataParallel", "DataParallel"} and isinstance(inner, nn.Module):
            module = inner
            continue
        orig = getattr(module, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            module = orig
            continue
        break
    return module
