"""Data where users keep it: dict rows (Hugging Face ``datasets`` style), iterable datasets and webdataset tars."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from densecontrast.data import SeededViews, collate_views
from densecontrast.data.multiview import MultiViewDataset, MultiViewIterableDataset
from densecontrast.transforms import byol_views

SIZES = [(40, 56), (48, 48), (36, 64), (50, 40), (44, 60), (40, 40), (64, 48), (48, 56)]  # (H, W)


def _pil(i: int, h: int, w: int) -> Image.Image:
    g = torch.Generator().manual_seed(i)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _rows() -> list[dict]:
    """A stand-in for a Hugging Face ``datasets.Dataset`` with an Image and a ClassLabel column: rows are dicts."""
    return [{"image": _pil(i, h, w), "label": i % 3, "file_name": f"{i:04d}.jpg"} for i, (h, w) in enumerate(SIZES)]


def _check_batch(views: list[torch.Tensor], geoms: list, batch: int, sizes: list[tuple[int, int]]) -> None:
    assert len(views) == len(geoms) == 2
    for v, g in zip(views, geoms):
        assert v.shape == (batch, 3, 32, 32) and torch.isfinite(v).all()
        wh = torch.tensor([[w, h] for h, w in sizes], dtype=g.image_size.dtype)
        torch.testing.assert_close(g.image_size, wh)  # the geometry knows each original image's size
        assert (g.boxes[:, :2] >= 0).all() and (g.boxes[:, 2:] <= wh + 1e-4).all()


def test_dict_rows_like_hugging_face_datasets() -> None:
    rows = _rows()
    ds = MultiViewDataset(rows, byol_views(32), image_key="image")
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_views)
    views, geoms, rest = next(iter(loader))
    _check_batch(views, geoms, 4, SIZES[:4])
    assert set(rest) == {"label", "file_name"}  # the row's other columns, collated per key
    assert rest["label"].tolist() == [0, 1, 2, 0] and rest["file_name"] == ["0000.jpg", "0001.jpg", "0002.jpg",
                                                                            "0003.jpg"]
    dropped = MultiViewDataset(rows, byol_views(32), keep_targets=False)
    views, geoms = collate_views([dropped[i] for i in range(4)])
    _check_batch(views, geoms, 4, SIZES[:4])


def test_dict_rows_with_the_image_only_give_views_and_geometries() -> None:
    ds = MultiViewDataset([{"img": _pil(0, 40, 40)}], byol_views(32), image_key="img")
    assert len(ds[0]) == 2


def test_dict_rows_are_seeded_like_any_map_style_dataset() -> None:
    ds = SeededViews(MultiViewDataset(_rows(), byol_views(32), keep_targets=False), seed=3)
    a, b = ds[5], ds[5]
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert torch.equal(a[1][0].boxes, b[1][0].boxes)


def test_a_missing_image_key_names_the_keys() -> None:
    ds = MultiViewDataset(_rows(), byol_views(32), image_key="jpg")
    with pytest.raises(ValueError, match=r"dataset\[0\] is a dict without the image key 'jpg'.*'file_name', 'image'"):
        ds[0]
    with pytest.raises(ValueError, match="image_key must be a non-empty string"):
        MultiViewDataset(_rows(), byol_views(32), image_key="")


class _Stream(IterableDataset):
    """An iterable dataset of dict samples that splits itself over DataLoader workers."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, self.n, step):
            h, w = SIZES[i % len(SIZES)]
            yield {"image": torch.rand(3, h, w), "index": i}


def test_map_style_wrapper_points_iterables_to_the_iterable_wrapper() -> None:
    with pytest.raises(ValueError, match="use MultiViewIterableDataset"):
        MultiViewDataset(_Stream(4), byol_views(32))


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_dataset_with_collate_views(workers: int) -> None:
    ds = MultiViewIterableDataset(_Stream(12), byol_views(32))
    loader = DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_views)
    seen = []
    for views, geoms, rest in loader:
        _check_batch(views, geoms, 3, [SIZES[i % len(SIZES)] for i in rest["index"].tolist()])
        seen += rest["index"].tolist()
    assert sorted(seen) == list(range(12))  # every sample once, also split over 2 workers


def test_iterable_of_tuples_and_of_images() -> None:
    tuples = [(torch.rand(3, 40, 48), torch.tensor(i)) for i in range(4)]
    views, _, labels = collate_views(list(MultiViewIterableDataset(tuples, byol_views(32))))
    assert labels.tolist() == [0, 1, 2, 3] and views[0].shape == (4, 3, 32, 32)
    images = (torch.rand(3, 40, 48) for _ in range(2))  # a generator works too (read once)
    assert len(list(MultiViewIterableDataset(images, byol_views(32)))) == 2
    with pytest.raises(ValueError, match="dataset must be iterable"):
        MultiViewIterableDataset(3, byol_views(32))  # type: ignore[arg-type]


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    """Two webdataset tar shards of 4 JPEG samples each (keys ``jpg`` and ``cls``), written with TarWriter."""
    wds = pytest.importorskip("webdataset", reason="webdataset is an optional test dependency (the dev extra)")
    paths = []
    for s in range(2):
        path = tmp_path / f"shard-{s:02d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(4 * s, 4 * s + 4):
                h, w = SIZES[i]
                sink.write({"__key__": f"sample{i:04d}", "jpg": _pil(i, h, w), "cls": i})
        paths.append(str(path))
    return paths


def test_webdataset_dict_samples(shards: list[str]) -> None:
    import webdataset as wds

    pipeline = wds.WebDataset(shards, shardshuffle=False).decode("pil")
    ds = MultiViewIterableDataset(pipeline, byol_views(32), image_key="jpg")
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_views))
    assert len(batches) == 2
    for b, (views, geoms, rest) in enumerate(batches):
        _check_batch(views, geoms, 4, SIZES[4 * b : 4 * b + 4])
        assert rest["cls"].tolist() == list(range(4 * b, 4 * b + 4))
        assert rest["__key__"] == [f"sample{i:04d}" for i in range(4 * b, 4 * b + 4)]


def test_webdataset_tuples_over_two_workers(shards: list[str]) -> None:
    import webdataset as wds

    pipeline = wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("jpg", "cls")
    ds = MultiViewIterableDataset(pipeline, byol_views(32))
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_views)
    labels = []
    for views, geoms, cls in loader:
        _check_batch(views, geoms, 2, [SIZES[i] for i in cls.tolist()])
        labels += cls.tolist()
    assert sorted(labels) == list(range(8))  # webdataset gives each worker its own shard
