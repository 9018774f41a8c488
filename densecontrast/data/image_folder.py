"""Every image under a folder, recursively, robust to unreadable files (e.g. COCO ``train2017/``).

Convention:
    Items are RGB ``PIL.Image.Image`` objects (or whatever ``transform`` makes of them), in the
    order of the sorted relative paths. No labels: self-supervised pre-training needs none.
    Decoding (:func:`to_rgb`): the EXIF orientation is applied; 16- and 32-bit grayscale is
    *scaled* to 8 bits (never clipped); palette, CMYK and grayscale images are converted to RGB;
    transparent pixels (RGBA, LA, palette transparency) are composited over the ImageNet mean
    colour :data:`BACKGROUND`, which the usual normalisation maps to zero.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

__all__ = ["BACKGROUND", "IMAGE_EXTENSIONS", "ImageDataset", "UnreadableImageWarning", "list_images", "to_rgb"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""File extensions :class:`ImageDataset` collects by default (matched case-insensitively)."""

BACKGROUND: tuple[int, int, int] = (124, 116, 104)
"""RGB colour transparent pixels are composited over: the ImageNet mean (0.485, 0.456, 0.406) x 255."""


class UnreadableImageWarning(UserWarning):
    """Emitted once per file that :class:`ImageDataset` could not decode and skipped."""


def to_rgb(image: Any) -> Any:
    """An 8-bit RGB ``PIL.Image`` from any PIL image: orientation applied, high bit depths scaled, alpha composited.

    Examples:
        >>> from PIL import Image
        >>> import numpy as np
        >>> deep = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))  # mode I;16, half of full scale
        >>> to_rgb(deep).getpixel((0, 0))
        (128, 128, 128)
        >>> to_rgb(Image.new("RGBA", (1, 1), (255, 0, 0, 0))).getpixel((0, 0))  # fully transparent
        (124, 116, 104)
    """
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        arr = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16"):
            full = 65535.0
        elif image.mode == "I":  # 32-bit integers: 16-bit data unless the values say 8-bit
            full = 65535.0 if arr.max(initial=0) > 255 else 255.0
        else:  # float images: [0, 1] unless the values say [0, 255]
            full = 255.0 if arr.max(initial=0) > 1 else 1.0
        arr = np.clip(np.rint(arr / full * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def list_images(root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Image files under ``root``, recursively, each real file once, sorted by path relative to ``root``.

    Symbolic links are followed, but every directory is entered once (a link loop is cut, not
    followed forever) and a file reached through several links is listed once; a warning says
    how many duplicates were dropped.

    Examples:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); open(os.path.join(d, "a.png"), "wb").close()
        >>> os.symlink(d, os.path.join(d, "loop"))  # a link cycle
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     names = [os.path.basename(p) for p in list_images(d)]
        >>> names, len(caught)
        (['a.png'], 1)
    """
    root_path = Path(root)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    paths: list[str] = []
    duplicates = revisited = 0
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:
            dirnames[:] = []
            revisited += 1
            continue
        seen_dirs.add(real_dir)
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(exts):
                continue
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real in seen_files:
                duplicates += 1
                continue
            seen_files.add(real)
            paths.append(path)
    if duplicates or revisited:
        warnings.warn(f"symbolic links under {str(root)!r} lead to {revisited} folder(s) and {duplicates} image(s) "
                      "already listed; each is used once", stacklevel=2)
    paths.sort(key=lambda p: os.path.relpath(p, root_path))
    return paths


class ImageDataset(Dataset):
    """All images under ``root`` (recursively, see :func:`list_images`), sorted by path, as RGB PIL images.

    Unreadable files (corrupt, truncated, not really images) never stop a run: the first time
    item ``i`` fails to decode, an :class:`UnreadableImageWarning` naming the file and the error
    is emitted — once per file, across DataLoader workers and epochs — and the next readable
    image (``i + 1``, ``i + 2``, ..., wrapping around) is returned instead. The record of bad
    files lives in shared memory, so :attr:`num_skipped` of the main-process object counts the
    files every worker met. Only if **no** file is readable does indexing raise a ``RuntimeError``.

    Args:
        root: folder to scan (symbolic links followed once).
        extensions: file name endings to include (case-insensitive).
        transform: optional callable applied to each PIL image.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
        ValueError: no file with one of ``extensions`` is found under ``root``.

    Examples:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> d = tempfile.mkdtemp()
        >>> Image.new("RGB", (8, 6), "red").save(os.path.join(d, "a.png"))
        >>> ds = ImageDataset(d)
        >>> len(ds), ds[0].size, ds.num_skipped
        (1, (8, 6), 0)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"root must be an existing directory of images, but got {str(root)!r}")
        if isinstance(extensions, str) or not all(isinstance(e, str) for e in extensions) or len(extensions) == 0:
            raise ValueError(f"extensions must be a non-empty sequence of strings like ('.jpg', '.png'), but got "
                             f"{extensions!r}")
        paths = list_images(root_path, extensions)
        if not paths:
            raise ValueError(f"root {str(root)!r} contains no images with extensions {tuple(extensions)}")
        self.root = str(root_path)
        self.paths: list[str] = paths
        """Sorted paths of the collected files."""
        self.transform = transform
        self._bad = torch.zeros(len(paths), dtype=torch.bool).share_memory_()  # shared with DataLoader workers
        self._errors: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files met so far, by this process and its DataLoader workers."""
        return int(self._bad.sum())

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the unreadable files met so far (by this process and its workers), sorted."""
        return sorted(self.paths[i] for i in self._bad.nonzero().flatten().tolist())

    def _load(self, index: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            img.load()  # decode now so truncated files fail here, not later in a transform
            return to_rgb(img)

    def _mark_bad(self, index: int, error: BaseException) -> None:
        self._bad[index] = True
        self._errors[index] = f"{type(error).__name__}: {error}"
        info = get_worker_info()
        where = f" (DataLoader worker {info.id})" if info is not None else ""
        warnings.warn(
            f"skipping unreadable image {self.paths[index]!r}{where}: {type(error).__name__}: {error}",
            UnreadableImageWarning,
            stacklevel=3,
        )

    def __getitem__(self, index: int) -> Any:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for an ImageDataset of {n} images")
        index = int(index) % n
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            try:
                image = self._load(i)
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                self._mark_bad(i, error)
                continue
            return self.transform(image) if self.transform is not None else image
        raise RuntimeError(
            f"no readable image in {self.root!r}: all {n} files failed to decode "
            f"(first error: {next(iter(self._errors.values()), 'unknown')})"
        )

    def __repr__(self) -> str:
        return f"ImageDataset(root={self.root!r}, num_images={len(self)}, num_skipped={self.num_skipped})"
