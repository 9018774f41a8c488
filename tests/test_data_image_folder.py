from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from densecontrast.data.image_folder import ImageDataset, UnreadableImageWarning


def _folder(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    files = {}
    colours = {"a.png": (255, 0, 0), "sub/b.JPG": (0, 255, 0), "sub/deeper/d.jpeg": (0, 0, 255)}
    for name, colour in colours.items():
        p = tmp_path / name
        Image.new("RGB", (20, 16), colour).save(p, format="PNG" if name.endswith("png") else "JPEG")
        files[name] = p
    # A truncated JPEG: a valid header followed by half of the data.
    full = tmp_path / "tmp_full.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full, format="JPEG")
    data = full.read_bytes()
    full.unlink()
    (tmp_path / "sub" / "c_truncated.jpg").write_bytes(data[: len(data) // 2])
    files["sub/c_truncated.jpg"] = tmp_path / "sub" / "c_truncated.jpg"
    # Garbage with an image extension, and a non-image file that must be ignored.
    (tmp_path / "sub" / "bb_corrupt.png").write_bytes(b"not an image at all" * 10)
    files["sub/bb_corrupt.png"] = tmp_path / "sub" / "bb_corrupt.png"
    (tmp_path / "notes.txt").write_text("hello")
    return files


def test_collects_sorted_recursive_paths(tmp_path: Path) -> None:
    _folder(tmp_path)
    ds = ImageDataset(tmp_path)
    rel = [str(Path(p).relative_to(tmp_path)) for p in ds.paths]
    assert rel == sorted(rel)
    assert set(rel) == {"a.png", "sub/b.JPG", "sub/bb_corrupt.png", "sub/c_truncated.jpg", "sub/deeper/d.jpeg"}
    assert len(ds) == 5
    only_png = ImageDataset(tmp_path, extensions=("png",))
    assert len(only_png) == 2


def test_unreadable_files_are_skipped_counted_and_warned_once(tmp_path: Path) -> None:
    _folder(tmp_path)
    ds = ImageDataset(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [ds[i] for i in range(len(ds))]
        again = [ds[i] for i in range(len(ds))]  # no new warnings for known-bad files
    bad = [w for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(bad) == 2
    assert any("bb_corrupt.png" in str(w.message) for w in bad)
    assert any("c_truncated.jpg" in str(w.message) for w in bad)
    assert ds.num_skipped == 2
    assert [Path(p).name for p in ds.skipped_paths] == ["bb_corrupt.png", "c_truncated.jpg"]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images + again)
    # Index of a bad file returns the next readable one: order is a.png, b.JPG, bb_corrupt, c_trunc, d.jpeg.
    names = [Path(p).name for p in ds.paths]
    i_corrupt = names.index("bb_corrupt.png")
    assert images[i_corrupt].getpixel((3, 3))[2] > 200  # d.jpeg is blue
    assert images[names.index("b.JPG")].getpixel((3, 3))[1] > 200  # green
    assert set(ds.skip_report()) == set(ds.skipped_paths)


def test_all_unreadable_raises_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "y.png").write_bytes(b"garbage too")
    ds = ImageDataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no readable image"):
            ds[0]
    assert ds.num_skipped == 2


def test_verify_removes_bad_files(tmp_path: Path) -> None:
    _folder(tmp_path)
    ds = ImageDataset(tmp_path)
    with pytest.warns(UnreadableImageWarning):
        bad = ds.verify()
    assert [Path(p).name for p in bad] == ["bb_corrupt.png", "c_truncated.jpg"]
    assert len(ds) == 3 and ds.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ = [ds[i] for i in range(len(ds))]


def test_dataloader_over_a_folder_with_bad_files(tmp_path: Path) -> None:
    _folder(tmp_path)
    ds = ImageDataset(tmp_path, transform=TF.pil_to_tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        batches = list(DataLoader(ds, batch_size=5))
    assert batches[0].shape == (5, 3, 16, 20) and batches[0].dtype == torch.uint8


def test_merge_reports() -> None:
    merged = ImageDataset.merge_reports([{"b": "e1"}, {"a": "e2"}, {"b": "e1"}])
    assert merged == {"a": "e2", "b": "e1"}


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="root"):
        ImageDataset(tmp_path / "missing")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageDataset(tmp_path)
    with pytest.raises(ValueError, match="extensions"):
        ImageDataset(tmp_path, extensions=".jpg")
