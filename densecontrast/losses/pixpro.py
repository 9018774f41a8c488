"""PixPro's pixel-to-propagation consistency loss.

For one direction (online view 1 after the pixel propagation module, target view 2 from the
momentum encoder) and image ``b``:

```text
l_b = -2 * sum_ij A_ij cos(y_i, x'_j) / (sum_ij A_ij + 1e-6)
```
where ``y_i`` is the propagated online feature of query cell ``i`` (view 1), ``x'_j`` the target
projection of key cell ``j`` (view 2, no gradient) and ``A_ij = 1`` when the two cells are
positives (PixPro: image-space distance below ``T = 0.7`` bin diagonals). ``l_b`` is a mean over
**all positive pairs of the image**, not a per-query mean. Use both directions and add them:
``L = l(y1, x'2, A12) + l(y2, x'1, A21)``.

Each direction lies in ``[-2, 2]``; because training pushes the cosines towards 1, **negative
values are normal** (a converged run sits well below 0 per direction; about -2 to -3 for the
symmetric sum).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from densecontrast._checks import check_choice, check_matches, check_shape, to_compute
from densecontrast.losses.reduction import REDUCTIONS, reduce
from densecontrast.matching.matches import Matches

__all__ = ["PixProConsistencyLoss", "pixpro_consistency_loss"]

_PER_IMAGE = ("pairs", "valid_images")


def pixpro_consistency_loss(
    propagated: Tensor,
    target: Tensor,
    matches: Matches,
    per_image: Literal["pairs", "valid_images"] = "pairs",
    reduction: str = "mean",
) -> Tensor:
    """PixPro consistency loss for one direction (functional form of :class:`PixProConsistencyLoss`).

    Args:
        propagated: ``(B, D, h, w)`` online features after the pixel propagation module (view 1).
        target: ``(B, D, h_k, w_k)`` target (momentum) projections of view 2. Detached here.
        matches: positives of the ``N = h * w`` query cells among the ``M = h_k * w_k`` key
            cells: the multi-positive form ``key_index (B, N, k)`` + ``key_mask (B, N, k)`` of the
            coordinate matcher (each masked-in entry is one pair; entries should not repeat a
            key), a single ``key_index (B, N)``, or ``key_points (B, N, 2)`` (bilinear sample of
            the target map). ``valid`` gates queries; ``weight`` scales every pair of a query
            (1 in PixPro).
        per_image: ``"pairs"`` (PixPro): the batch loss is the mean of ``l_b`` over all ``B``
            images, images without positive pairs contribute 0; ``"valid_images"``: divide by the
            number of images that have at least one positive pair instead.
        reduction: ``"mean"`` (as set by ``per_image``), ``"sum"`` (sum of ``l_b``) or
            ``"none"`` (the ``(B,)`` per-image losses ``l_b``).

    Returns:
        Float32 scalar, or ``(B,)`` for ``reduction="none"``. Exactly 0 (with a gradient) when no
        image has a positive pair.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> y, x = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
        >>> m = Matches(valid=torch.ones(2, 9, dtype=torch.bool), weight=torch.ones(2, 9),
        ...             key_index=torch.arange(9).expand(2, 9)[..., None].contiguous(),
        ...             key_mask=torch.ones(2, 9, 1, dtype=torch.bool))
        >>> loss = pixpro_consistency_loss(y, x, m)
        >>> bool(-2 <= loss <= 2)
        True
        >>> round(float(pixpro_consistency_loss(x, x, m)), 4)  # perfectly aligned: -2
        -2.0
    """
    check_choice(per_image, "per_image", _PER_IMAGE)
    check_choice(reduction, "reduction", REDUCTIONS)
    dims: dict[str, int] = {}
    b, _, h, w = check_shape(propagated, "propagated", ("B", "D", "h", "w"), sizes=dims, floating=True)
    _, _, hk, wk = check_shape(target, "target", ("B", "D", "h_k", "w_k"), sizes=dims, of="propagated", floating=True)
    check_matches(matches, queries=(b, h * w), cells_of="propagated", key_shape=(hk, wk), key_name="target")

    with torch.autocast(device_type=propagated.device.type, enabled=False):
        y = F.normalize(rearrange(to_compute(propagated), "b d h w -> b (h w) d"), dim=-1)  # (B, N, D)
        tgt = to_compute(target.detach())
        if matches.key_index is not None:
            keys = F.normalize(rearrange(tgt, "b d h w -> b (h w) d"), dim=-1)  # (B, M, D)
            pos = matches.gather(keys)
        else:
            pos = F.normalize(matches.gather(tgt), dim=-1)
        valid = matches.valid
        if pos.dim() == 3:  # one positive per query
            pos, mask = pos[:, :, None], valid[..., None]
        else:
            mask = matches.key_mask & valid[..., None]  # type: ignore[operator]
        cos = torch.einsum("bnd,bnkd->bnk", y, pos)
        # A_ij, (B, N, k), in the compute dtype (geometry-derived weights may be float64)
        pair_w = mask.to(cos.dtype) * matches.weight.detach().to(cos.dtype)[..., None]
        num = torch.where(pair_w != 0, pair_w * cos, torch.zeros_like(cos)).sum(dim=(1, 2))
        den = pair_w.sum(dim=(1, 2))
        per_img = -2.0 * num / (den + 1e-6)  # (B,)
        img_w = torch.ones_like(den) if per_image == "pairs" else (den > 0).to(den.dtype)
        return reduce(per_img, img_w, reduction)


class PixProConsistencyLoss(nn.Module):
    """PixPro pixel-to-propagation consistency loss (one direction).

    ``l_b = -2 * sum_ij A_ij cos(y_i, x'_j) / (sum_ij A_ij + 1e-6)`` per image ``b``: the mean
    cosine over all positive pairs of the image, target detached; then a mean over the batch.
    See :func:`pixpro_consistency_loss` for the argument details.

    Args:
        per_image: ``"pairs"`` (default, PixPro): mean of ``l_b`` over all ``B`` images, so images
            without positives contribute 0 but still count in the denominator;
            ``"valid_images"``: mean over the images that have positives only.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-image ``(B,)``).

    Shapes:
        propagated ``(B, D, h, w)``, target ``(B, D, h_k, w_k)``, matches with ``N = h * w``
        queries; output a float32 scalar (``(B,)`` for ``"none"``). Computed in float32 under
        autocast (bf16 / fp16 inputs are accepted).

    Note:
        The range per direction is ``[-2, 2]`` and the loss is **negative in normal training**
        (the symmetric sum of both directions approaches -4).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> loss_fn = PixProConsistencyLoss()
        >>> y = torch.randn(2, 16, 4, 4, requires_grad=True)
        >>> m = Matches(valid=torch.zeros(2, 16, dtype=torch.bool), weight=torch.ones(2, 16),
        ...             key_index=torch.zeros(2, 16, 1, dtype=torch.long),
        ...             key_mask=torch.zeros(2, 16, 1, dtype=torch.bool))
        >>> loss = loss_fn(y, torch.randn(2, 16, 4, 4), m)  # no overlap at all
        >>> loss.item(), loss.requires_grad
        (0.0, True)
    """

    def __init__(self, per_image: Literal["pairs", "valid_images"] = "pairs", reduction: str = "mean") -> None:
        super().__init__()
        self.per_image = check_choice(per_image, "per_image", _PER_IMAGE)
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def forward(self, propagated: Tensor, target: Tensor, matches: Matches) -> Tensor:
        """Loss of the online propagated map against the target projections at the positives."""
        return pixpro_consistency_loss(
            propagated, target, matches, per_image=self.per_image, reduction=self.reduction  # type: ignore[arg-type]
        )

    def extra_repr(self) -> str:
        return f"per_image={self.per_image!r}, reduction={self.reduction!r}"
