"""Batch multi-view samples (views + [`ViewGeometry`][densecontrast.geometry.ViewGeometry]) for a ``DataLoader``.

Convention:
    A sample is ``(views, geometries)`` or ``(views, geometries, *extras)`` as returned by
    [`MultiViewTransform`][densecontrast.transforms.MultiViewTransform] (optionally with labels, masks or the
    ``info`` dict of [`sample_with_info`][densecontrast.transforms.MultiViewTransform.sample_with_info]
    appended by a dataset). ``views`` holds ``V`` tensors
    ``(C, H_v, W_v)`` and ``geometries`` ``V`` one-view geometries. The batch keeps the sample
    order: row ``b`` of every batched view and geometry comes from sample ``b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from densecontrast._checks import check_type
from densecontrast.geometry import ViewGeometry

__all__ = ["collate_views"]


def collate_views(batch: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    """Collate multi-view samples into per-view batches; usable as a ``DataLoader`` ``collate_fn``.

    Args:
        batch: ``B >= 1`` samples, each ``(views, geometries)`` or ``(views, geometries, *extras)``:
            ``views`` a sequence of ``V`` tensors (view ``v`` has the same shape and dtype in every
            sample), ``geometries`` a sequence of ``V`` [`ViewGeometry`][densecontrast.geometry.ViewGeometry]
            (usually one view each). Every sample has the same number of extras.

    Returns:
        ``(views, geometries)`` or ``(views, geometries, *extras)``: ``views`` a list of ``V`` tensors
        ``(B, C, H_v, W_v)``, ``geometries`` a list of ``V`` batched geometries
        ([`ViewGeometry.cat`][densecontrast.geometry.ViewGeometry.cat] over the samples),
        and each extra collated with ``torch.utils.data.default_collate`` (tensors are stacked,
        numbers become tensors, dicts are collated per key).

    Raises:
        ValueError: an empty batch, a sample that is not ``(views, geometries, ...)``, a different
            number of views, extras or shapes across samples, or geometries that are not
            ``ViewGeometry``.

    Examples:
        >>> import torch
        >>> from densecontrast.transforms import byol_views
        >>> _ = torch.manual_seed(0)
        >>> t = byol_views(16)
        >>> batch = [(*t(torch.rand(3, 32, 32)), torch.tensor(label)) for label in range(4)]
        >>> views, geoms, labels = collate_views(batch)
        >>> [tuple(v.shape) for v in views], [len(g) for g in geoms], labels
        ([(4, 3, 16, 16), (4, 3, 16, 16)], [4, 4], tensor([0, 1, 2, 3]))
    """
    if isinstance(batch, (Tensor, str)) or not isinstance(batch, Sequence) or len(batch) == 0:
        raise ValueError(f"batch must be a non-empty list of (views, geometries[, extras]) samples, but got {batch!r}")
    n_items = None
    n_views = None
    for b, sample in enumerate(batch):
        if not isinstance(sample, Sequence) or isinstance(sample, (Tensor, str)) or len(sample) < 2:
            raise ValueError(
                f"batch[{b}] must be a tuple (views, geometries[, extras]), but got {type(sample).__name__}"
            )
        views, geoms = sample[0], sample[1]
        if isinstance(views, Tensor) or not isinstance(views, Sequence):
            raise ValueError(
                f"batch[{b}][0] (views) must be a list of (C, H, W) tensors, but got {type(views).__name__}"
            )
        if isinstance(geoms, ViewGeometry) or not isinstance(geoms, Sequence):
            raise ValueError(
                f"batch[{b}][1] (geometries) must be a list of ViewGeometry, but got {type(geoms).__name__}"
            )
        if n_items is None:
            n_items, n_views = len(sample), len(views)
            if n_views == 0:
                raise ValueError("batch[0][0] (views) must hold at least one view, but it is empty")
        if len(sample) != n_items:
            raise ValueError(f"batch[{b}] must have {n_items} items like batch[0], but it has {len(sample)}")
        if len(views) != n_views or len(geoms) != n_views:
            raise ValueError(
                f"batch[{b}] must have {n_views} views and {n_views} geometries like batch[0], "
                f"but got {len(views)} views and {len(geoms)} geometries"
            )
        for v, (x, g) in enumerate(zip(views, geoms)):
            check_type(x, f"batch[{b}][0][{v}]", Tensor, what="a (C, H, W) tensor")
            ref = batch[0][0][v]
            if x.shape != ref.shape or x.dtype != ref.dtype:
                raise ValueError(
                    f"view {v} must have the same shape and dtype in every sample: batch[0] has "
                    f"{tuple(ref.shape)} {ref.dtype}, batch[{b}] has {tuple(x.shape)} {x.dtype}"
                )
            check_type(g, f"batch[{b}][1][{v}]", ViewGeometry)
    assert n_views is not None and n_items is not None
    out_views = [torch.stack([sample[0][v] for sample in batch]) for v in range(n_views)]
    out_geoms = [ViewGeometry.cat([sample[1][v] for sample in batch]) for v in range(n_views)]
    extras = [default_collate([sample[i] for sample in batch]) for i in range(2, n_items)]
    return (out_views, out_geoms, *extras)
