"""Similarity matcher: the most similar key cell of every query cell (DenseCL, PixCon-Sim/SR, VICRegL L2).

Convention:
    Queries are the ``N`` cells of the query features, keys the ``M`` cells of the key features,
    flattened row-major for ``(B, C, h, w)`` maps. Flattened 3-D features state their layout:
    ``layout="BNC"`` for ``(B, N, C)`` rows, ``layout="BCN"`` for ``(B, C, N)`` (a map after
    ``.flatten(2)``); a 3-D tensor without ``layout`` is rejected, since ``(2, 8, 16)`` fits both.
    The match is computed without gradient in float32 (float64 inputs stay float64), with
    autocast disabled, and in query chunks so the full ``(B, N, M)`` similarity matrix is never held.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from densecontrast._checks import (
    check_choice,
    check_floating,
    check_geometry_pair,
    check_grid_shape,
    check_int,
    compute_dtype,
)
from densecontrast.geometry import ViewGeometry
from densecontrast.matching.matches import Matches

__all__ = ["SimilarityMatcher", "similarity_match"]

_METRICS = ("cosine", "l2")
_LAYOUTS = ("BNC", "BCN")


def _flatten(name: str, x: object, layout: str | None) -> tuple[Tensor, tuple[int, int] | None]:
    """``(B, C, h, w)`` -> ``(B, h*w, C)`` rows and ``(h, w)``; 3-D features by ``layout``, with ``None``."""
    if isinstance(x, Tensor) and x.dim() == 4:
        if layout is not None:
            raise ValueError(f"layout is only for 3-D features; {name} is a (B, C, h, w) map, so layout must be "
                             f"None, but got {layout!r}")
        return rearrange(check_floating(x, name), "b c h w -> b (h w) c"), (x.shape[2], x.shape[3])
    if isinstance(x, Tensor) and x.dim() == 3:
        if layout is None:
            raise ValueError(f"{name} is 3-D, so its layout is ambiguous: pass layout='BNC' for (B, N, C) rows or "
                             f"layout='BCN' for (B, C, N) (a flattened map), but got shape {tuple(x.shape)}")
        check_floating(x, name)
        return (x if layout == "BNC" else rearrange(x, "b c n -> b n c")), None
    got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
    raise ValueError(f"{name} must have shape (B, C, h, w), or (B, N, C) / (B, C, N) with layout, but got {got}")


def _resolve_shape(name: str, from_map: tuple[int, int] | None, given: object, n: int) -> tuple[int, int] | None:
    if given is None:
        return from_map
    shape = check_grid_shape(given, name)
    if from_map is not None and shape != from_map:
        raise ValueError(f"{name} must agree with the feature map size {from_map}, but got {shape}")
    if shape[0] * shape[1] != n:
        raise ValueError(f"{name} must satisfy h * w = N = {n}, but got {shape}")
    return shape


def _assemble(tiles: list[tuple[Tensor, Tensor, Tensor]], per_row: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, N)`` results from the ``(b, n)`` tiles of the steps, ``per_row`` query chunks per batch step."""
    rows = [tiles[r:r + per_row] for r in range(0, len(tiles), per_row)]
    return tuple(torch.cat([torch.cat([t[i] for t in row], 1) for row in rows]) for i in range(3))  # type: ignore[return-value]


def similarity_match(
    query_features: Tensor,
    key_features: Tensor,
    chunk_size: int = 1024,
    metric: Literal["cosine", "l2"] = "cosine",
    *,
    query_geometry: ViewGeometry | None = None,
    key_geometry: ViewGeometry | None = None,
    query_shape: tuple[int, int] | None = None,
    key_shape: tuple[int, int] | None = None,
    layout: Literal["BNC", "BCN"] | None = None,
) -> Matches:
    """Feature matching: each query's positive is its most similar key cell of the same image.

    ``metric="cosine"`` (DenseCL, PixCon-Sim/SR): ``j*(i) = argmax_j cos(q_i, k_j)``.
    ``metric="l2"`` (VICRegL feature matching): ``j*(i) = argmin_j ||q_i - k_j||`` on the raw
    (unnormalized) features, computed as ``argmax_j (2 q_i . k_j - ||k_j||^2)``.

    At most ``chunk_size`` query rows (summed over the batch) have their similarities to all
    ``M`` keys in memory at once: whole images are batched together while ``N <= chunk_size``,
    larger images are split into query chunks; normalized copies of the features are also made
    per step only. Peak extra memory is about ``chunk_size * (M + C)`` floats plus the keys of
    one step, instead of ``B * N * M`` (and ``B * (N + M) * C``) for the full matrix. Rows are
    reduced with ``torch.max``, which returns the **first** maximal index on ties, as the
    full-matrix ``argmax`` does, so the indices equal the naive full-matrix version's (up to
    reassociation in the matmul, which only matters for near-exact ties). Zero feature vectors
    have cosine 0 with everything.

    Non-finite features (NaN or inf in any channel) never give a match: a key cell with one is
    no candidate for any query, and a query with one, or whose image has no finite key, is
    ``valid = False`` with ``similarity`` NaN (its ``key_index`` is some in-range cell). Nothing is
    raised and nothing is synchronized with the host for this.

    Args:
        query_features: floating ``(B, C, h_q, w_q)`` map, or 3-D with ``layout`` (e.g. backbone features).
        key_features: floating ``(B, C, h_k, w_k)`` map, or 3-D with ``layout``; same ``B`` and ``C``.
        chunk_size: query rows held at once (>= 1).
        metric: ``"cosine"`` or ``"l2"``.
        query_geometry: optional query views; with ``key_geometry`` it fills ``in_box``.
        key_geometry: optional key views.
        query_shape: ``(h_q, w_q)``, needed for ``in_box`` when ``query_features`` is ``(B, N, C)``.
        key_shape: ``(h_k, w_k)`` recorded in the result when ``key_features`` is 3-D.
        layout: the layout of 3-D features (both): ``"BNC"`` (rows) or ``"BCN"`` (channels
            first); must be ``None`` for maps.

    Returns:
        :class:`Matches` with ``key_index (B, N)`` long, ``valid`` (all True for finite features), ``weight`` ones
        (float32), ``similarity (B, N)`` float32 (float64 for float64 inputs) = the **cosine
        similarity of the matched pair** for both metrics (for ``"cosine"`` the row maximum;
        for ``"l2"`` the cosine of the L2-nearest key, so that
        :func:`~densecontrast.weighting.semantic_reweighting` can use either), ``in_box`` when
        both geometries are given, and ``key_shape`` when known.

    Raises:
        ValueError: bad shapes (features, geometry lengths), non-floating features, 3-D features
            without ``layout`` (or maps with one), ``chunk_size < 1`` or an unknown ``metric``.

    Examples:
        >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # (B, N, C)
        >>> k = torch.tensor([[[0.0, 2.0], [3.0, 0.1]]])  # (B, M, C)
        >>> m = similarity_match(q, k, chunk_size=2, layout="BNC")
        >>> m.key_index
        tensor([[1, 0, 1]])
        >>> similarity_match(q, k, metric="l2", layout="BNC").key_index  # raw distances: (1, 1) is nearer (0, 2)
        tensor([[1, 0, 0]])
        >>> m = similarity_match(q.transpose(1, 2), k.transpose(1, 2), layout="BCN")  # (B, C, N): the same match
        >>> m.key_index
        tensor([[1, 0, 1]])
        >>> m = similarity_match(torch.tensor([[[float("nan"), 0.0], [1.0, 0.0]]]), k, layout="BNC")
        >>> m.valid, m.similarity  # a non-finite query has no match
        (tensor([[False,  True]]), tensor([[   nan, 0.9994]]))
    """
    check_int(chunk_size, "chunk_size", 1, note="(query rows held at once)")
    check_choice(metric, "metric", _METRICS)
    if layout is not None:
        check_choice(layout, "layout", _LAYOUTS)
    q, q_map = _flatten("query_features", query_features, layout)
    k, k_map = _flatten("key_features", key_features, layout)
    b, n, c = q.shape
    if k.shape[0] != b or k.shape[2] != c:
        raise ValueError(
            f"key_features must have batch size B = {b} and C = {c} channels like query_features, "
            f"but got {tuple(key_features.shape)}"
        )
    m = k.shape[1]
    if n == 0 or m == 0:
        raise ValueError(f"query_features and key_features need at least one cell, but got N = {n}, M = {m}")
    q_shape = _resolve_shape("query_shape", q_map, query_shape, n)
    k_shape = _resolve_shape("key_shape", k_map, key_shape, m)
    in_box = None
    if (query_geometry is None) != (key_geometry is None):
        raise ValueError("query_geometry and key_geometry must be given together, but got only one")
    if query_geometry is not None:
        qg, kg = check_geometry_pair(query_geometry, key_geometry, batch=b)
        if q_shape is None:
            raise ValueError("query_shape is required with geometry when query_features is (B, N, C)")
        in_box = kg.contains(qg.grid(*q_shape)).to(q.device)

    dtype = compute_dtype(q, k)
    device = q.device
    tiles = []  # (key index, similarity, best score) of each step, row-major over (batch, query) steps
    per_step = max(1, chunk_size // n)  # whole images per step while N <= chunk_size
    step_n = min(n, chunk_size)
    # Normalized copies are made per step only, so memory stays ~ chunk_size * (M + C) floats.
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        for b0 in range(0, b, per_step):
            b1 = min(b, b0 + per_step)
            kb = k[b0:b1].detach().to(dtype)
            kn = F.normalize(kb, dim=-1)
            if metric == "cosine":
                kt, bias = kn.transpose(1, 2), None
            else:
                kt, bias = 2 * kb.transpose(1, 2), -(kb * kb).sum(-1)[:, None, :]  # (b, 1, M)
            for n0 in range(0, n, step_n):
                n1 = min(n, n0 + step_n)
                qc = q[b0:b1, n0:n1].detach().to(dtype)
                qn = F.normalize(qc, dim=-1)
                scores = torch.bmm(qn, kt) if bias is None else torch.baddbmm(bias, qc, kt)
                # A non-finite key makes its whole column NaN (or -inf), a non-finite query its whole row:
                # NaN -> -inf, so such a key is never the match and such a query's best score is not finite.
                scores.nan_to_num_(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
                if metric == "cosine":
                    val, idx = torch.max(scores, dim=-1)
                    score = val
                else:
                    score, idx = torch.max(scores, dim=-1)
                    matched = torch.gather(kn, 1, idx[..., None].expand(-1, -1, c))
                    val = (qn * matched).sum(-1)
                tiles.append((idx, val, score))
        index, sim, best = tiles[0] if len(tiles) == 1 else _assemble(tiles, -(-n // step_n))
        # NaN for a non-finite query (it propagates through max), -inf when the image has no finite key
        valid = torch.isfinite(best)
        sim = sim.masked_fill_(~valid, torch.nan)
    return Matches._trusted(  # indices of torch.max over the M keys: in range by construction
        num_keys=m,
        valid=valid,
        weight=torch.ones(b, n, dtype=torch.float32, device=q.device),
        key_index=index,
        in_box=in_box,
        similarity=sim,
        key_shape=k_shape,
    )


class SimilarityMatcher(nn.Module):
    """Module form of :func:`similarity_match` (DenseCL / PixCon-Sim argmax matching).

    Args:
        chunk_size: query rows whose similarities are held at once (>= 1).
        metric: ``"cosine"`` (DenseCL, PixCon) or ``"l2"`` (VICRegL feature matching).

    Examples:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> f = torch.randn(2, 8, 4, 4)
        >>> m = SimilarityMatcher(chunk_size=5)(f, f)  # identical views: every cell matches itself
        >>> bool((m.key_index == torch.arange(16)).all()), m.key_shape
        (True, (4, 4))
    """

    def __init__(self, chunk_size: int = 1024, metric: Literal["cosine", "l2"] = "cosine") -> None:
        super().__init__()
        self.chunk_size = check_int(chunk_size, "chunk_size", 1, note="(query rows held at once)")
        self.metric = check_choice(metric, "metric", _METRICS)

    def forward(
        self,
        query_features: Tensor,
        key_features: Tensor,
        *,
        query_geometry: ViewGeometry | None = None,
        key_geometry: ViewGeometry | None = None,
        query_shape: tuple[int, int] | None = None,
        key_shape: tuple[int, int] | None = None,
        layout: Literal["BNC", "BCN"] | None = None,
    ) -> Matches:
        """See :func:`similarity_match`."""
        return similarity_match(
            query_features, key_features, self.chunk_size, self.metric,
            query_geometry=query_geometry, key_geometry=key_geometry,
            query_shape=query_shape, key_shape=key_shape, layout=layout,
        )

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, metric={self.metric!r}"
