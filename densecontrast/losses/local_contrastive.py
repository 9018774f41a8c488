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
from einops import rearrange
from torch import Tensor, nn

from densecontrast._checks import check_choice, check_matches, check_positive, check_shape, to_compute
from densecontrast.losses.reduction import REDUCTIONS, reduce
from densecontrast.matching.matches import Matches, sample_points

__all__ = ["LocalContrastiveLoss", "local_contrastive_loss"]


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
    tau = check_positive(temperature, "temperature")
    check_choice(reduction, "reduction", REDUCTIONS)
    dims: dict[str, int] = {}
    b, _, h, w = check_shape(query, "query", ("B", "D", "h", "w"), sizes=dims, floating=True)
    _, _, hk, wk = check_shape(key, "key", ("B", "D", "h_k", "w_k"), sizes=dims, of="query", floating=True)
    check_matches(matches, queries=(b, h * w), cells_of="query", key_shape=(hk, wk))
    if matches.key_points is None:
        raise ValueError("matches must carry key_points (B, N, 2) (a correspondence matcher), but got None")

    with torch.autocast(device_type=query.device.type, enabled=False):
        qn = F.normalize(rearrange(to_compute(query), "b d h w -> b (h w) d"), dim=-1)  # (B, N, D)
        kn = F.normalize(rearrange(to_compute(key), "b d h w -> b d (h w)"), dim=1)  # (B, D, M)
        nll = -torch.log_softmax(torch.bmm(qn, kn) / tau, dim=-1)  # (B, N, M)
        pts = torch.where(matches.valid[..., None], to_compute(matches.key_points.detach()), 0.0)
        # every query's NLL map is a 1-image batch of its own, sampled at its one point
        maps = rearrange(nll, "b n (h w) -> (b n) 1 h w", h=hk, w=wk)
        sampled = sample_points(maps, rearrange(pts, "b n p -> (b n) 1 p"))  # (B * N, 1, 1)
        return reduce(rearrange(sampled, "(b n) 1 1 -> b n", b=b), matches.effective_weight, reduction)


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
        self.temperature = check_positive(temperature, "temperature")
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def forward(self, query: Tensor, key: Tensor, matches: Matches) -> Tensor:
        """LC-loss of the query cells against the key grid at the matched points."""
        return local_contrastive_loss(query, key, matches, self.temperature, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
