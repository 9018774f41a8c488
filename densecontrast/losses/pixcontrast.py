"""PixContrast: multi-positive pixel InfoNCE over the other view's cells (PixPro paper).

For query cell ``i`` of view 1 with positive key cells ``P_i`` in view 2 (cells within the
coordinate threshold) and all other key cells of that image as negatives::

    L_i = -log( sum_{j in P_i} exp(c_ij / tau) / sum_{j} exp(c_ij / tau) )
        = logsumexp_j(c_ij / tau) - logsumexp_{j in P_i}(c_ij / tau),      c_ij = cos(x_i, x'_j)

The positive log-sum-exp is taken over logits masked with ``-inf`` (the exponentials are never
multiplied by a mask), and queries without positives are skipped (weight 0) rather than divided
by zero. The ``(B, N, M)`` logit tensor is materialized: ``M`` is the other view's cell count
(e.g. 7 x 7 or 14 x 14), so it is small.

Note:
    ``tau = 0.3`` is the value recalled from the PixPro paper (§3.1); PixContrast is not in the
    released PixPro code and the value is not verified there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast._checks import check_choice, check_matches, check_positive, check_shape, compute_dtype
from densecontrast.losses.dense_infonce import dense_keys, dense_queries
from densecontrast.losses.reduction import REDUCTIONS, reduce
from densecontrast.matching.matches import Matches

__all__ = ["PixContrastLoss", "pix_contrast"]


def pix_contrast(
    query: Tensor,
    key: Tensor,
    positive_mask: Tensor,
    temperature: float = 0.3,
    *,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-query multi-positive InfoNCE.

    Args:
        query: ``(B, N, D)`` query features (view 1).
        key: ``(B, M, D)`` key features (view 2).
        positive_mask: ``(B, N, M)`` bool, ``True`` where key ``j`` is a positive of query ``i``.
        temperature: ``tau > 0``.
        normalize: L2-normalize both inputs (cosine logits).

    Returns:
        ``(loss (B, N), has_positive (B, N) bool)``; the loss is 0 (with a zero gradient) where a
        query has no positive. float32 (float64 for float64 inputs), autocast disabled inside.

    Examples:
        >>> import torch
        >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> mask = torch.tensor([[[True, True], [False, False]]])
        >>> loss, has = pix_contrast(q, q, mask)
        >>> loss.tolist(), has.tolist()
        ([[0.0, 0.0]], [[True, False]])
    """
    tau = check_positive(temperature, "temperature")
    dims: dict[str, int] = {}
    check_shape(query, "query", ("B", "N", "D"), sizes=dims, floating=True)
    check_shape(key, "key", ("B", "M", "D"), sizes=dims, of="query")
    check_shape(positive_mask, "positive_mask", ("B", "N", "M"), sizes=dims)
    if positive_mask.dtype != torch.bool:
        raise ValueError(f"positive_mask must be a bool tensor, but got dtype {positive_mask.dtype}")
    dtype = compute_dtype(query, key)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k = query.to(dtype), key.to(dtype)
        if normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        logits = torch.bmm(q, k.transpose(1, 2)) / tau  # (B, N, M)
        has_pos = positive_mask.any(dim=-1)
        # Rows without positives use all keys as "positives": their loss is exactly 0 and the
        # log-sum-exp never sees an all -inf row (whose gradient would be NaN).
        pos_mask = positive_mask | ~has_pos[..., None]
        lse_pos = torch.logsumexp(logits.masked_fill(~pos_mask, float("-inf")), dim=-1)
        lse_all = torch.logsumexp(logits, dim=-1)
        loss = torch.where(has_pos, lse_all - lse_pos, torch.zeros_like(lse_all))
        return loss, has_pos


class PixContrastLoss(nn.Module):
    """PixContrast loss (PixPro, §3.2 of the spec): multi-positive InfoNCE across the two views.

    Convention:
        ``query`` is view 1's dense projection ``(B, D, h, w)`` or ``(B, N, D)`` (row-major cells);
        ``key`` is view 2's ``(B, D, h_k, w_k)`` or ``(B, M, D)``. The positives of query ``i`` are
        the key cells of ``matches`` (a :class:`~densecontrast.matching.Matches` from the
        coordinate matcher: ``key_index (B, N, k)`` + ``key_mask``, or single ``key_index``;
        converted with ``matches.to_dense(M)``), or an explicit ``(B, N, M)`` bool mask. Every
        other key cell of the same image is a negative. Queries without a positive are skipped;
        the reduction is the weighted mean ``sum(w L) / max(sum(w), eps)`` over the remaining
        queries with ``w = matches.effective_weight`` (or 1 for a mask). The symmetric PixPro
        loss is the average of the two directions (two calls).

    Args:
        temperature: ``tau > 0``; 0.3 is recalled from the PixPro paper (not verified in code).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B, N)`` of ``w * L``).

    Examples:
        >>> import torch
        >>> from densecontrast.matching import Matches
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.randn(2, 8, 2, 2, generator=g, requires_grad=True)
        >>> k = torch.randn(2, 8, 2, 2, generator=g)
        >>> idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]]).expand(2, 4, 2)
        >>> mask = torch.tensor([True, False]).expand(2, 4, 2).clone()
        >>> m = Matches(valid=torch.ones(2, 4, dtype=torch.bool), weight=torch.ones(2, 4),
        ...             key_index=idx.clone(), key_mask=mask, key_shape=(2, 2))
        >>> loss = PixContrastLoss()(q, k, m)
        >>> loss.backward(); loss.dim(), bool(loss > 0), q.grad.shape
        (0, True, torch.Size([2, 8, 2, 2]))
    """

    def __init__(self, temperature: float = 0.3, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"

    def forward(self, query: Tensor, key: Tensor, matches: Matches | Tensor, *, normalize: bool = True) -> Tensor:
        """Loss of ``query`` against ``key`` with positives from ``matches``.

        Args:
            query: ``(B, D, h, w)`` or ``(B, N, D)``.
            key: ``(B, D, h_k, w_k)`` or ``(B, M, D)``.
            matches: :class:`~densecontrast.matching.Matches` with ``N`` queries, or a ``(B, N, M)``
                bool positive mask.
            normalize: L2-normalize both inputs.

        Returns:
            float32 scalar, or ``(B, N)`` for ``reduction="none"``.
        """
        q = dense_queries(query, "query")
        k = dense_queries(dense_keys(key, "key"), "key")
        b, n, _ = q.shape
        m = k.shape[1]
        if isinstance(matches, Matches):
            check_matches(matches, queries=(b, n), cells_of="query")
            mask = matches.to_dense(m).to(q.device)
            weight = matches.effective_weight.to(q.device)
        elif isinstance(matches, Tensor):
            mask, weight = matches, None
        else:
            raise ValueError(f"matches must be a Matches or a (B, N, M) bool tensor, but got {type(matches).__name__}")
        loss, has_pos = pix_contrast(q, k, mask, self.temperature, normalize=normalize)
        w = has_pos.float() if weight is None else weight * has_pos.float()
        return reduce(loss, w, self.reduction)
