"""DenseSiam losses: PixSim (dense SimSiam at matched points) and RegionSim (region InfoNCE).

PixSim: the location matcher samples ``N`` points inside the intersection of the two views (a
regular 7 x 7 grid by default) and both views' dense projections / predictions are bilinearly
sampled there (:func:`densecontrast.matching.sample_points`), giving ``(B, N, D)`` features. With
``D(p, z) = -cos(p, sg(z))``:

```text
L_pix = mean_n [ 0.5 * D(p1_n, z2_n) + 0.5 * D(p2_n, z1_n) ]     (weighted mean over valid points)
```

RegionSim: ``K`` soft masks ``softmax_K(mask_logits)`` pool the features into ``K`` region
embeddings per image (:func:`region_embeddings`, an **unnormalized** weighted sum). After a
projector and predictor, the regions of the two views are contrasted against each other within
the same image (positives on the diagonal):

```text
M12 = normalize(p1) normalize(z2)^T / tau,   M21 = normalize(p2) normalize(z1)^T / tau    (B, K, K)
L_region = -0.5 * [ mean_k log_softmax(M12)_kk + mean_k log_softmax(M21)_kk ]
```
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast._checks import check_choice, check_positive, check_shape, to_compute
from densecontrast.losses.reduction import REDUCTIONS, reduce

__all__ = ["DenseSimSiamLoss", "RegionSimLoss", "dense_simsiam_loss", "region_embeddings", "region_sim_loss"]



def dense_simsiam_loss(
    p1: Tensor, z2: Tensor, p2: Tensor, z1: Tensor, valid: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Symmetric negative cosine at matched points (functional form of :class:`DenseSimSiamLoss`).

    Args:
        p1: ``(B, N, D)`` predictions of view 1 at the ``N`` matched points.
        z2: ``(B, N, D)`` projections of view 2 at the same points (stop-gradient applied here).
        p2: ``(B, N, D)`` predictions of view 2.
        z1: ``(B, N, D)`` projections of view 1 (stop-gradient applied here).
        valid: ``(B, N)`` bool mask or float weights of the points (``None``: all valid).
        reduction: ``"mean"`` (weighted mean over valid points), ``"sum"`` or ``"none"``
            (``(B, N)``, 0 at invalid points).

    Returns:
        Float32 scalar in ``[-1, 1]`` for ``"mean"``; exactly 0 with a gradient when no point is
        valid.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(2, 49, 16)
        >>> round(dense_simsiam_loss(z, z, z, z).item(), 4)  # identical predictions: -1
        -1.0
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    dims: dict[str, int] = {}
    for name, t in (("p1", p1), ("z2", z2), ("p2", p2), ("z1", z1)):
        check_shape(t, name, ("B", "N", "D"), sizes=dims, of="p1", floating=True)
    if valid is not None:
        check_shape(valid, "valid", (dims["B"], dims["N"]))
    with torch.autocast(device_type=p1.device.type, enabled=False):
        d12 = -(F.normalize(to_compute(p1), dim=-1) * F.normalize(to_compute(z2.detach()), dim=-1)).sum(-1)
        d21 = -(F.normalize(to_compute(p2), dim=-1) * F.normalize(to_compute(z1.detach()), dim=-1)).sum(-1)
        loss = 0.5 * d12 + 0.5 * d21  # (B, N)
        return reduce(loss, None if valid is None else to_compute(valid), reduction)


class DenseSimSiamLoss(nn.Module):
    """DenseSiam PixSim loss: ``0.5 D(p1, sg(z2)) + 0.5 D(p2, sg(z1))`` with ``D = -cos``, per point.

    The inputs are features already sampled at the points of a location matcher
    (:func:`densecontrast.matching.sample_points` on the dense projector / predictor maps with
    ``matches.query_points`` of view 1 and ``matches.key_points`` of view 2). See
    :func:`dense_simsiam_loss`.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes:
        p1, z2, p2, z1 ``(B, N, D)``; valid ``(B, N)`` bool or float; output float32 scalar.
        Computed in float32 under autocast.

    Note:
        Never pair this loss with a similarity (argmax) matcher: without negatives it collapses.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> p1, p2 = torch.randn(2, 49, 16, requires_grad=True), torch.randn(2, 49, 16, requires_grad=True)
        >>> z1, z2 = torch.randn(2, 49, 16, requires_grad=True), torch.randn(2, 49, 16, requires_grad=True)
        >>> DenseSimSiamLoss()(p1, z2, p2, z1).backward()
        >>> p1.grad is not None, z2.grad is None  # stop-gradient on z
        (True, True)
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def forward(self, p1: Tensor, z2: Tensor, p2: Tensor, z1: Tensor, valid: Tensor | None = None) -> Tensor:
        """Symmetric negative cosine between predictions and stop-gradient projections."""
        return dense_simsiam_loss(p1, z2, p2, z1, valid=valid, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


def region_embeddings(mask_logits: Tensor, features: Tensor) -> Tensor:
    """Pool features into ``K`` soft regions: ``r_bk = sum_hw softmax_K(mask_logits)_bkhw * f_b,:,hw``.

    Args:
        mask_logits: ``(B, K, h, w)`` region logits; softmax over the ``K`` axis gives soft masks.
        features: ``(B, C, h, w)`` features on the same grid.

    Returns:
        ``(B, K, C)`` float32 region embeddings, an **unnormalized** weighted sum (not divided by
        the mask mass, as in DenseSiam).

    Examples:
        >>> logits = torch.zeros(1, 2, 2, 2)  # two regions, uniform masks: every weight is 0.5
        >>> region_embeddings(logits, torch.ones(1, 3, 2, 2))
        tensor([[[2., 2., 2.],
                 [2., 2., 2.]]])
    """
    dims: dict[str, int] = {}
    check_shape(mask_logits, "mask_logits", ("B", "K", "h", "w"), sizes=dims, floating=True)
    check_shape(features, "features", ("B", "C", "h", "w"), sizes=dims, of="mask_logits", floating=True)
    with torch.autocast(device_type=features.device.type, enabled=False):
        masks = torch.softmax(to_compute(mask_logits), dim=1)
        return torch.einsum("bkhw,bchw->bkc", masks, to_compute(features))


def region_sim_loss(
    p1: Tensor,
    z2: Tensor,
    p2: Tensor,
    z1: Tensor,
    temperature: float = 0.1,
    stop_gradient: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """RegionSim InfoNCE among the ``K`` regions of each image (functional :class:`RegionSimLoss`).

    Args:
        p1: ``(B, K, D)`` region predictions of view 1.
        z2: ``(B, K, D)`` region projections of view 2.
        p2: ``(B, K, D)`` region predictions of view 2.
        z1: ``(B, K, D)`` region projections of view 1.
        temperature: ``tau`` (> 0).
        stop_gradient: detach ``z1`` and ``z2`` (DenseSiam's released code does not).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B, K)`` per region, averaged over the
            two directions).

    Returns:
        Float32 scalar ``-0.5 [mean_k log_softmax(M12)_kk + mean_k log_softmax(M21)_kk]``, where
        the softmax runs over the ``K`` regions of view 2 (row-wise).

    Examples:
        >>> z = torch.eye(4)[None]  # (1, 4, 4): four orthogonal regions
        >>> region_sim_loss(z, z, z, z, temperature=0.1).item() < 1e-3
        True
    """
    tau = check_positive(temperature, "temperature")
    check_choice(reduction, "reduction", REDUCTIONS)
    dims: dict[str, int] = {}
    for name, t in (("p1", p1), ("z2", z2), ("p2", p2), ("z1", z1)):
        check_shape(t, name, ("B", "K", "D"), sizes=dims, of="p1", floating=True)
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    with torch.autocast(device_type=p1.device.type, enabled=False):

        def _direction(p: Tensor, z: Tensor) -> Tensor:
            pn, zn = F.normalize(to_compute(p), dim=-1), F.normalize(to_compute(z), dim=-1)
            logits = torch.bmm(pn, zn.transpose(1, 2)) / tau
            return -torch.diagonal(torch.log_softmax(logits, dim=-1), dim1=1, dim2=2)  # (B, K)

        loss = 0.5 * (_direction(p1, z2) + _direction(p2, z1))
        return reduce(loss, None, reduction)


class RegionSimLoss(nn.Module):
    """DenseSiam RegionSim: InfoNCE across the ``K`` region embeddings of the same image.

    Build the inputs with :func:`region_embeddings` (per view), a region projector (``z``) and a
    predictor (``p``) applied to the flattened ``(B * K, C)`` embeddings. Positives are the same
    region index in the other view, negatives the other regions of the same image. See
    :func:`region_sim_loss`.

    Args:
        temperature: ``tau`` (0.1 in DenseSiam).
        stop_gradient: detach the projections ``z`` (default False, as DenseSiam's released code,
            which lets the gradient reach both sides).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes:
        p1, z2, p2, z1 ``(B, K, D)``; output float32 scalar. Computed in float32 under autocast.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> feats, logits = torch.randn(2, 32, 7, 7), torch.randn(2, 4, 7, 7)
        >>> r = region_embeddings(logits, feats)  # (2, 4, 32)
        >>> loss = RegionSimLoss()(r, r + 0.01, r, r - 0.01)
        >>> r.shape, bool(loss >= 0)
        (torch.Size([2, 4, 32]), True)
    """

    def __init__(self, temperature: float = 0.1, stop_gradient: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.stop_gradient = bool(stop_gradient)
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def forward(self, p1: Tensor, z2: Tensor, p2: Tensor, z1: Tensor) -> Tensor:
        """Symmetric region InfoNCE between predictions and projections of the two views."""
        return region_sim_loss(p1, z2, p2, z1, self.temperature, self.stop_gradient, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, stop_gradient={self.stop_gradient}, reduction={self.reduction!r}"
