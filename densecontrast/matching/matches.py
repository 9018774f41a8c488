"""``Matches``: the one result type every matcher returns and every loss reads.

Convention:
    Queries are the ``N = h_q * w_q`` cells (or sampled points) of view 1, keys the
    ``M = h_k * w_k`` cells of view 2, both flattened row-major. A positive is given in one of
    three forms:

    * ``key_index (B, N)`` long: one key cell per query;
    * ``key_index (B, N, k)`` long + ``key_mask (B, N, k)`` bool: a set of up to ``k`` key cells;
    * ``key_points (B, N, 2)`` float: continuous ``(u, v)`` in the key view's feature-cell
      space (cell centers at integers, see :mod:`densecontrast.geometry`).

    ``valid (B, N)`` says whether a query has a positive at all; ``weight (B, N)`` (1 by
    default) is what reweighting multiplies. Losses reduce with
    ``sum(weight * valid * loss) / max(sum(weight * valid), eps)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["Matches"]


@dataclass(frozen=True, eq=False)
class Matches:
    """Positives of every query of view 1 in view 2.

    Attributes:
        valid: ``(B, N)`` bool, the query has a positive.
        weight: ``(B, N)`` float, per-query weight (1 unless reweighted; no gradient).
        key_index: ``(B, N)`` or ``(B, N, k)`` long key-cell indices into ``M`` (row-major), or None.
        key_mask: ``(B, N, k)`` bool, which of the ``k`` indices are positives (multi-positive form).
        key_points: ``(B, N, 2)`` float ``(u, v)`` in the key view's feature-cell space, or None.
        query_points: ``(B, N, 2)`` float ``(u, v)`` in the query view's feature-cell space when
            queries are sampled points rather than the cells of the grid (location matching).
        in_box: ``(B, N)`` bool, the query's image point lies in the key view (when geometry is known).
        similarity: ``(B, N)`` float, the matched similarity (similarity matchers), or None.
        key_shape: ``(h_k, w_k)`` of the key grid, when known.

    Examples:
        >>> m = Matches(valid=torch.tensor([[True, False]]), weight=torch.ones(1, 2),
        ...             key_index=torch.tensor([[1, 0]]), key_shape=(1, 2))
        >>> m.to_dense(2)
        tensor([[[False,  True],
                 [False, False]]])
        >>> m.gather(torch.tensor([[[1.0], [2.0]]]))  # (B, M, D) keys -> (B, N, D)
        tensor([[[2.],
                 [1.]]])
    """

    valid: Tensor
    weight: Tensor
    key_index: Tensor | None = None
    key_mask: Tensor | None = None
    key_points: Tensor | None = None
    query_points: Tensor | None = None
    in_box: Tensor | None = None
    similarity: Tensor | None = None
    key_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        v = self.valid
        if not isinstance(v, Tensor) or v.dim() != 2 or v.dtype != torch.bool:
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"valid must be a (B, N) bool tensor, but got {got}")
        b, n = v.shape
        if self.weight.shape != (b, n):
            raise ValueError(f"weight must have shape (B, N) = ({b}, {n}), but got {tuple(self.weight.shape)}")
        if self.key_index is None and self.key_points is None:
            raise ValueError("Matches needs key_index or key_points, but got neither")
        if self.key_index is not None:
            ki = self.key_index
            if ki.dtype != torch.long or ki.shape[:2] != (b, n) or ki.dim() not in (2, 3):
                raise ValueError(
                    f"key_index must be long of shape (B, N) or (B, N, k) with (B, N) = ({b}, {n}), "
                    f"but got {tuple(ki.shape)} {ki.dtype}"
                )
            if ki.dim() == 3 and (self.key_mask is None or self.key_mask.shape != ki.shape):
                got = None if self.key_mask is None else tuple(self.key_mask.shape)
                raise ValueError(f"key_mask must have the shape of key_index {tuple(ki.shape)}, but got {got}")
        for name in ("key_points", "query_points"):
            p = getattr(self, name)
            if p is not None and p.shape != (b, n, 2):
                raise ValueError(f"{name} must have shape (B, N, 2) = ({b}, {n}, 2), but got {tuple(p.shape)}")
        for name in ("in_box", "similarity"):
            x = getattr(self, name)
            if x is not None and x.shape != (b, n):
                raise ValueError(f"{name} must have shape (B, N) = ({b}, {n}), but got {tuple(x.shape)}")

    @property
    def batch_size(self) -> int:
        """B."""
        return self.valid.shape[0]

    @property
    def num_queries(self) -> int:
        """N."""
        return self.valid.shape[1]

    @property
    def is_multi(self) -> bool:
        """True for the multi-positive ``(B, N, k)`` form."""
        return self.key_index is not None and self.key_index.dim() == 3

    def replace(self, **changes: object) -> Matches:
        """A copy with some fields replaced (the dataclass is immutable)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def with_weight(self, weight: Tensor) -> Matches:
        """A copy whose ``weight`` is ``weight`` (detached)."""
        return self.replace(weight=weight.detach())

    @property
    def effective_weight(self) -> Tensor:
        """``(B, N)`` ``weight * valid`` in float32: the weights a loss reduces with."""
        return self.weight.float() * self.valid.float()

    def gather(self, keys: Tensor) -> Tensor:
        """Gather the positive key features of every query.

        Args:
            keys: ``(B, M, D)`` key features, or a ``(B, D, h_k, w_k)`` feature map.

        Returns:
            ``(B, N, D)`` for ``(B, N)`` indices; ``(B, N, k, D)`` for the multi-positive form
            (entries where ``key_mask`` is False hold arbitrary valid keys); for ``key_points``,
            ``(B, N, D)`` bilinearly sampled (``grid_sample``, ``align_corners=False``, border
            padding), which needs a feature map or a known :attr:`key_shape`. Invalid queries
            get some in-range key; mask them with :attr:`valid`.
        """
        if keys.dim() == 4:
            b = keys.shape[0]
            fmap = keys
            flat = rearrange(keys, "b d h w -> b (h w) d")
        elif keys.dim() == 3:
            flat = keys
            b, m, _ = keys.shape
            fmap = None
            if self.key_shape is not None:
                h, w = self.key_shape
                if h * w != m:
                    raise ValueError(f"keys has M = {m} entries, but key_shape is {self.key_shape}")
                fmap = rearrange(keys, "b (h w) d -> b d h w", h=h, w=w)
        else:
            raise ValueError(f"keys must have shape (B, M, D) or (B, D, h, w), but got {tuple(keys.shape)}")
        if b != self.batch_size:
            raise ValueError(f"keys must have batch size B = {self.batch_size}, but got {b}")
        if self.key_index is not None:
            idx = self.key_index.clamp(0, flat.shape[1] - 1)
            if idx.dim() == 2:
                return torch.gather(flat, 1, idx[..., None].expand(-1, -1, flat.shape[-1]))
            bb, n, k = idx.shape
            out = torch.gather(flat, 1, idx.reshape(bb, n * k, 1).expand(-1, -1, flat.shape[-1]))
            return out.reshape(bb, n, k, -1)
        if fmap is None:
            raise ValueError("gather with key_points needs a (B, D, h, w) feature map or key_shape set")
        return sample_points(fmap, self.key_points)  # type: ignore[arg-type]

    def to_dense(self, num_keys: int) -> Tensor:
        """``(B, N, M)`` bool positive matrix (for small grids and tests).

        Key points are rounded to the nearest cell (needs :attr:`key_shape`). Invalid queries have
        an all-False row.
        """
        b, n = self.valid.shape
        dense = torch.zeros(b, n, num_keys, dtype=torch.bool, device=self.valid.device)
        if self.key_index is not None:
            idx = self.key_index if self.key_index.dim() == 3 else self.key_index[..., None]
            mask = self.key_mask if self.key_mask is not None else torch.ones_like(idx, dtype=torch.bool)
            mask = mask & self.valid[..., None]
            # amax, so that a masked-out slot never clears a positive set by another slot
            hits = torch.zeros(b, n, num_keys, dtype=torch.uint8, device=self.valid.device)
            hits.scatter_reduce_(2, idx.clamp(0, num_keys - 1), mask.to(torch.uint8), reduce="amax")
            return hits.bool()
        if self.key_shape is None:
            raise ValueError("to_dense with key_points needs key_shape")
        h, w = self.key_shape
        if h * w != num_keys:
            raise ValueError(f"num_keys must equal h_k * w_k = {h * w}, but got {num_keys}")
        uv = torch.round(self.key_points).long()  # type: ignore[arg-type]
        u, v = uv[..., 0].clamp(0, w - 1), uv[..., 1].clamp(0, h - 1)
        dense.scatter_(2, (v * w + u)[..., None], self.valid[..., None])
        return dense


def sample_points(feature_map: Tensor, points: Tensor) -> Tensor:
    """Bilinearly sample a feature map at continuous feature-cell coordinates.

    Args:
        feature_map: ``(B, D, h, w)``.
        points: ``(B, N, 2)`` ``(u, v)`` in feature-cell space (cell centers at integers).

    Returns:
        ``(B, N, D)``, via ``grid_sample(align_corners=False, padding_mode="border")``.

    Examples:
        >>> fmap = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> sample_points(fmap, torch.tensor([[[0.5, 0.0], [0.0, 1.0]]]))
        tensor([[[0.5000],
                 [2.0000]]])
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must have shape (B, D, h, w), but got {tuple(feature_map.shape)}")
    b, _, h, w = feature_map.shape
    if points.dim() != 3 or points.shape[0] != b or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (B, N, 2) with B = {b}, but got {tuple(points.shape)}")
    size = points.new_tensor([w, h])
    g = (2 * points + 1) / size - 1
    grid = rearrange(g, "b n p -> b n 1 p").to(feature_map.dtype)  # an N x 1 "image" of sample points
    out = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return rearrange(out, "b d n 1 -> b n d")
