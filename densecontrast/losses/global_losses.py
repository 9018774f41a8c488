"""Image-level (and per-cell) losses: MoCo v2 InfoNCE, BYOL regression, SimSiam negative cosine.

All losses compute in float32 with autocast disabled inside, so bf16/fp16 activations are
accepted. ``BYOLLoss`` and ``NegativeCosine`` also work per cell (``(B, N, D)`` inputs with an
optional ``(B, N)`` weight or validity mask), which is how DenseSiam's PixSim and PixPro's
consistency term use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast._checks import check_choice, check_positive, check_shape, compute_dtype
from densecontrast.losses.dense_infonce import dense_info_nce
from densecontrast.losses.reduction import REDUCTIONS, reduce

__all__ = ["BYOLLoss", "InfoNCE", "NegativeCosine", "byol_loss", "info_nce", "negative_cosine"]


def info_nce(
    query: Tensor,
    key: Tensor,
    queue: Tensor | None = None,
    temperature: float = 0.2,
    *,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample MoCo v2 InfoNCE loss ``(B,)``.

    With a queue: ``L_b = -log softmax([q_b . k_b, q_b . Q] / tau)_0`` (MoCo v2; the memory-efficient
    :func:`~densecontrast.losses.dense_infonce.dense_info_nce` core). Without a queue: in-batch
    negatives, ``L_b = -log softmax(q_b . K^T / tau)_b`` where ``K`` holds all keys of the batch,
    i.e. the other samples' keys are the negatives (a batch of one gives 0).

    Args:
        query: ``(B, D)`` online (predicted) embeddings.
        key: ``(B, D)`` target embeddings of the other view (normally no gradient).
        queue: ``(K, D)`` unit-norm negatives or ``None``.
        temperature: ``tau > 0``.
        normalize: L2-normalize ``query`` and ``key`` first (the queue is used as given).
        chunk_size: query chunk for the queue path.

    Returns:
        ``(B,)`` float32 losses (float64 for float64 inputs).

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> info_nce(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)).shape
        torch.Size([4])
    """
    tau = check_positive(temperature, "temperature")
    _, d = check_shape(query, "query", ("B", "D"), floating=True)
    check_shape(key, "key", query.shape, floating=True)
    if queue is not None:
        check_shape(queue, "queue", ("K", d), floating=True)
    dtype = compute_dtype(query, key)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k = query.to(dtype), key.to(dtype)
        if normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if queue is not None:
            return dense_info_nce(q, k, queue, tau, chunk_size)
        logits = q @ k.t() / tau
        target = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, target, reduction="none")


class InfoNCE(nn.Module):
    """MoCo v2 image-level InfoNCE with an optional queue (PixCon §1.5 / DenseCL global branch).

    ``L = mean_b -log softmax([q_b . k_b, q_b . Q] / tau)_0``; without a queue, the other keys of the
    batch are the negatives (see :func:`info_nce`). Inputs are L2-normalized by default.

    Args:
        temperature: ``tau > 0`` (0.2 in MoCo v2 / DenseCL / PixCon).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``).

    Examples:
        >>> import torch, torch.nn.functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.randn(4, 8, generator=g, requires_grad=True)
        >>> queue = F.normalize(torch.randn(32, 8, generator=g), dim=1)
        >>> loss = InfoNCE(0.2)(q, torch.randn(4, 8, generator=g), queue)
        >>> loss.backward(); loss.dim(), q.grad.shape
        (0, torch.Size([4, 8]))
    """

    def __init__(self, temperature: float = 0.2, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"

    def forward(self, query: Tensor, key: Tensor, queue: Tensor | None = None, *, normalize: bool = True) -> Tensor:
        """``query (B, D)``, ``key (B, D)``, ``queue (K, D)`` or None -> scalar (or ``(B,)`` for ``"none"``)."""
        per = info_nce(query, key, queue, self.temperature, normalize=normalize)
        return reduce(per, None, self.reduction)


def _pair_cosine(prediction: Tensor, target: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(prediction, Tensor) or prediction.dim() not in (2, 3) or not prediction.is_floating_point():
        got = tuple(prediction.shape) if isinstance(prediction, Tensor) else type(prediction).__name__
        raise ValueError(f"prediction must be a float tensor of shape (B, D) or (B, N, D), but got {got}")
    check_shape(target, "target", prediction.shape, floating=True)
    if weight is not None:
        check_shape(weight, "weight", prediction.shape[:-1])
    dtype = compute_dtype(prediction, target)
    p = F.normalize(prediction.to(dtype), dim=-1)
    z = F.normalize(target.detach().to(dtype), dim=-1)
    return (p * z).sum(-1), weight


def byol_loss(prediction: Tensor, target: Tensor, weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """BYOL regression loss ``2 - 2 cos(p, sg(z))`` (= ``||p/|p| - z/|z| ||^2``).

    Args:
        prediction: ``(B, D)`` or ``(B, N, D)`` online predictions.
        target: same shape, target projections; detached here (stop-gradient).
        weight: optional ``(B,)`` / ``(B, N)`` float weights or bool validity mask.
        reduction: ``"mean"`` (weighted mean over entries with non-zero weight), ``"sum"``, ``"none"``.

    Returns:
        float32 scalar, or ``(B,)`` / ``(B, N)`` for ``"none"``.

    Examples:
        >>> import torch
        >>> p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> byol_loss(p, torch.tensor([[1.0, 0.0], [0.0, -1.0]])).item()
        2.0
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        cos, w = _pair_cosine(prediction, target, weight)
        return reduce(2.0 - 2.0 * cos, w, reduction)


def negative_cosine(
    prediction: Tensor, target: Tensor, weight: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """SimSiam loss ``-cos(p, sg(z))`` (range ``[-1, 1]``).

    Args:
        prediction: ``(B, D)`` or ``(B, N, D)``.
        target: same shape; detached here (stop-gradient).
        weight: optional ``(B,)`` / ``(B, N)`` weights or bool validity mask.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Examples:
        >>> import torch
        >>> negative_cosine(torch.ones(2, 3, 4), torch.ones(2, 3, 4)).item()
        -1.0
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        cos, w = _pair_cosine(prediction, target, weight)
        return reduce(-cos, w, reduction)


class BYOLLoss(nn.Module):
    """BYOL regression loss ``2 - 2 cos(p, sg(z))``, averaged (optionally weighted, per cell).

    Convention:
        ``prediction`` and ``target`` are ``(B, D)`` (global) or ``(B, N, D)`` (per cell, e.g. the
        ``N`` matched query cells with their gathered targets). ``weight`` is ``(B,)`` / ``(B, N)``
        (float weights or a bool validity mask); the mean runs over entries with non-zero weight.
        The target is detached.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> p = torch.randn(2, 5, 8, generator=g, requires_grad=True)
        >>> z = torch.randn(2, 5, 8, generator=g, requires_grad=True)
        >>> loss = BYOLLoss()(p, z, weight=torch.ones(2, 5, dtype=torch.bool))
        >>> loss.backward(); bool(0 <= loss <= 4), z.grad is None
        (True, True)
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def forward(self, prediction: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """See :func:`byol_loss`."""
        return byol_loss(prediction, target, weight, self.reduction)


class NegativeCosine(nn.Module):
    """SimSiam / DenseSiam loss ``-cos(p, sg(z))``, averaged (optionally weighted, per cell).

    Same conventions as :class:`BYOLLoss`. The symmetric SimSiam loss is
    ``0.5 * (D(p1, z2) + D(p2, z1))`` with two calls.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Examples:
        >>> import torch
        >>> loss = NegativeCosine()(torch.ones(2, 4), -torch.ones(2, 4))
        >>> loss.item()
        1.0
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def forward(self, prediction: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """See :func:`negative_cosine`."""
        return negative_cosine(prediction, target, weight, self.reduction)
