"""Pair any image dataset with a multi-view transform; items fit :func:`~densecontrast.data.collate.collate_views`.

Convention:
    The wrapped dataset returns an image (PIL or ``(C, H, W)`` tensor), a tuple
    ``(image, *targets)``, or a dict holding the image under ``image_key`` (a Hugging Face
    ``datasets`` row such as ``{"image": <PIL>, "label": 3}``, a webdataset sample such as
    ``{"__key__": "000001", "jpg": <PIL>, "cls": 3}``). Items become ``(views, geometries,
    *targets)``: a tuple's targets, or one dict with the row's other keys (a transform that
    returns more, e.g. :meth:`MultiViewTransform.sample_with_info
    <densecontrast.transforms.MultiViewTransform.sample_with_info>` with its ``info`` dict, has
    those items right after ``geometries``). Targets (labels, masks) are passed through
    untouched, in the **original image frame**; map them into a view with the view's
    :class:`~densecontrast.geometry.ViewGeometry` if needed.

:class:`MultiViewDataset` wraps a map-style dataset (``__getitem__`` and ``__len__``: folders,
synthetic scenes, a ``datasets.Dataset``); :class:`MultiViewIterableDataset` wraps an iterable
one (a ``torch.utils.data.IterableDataset``, a webdataset pipeline, a streaming
``datasets.IterableDataset``, a generator). Both batch with ``collate_views``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from torch.utils.data import Dataset, IterableDataset

__all__ = ["MultiViewDataset", "MultiViewIterableDataset"]


def _check_transform(transform: object) -> None:
    if not callable(transform):
        raise ValueError(
            f"transform must be a callable image -> (views, geometries) such as MultiViewTransform, "
            f"but got {type(transform).__name__}"
        )


def _check_image_key(image_key: object) -> None:
    if not isinstance(image_key, str) or not image_key:
        raise ValueError(f"image_key must be a non-empty string, but got {image_key!r}")


def _views_of(
    item: Any, transform: Callable[[Any], Any], image_key: str, keep_targets: bool, where: str
) -> tuple[Any, ...]:
    """``(views, geometries, *extras, *targets)`` of one item: an image, ``(image, *targets)`` or a dict row."""
    targets: tuple[Any, ...] = ()
    if isinstance(item, Mapping):
        if image_key not in item:
            raise ValueError(
                f"{where} is a dict without the image key {image_key!r} (its keys: {sorted(map(str, item))}); "
                f"pass image_key= the key that holds the image"
            )
        image = item[image_key]
        rest = {k: v for k, v in item.items() if k != image_key}
        targets = (rest,) if rest else ()
    elif isinstance(item, (tuple, list)):
        if len(item) == 0:
            raise ValueError(f"{where} is an empty tuple; expected an image, (image, *targets) or a dict")
        image, targets = item[0], tuple(item[1:])
    else:
        image = item
    out = transform(image)
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise ValueError(
            f"transform must return (views, geometries, *extras), but returned {type(out).__name__}"
        )
    return (*out, *targets) if keep_targets else tuple(out)


class MultiViewDataset(Dataset):
    """Wrap an image dataset so each item is several augmented views with their geometry.

    Args:
        dataset: any map-style dataset (``__getitem__`` and ``__len__``) returning an image,
            ``(image, *targets)`` or a dict with the image under ``image_key``. For an
            iterable-style dataset use :class:`MultiViewIterableDataset`.
        transform: a :class:`~densecontrast.transforms.MultiViewTransform` (or any callable
            ``image -> (views, geometries, *extras)``, such as its ``sample_with_info`` method).
        image_key: the key of the image in dict items (``"image"``: Hugging Face ``datasets``
            image columns; ``"jpg"``, ``"png"``, ... for webdataset samples). Unused for other items.
        keep_targets: pass the wrapped dataset's targets through (default): a tuple's
            ``targets``, or for a dict item one dict with its other keys, if any (``collate_views``
            collates it per key: numbers and tensors are stacked, strings listed). ``False``
            drops them, e.g. to ignore :class:`~densecontrast.data.synthetic.SyntheticScenes`
            masks, or dict columns that do not collate (``None`` values, undecoded bytes).

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

        Dict rows, as a Hugging Face ``datasets.Dataset`` returns them:

        >>> rows = [{"image": torch.rand(3, 40, 60), "label": i, "id": f"img{i}"} for i in range(4)]
        >>> ds = MultiViewDataset(rows, mocov2_views(32), image_key="image")
        >>> views, geoms, rest = collate_views([ds[i] for i in range(4)])
        >>> tuple(views[0].shape), rest["label"], rest["id"]
        ((4, 3, 32, 32), tensor([0, 1, 2, 3]), ['img0', 'img1', 'img2', 'img3'])
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any], Any],
        *,
        image_key: str = "image",
        keep_targets: bool = True,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            hint = (
                "; for an iterable dataset (IterableDataset, webdataset pipeline, streaming datasets) use "
                "MultiViewIterableDataset" if hasattr(dataset, "__iter__") else ""
            )
            raise ValueError(
                f"dataset must be a map-style dataset with __getitem__ and __len__, but got "
                f"{type(dataset).__name__}{hint}"
            )
        _check_transform(transform)
        _check_image_key(image_key)
        self.dataset = dataset
        self.transform = transform
        self.image_key = image_key
        self.keep_targets = keep_targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return _views_of(self.dataset[index], self.transform, self.image_key, self.keep_targets, f"dataset[{index}]")

    def __repr__(self) -> str:
        return f"MultiViewDataset(dataset={self.dataset!r}, transform={type(self.transform).__name__})"


class MultiViewIterableDataset(IterableDataset):
    """:class:`MultiViewDataset` for a stream: each item of ``dataset`` becomes ``(views, geometries, *targets)``.

    Items are handled exactly as by :class:`MultiViewDataset` (an image, ``(image, *targets)`` or
    a dict with the image under ``image_key``). Order, shuffling and the split over DataLoader
    workers and ranks are the source's: webdataset splits its shards over workers and nodes (see
    its ``shardshuffle`` / ``nodesplitter``), a streaming ``datasets.IterableDataset`` splits
    its shards over workers; a plain iterable is read in full by every worker. The views are
    drawn from torch's global RNG in the process that iterates, so they are not reproducible
    the way :class:`~densecontrast.data.sampling.SeededViews` makes a map-style dataset's.

    Args:
        dataset: an iterable of items (re-iterated at every epoch).
        transform: the multi-view transform.
        image_key: the key of the image in dict items.
        keep_targets: pass targets through (see :class:`MultiViewDataset`).

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from densecontrast.data.collate import collate_views
        >>> from densecontrast.transforms import byol_views
        >>> stream = [{"jpg": torch.rand(3, 48, 64), "cls": i} for i in range(6)]
        >>> ds = MultiViewIterableDataset(stream, byol_views(32), image_key="jpg")
        >>> views, geoms, rest = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_views)))
        >>> tuple(views[1].shape), len(geoms[1]), rest["cls"]
        ((3, 3, 32, 32), 3, tensor([0, 1, 2]))
    """

    def __init__(
        self,
        dataset: Iterable[Any],
        transform: Callable[[Any], Any],
        *,
        image_key: str = "image",
        keep_targets: bool = True,
    ) -> None:
        if not hasattr(dataset, "__iter__"):
            raise ValueError(f"dataset must be iterable, but got {type(dataset).__name__}")
        _check_transform(transform)
        _check_image_key(image_key)
        self.dataset = dataset
        self.transform = transform
        self.image_key = image_key
        self.keep_targets = keep_targets

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for i, item in enumerate(self.dataset):
            yield _views_of(item, self.transform, self.image_key, self.keep_targets, f"item {i} of the dataset")

    def __repr__(self) -> str:
        return f"MultiViewIterableDataset(dataset={self.dataset!r}, transform={type(self.transform).__name__})"
