"""Shared helpers for the losses: weighted reduction over valid queries and input checks.

Every dense loss in :mod:`densecontrast.losses` produces one loss value per query and averages
those with per-query weights (``Matches.effective_weight``: the matcher's weight times its
validity mask)::

    loss = sum(w * l) / max(sum(w), eps)

so a batch without a single valid query gives a loss of exactly ``0`` that still carries a
gradient (of zeros), never ``NaN``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "REDUCTIONS",
    "check_finite_positive",
    "check_reduction",
    "check_shape",
    "reduce",
    "weighted_mean",
]

REDUCTIONS = ("mean", "sum", "none")


def _dtype(loss: Tensor) -> torch.dtype:
    """float32, or float64 when the loss already is float64."""
    return torch.float64 if loss.dtype == torch.float64 else torch.float32


def _check_weight(loss: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return torch.ones_like(loss, dtype=_dtype(loss))
    if not isinstance(weight, Tensor):
        raise ValueError(f"weight must be a tensor, but got {type(weight).__name__}")
    if weight.shape != loss.shape:
        raise ValueError(f"weight must have the shape of loss {tuple(loss.shape)}, but got {tuple(weight.shape)}")
    return weight.to(device=loss.device, dtype=_dtype(loss))


def weighted_mean(loss: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Weighted mean ``sum(w * l) / max(sum(w), eps)`` computed in float32 (float64 for float64 losses).

    Args:
        loss: per-query losses, any shape, typically ``(B, N)`` or ``(B * N,)``.
        weight: per-query weights of the same shape (bool or float; ``None`` means all ones).
            Invalid queries carry weight 0. Converted to the compute dtype.
        eps: lower bound of the denominator.

    Returns:
        A float32 (float64 for a float64 ``loss``) scalar. When ``sum(w) == 0`` the result is
        exactly ``0`` and is still connected to the graph of ``loss`` (every contribution is a
        masked zero), so ``backward()`` works and produces zero gradients. Weights are expected to be non-negative.

    Examples:
        >>> import torch
        >>> loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        >>> weighted_mean(loss, torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item()
        2.0
        >>> out = weighted_mean(loss, torch.zeros(2, 2))
        >>> out.item(), out.requires_grad
        (0.0, True)
    """
    w = _check_weight(loss, weight)
    loss32 = loss.to(_dtype(loss))
    # where() instead of multiplication: an invalid query with an infinite/NaN loss must not poison the sum.
    contrib = torch.where(w != 0, w * loss32, torch.zeros_like(loss32))
    # No host sync: when every weight is 0, every contribution is exactly 0 and so is 0 / eps.
    return contrib.sum() / w.sum().clamp_min(eps)


def reduce(loss: Tensor, weight: Tensor | None = None, reduction: str = "mean", eps: float = 1e-6) -> Tensor:
    """Reduce per-query losses with weights.

    Args:
        loss: per-query losses, e.g. ``(B, N)``.
        weight: weights of the same shape (``None``: all ones).
        reduction: ``"mean"`` — weighted mean over valid queries (:func:`weighted_mean`);
            ``"sum"`` — ``sum(w * l)``; ``"none"`` — ``w * l`` elementwise (same shape; queries
            with weight 0 give exactly 0).
        eps: denominator lower bound for ``"mean"``.

    Returns:
        A float32 (float64 for a float64 ``loss``) scalar for ``"mean"``/``"sum"``, else a tensor
        shaped like ``loss``.

    Examples:
        >>> import torch
        >>> loss = torch.tensor([1.0, 2.0, 3.0])
        >>> reduce(loss, torch.tensor([1.0, 1.0, 0.0]), "sum").item()
        3.0
        >>> reduce(loss, None, "none").tolist()
        [1.0, 2.0, 3.0]
    """
    check_reduction(reduction)
    if reduction == "mean":
        return weighted_mean(loss, weight, eps)
    w = _check_weight(loss, weight)
    loss32 = loss.to(_dtype(loss))
    out = torch.where(w != 0, w * loss32, torch.zeros_like(loss32))
    return out.sum() if reduction == "sum" else out


def check_reduction(reduction: str) -> str:
    """Raise ``ValueError`` unless ``reduction`` is one of ``"mean"``, ``"sum"``, ``"none"``.

    Examples:
        >>> check_reduction("mean")
        'mean'
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, but got {reduction!r}")
    return reduction


def check_finite_positive(name: str, value: float) -> float:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0 (e.g. a temperature).

    Examples:
        >>> check_finite_positive("temperature", 0.2)
        0.2
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, but got {value!r}") from None
    if not (v > 0 and v != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, but got {value!r}")
    return v


def check_shape(name: str, x: object, pattern: Sequence[str | int | None], *, floating: bool = False) -> Tensor:
    """Check that ``x`` is a tensor with ``len(pattern)`` dims matching ``pattern``.

    Args:
        name: argument name used in the error message.
        x: the value to check.
        pattern: one entry per dimension: a string is a symbolic name shown in the message
            (e.g. ``"B"``); an int requires that exact size; ``None`` accepts any size.
            Symbolic names are only displayed, not matched against each other.
        floating: also require a floating-point dtype.

    Returns:
        ``x`` unchanged.

    Raises:
        ValueError: ``"<name> must have shape (B, N, D), but got (3, 4)"`` and similar.

    Examples:
        >>> import torch
        >>> check_shape("query", torch.zeros(2, 5, 8), ("B", "N", "D")).shape
        torch.Size([2, 5, 8])
        >>> check_shape("query", torch.zeros(3, 4), ("B", "N", "D"))
        Traceback (most recent call last):
        ...
        ValueError: query must have shape (B, N, D), but got (3, 4)
    """
    expected = "(" + ", ".join("*" if p is None else str(p) for p in pattern) + ")"
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {expected}, but got {type(x).__name__}")
    got = tuple(x.shape)
    ok = x.dim() == len(pattern) and all(not isinstance(p, int) or s == p for p, s in zip(pattern, got, strict=False))
    if not ok:
        raise ValueError(f"{name} must have shape {expected}, but got {got}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, but got dtype {x.dtype}")
    return x


def check_feature_map_pair(query_name: str, query: object, key_name: str, key: object) -> tuple[int, ...]:
    """Check two feature maps ``(B, D, h, w)`` and ``(B, D, h_k, w_k)`` that share ``B`` and ``D``.

    Returns:
        ``(B, D, h, w, h_k, w_k)``.

    Raises:
        ValueError: naming the argument, the expected shape and what came.

    Examples:
        >>> import torch
        >>> check_feature_map_pair("query", torch.zeros(2, 8, 3, 3), "key", torch.zeros(2, 8, 4, 5))
        (2, 8, 3, 3, 4, 5)
        >>> check_feature_map_pair("query", torch.zeros(2, 8, 3, 3), "key", torch.zeros(2, 6, 4, 5))
        Traceback (most recent call last):
        ...
        ValueError: key must have shape (B, D, h_k, w_k) with (B, D) = (2, 8) as query, but got (2, 6, 4, 5)
    """
    check_shape(query_name, query, ("B", "D", "h", "w"), floating=True)
    check_shape(key_name, key, ("B", "D", "h_k", "w_k"), floating=True)
    b, d, h, w = query.shape  # type: ignore[union-attr]
    if key.shape[:2] != (b, d):  # type: ignore[union-attr]
        raise ValueError(
            f"{key_name} must have shape (B, D, h_k, w_k) with (B, D) = ({b}, {d}) as {query_name}, "
            f"but got {tuple(key.shape)}"  # type: ignore[union-attr]
        )
    hk, wk = key.shape[2:]  # type: ignore[union-attr]
    return b, d, h, w, hk, wk
