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

    Every entry of ``key_index`` addresses a key cell (``0 <= key_index < M``), also for invalid
    queries and for the slots ``key_mask`` switches off; :class:`Matches` checks this when it is
    built (see its docstring). ``key_points`` of invalid queries may hold anything, NaN included.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from densecontrast._checks import check_floating, check_grid_shape, check_index

__all__ = ["Matches"]

_VALUE_FIELDS = ("key_index", "key_shape")  # what the construction's range check reads


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

    Construction checks shapes and dtypes, and the indices that would otherwise give a silently
    wrong loss (``gather`` used to clamp them): every ``key_index`` entry must lie in
    ``[0, h_k * w_k)`` (only ``>= 0`` while ``key_shape`` is ``None``; :meth:`gather` and
    :meth:`to_dense` then check the upper bound against the keys they get). On the CPU a violation
    raises ``ValueError`` right away. On CUDA the check is an asynchronous device assert
    (``torch._assert_async``, no host synchronization): a violation stops the program with a
    ``RuntimeError`` (device-side assert) at the next synchronization instead. The library's
    matchers build their results with indices that are in range by construction and skip this
    check; :meth:`replace` re-checks only when it changes ``key_index`` or ``key_shape``.

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
        self._validate(check_values=True)

    @classmethod
    def _trusted(cls, *, num_keys: int | None = None, **fields: Any) -> Matches:
        """Build without the index range check: for matchers whose indices are in range by construction.

        Shapes and dtypes are still checked (no device work). ``num_keys`` is the ``M`` the
        ``key_index`` entries are known to be below (``None``: derived from ``key_shape``, or unknown).
        Private: user-built :class:`Matches` are always checked.
        """
        obj = cls.__new__(cls)
        for name, default in _FIELDS:
            if name in fields:
                value = fields.pop(name)
            elif default is not dataclasses.MISSING:
                value = default
            else:
                raise TypeError(f"Matches._trusted() missing required field {name!r}")
            object.__setattr__(obj, name, value)
        if fields:
            raise TypeError(f"Matches._trusted() got unexpected fields {sorted(fields)}")
        obj._validate(check_values=False, num_keys=num_keys)
        return obj

    def _validate(self, *, check_values: bool, num_keys: int | None = None) -> None:
        """Shape and dtype checks; with ``check_values`` also the range of ``key_index``."""
        v = self.valid
        if not isinstance(v, Tensor) or v.dim() != 2 or v.dtype != torch.bool:
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"valid must be a (B, N) bool tensor, but got {got}")
        b, n = v.shape
        if not isinstance(self.weight, Tensor) or self.weight.shape != (b, n):
            got = tuple(self.weight.shape) if isinstance(self.weight, Tensor) else type(self.weight).__name__
            raise ValueError(f"weight must have shape (B, N) = ({b}, {n}), but got {got}")
        if self.key_index is None and self.key_points is None:
            raise ValueError("Matches needs key_index or key_points, but got neither")
        if self.key_shape is not None:
            object.__setattr__(self, "key_shape", check_grid_shape(self.key_shape, "key_shape"))
        if self.key_index is not None:
            ki = self.key_index
            if not isinstance(ki, Tensor) or ki.dtype != torch.long or ki.dim() not in (2, 3) or ki.shape[:2] != (b, n):
                got = f"{tuple(ki.shape)} {ki.dtype}" if isinstance(ki, Tensor) else type(ki).__name__
                raise ValueError(
                    f"key_index must be long of shape (B, N) or (B, N, k) with (B, N) = ({b}, {n}), but got {got}"
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
        grid = None if self.key_shape is None else self.key_shape[0] * self.key_shape[1]
        if check_values:
            if self.key_index is not None:
                note = "" if grid is None else f"(the cells of key_shape {self.key_shape})"
                check_index(self.key_index, "key_index", grid, note=note)
            num_keys = grid
        elif num_keys is None:
            num_keys = grid
        # the M that key_index is known to lie below (None: only >= 0 is known); gather skips its check then
        object.__setattr__(self, "_num_keys_checked", num_keys if self.key_index is not None else None)

    def _checked_num_keys(self) -> int | None:
        """The ``M`` every ``key_index`` entry is known to lie below, or ``None`` (only ``>= 0`` is known)."""
        return getattr(self, "_num_keys_checked", None)

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
        """A copy with some fields replaced (the dataclass is immutable).

        The constructor's index range check runs again only when ``key_index`` or ``key_shape`` change.
        """
        names = [name for name, _ in _FIELDS]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"Matches.replace() got unexpected fields {unknown}")
        fields = {name: changes.get(name, getattr(self, name)) for name in names}
        if any(name in changes for name in _VALUE_FIELDS):
            return Matches(**fields)  # type: ignore[arg-type]
        return Matches._trusted(num_keys=self._checked_num_keys(), **fields)

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
            get some in-range key (also when their ``key_points`` are NaN); mask them with
            :attr:`valid`. A valid query with a non-finite key point gets NaN features
            (:func:`sample_points`).

        Raises:
            ValueError: ``keys`` of another shape, batch size or key grid than :attr:`key_shape`,
                or (``key_shape`` unknown, CPU) a ``key_index`` entry ``>= M`` (on CUDA an
                asynchronous device assert, as at construction). Indices are never clamped.
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
        if keys.dim() == 4 and self.key_shape is not None and tuple(keys.shape[2:]) != self.key_shape:
            raise ValueError(
                f"keys must be a feature map of the key grid key_shape {self.key_shape}, but got {tuple(keys.shape)}"
            )
        if self.key_index is not None:
            idx = self.key_index
            checked = self._checked_num_keys()
            if checked is None or checked > flat.shape[1]:
                check_index(idx, "matches.key_index", flat.shape[1], note="(the M entries of keys)")
            if idx.dim() == 2:
                return torch.gather(flat, 1, idx[..., None].expand(-1, -1, flat.shape[-1]))
            bb, n, k = idx.shape
            out = torch.gather(flat, 1, idx.reshape(bb, n * k, 1).expand(-1, -1, flat.shape[-1]))
            return out.reshape(bb, n, k, -1)
        if fmap is None:
            raise ValueError("gather with key_points needs a (B, D, h, w) feature map or key_shape set")
        pts: Tensor = self.key_points  # type: ignore[assignment]
        # invalid queries may hold any point, NaN included: sample them at cell (0, 0), never NaN
        pts = torch.where(self.valid[..., None], pts, torch.zeros_like(pts))
        return sample_points(fmap, pts)

    def to_dense(self, num_keys: int) -> Tensor:
        """``(B, N, M)`` bool positive matrix (for small grids and tests).

        Key points are rounded to the nearest cell (needs :attr:`key_shape`). Invalid queries have
        an all-False row.
        """
        b, n = self.valid.shape
        if self.key_shape is not None and self.key_shape[0] * self.key_shape[1] != num_keys:
            h, w = self.key_shape
            raise ValueError(f"num_keys must equal h_k * w_k = {h * w} (key_shape), but got {num_keys}")
        dense = torch.zeros(b, n, num_keys, dtype=torch.bool, device=self.valid.device)
        if self.key_index is not None:
            check_index(self.key_index, "key_index", num_keys, note="(num_keys)")
            idx = self.key_index if self.key_index.dim() == 3 else self.key_index[..., None]
            mask = self.key_mask if self.key_mask is not None else torch.ones_like(idx, dtype=torch.bool)
            mask = mask & self.valid[..., None]
            # amax, so that a masked-out slot never clears a positive set by another slot
            hits = torch.zeros(b, n, num_keys, dtype=torch.uint8, device=self.valid.device)
            hits.scatter_reduce_(2, idx, mask.to(torch.uint8), reduce="amax")
            return hits.bool()
        if self.key_shape is None:
            raise ValueError("to_dense with key_points needs key_shape")
        h, w = self.key_shape
        uv = torch.round(self.key_points).long()  # type: ignore[arg-type]
        u, v = uv[..., 0].clamp(0, w - 1), uv[..., 1].clamp(0, h - 1)
        dense.scatter_(2, (v * w + u)[..., None], self.valid[..., None])
        return dense


#: ``(name, default)`` of the fields of :class:`Matches`, read once: ``dataclasses.fields`` of the class
#: cannot be traced by ``torch.compile``, so matchers build their results through this.
_FIELDS = tuple((f.name, f.default) for f in dataclasses.fields(Matches))


def sample_points(feature_map: Tensor, points: Tensor) -> Tensor:
    """Bilinearly sample a feature map at continuous feature-cell coordinates.

    Convention:
        ``(u, v)`` = (column, row) in feature-cell space: cell ``(i, j)`` has its center at
        ``(u, v) = (j, i)``; the map spans ``[-0.5, w - 0.5] x [-0.5, h - 0.5]``. Points outside
        the outermost cell centers take the edge cells' values (border padding).

    Args:
        feature_map: ``(B, D, h, w)`` floating-point map.
        points: ``(B, N, 2)`` floating-point ``(u, v)`` in feature-cell space (cell centers at integers).

    Returns:
        ``(B, N, D)``, via ``grid_sample(align_corners=False, padding_mode="border")``, in the
        dtype of ``feature_map``. A point with a NaN or infinite coordinate has no location: its
        row is all NaN (``grid_sample`` alone would return an edge cell's features), and it passes
        no gradient to ``feature_map``. Nothing is synchronized with the host.

    Raises:
        ValueError: bad shapes, or a non-floating ``feature_map`` or ``points``.

    Examples:
        >>> fmap = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> sample_points(fmap, torch.tensor([[[0.5, 0.0], [0.0, 1.0], [float("nan"), 0.0]]]))
        tensor([[[0.5000],
                 [2.0000],
                 [   nan]]])
    """
    if not isinstance(feature_map, Tensor) or feature_map.dim() != 4:
        got = tuple(feature_map.shape) if isinstance(feature_map, Tensor) else type(feature_map).__name__
        raise ValueError(f"feature_map must have shape (B, D, h, w), but got {got}")
    b, _, h, w = feature_map.shape
    if not isinstance(points, Tensor) or points.dim() != 3 or points.shape[0] != b or points.shape[-1] != 2:
        got = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"points must have shape (B, N, 2) with B = {b}, but got {got}")
    check_floating(feature_map, "feature_map")
    check_floating(points, "points")
    located = torch.isfinite(points).all(-1, keepdim=True)  # (B, N, 1)
    # grid_sample must never see a NaN coordinate (its CPU backward then reads out of bounds): sample
    # those points at the center and blank their rows afterwards
    points = torch.where(located, points, torch.zeros_like(points))
    size = points.new_tensor([w, h])
    g = (2 * points + 1) / size - 1
    grid = rearrange(g, "b n p -> b n 1 p").to(feature_map.dtype)  # an N x 1 "image" of sample points
    out = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = rearrange(out, "b d n 1 -> b n d")
    return torch.where(located, out, torch.full_like(out, math.nan))
