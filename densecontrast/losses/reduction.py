"""The weighted reduction over valid queries that every loss shares.

Every dense loss in :mod:`densecontrast.losses` produces one loss value per query and averages
those with per-query weights (``Matches.effective_weight``: the matcher's weight times its
validity mask)::

    loss = sum(w * l) / max(sum(w), eps)

so a batch without a single valid query gives a loss of exactly ``0`` that still carries a
gradient (of zeros), never ``NaN``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from densecontrast._checks import check_choice, check_nonnegative, check_shape, compute_dtype

__all__ = ["REDUCTIONS", "reduce", "weighted_mean"]

REDUCTIONS = ("mean", "sum", "none")
"""The ``reduction`` values every loss accepts."""


def _weight_like(loss: Tensor, weight: Tensor | None) -> Tensor:
    """``weight`` (all ones for ``None``), checked (shape of ``loss``; finite, ``>= 0``), in the compute dtype."""
    if weight is None:
        return torch.ones_like(loss, dtype=compute_dtype(loss))
    check_shape(weight, "weight", loss.shape, of="loss")
    w = weight.to(device=loss.device, dtype=compute_dtype(loss))
    check_nonnegative(w, "weight")  # ValueError on the CPU, an asynchronous device assert on CUDA
    return w


def weighted_mean(loss: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Weighted mean ``sum(w * l) / max(sum(w), eps)`` computed in float32 (float64 for float64 losses).

    Args:
        loss: per-query losses, any shape, typically ``(B, N)`` or ``(B * N,)``.
        weight: per-query weights of the same shape (bool or float; ``None`` means all ones),
            finite and ``>= 0``. Invalid queries carry weight 0. Converted to the compute dtype.
        eps: lower bound of the denominator.

    Returns:
        A float32 (float64 for a float64 ``loss``) scalar. When ``sum(w) == 0`` the result is
        exactly ``0`` and is still connected to the graph of ``loss`` (every contribution is a
        masked zero), so ``backward()`` works and produces zero gradients. A query of weight 0
        never contributes, even with a NaN or infinite loss.

    Raises:
        ValueError: ``weight`` of another shape, or with a negative, NaN or infinite entry (a
            negative weight could make the denominator tiny and the mean huge). The values are
            checked without a host synchronization: on CUDA a bad weight is an asynchronous
            device assert (a ``RuntimeError`` at the next synchronization) instead.

    Examples:
        >>> import torch
        >>> loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        >>> weighted_mean(loss, torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item()
        2.0
        >>> out = weighted_mean(loss, torch.zeros(2, 2))
        >>> out.item(), out.requires_grad
        (0.0, True)
        >>> weighted_mean(loss, torch.tensor([[1.0, -0.5], [1.0, 0.0]]))
        Traceback (most recent call last):
        ...
        ValueError: weight must be finite and >= 0, but got 1 negative or non-finite values (first -0.5 at ...
    """
    w = _weight_like(loss, weight)
    loss32 = loss.to(compute_dtype(loss))
    # where() instead of multiplication: an invalid query with an infinite/NaN loss must not poison the sum.
    contrib = torch.where(w != 0, w * loss32, torch.zeros_like(loss32))
    # No host sync: when every weight is 0, every contribution is exactly 0 and so is 0 / eps.
    return contrib.sum() / w.sum().clamp_min(eps)


def reduce(loss: Tensor, weight: Tensor | None = None, reduction: str = "mean", eps: float = 1e-6) -> Tensor:
    """Reduce per-query losses with weights.

    Args:
        loss: per-query losses, e.g. ``(B, N)``.
        weight: weights of the same shape (``None``: all ones), finite and ``>= 0`` (checked as
            in :func:`weighted_mean`).
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
    check_choice(reduction, "reduction", REDUCTIONS)
    if reduction == "mean":
        return weighted_mean(loss, weight, eps)
    w = _weight_like(loss, weight)
    loss32 = loss.to(compute_dtype(loss))
    out = torch.where(w != 0, w * loss32, torch.zeros_like(loss32))
    return out.sum() if reduction == "sum" else out
