"""Real photographs that ship inside scikit-image's wheel: an evaluation set that needs no download.

Convention:
    Images are ``uint8`` tensors ``(3, H, W)`` (grayscale photographs repeated over the three
    channels), in the fixed order of :data:`PHOTO_NAMES`, at their original sizes unless
    ``size`` asks for square images: the largest centred square is cut out (no distortion) and
    resized to ``size x size`` (bilinear, antialiased).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densecontrast._checks import check_int

__all__ = ["COLOUR_PHOTOS", "GRAY_PHOTOS", "PHOTO_NAMES", "photos_available", "sample_photos", "square_resize"]

COLOUR_PHOTOS: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
    "immunohistochemistry", "retina",
)
"""The colour photographs of ``skimage.data`` (the stereo motorcycle pair counts twice)."""

GRAY_PHOTOS: tuple[str, ...] = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell")
"""Grayscale photographs of ``skimage.data`` (natural scenes and textures, no drawings or documents)."""

PHOTO_NAMES: tuple[str, ...] = COLOUR_PHOTOS + GRAY_PHOTOS
"""Every photograph :func:`sample_photos` returns, in order."""


def photos_available() -> bool:
    """Whether scikit-image (the ``examples`` / ``dev`` extra) is installed, so :func:`sample_photos` works.

    Examples:
        >>> isinstance(photos_available(), bool)
        True
    """
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


def _load(name: str) -> Tensor:
    import numpy as np
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name == "motorcycle_left" else right
    else:
        arr = getattr(skimage.data, name)()
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return torch.from_numpy(arr[..., :3]).permute(2, 0, 1).contiguous()


def sample_photos(size: int | None = None, names: tuple[str, ...] = PHOTO_NAMES) -> list[Tensor]:
    """The scikit-image sample photographs as ``uint8`` ``(3, H, W)`` tensors (``(3, size, size)`` with ``size``).

    Args:
        size: cut the centred square of every photograph and resize it to ``size x size`` pixels;
            ``None`` keeps the original sizes.
        names: which photographs, a subset of :data:`PHOTO_NAMES`.

    Raises:
        ImportError: scikit-image is not installed (``pip install 'densecontrast[examples]'``).
        ValueError: an unknown name, or a bad ``size``.

    Examples:
        >>> photos = sample_photos(64, names=("astronaut", "camera"))
        >>> [tuple(p.shape) for p in photos], photos[0].dtype
        ([(3, 64, 64), (3, 64, 64)], torch.uint8)
    """
    if size is not None:
        check_int(size, "size", 1)
    unknown = [n for n in names if n not in PHOTO_NAMES]
    if unknown:
        raise ValueError(f"names must be among {PHOTO_NAMES}, but got {unknown}")
    if not photos_available():
        raise ImportError("the sample photographs need scikit-image: pip install 'densecontrast[examples]'")
    out = []
    for name in names:
        img = _load(name)
        out.append(img if size is None else square_resize(img, size))
    return out


def square_resize(image: Tensor, size: int) -> Tensor:
    """The centred square of a ``(3, H, W)`` uint8 image, resized to ``(3, size, size)`` (bilinear, antialiased).

    Examples:
        >>> square_resize(torch.zeros(3, 40, 60, dtype=torch.uint8), 16).shape
        torch.Size([3, 16, 16])
    """
    check_int(size, "size", 1)
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top : top + side, left : left + side]
    resized = F.interpolate(square[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)[0]
    return resized.round().clamp(0, 255).to(torch.uint8)
