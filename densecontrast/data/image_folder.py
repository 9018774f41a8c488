"""Every image under a folder, recursively, robust to unreadable files (e.g. COCO ``train2017/``).

Convention:
    Items are RGB ``PIL.Image.Image`` objects (or whatever ``transform`` makes of them), in the
    order of the sorted relative paths. No labels: self-supervised pre-training needs none.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, get_worker_info

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "UnreadableImageWarning"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""File extensions :class:`ImageDataset` collects by default (matched case-insensitively)."""


class UnreadableImageWarning(UserWarning):
    """Emitted once per file that :class:`ImageDataset` could not decode and skipped."""


class ImageDataset(Dataset):
    """All images under ``root`` (recursively), sorted by path, returned as RGB PIL images.

    Unreadable files (corrupt, truncated, not really images) never stop a run: the first time
    item ``i`` fails to decode, an :class:`UnreadableImageWarning` naming the file and the error
    is emitted (once per file), the path is recorded in :attr:`skipped_paths`, and the next
    readable image (``i + 1``, ``i + 2``, ..., wrapping around) is returned instead. Known-bad
    files are not retried and not warned about again. Only if **no** file is readable does
    indexing raise a ``RuntimeError``.

    Note:
        With ``DataLoader(num_workers > 0)`` every worker holds its own copy of the dataset, so
        :attr:`num_skipped` of the main-process object stays 0 and each worker counts only the
        files it met. To get one global count, either call :meth:`verify` once before training
        (decodes every file in this process, records and drops bad ones, so workers never meet
        them), or collect :meth:`skip_report` from each worker (e.g. in ``worker_init_fn`` /
        at the end of an epoch) and merge with :meth:`merge_reports`.

    Args:
        root: folder to scan (symlinks followed).
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
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        paths: list[str] = []
        for dirpath, _, filenames in os.walk(root_path, followlinks=True):
            for name in filenames:
                if name.lower().endswith(exts):
                    paths.append(os.path.join(dirpath, name))
        paths.sort(key=lambda p: os.path.relpath(p, root_path))
        if not paths:
            raise ValueError(f"root {str(root)!r} contains no images with extensions {exts}")
        self.root = str(root_path)
        self.extensions = exts
        self.paths: list[str] = paths
        """Sorted absolute (or ``root``-relative-joined) paths of the collected files."""
        self.transform = transform
        self._bad: dict[int, str] = {}
        self._removed: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files met so far by this process (see the class note on workers)."""
        return len(self._bad) + len(self._removed)

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the unreadable files met so far by this process, sorted."""
        return sorted([self.paths[i] for i in self._bad] + list(self._removed))

    def _load(self, index: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            img.load()  # decode now so truncated files fail here, not later in a transform
            return img.convert("RGB")

    def _mark_bad(self, index: int, error: BaseException) -> None:
        self._bad[index] = f"{type(error).__name__}: {error}"
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
            if i in self._bad:
                continue
            try:
                image = self._load(i)
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                self._mark_bad(i, error)
                continue
            return self.transform(image) if self.transform is not None else image
        raise RuntimeError(
            f"no readable image in {self.root!r}: all {n} files failed to decode "
            f"(first error: {next(iter(self._bad.values()), 'unknown')})"
        )

    def verify(self, remove: bool = True) -> list[str]:
        """Decode every file now (in this process) and record the unreadable ones.

        Run it once before building a ``DataLoader`` with workers to get a global count and to
        keep workers from meeting bad files at all.

        Args:
            remove: drop the unreadable files from :attr:`paths` (they stay in :attr:`skipped_paths`).

        Returns:
            Sorted paths of the unreadable files found.

        Examples:
            >>> import tempfile, os
            >>> from PIL import Image
            >>> d = tempfile.mkdtemp()
            >>> Image.new("RGB", (4, 4)).save(os.path.join(d, "ok.png"))
            >>> ImageDataset(d).verify()
            []
        """
        for i in range(len(self.paths)):
            if i in self._bad:
                continue
            try:
                self._load(i)
            except Exception as error:
                self._mark_bad(i, error)
        if len(self._bad) == len(self.paths):
            raise RuntimeError(f"no readable image in {self.root!r}: all {len(self.paths)} files failed to decode")
        if remove and self._bad:
            self._removed.update({self.paths[i]: err for i, err in self._bad.items()})
            self.paths = [p for i, p in enumerate(self.paths) if i not in self._bad]
            self._bad = {}
        return self.skipped_paths

    def skip_report(self) -> dict[str, str]:
        """``{path: error}`` of the unreadable files met by this process (for merging across workers)."""
        report = dict(self._removed)
        report.update({self.paths[i]: err for i, err in self._bad.items()})
        return dict(sorted(report.items()))

    @staticmethod
    def merge_reports(reports: Iterable[dict[str, str]]) -> dict[str, str]:
        """Union of several :meth:`skip_report` dicts (e.g. one per DataLoader worker).

        Examples:
            >>> ImageDataset.merge_reports([{"a.jpg": "OSError"}, {"a.jpg": "OSError", "b.jpg": "OSError"}])
            {'a.jpg': 'OSError', 'b.jpg': 'OSError'}
        """
        merged: dict[str, str] = {}
        for r in reports:
            merged.update(r)
        return dict(sorted(merged.items()))

    def __repr__(self) -> str:
        return f"ImageDataset(root={self.root!r}, num_images={len(self)}, num_skipped={self.num_skipped})"
