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


def test_all_unreadable_raises_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "y.png").write_bytes(b"garbage too")
    ds = ImageDataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no readable image"):
            ds[0]
    assert ds.num_skipped == 2


def test_dataloader_over_a_folder_with_bad_files(tmp_path: Path) -> None:
    _folder(tmp_path)
    ds = ImageDataset(tmp_path, transform=TF.pil_to_tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        batches = list(DataLoader(ds, batch_size=5))
    assert batches[0].shape == (5, 3, 16, 20) and batches[0].dtype == torch.uint8


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="root"):
        ImageDataset(tmp_path / "missing")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageDataset(tmp_path)
    with pytest.raises(ValueError, match="extensions"):
        ImageDataset(tmp_path, extensions=".jpg")


WORKER_SCRIPT = """
import sys, warnings
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF
from densecontrast.data.image_folder import ImageDataset
ds = ImageDataset(sys.argv[1], transform=TF.pil_to_tensor)
loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda b: b)
for epoch in range(3):
    for _ in loader:
        pass
print("SKIPPED", ds.num_skipped, [p.rsplit("/", 1)[-1] for p in ds.skipped_paths])
"""


def test_skips_are_counted_exactly_and_warned_once_with_workers(tmp_path: Path) -> None:
    """Two DataLoader workers, three epochs: the main process counts 2 files, each warned about once."""
    import subprocess
    import sys

    _folder(tmp_path / "data")
    script = tmp_path / "run.py"
    script.write_text(WORKER_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SKIPPED 2 ['bb_corrupt.png', 'c_truncated.jpg']" in proc.stdout
    warned = [line for line in proc.stderr.splitlines() if "skipping unreadable image" in line]
    assert len(warned) == 2 and {"bb_corrupt.png" in w for w in warned} == {True, False}


def _saved(tmp_path: Path, name: str, image: Image.Image, **kwargs) -> ImageDataset:
    folder = tmp_path / name
    folder.mkdir()
    image.save(folder / ("x.jpg" if image.mode == "CMYK" else "x.png"), **kwargs)
    return ImageDataset(folder)


def test_decoding_scales_bit_depths_and_composites_alpha(tmp_path: Path) -> None:
    import numpy as np

    from densecontrast.data.image_folder import BACKGROUND

    ramp = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    deep = _saved(tmp_path, "deep", Image.fromarray(ramp))[0]  # a 16-bit grayscale PNG
    assert deep.mode == "RGB"
    assert [deep.getpixel((i, 0))[0] for i in range(4)] == [round(v / 65535 * 255) for v in ramp[0].tolist()]
    rgba = Image.new("RGBA", (2, 1), (200, 10, 20, 255))
    rgba.putpixel((1, 0), (200, 10, 20, 0))  # transparent: the background shows
    out = _saved(tmp_path, "rgba", rgba)[0]
    assert out.getpixel((0, 0)) == (200, 10, 20) and out.getpixel((1, 0)) == BACKGROUND
    half = Image.new("LA", (1, 1), (255, 128))  # half-transparent white over the background
    got = _saved(tmp_path, "la", half)[0].getpixel((0, 0))
    assert all(abs(g - (255 * 128 + b * 127) / 255) <= 1 for g, b in zip(got, BACKGROUND))
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    out = _saved(tmp_path, "palette", palette, transparency=1)[0]
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == BACKGROUND
    gray = _saved(tmp_path, "gray", Image.new("L", (1, 1), 77))[0]
    assert gray.getpixel((0, 0)) == (77, 77, 77)
    cmyk = _saved(tmp_path, "cmyk", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)[0]
    r, g, b = cmyk.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta + yellow full: red


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    folder = tmp_path / "exif"
    folder.mkdir()
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 5, 10))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(folder / "x.jpg", exif=exif, quality=95)
    out = ImageDataset(folder)[0]
    assert out.size == (10, 30)
    assert out.getpixel((5, 2))[0] > 200 and out.getpixel((5, 27))[0] < 60  # the white band is now on top


def test_symlink_loop_lists_each_image_once_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(data / "sub" / "a.png")
    (data / "sub" / "loop").symlink_to(data)  # a cycle: data/sub/loop -> data
    (data / "again.png").symlink_to(data / "sub" / "a.png")  # the same file twice
    with pytest.warns(UserWarning, match="symbolic links"):
        ds = ImageDataset(data)
    assert len(ds) == 1
