"""LC-loss: local contrastive loss with a bilinearly interpolated negative log-likelihood.

Views: ``I_c`` (colour transforms only, no crop or flip) and ``I_sc`` (crop, flip and colour).
Every cell ``p_c`` of ``I_c``'s ``h x w`` feature grid is a query; its analytic correspondence in
``I_sc`` is the continuous point ``p_sc``. With ``F_xi`` the target features of ``I_c`` and
``F_theta`` the online features of ``I_sc``:

```text
C'(p_c, p_t)   = cos(F_xi(p_c), F_theta(p_t))                 for every key cell p_t of I_sc
NLL(p_c, p_t)  = -log softmax_{p_t}( C'(p_c, p_t) / tau )
L_LC           = sum_{p_c valid} w(p_c) * NLL(p_c, p_sc) / sum_{p_c valid} w(p_c)
```

where ``NLL(p_c, p_sc)`` is the NLL map of query ``p_c``, reshaped to the ``h_k x w_k`` key grid,
sampled **bilinearly** at the sub-cell point ``p_sc`` (the four neighbouring NLL values are
interpolated; the features themselves are never warped). The full objective of the method is the
user's sum ``(1 - alpha) * L_global + alpha * L_LC`` with ``alpha = 0.1`` (BYOL global loss).

The temperature is a required argument: the paper does not state its value (0.1 to 0.2 are
reasonable starting points).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast.losses.reduction import (
    check_feature_map_pair,
    check_finite_positive,
    check_reduction,
    reduce,
)
from densecontrast.matching.matches import Matches, sample_points

__all__ = ["LocalContrastiveLoss", "local_contrastive_loss"]


def _f32(x: Tensor) -> Tensor:
    """At least float32 (half / bfloat16 are upcast, float64 is kept)."""
    return x if x.dtype == torch.float64 else x.float()


def local_contrastive_loss(
    query: Tensor, key: Tensor, matches: Matches, temperature: float, reduction: str = "mean"
) -> Tensor:
    """LC-loss (functional form of :class:`LocalContrastiveLoss`).

    Args:
        query: ``(B, D, h, w)`` features of the colour-only view ``I_c`` (the target branch in the
            paper; detach it yourself if it must not receive gradient). Every cell is a query,
            ``N = h * w``, flattened row-major.
        key: ``(B, D, h_k, w_k)`` features of the spatial view ``I_sc`` (online branch).
        matches: from the correspondence matcher: ``key_points (B, N, 2)`` continuous ``(u, v)``
            in the key view's feature-cell space (cell centers at integers, ``u`` = column),
            ``valid (B, N)`` (the point lies in ``I_sc``) and ``weight (B, N)``.
        temperature: softmax temperature ``tau`` (> 0; required, no published value).
        reduction: ``"mean"`` (weighted mean over valid queries), ``"sum"`` or ``"none"``
            (``(B, N)`` per-query NLL, 0 for invalid queries).

    Returns:
        Float32 scalar (``(B, N)`` for ``"none"``). Exactly 0 with a gradient when no query is
        valid.

    Convention:
        ``key_points`` are sampled with ``grid_sample(align_corners=False, padding_mode="border")``
        at ``g = (2 u + 1) / w_k - 1``, i.e. :func:`densecontrast.matching.sample_points`. Points
        of invalid queries are ignored (replaced by 0 before sampling).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> q, k = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
        >>> pts = torch.rand(2, 9, 2) * 2  # (u, v) in [0, 2]: inside the 3 x 3 key grid
        >>> m = Matches(valid=torch.ones(2, 9, dtype=torch.bool), weight=torch.ones(2, 9), key_points=pts)
        >>> loss = local_contrastive_loss(q, k, m, temperature=0.2)
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
    """
    tau = check_finite_positive("temperature", temperature)
    check_reduction(reduction)
    b, _, h, w, hk, wk = check_feature_map_pair("query", query, "key", key)
    n = h * w
    if not isinstance(matches, Matches):
        raise ValueError(f"matches must be a densecontrast.matching.Matches, but got {type(matches).__name__}")
    if tuple(matches.valid.shape) != (b, n):
        raise ValueError(
            f"matches must have B x N = {b} x {n} queries (one per cell of query), "
            f"but matches.valid has shape {tuple(matches.valid.shape)}"
        )
    if matches.key_points is None:
        raise ValueError("matches must carry key_points (B, N, 2) (a correspondence matcher), but got None")
    if matches.key_shape is not None and tuple(matches.key_shape) != (hk, wk):
        raise ValueError(f"matches.key_shape must equal the key grid {(hk, wk)}, but got {matches.key_shape}")

    with torch.autocast(device_type=query.device.type, enabled=False):
        qn = F.normalize(_f32(query).flatten(2).transpose(1, 2), dim=-1)  # (B, N, D)
        kn = F.normalize(_f32(key).flatten(2), dim=1)  # (B, D, M)
        nll = -torch.log_softmax(torch.bmm(qn, kn) / tau, dim=-1)  # (B, N, M)
        valid = matches.valid
        pts = torch.where(valid[..., None], _f32(matches.key_points.detach()), 0.0)
        sampled = sample_points(nll.reshape(b * n, 1, hk, wk), pts.reshape(b * n, 1, 2)).reshape(b, n)
        return reduce(sampled, matches.effective_weight, reduction)


class LocalContrastiveLoss(nn.Module):
    """LC-loss: per-query NLL of the true correspondence, bilinearly interpolated.

    ``NLL = -log_softmax_{key cells}(cos(query_i, key_j) / tau)``; each query's NLL map over the
    ``h_k x w_k`` key grid is sampled bilinearly at its corresponding point ``key_points``; the
    result is averaged over valid queries with their weights. Use it as
    ``(1 - alpha) * global_loss + alpha * lc_loss`` with ``alpha = 0.1``. See
    :func:`local_contrastive_loss` for details.

    Args:
        temperature: softmax temperature ``tau`` (required; the paper gives no value).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes:
        query ``(B, D, h, w)``, key ``(B, D, h_k, w_k)``, matches with ``N = h * w`` queries and
        ``key_points (B, N, 2)``; output float32 scalar. Computed in float32 under autocast.

    Note:
        Both inputs are plain tensors and both receive gradient; in the paper the query side
        (colour-only view) is the EMA target, so pass ``query.detach()`` or produce it under
        ``torch.no_grad()``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> loss_fn = LocalContrastiveLoss(temperature=0.1)
        >>> key = torch.randn(1, 8, 4, 4, requires_grad=True)
        >>> pts = torch.tensor([[[1.5, 2.0]]]).expand(1, 4, 2)  # every query matched at (u, v) = (1.5, 2)
        >>> m = Matches(valid=torch.ones(1, 4, dtype=torch.bool), weight=torch.ones(1, 4), key_points=pts)
        >>> loss_fn(torch.randn(1, 8, 2, 2), key, m).backward()
        >>> key.grad.shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, temperature: float, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = check_finite_positive("temperature", temperature)
        self.reduction = check_reduction(reduction)

    def forward(self, query: Tensor, key: Tensor, matches: Matches) -> Tensor:
        """LC-loss of the query cells against the key grid at the matched points."""
        return local_contrastive_loss(query, key, matches, self.temperature, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
