"""Dense InfoNCE with a negative queue (DenseCL, PixCon): a memory-efficient implementation.

For every valid query cell ``i`` with positive key ``k_i`` and the ``K`` negatives ``Q`` (the
queue), the loss is::

    L_i = -log softmax([q_i . k_i, q_i . Q_1, ..., q_i . Q_K] / tau)_0
        = logsumexp([q_i . k_i, q_i . Q] / tau) - q_i . k_i / tau

At ``B = 32``, ``28 x 28`` queries and ``K = 65,536`` the ``(B * N, K)`` logit matrix alone is
6.6 GB in float32 and a plain ``cat`` + ``cross_entropy`` keeps two or three such matrices alive
for the backward pass. :func:`dense_info_nce` never holds more than one chunk of logits:

* **forward**, per chunk of ``C`` queries: ``L = (q_c / tau) @ Q^T`` (``C x K``), its row maximum
  ``m``, ``E = exp(L - m)`` in place, ``s = E.sum(1)``; the log-sum-exp over the positive and the
  negatives is ``lse = logaddexp(l_pos, m + log s)``. When a gradient will be needed the same
  chunk also gives ``A_c = softmax_neg(L) @ Q = (E @ Q) * exp(m - lse)``, the softmax-weighted mean
  of the negatives. Only ``q``, the positives, ``lse``, ``l_pos`` and ``A`` (all ``(P, D)`` or
  ``(P,)``) are saved.
* **backward**: ``grad_q = (A + (p_pos - 1) k_pos) / tau * g`` and
  ``grad_k_pos = (p_pos - 1) q / tau * g`` need no matrix product at all. Only when the queue
  itself requires a gradient are the chunk logits recomputed to form
  ``grad_Q = sum_i g_i p_ij q_i / tau``.

So the forward + backward costs the same two ``(P x D) @ (D x K)`` products as the bare
"matmul + logsumexp + backward" floor, while peak memory is one chunk. The chunk size defaults to
``max(1, 64 MiB // (4 * K))`` rows (256 rows at ``K = 65,536``), i.e. a chunk's float32 logits stay
at about 64 MiB; see :func:`default_chunk_size`.

All arithmetic runs in float32 (float64 when the inputs are float64), with autocast disabled
inside, so bf16/fp16 activations under autocast are accepted and the logits never round to half
precision. The custom function is differentiable once (no double backward).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from densecontrast._checks import (
    check_choice,
    check_int,
    check_matches,
    check_positive,
    check_shape,
    check_type,
    compute_dtype,
)
from densecontrast.losses.reduction import REDUCTIONS, reduce
from densecontrast.matching.matches import Matches

__all__ = ["DenseInfoNCE", "default_chunk_size", "dense_info_nce", "dense_queries", "dense_keys"]

#: Byte budget of one chunk of float32 logits (``C * K * 4`` bytes).
CHUNK_BYTES = 64 * 2**20


def default_chunk_size(num_negatives: int, bytes_per_element: int = 4, budget: int = CHUNK_BYTES) -> int:
    """Number of query rows per chunk so that a chunk's ``(C, K)`` logits take at most ``budget`` bytes.

    Args:
        num_negatives: ``K``.
        bytes_per_element: 4 for float32 logits, 8 for float64.
        budget: bytes for one chunk (default 64 MiB).

    Returns:
        ``max(1, budget // (bytes_per_element * max(K, 1)))``.

    Examples:
        >>> default_chunk_size(65536)
        256
    """
    return max(1, budget // (bytes_per_element * max(int(num_negatives), 1)))


class _DenseInfoNCEFunction(torch.autograd.Function):
    """Chunked InfoNCE; inputs already in the compute dtype. Returns the per-query loss ``(P,)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor,
        inv_tau: float,
        chunk_size: int,
        grad_enabled: bool,
    ) -> Tensor:
        p = query.shape[0]
        # needs_input_grad reflects requires_grad only; skip the extra product when no graph is recorded
        need_q_grad = grad_enabled and ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        need_any = grad_enabled and any(ctx.needs_input_grad[:3])  # type: ignore[attr-defined]
        qs = query * inv_tau
        l_pos = (qs * positive).sum(-1)
        lse = torch.empty_like(l_pos)
        attract = torch.empty_like(query) if need_q_grad else None
        neg_t = negatives.t()
        for start in range(0, p, chunk_size):
            stop = min(start + chunk_size, p)
            logits = qs[start:stop] @ neg_t  # (C, K)
            row_max = logits.amax(dim=1)
            logits.sub_(row_max[:, None]).exp_()  # E = exp(L - m), in place
            lse_neg = row_max + logits.sum(dim=1).log()
            lse_c = torch.logaddexp(l_pos[start:stop], lse_neg)
            lse[start:stop] = lse_c
            if attract is not None:
                # softmax weights of the negatives, applied after the product: (E @ Q) * exp(m - lse)
                torch.mm(logits, negatives, out=attract[start:stop])
                attract[start:stop].mul_(torch.exp(row_max - lse_c)[:, None])
            del logits
        if need_any:
            ctx.save_for_backward(query, positive, negatives, lse, l_pos, attract)
        ctx.inv_tau = inv_tau  # type: ignore[attr-defined]
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        return lse - l_pos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        query, positive, negatives, lse, l_pos, attract = ctx.saved_tensors  # type: ignore[attr-defined]
        inv_tau: float = ctx.inv_tau  # type: ignore[attr-defined]
        need_q, need_k, need_neg = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        g = grad_out.to(query.dtype) * inv_tau  # (P,)
        coef_pos = (torch.exp(l_pos - lse) - 1.0) * g  # dL/dl_pos * g / tau
        grad_q = grad_k = grad_neg = None
        if need_q:
            grad_q = attract * g[:, None] + coef_pos[:, None] * positive
        if need_k:
            grad_k = coef_pos[:, None] * query
        if need_neg:
            chunk = ctx.chunk_size  # type: ignore[attr-defined]
            qs = query * inv_tau
            grad_neg = torch.zeros_like(negatives)
            neg_t = negatives.t()
            for start in range(0, query.shape[0], chunk):
                stop = min(start + chunk, query.shape[0])
                prob = qs[start:stop] @ neg_t
                prob.sub_(lse[start:stop, None]).exp_().mul_(g[start:stop, None])
                grad_neg.addmm_(prob.t(), query[start:stop])
                del prob
        return grad_q, grad_k, grad_neg, None, None, None


def dense_info_nce(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    temperature: float = 0.2,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-query InfoNCE loss against one positive and a shared set of negatives, in query chunks.

    ``loss_i = logsumexp([q_i . k_i, q_i . n_1, ..., q_i . n_K] / tau) - q_i . k_i / tau``, computed
    without materializing the ``(P, K)`` logits (see the module docstring for the algorithm and
    its memory/time cost). No normalization is applied here: pass unit vectors for cosine logits.

    Args:
        query: ``(P, D)`` queries (any floating dtype; gradients flow).
        positive: ``(P, D)`` the positive key of every query (gradients flow if it requires grad).
        negatives: ``(K, D)`` negatives shared by all queries, e.g. a MoCo queue (gradients flow
            if it requires grad; ``K = 0`` gives a loss of 0 for every query).
        temperature: ``tau > 0``.
        chunk_size: query rows per chunk; default :func:`default_chunk_size` (about 64 MiB of
            float32 logits per chunk). Need not divide ``P``.

    Returns:
        ``(P,)`` losses in float32 (float64 if any input is float64), autocast disabled inside.

    Examples:
        >>> import torch, torch.nn.functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> q = F.normalize(torch.randn(10, 8, generator=g), dim=1).requires_grad_()
        >>> k = F.normalize(torch.randn(10, 8, generator=g), dim=1)
        >>> queue = F.normalize(torch.randn(50, 8, generator=g), dim=1)
        >>> loss = dense_info_nce(q, k, queue, temperature=0.2, chunk_size=3)
        >>> logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.2
        >>> ref = F.cross_entropy(logits, torch.zeros(10, dtype=torch.long), reduction="none")
        >>> loss.shape, torch.allclose(loss, ref, atol=1e-5)
        (torch.Size([10]), True)
        >>> loss.mean().backward(); q.grad.shape
        torch.Size([10, 8])
    """
    tau = check_positive(temperature, "temperature")
    _, d = check_shape(query, "query", ("P", "D"), floating=True)
    check_shape(positive, "positive", query.shape, floating=True)
    check_shape(negatives, "negatives", ("K", d), floating=True)
    check_int(chunk_size, "chunk_size", 1, allow_none=True)
    dtype = compute_dtype(query, positive, negatives)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k, n = query.to(dtype), positive.to(dtype), negatives.to(dtype)
        if n.shape[0] == 0:  # a single logit: softmax is 1, loss 0 (kept connected to the graph)
            return (q * k).sum(-1) * 0.0
        if q.shape[0] == 0:
            return (q * k).sum(-1)
        chunk = chunk_size or default_chunk_size(n.shape[0], torch.finfo(dtype).bits // 8)
        return _DenseInfoNCEFunction.apply(q, k, n, 1.0 / tau, chunk, torch.is_grad_enabled())


def dense_queries(x: Tensor, name: str = "query") -> Tensor:
    """Flatten a dense map ``(B, D, h, w)`` to ``(B, h*w, D)`` (row-major cells); ``(B, N, D)`` passes through.

    Examples:
        >>> dense_queries(torch.zeros(2, 16, 3, 4)).shape
        torch.Size([2, 12, 16])
    """
    if isinstance(x, Tensor) and x.dim() == 4:
        return rearrange(x, "b d h w -> b (h w) d")
    if isinstance(x, Tensor) and x.dim() == 3:
        return x
    got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
    raise ValueError(f"{name} must have shape (B, D, h, w) or (B, N, D), but got {got}")


def dense_keys(x: Tensor, name: str = "key") -> Tensor:
    """Check a key map ``(B, D, h_k, w_k)`` or key set ``(B, M, D)``; returned unchanged.

    Examples:
        >>> dense_keys(torch.zeros(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (B, D, h_k, w_k) or (B, M, D), but got {got}")
    return x


class DenseInfoNCE(nn.Module):
    """Pixel-level InfoNCE with a queue of negatives (DenseCL, PixCon-Sim / -SR / -Coord).

    Each valid query cell ``i`` of the online view is pulled to its positive key (from
    ``matches``) and pushed from every queue entry:
    ``L_i = -log softmax([q_i . k_i, q_i . Q] / tau)_0``. The batch loss is the weighted mean
    ``sum(w_i L_i) / max(sum(w_i), eps)`` over all ``B * N`` queries of the batch, with
    ``w = matches.effective_weight`` (``weight * valid``; PixCon-SR's semantic weights live in
    ``weight``). Only queries with non-zero weight are computed, unless ``static_shapes``.

    Convention:
        ``query`` is the online dense projection of the query view, a map ``(B, D, h, w)``
        (flattened row-major to ``N = h * w`` queries) or ``(B, N, D)``. ``key`` is the target
        (momentum) dense projection of the other view, ``(B, D, h_k, w_k)`` or ``(B, M, D)``; it
        normally carries no gradient (if it does, gradients flow to the gathered positives). The
        positive of query ``i`` is ``matches.gather(key)[:, i]`` (a key cell, or a bilinear
        resample at ``matches.key_points``). ``queue`` is ``(K, D)`` of unit vectors (DenseCL and
        PixCon store one pooled dense key per image; per-pixel keys work the same); it is not
        re-normalized. With ``normalize=True`` queries and gathered positives are L2-normalized
        (after resampling).

    Without a queue (``queue=None``) the negatives of a query are the mean-pooled, normalized keys
    of the **other** images in the batch (in-batch, DenseCL-style pooled negatives); with a batch
    of one there are none: the loss is 0 with a zero gradient, and a ``UserWarning`` says so
    (once per module).

    Args:
        temperature: ``tau > 0`` (0.2 in DenseCL and PixCon).
        reduction: ``"mean"`` (weighted mean over valid queries), ``"sum"`` (``sum(w * L)``) or
            ``"none"`` (``(B, N)`` of ``w * L``).
        chunk_size: query rows per chunk (default: ~64 MiB of float32 logits per chunk).
        static_shapes: compute every query, valid or not, so that no shape depends on the data
            (no ``nonzero`` selection of the valid queries): ``torch.compile(..., fullgraph=True)``
            then traces the loss with a queue without a graph break. The value is the same (the
            reduction drops zero-weight queries; up to float rounding of differently tiled matrix
            products), the time grows by the share of invalid queries, and every query's features
            must be finite (a non-finite invalid query would give NaN gradients).

    Examples:
        >>> import torch, torch.nn.functional as F
        >>> from densecontrast.matching import Matches
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.randn(2, 16, 3, 3, generator=g, requires_grad=True)   # (B, D, h, w)
        >>> k = torch.randn(2, 16, 3, 3, generator=g)                       # (B, D, h_k, w_k)
        >>> queue = F.normalize(torch.randn(64, 16, generator=g), dim=1)    # (K, D)
        >>> m = Matches(valid=torch.ones(2, 9, dtype=torch.bool), weight=torch.ones(2, 9),
        ...             key_index=torch.arange(9).repeat(2, 1), key_shape=(3, 3))
        >>> loss = DenseInfoNCE(temperature=0.2)(q, k, m, queue)
        >>> loss.backward(); loss.dim(), bool(loss > 0), q.grad.shape
        (0, True, torch.Size([2, 16, 3, 3]))
        >>> static = DenseInfoNCE(temperature=0.2, static_shapes=True)(q, k, m, queue)  # every query computed
        >>> torch.allclose(static, loss)
        True
    """

    def __init__(
        self,
        temperature: float = 0.2,
        reduction: str = "mean",
        chunk_size: int | None = None,
        static_shapes: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.chunk_size = check_int(chunk_size, "chunk_size", 1, allow_none=True)
        self.static_shapes = check_type(static_shapes, "static_shapes", bool)
        self._warned_no_negatives = False

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, static_shapes={self.static_shapes}"

    def _warn_no_negatives(self) -> None:
        """Once per module: in-batch negatives with a batch of one image, i.e. no negatives at all."""
        if getattr(self, "_warned_no_negatives", False):
            return
        self._warned_no_negatives = True
        warnings.warn(
            "DenseInfoNCE without a queue takes its negatives from the other images of the batch, but the "
            "batch holds one image: there are no negatives, so the loss is 0 and gives no gradient. Pass a "
            "queue (e.g. MomentumQueue.negatives()) or a batch of at least two images. (Warned once per module.)",
            UserWarning,
            stacklevel=2,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        matches: Matches,
        queue: Tensor | None = None,
        *,
        normalize: bool = True,
    ) -> Tensor:
        """Loss of ``query`` against the matched positives in ``key`` and the ``queue``.

        Args:
            query: ``(B, D, h, w)`` or ``(B, N, D)`` online projections.
            key: ``(B, D, h_k, w_k)`` or ``(B, M, D)`` target projections.
            matches: single-positive :class:`~densecontrast.matching.Matches` (``key_index (B, N)``
                or ``key_points``) with ``N`` queries.
            queue: ``(K, D)`` negatives, or ``None`` for in-batch pooled negatives.
            normalize: L2-normalize queries and positives (and, without a queue, the pooled keys).

        Returns:
            float32 scalar (``"mean"``/``"sum"``) or ``(B, N)`` (``"none"``).

        Warns:
            UserWarning: once per module, when ``queue`` is ``None`` and ``B = 1`` (no negatives).
        """
        q = dense_queries(query, "query")
        dense_keys(key, "key")
        b, n, d = q.shape
        check_matches(matches, queries=(b, n), cells_of="query")
        if matches.is_multi:
            raise ValueError("matches must have a single positive per query (key_index (B, N) or key_points); "
                             "use PixContrastLoss for multi-positive matches")
        key_d = key.shape[1] if key.dim() == 4 else key.shape[2]
        if key_d != d or key.shape[0] != b:
            raise ValueError(f"key must have batch {b} and D = {d}, but got {tuple(key.shape)}")
        if queue is not None:
            check_shape(queue, "queue", ("K", d), floating=True)
        elif b == 1:
            self._warn_no_negatives()

        with torch.autocast(device_type=q.device.type, enabled=False):
            weight = matches.effective_weight.to(q.device)
            pos = matches.gather(key)  # (B, N, D)
            dtype = compute_dtype(q, pos)
            q32, pos32 = q.to(dtype), pos.to(dtype)
            if normalize:
                q32, pos32 = F.normalize(q32, dim=-1), F.normalize(pos32, dim=-1)
            if queue is None:
                per_query = self._in_batch(q32, pos32, key, normalize)
            elif self.static_shapes:  # every query; the reduction drops the zero-weight ones
                per_query = dense_info_nce(
                    q32.reshape(-1, d), pos32.reshape(-1, d), queue, self.temperature, self.chunk_size
                ).reshape(b, n)
            else:
                flat_w = weight.reshape(-1)
                idx = torch.nonzero(flat_w != 0).squeeze(1)
                sel = dense_info_nce(
                    q32.reshape(-1, d).index_select(0, idx), pos32.reshape(-1, d).index_select(0, idx),
                    queue, self.temperature, self.chunk_size,
                )
                per_query = torch.zeros(b * n, dtype=sel.dtype, device=sel.device).index_put((idx,), sel)
                per_query = per_query.reshape(b, n)
            return reduce(per_query, weight, self.reduction)

    def _in_batch(self, q: Tensor, pos: Tensor, key: Tensor, normalize: bool) -> Tensor:
        """Per-query loss with the pooled keys of the other images as negatives: ``(B, N)``."""
        keys = dense_queries(key, "key").to(q.dtype).mean(dim=1)  # (B, D)
        if normalize:
            keys = F.normalize(keys, dim=-1)
        b = q.shape[0]
        neg = torch.einsum("bnd,cd->bnc", q, keys) / self.temperature  # (B, N, B)
        own = torch.eye(b, dtype=torch.bool, device=q.device)[:, None, :]
        neg = neg.masked_fill(own, float("-inf"))
        l_pos = (q * pos).sum(-1) / self.temperature
        return torch.logsumexp(torch.cat([l_pos[..., None], neg], dim=-1), dim=-1) - l_pos
