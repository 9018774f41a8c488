"""Pair any image dataset with a multi-view transform; items fit :func:`~densecontrast.data.collate.collate_views`.

Convention:
    The wrapped dataset returns an image (PIL or ``(C, H, W)`` tensor) or a tuple
    ``(image, *targets)``. Items become ``(views, geometries, *targets)`` (a transform that
    returns more, e.g. :meth:`MultiViewTransform.sample_with_info
    <densecontrast.transforms.MultiViewTransform.sample_with_info>` with its ``info`` dict, has
    those items right after ``geometries``). Targets (labels, masks) are passed through
    untouched, in the **original image frame**; map them into a view with the view's
    :class:`~densecontrast.geometry.ViewGeometry` if needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

__all__ = ["MultiViewDataset"]


class MultiViewDataset(Dataset):
    """Wrap an image dataset so each item is several augmented views with their geometry.

    Args:
        dataset: any map-style dataset returning an image or ``(image, *targets)``.
        transform: a :class:`~densecontrast.transforms.MultiViewTransform` (or any callable
            ``image -> (views, geometries, *extras)``, such as its ``sample_with_info`` method).
        keep_targets: pass the wrapped dataset's targets through (default). ``False`` drops
            them, e.g. to ignore :class:`~densecontrast.data.synthetic.SyntheticScenes` masks
            during pre-training.

    Returns (per item):
        ``(views, geometries)`` or ``(views, geometries, *targets)``: ``views`` a list of ``V``
        ``(C, h, w)`` tensors, ``geometries`` a list of ``V`` one-view
        :class:`~densecontrast.geometry.ViewGeometry`.

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from densecontrast.data.synthetic import SyntheticScenes
        >>> from densecontrast.data.collate import collate_views
        >>> from densecontrast.transforms import mocov2_views
        >>> _ = torch.manual_seed(0)
        >>> ds = MultiViewDataset(SyntheticScenes(num_images=4, image_size=48), mocov2_views(32))
        >>> views, geoms, masks = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_views)))
        >>> [tuple(v.shape) for v in views], len(geoms[0]), tuple(masks.shape)
        ([(4, 3, 32, 32), (4, 3, 32, 32)], 4, (4, 48, 48))
    """

    def __init__(self, dataset: Any, transform: Callable[[Any], Any], *, keep_targets: bool = True) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"dataset must be a map-style dataset with __getitem__ and __len__, but got {type(dataset).__name__}"
            )
        if not callable(transform):
            raise ValueError(
                f"transform must be a callable image -> (views, geometries) such as MultiViewTransform, "
                f"but got {type(transform).__name__}"
            )
        self.dataset = dataset
        self.transform = transform
        self.keep_targets = keep_targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        targets: Sequence[Any] = ()
        if isinstance(item, (tuple, list)):
            if len(item) == 0:
                raise ValueError(f"dataset[{index}] is an empty tuple; expected an image or (image, *targets)")
            image, targets = item[0], tuple(item[1:])
        else:
            image = item
        out = self.transform(image)
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise ValueError(
                f"transform must return (views, geometries, *extras), but returned {type(out).__name__}"
            )
        return (*out, *targets) if self.keep_targets else tuple(out)

    def __repr__(self) -> str:
        return f"MultiViewDataset(dataset={self.dataset!r}, transform={type(self.transform).__name__})"
