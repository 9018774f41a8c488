"""Multi-view augmentation that records the exact geometry of every view.

Each view of an image is made in two parts:

1. a **spatial** part, either a random resized crop (area ``scale``, aspect ``ratio``) or a
   resize of the full image with no crop, followed by a horizontal flip with probability
   ``flip_p`` and a vertical flip with probability ``vflip_p`` (default 0);
2. a **photometric** part: any callable on the view tensor (a ``torchvision.transforms.v2``
   pipeline, e.g. [`color_pipeline`][densecontrast.transforms.color_pipeline]).

The crop rectangle and the flip decisions are sampled first, stored in a
[`ViewGeometry`][densecontrast.geometry.ViewGeometry], and only then applied with
``torchvision.transforms.v2.functional.resized_crop``, ``horizontal_flip`` and ``vertical_flip``.
The geometry is therefore the record of what was done, never re-derived from the output.

Convention:
    * Crops are integer pixel rectangles of the original image (``top``, ``left``, ``height``,
      ``width``), as ``torchvision`` samples them. The geometry stores them as continuous pixel
      boxes ``x0, y0, x1, y1 = left, top, left + width, top + height`` (pixel ``(i, j)`` covers
      ``[j, j + 1) x [i, i + 1)``), together with the flip flags and the original ``(W, H)``.
    * The crop is resized with ``align_corners=False`` sampling, so output pixel ``p`` of a view
      of width ``w_out`` shows the image point ``x0 + (p + 0.5) / w_out * (x1 - x0)`` (pixels),
      mirrored when flipped (rows likewise, mirrored when flipped vertically). This is exactly
      ``ViewGeometry.grid``'s convention.
    * An ``int`` size means a square ``size x size`` view, for crops and full-image views alike.
    * Randomness comes from torch's global generator (as in ``torchvision``): seed it with
      ``torch.manual_seed`` for reproducible views; ``DataLoader`` workers are seeded by torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from densecontrast._checks import check_int, check_interval, check_number, check_positive, check_size
from densecontrast.geometry import ViewGeometry

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Crop",
    "MultiViewTransform",
    "ViewTransform",
    "blur_kernel_size",
    "byol_views",
    "center_crop_params",
    "color_pipeline",
    "crop_geometry",
    "crop_overlap_fraction",
    "lc_views",
    "mocov2_views",
    "resized_crop_flip",
    "to_image_tensor",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet, used by the ``Normalize`` step of ``color_pipeline``."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet, used by the ``Normalize`` step of ``color_pipeline``."""

Crop = tuple[int, int, int, int]
"""An integer crop rectangle ``(top, left, height, width)`` in original-image pixels."""

SizeLike = int | Sequence[int]


# ---------------------------------------------------------------------------------------- helpers
def _draw(p: float) -> bool:
    """``True`` with probability ``p`` from torch's global generator (no draw when ``p`` is 0 or 1)."""
    if p == 0.0:
        return False
    if p == 1.0:
        return True
    return bool(torch.rand(()) < p)


def to_image_tensor(image: Any) -> Tensor:
    """Validate an input image and return it as a plain ``(C, H, W)`` tensor.

    Args:
        image: a PIL image, or a ``(C, H, W)`` tensor of dtype ``uint8`` or floating point
            (floats are expected in ``[0, 1]`` for the colour presets). ``tv_tensors.Image``
            is accepted and unwrapped.

    Returns:
        A ``(C, H, W)`` tensor (PIL images become ``uint8``; tensors are returned as they are,
        not copied).

    Raises:
        ValueError: ``image`` is not a PIL image or a tensor of shape ``(C, H, W)`` with
            ``C, H, W >= 1`` and dtype ``uint8``/float.

    Examples:
        >>> to_image_tensor(torch.zeros(3, 4, 5)).shape
        torch.Size([3, 4, 5])
    """
    if isinstance(image, Tensor):
        x = image.as_subclass(Tensor)
    elif type(image).__module__.startswith("PIL.") and hasattr(image, "getbands"):
        x = TF.pil_to_tensor(image)
    else:
        raise ValueError(f"image must be a PIL image or a (C, H, W) uint8/float tensor, but got {type(image).__name__}")
    if x.dim() != 3 or min(x.shape) < 1:
        raise ValueError(f"image must have shape (C, H, W) with C, H, W >= 1, but got shape {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"image must have dtype uint8 or a floating dtype, but got {x.dtype}")
    return x


def crop_geometry(crop: Crop, flip: bool, image_size: tuple[int, int], *, vflip: bool = False) -> ViewGeometry:
    """The one-view [`ViewGeometry`][densecontrast.geometry.ViewGeometry] of an integer crop and its flips.

    Args:
        crop: ``(top, left, height, width)`` in original-image pixels.
        flip: whether the resized crop is mirrored horizontally.
        image_size: original ``(H, W)`` in pixels (torch order, as ``image.shape[-2:]``).
        vflip: whether the resized crop is mirrored vertically.

    Returns:
        A geometry with ``boxes (1, 4) = [[left, top, left + width, top + height]]`` (float32
        pixels), ``flips (1,)``, ``vflips (1,)`` and ``image_size (1, 2) = [[W, H]]``, equal to what
        ``ViewGeometry.from_crops`` (and ``ViewGeometry.from_torchvision_crop``) build from them.

    Raises:
        ValueError: an empty crop or one that leaves the image.

    Examples:
        >>> g = crop_geometry((10, 20, 30, 40), True, (100, 200))
        >>> g.boxes, g.flips, g.image_size
        (tensor([[20., 10., 60., 40.]]), tensor([True]), tensor([[200., 100.]]))
    """
    top, left, h, w = (int(v) for v in crop)
    height, width = (int(v) for v in image_size)
    if not (0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= height and left + w <= width):
        raise ValueError(
            f"crop must be (top, left, height, width) inside the image of (H, W) = {(height, width)}, but got {crop}"
        )
    # The checks above are those of ViewGeometry.from_crops for integer crops; building the
    # dataclass directly avoids its tensor-level validation (about 10x the cost of the rest).
    return ViewGeometry(
        boxes=torch.tensor([[left, top, left + w, top + h]], dtype=torch.float32),
        flips=torch.tensor([bool(flip)]),
        image_size=torch.tensor([[width, height]], dtype=torch.float32),
        vflips=torch.tensor([bool(vflip)]),
    )


def crop_overlap_fraction(crop: Crop, reference: Crop) -> float:
    """Fraction of ``crop``'s area that lies inside ``reference`` (pixel rectangles).

    Args:
        crop: ``(top, left, height, width)`` of the crop being tested.
        reference: ``(top, left, height, width)`` of the reference crop.

    Returns:
        ``area(crop ∩ reference) / area(crop)`` in ``[0, 1]``; 0 for disjoint crops.

    Examples:
        >>> crop_overlap_fraction((0, 0, 10, 10), (0, 5, 10, 10))
        0.5
    """
    t0, l0, h0, w0 = crop
    t1, l1, h1, w1 = reference
    iw = max(0, min(l0 + w0, l1 + w1) - max(l0, l1))
    ih = max(0, min(t0 + h0, t1 + h1) - max(t0, t1))
    return (iw * ih) / float(h0 * w0)


def center_crop_params(height: int, width: int, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Crop:
    """The deterministic center crop used as the fallback of random resized crops.

    It is the whole image when its aspect ratio ``W / H`` lies within ``ratio``; otherwise the
    largest centered crop whose aspect ratio is the nearest end of ``ratio`` (the rule
    ``torchvision``'s ``RandomResizedCrop`` falls back to).

    Args:
        height: image height in pixels.
        width: image width in pixels.
        ratio: allowed aspect ratio range ``(min, max)`` of width / height.

    Returns:
        ``(top, left, height, width)``.

    Examples:
        >>> center_crop_params(100, 400)  # too wide: clamp to aspect 4/3
        (0, 133, 100, 133)
        >>> center_crop_params(90, 100)
        (0, 0, 90, 100)
    """
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = min(height, max(1, round(w / min(ratio))))
    elif in_ratio > max(ratio):
        h = height
        w = min(width, max(1, round(h * max(ratio))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_flip(
    image: Tensor,
    crop: Crop,
    flip: bool,
    size: SizeLike,
    *,
    vflip: bool = False,
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
    antialias: bool = True,
) -> Tensor:
    """Crop an integer rectangle, resize it to ``size`` and optionally mirror it (functional form).

    Args:
        image: ``(C, H, W)`` tensor, ``uint8`` or float.
        crop: ``(top, left, height, width)`` in pixels, inside the image.
        flip: mirror the result horizontally.
        size: output ``int`` (square) or ``(height, width)``.
        vflip: mirror the result vertically.
        interpolation: resampling mode (``torchvision`` ``InterpolationMode``).
        antialias: low-pass filter when downscaling (``torchvision``'s ``antialias``).

    Returns:
        ``(C, h_out, w_out)`` tensor of the input dtype.

    Convention:
        Sampling uses ``align_corners=False``: output pixel ``p`` is centered on the image point
        ``left + (p + 0.5) * width / w_out`` (and mirrored when ``flip``; rows likewise, mirrored
        when ``vflip``), matching [`crop_geometry`][densecontrast.transforms.crop_geometry].

    Examples:
        >>> x = torch.arange(16.0).view(1, 4, 4)
        >>> resized_crop_flip(x, (0, 0, 2, 4), True, (2, 4))
        tensor([[[3., 2., 1., 0.],
                 [7., 6., 5., 4.]]])
        >>> resized_crop_flip(x, (0, 0, 2, 4), False, (2, 4), vflip=True)
        tensor([[[4., 5., 6., 7.],
                 [0., 1., 2., 3.]]])
    """
    h, w = check_size(size)
    top, left, ch, cw = crop
    out = TF.resized_crop(
        image, top=top, left=left, height=ch, width=cw, size=[h, w], interpolation=interpolation, antialias=antialias
    )
    if flip:
        out = TF.horizontal_flip(out)
    if vflip:
        out = TF.vertical_flip(out)
    return out


def blur_kernel_size(size: SizeLike, fraction: float = 0.1) -> int:
    """Gaussian-blur kernel size scaled to the view size: the odd integer nearest ``fraction * min(size)``.

    At 224 px this gives the papers' kernel of 23; at 96 px it gives 9, at 32 px 3 (the minimum).

    Args:
        size: view size, ``int`` or ``(height, width)``.
        fraction: kernel size as a fraction of the smaller view side.

    Returns:
        An odd kernel size ``>= 3``.

    Examples:
        >>> blur_kernel_size(224), blur_kernel_size(96), blur_kernel_size(32)
        (23, 9, 3)
    """
    h, w = check_size(size)
    fraction = check_positive(fraction, "fraction")
    k = 2 * round((fraction * min(h, w) - 1) / 2) + 1
    return max(3, k)


class _ToRGB(nn.Module):
    """Repeat a 1-channel view to 3 channels; reject other channel counts (the colour ops assume RGB)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-3] not in (1, 3):
            raise ValueError(
                f"image must have 1 or 3 channels (C, H, W) for the colour pipeline, but got shape {tuple(x.shape)}"
            )
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x


def color_pipeline(
    *,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    gray_p: float = 0.2,
    blur_p: float = 0.0,
    blur_kernel: int = 23,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_p: float = 0.0,
    color: bool = True,
    normalize: bool = True,
) -> v2.Compose:
    """The photometric part of a view: a ``torchvision.transforms.v2`` pipeline on a ``(C, H, W)`` tensor.

    Steps, in order: 1-channel views are repeated to 3 channels (other channel counts raise
    ``ValueError``), ``ToDtype(float32, scale=True)`` (``uint8`` -> ``[0, 1]``), then, if
    ``color``: ``ColorJitter(*jitter)`` with probability ``jitter_p``, ``RandomGrayscale(gray_p)``,
    ``GaussianBlur(blur_kernel, blur_sigma)`` with probability ``blur_p``,
    ``RandomSolarize(0.5, solarize_p)``; finally, if ``normalize``, ``Normalize`` with the
    ImageNet statistics. Steps with probability 0 are left out. No step moves pixels, so the
    view geometry is unaffected.

    Args:
        jitter: ``(brightness, contrast, saturation, hue)`` strengths.
        jitter_p: probability of applying the colour jitter.
        gray_p: probability of converting to grayscale (kept 3-channel).
        blur_p: probability of the Gaussian blur.
        blur_kernel: odd blur kernel size (see [`blur_kernel_size`][densecontrast.transforms.blur_kernel_size]).
        blur_sigma: range of the blur standard deviation (pixels); not scaled with the size.
        solarize_p: probability of solarizing (threshold 0.5 on ``[0, 1]`` values).
        color: ``False`` keeps only the dtype conversion and normalization (for geometry checks).
        normalize: apply the ImageNet ``Normalize`` at the end.

    Returns:
        A ``v2.Compose`` returning float32 ``(3, H, W)`` tensors.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> out = color_pipeline(blur_p=1.0, blur_kernel=3)(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8))
        >>> out.shape, out.dtype
        (torch.Size([3, 8, 8]), torch.float32)
    """
    jitter_p = check_number(jitter_p, "jitter_p", 0, 1, note="(a probability)")
    gray_p = check_number(gray_p, "gray_p", 0, 1, note="(a probability)")
    blur_p = check_number(blur_p, "blur_p", 0, 1, note="(a probability)")
    solarize_p = check_number(solarize_p, "solarize_p", 0, 1, note="(a probability)")
    if check_int(blur_kernel, "blur_kernel", 1, note="(odd)") % 2 == 0:
        raise ValueError(f"blur_kernel must be an odd int >= 1, but got {blur_kernel!r}")
    steps: list[Callable[..., Any]] = [_ToRGB(), v2.ToDtype(torch.float32, scale=True)]
    if color:
        if jitter_p > 0:
            steps.append(v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p))
        if gray_p > 0:
            steps.append(v2.RandomGrayscale(p=gray_p))
        if blur_p > 0:
            blur = v2.GaussianBlur(kernel_size=blur_kernel, sigma=blur_sigma)
            steps.append(blur if blur_p == 1.0 else v2.RandomApply([blur], p=blur_p))
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=0.5, p=solarize_p))
    if normalize:
        steps.append(v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
    return v2.Compose(steps)


# ---------------------------------------------------------------------------------------- one view
class ViewTransform(nn.Module):
    """One view: a spatial part (random resized crop or full-image resize, then flips) and a photometric part.

    Args:
        size: output ``int`` (square) or ``(height, width)`` in pixels.
        crop: ``True``: random resized crop with ``scale``/``ratio`` (sampled by
            ``torchvision.transforms.v2.RandomResizedCrop``). ``False``: the full image resized to
            ``size`` (no crop; the aspect ratio may change).
        scale: crop area range as fractions of the image area, ``0 < min <= max <= 1``.
        ratio: crop aspect-ratio range (width / height), ``0 < min <= max``.
        flip_p: probability of a horizontal flip, in ``[0, 1]``.
        vflip_p: probability of a vertical flip, in ``[0, 1]`` (default 0: never; no random
            number is drawn then, so the views of a seed do not change).
        photometric: a callable applied to the resized, flipped ``(C, h, w)`` view tensor (e.g.
            [`color_pipeline`][densecontrast.transforms.color_pipeline]); it must not move pixels.
            ``None``: the view keeps the input dtype.
        interpolation: resampling mode for the resize.
        antialias: low-pass filter when downscaling.

    Convention:
        See the module docstring: integer pixel crops, ``align_corners=False`` resampling, flips
        after the resize (the horizontal one is drawn first). The returned geometry is built from
        the sampled parameters.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> t = ViewTransform(32, scale=(0.2, 1.0), flip_p=0.5)
        >>> view, geom = t(torch.rand(3, 60, 80))
        >>> view.shape, len(geom), geom.image_size
        (torch.Size([3, 32, 32]), 1, tensor([[80., 60.]]))
    """

    def __init__(
        self,
        size: SizeLike,
        *,
        crop: bool = True,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        photometric: Callable[[Tensor], Tensor] | None = None,
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
        antialias: bool = True,
        vflip_p: float = 0.0,
    ) -> None:
        super().__init__()
        self.size = check_size(size)
        self.crop = bool(crop)
        self.scale = check_interval(scale, "scale", 0.0, 1.0)
        self.ratio = check_interval(ratio, "ratio", 0.0, math.inf)
        self.flip_p = check_number(flip_p, "flip_p", 0, 1, note="(a probability)")
        self.vflip_p = check_number(vflip_p, "vflip_p", 0, 1, note="(a probability)")
        if photometric is not None and not callable(photometric):
            raise ValueError(f"photometric must be a callable on a (C, H, W) tensor or None, but got {photometric!r}")
        self.photometric = photometric
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        self._rrc = v2.RandomResizedCrop(
            self.size, scale=self.scale, ratio=self.ratio, interpolation=interpolation, antialias=self.antialias
        )

    def sample_crop(self, image: Tensor) -> Crop:
        """Sample the crop rectangle for ``image`` (the full image when ``crop=False``).

        Args:
            image: ``(C, H, W)`` tensor (only its size is used).

        Returns:
            ``(top, left, height, width)`` in pixels.

        Examples:
            >>> _ = torch.manual_seed(0)
            >>> t = ViewTransform(8, scale=(0.25, 0.25), ratio=(1.0, 1.0))
            >>> top, left, h, w = t.sample_crop(torch.zeros(3, 40, 40))
            >>> (h, w)
            (20, 20)
        """
        height, width = image.shape[-2:]
        if not self.crop:
            return 0, 0, int(height), int(width)
        make = getattr(self._rrc, "make_params", None) or self._rrc._get_params  # torchvision < 0.21
        p = make([image])
        return int(p["top"]), int(p["left"]), int(p["height"]), int(p["width"])

    def center_crop(self, image: Tensor) -> Crop:
        """The deterministic fallback crop (the full image when ``crop=False``).

        It is [`center_crop_params`][densecontrast.transforms.center_crop_params] with this view's ``ratio``.

        Examples:
            >>> ViewTransform(8).center_crop(torch.zeros(3, 30, 90))
            (0, 25, 30, 40)
        """
        height, width = (int(s) for s in image.shape[-2:])
        if not self.crop:
            return 0, 0, height, width
        return center_crop_params(height, width, self.ratio)

    def sample_flip(self) -> bool:
        """Draw the flip decision (``True`` with probability ``flip_p``, from torch's global generator).

        Examples:
            >>> ViewTransform(8, flip_p=1.0).sample_flip()
            True
        """
        return _draw(self.flip_p)

    def sample_vflip(self) -> bool:
        """Draw the vertical flip decision (``True`` with probability ``vflip_p``; no draw when it is 0 or 1).

        Examples:
            >>> ViewTransform(8).sample_vflip(), ViewTransform(8, vflip_p=1.0).sample_vflip()
            (False, True)
        """
        return _draw(self.vflip_p)

    def apply(self, image: Tensor, crop: Crop, flip: bool, *, vflip: bool = False) -> tuple[Tensor, ViewGeometry]:
        """Apply given spatial parameters, then the photometric part.

        Args:
            image: ``(C, H, W)`` tensor.
            crop: ``(top, left, height, width)``.
            flip: horizontal flip.
            vflip: vertical flip.

        Returns:
            ``(view, geometry)``: the ``(C, h, w)`` view and its one-view geometry.

        Examples:
            >>> view, g = ViewTransform((2, 4)).apply(torch.arange(16.0).view(1, 4, 4), (2, 0, 2, 4), True)
            >>> view, g.boxes, g.flips
            (tensor([[[11., 10.,  9.,  8.],
                     [15., 14., 13., 12.]]]), tensor([[0., 2., 4., 4.]]), tensor([True]))
        """
        view = resized_crop_flip(
            image, crop, flip, self.size, vflip=vflip, interpolation=self.interpolation, antialias=self.antialias
        )
        if self.photometric is not None:
            view = self.photometric(view)
        return view, crop_geometry(crop, flip, (int(image.shape[-2]), int(image.shape[-1])), vflip=vflip)

    def forward(self, image: Any) -> tuple[Tensor, ViewGeometry]:
        """Make one view of ``image`` (PIL or ``(C, H, W)`` tensor) and its geometry."""
        x = to_image_tensor(image)
        crop = self.sample_crop(x)
        flip = self.sample_flip()
        return self.apply(x, crop, flip, vflip=self.sample_vflip())

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, crop={self.crop}, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}, "
            f"flip_p={self.flip_p}, antialias={self.antialias}" + (f", vflip_p={self.vflip_p}" if self.vflip_p else "")
        )


# ---------------------------------------------------------------------------------------- views
class MultiViewTransform(nn.Module):
    """Several views of one image, each with the geometry of the crop and flip actually applied.

    Args:
        view_transforms: one [`ViewTransform`][densecontrast.transforms.ViewTransform] per view (at least one).
        min_overlap: if given, in ``(0, 1]``: every later cropping view is re-sampled until its
            intersection with the **first** view's crop covers at least this fraction of the
            later crop's area. ``None`` (default): views are independent.
        max_tries: how many crops a later view may draw before the fallback (``>= 1``).

    Fallback:
        If some view fails ``max_tries`` times, **every** cropping view takes the same center crop
        (the first view's
        [`ViewTransform.center_crop`][densecontrast.transforms.ViewTransform.center_crop], i.e. the
        whole image when its aspect ratio is within ``ratio``), the rule of PixCon's two-crop
        sampler. Those views then overlap completely. Flips and photometric parts are still
        sampled independently. Fallbacks are never silent: they are counted in ``fallback_count``
        (per process; ``DataLoader`` workers keep their own copies) and reported per image by
        [`sample_with_info`][densecontrast.transforms.MultiViewTransform.sample_with_info]. Views
        with ``crop=False`` are never re-sampled (they always show the full image).

    Call:
        ``transform(image)`` with a PIL image or a ``(C, H, W)`` ``uint8``/float tensor returns
        ``(views, geometries)``: a list of ``V`` view tensors and a list of ``V`` one-view
        [`ViewGeometry`][densecontrast.geometry.ViewGeometry].
        ``transform.sample_with_info(image)`` returns ``(views, geometries, info)`` with the
        re-sampling record.

    Convention:
        Geometry boxes are original-image pixels (float32), ``image_size = (W, H)``; see the module
        docstring for the resampling convention.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> t = MultiViewTransform([ViewTransform(16), ViewTransform(16)], min_overlap=0.5)
        >>> views, geoms = t(torch.rand(3, 40, 50))
        >>> [v.shape for v in views], [len(g) for g in geoms]
        ([torch.Size([3, 16, 16]), torch.Size([3, 16, 16])], [1, 1])
        >>> _, area = geoms[1].overlap(geoms[0])
        >>> bool(area / geoms[1].cell_size(1, 1).prod() >= 0.5)
        True
    """

    def __init__(
        self,
        view_transforms: Sequence[ViewTransform],
        min_overlap: float | None = None,
        max_tries: int = 10,
    ) -> None:
        super().__init__()
        if isinstance(view_transforms, ViewTransform) or not isinstance(view_transforms, Sequence):
            raise ValueError(
                "view_transforms must be a non-empty sequence of ViewTransform, but got "
                f"{type(view_transforms).__name__}"
            )
        if len(view_transforms) == 0 or not all(isinstance(t, ViewTransform) for t in view_transforms):
            raise ValueError(
                "view_transforms must be a non-empty sequence of ViewTransform, but got "
                f"[{', '.join(type(t).__name__ for t in view_transforms)}]"
            )
        if min_overlap is not None:
            min_overlap = check_number(min_overlap, "min_overlap", 0, 1, open_low=True, note="or None")
        self.view_transforms = nn.ModuleList(view_transforms)
        self.min_overlap = min_overlap
        self.max_tries = check_int(max_tries, "max_tries", 1)
        self.call_count = 0
        """Images transformed by this instance (in this process)."""
        self.fallback_count = 0
        """How many of them took the center-crop fallback (in this process)."""

    @property
    def num_views(self) -> int:
        """Number of views ``V``."""
        return len(self.view_transforms)

    def sample_crops(self, image: Tensor) -> tuple[list[Crop], list[int], bool]:
        """Sample every view's crop, applying the minimum-overlap rule.

        Args:
            image: ``(C, H, W)`` tensor (only its size is used).

        Returns:
            ``(crops, tries, fallback)``: one ``(top, left, height, width)`` per view, the number of
            crops drawn per view (0 for views after the one that triggered the fallback), and whether
            the center-crop fallback was taken.

        Examples:
            >>> _ = torch.manual_seed(0)
            >>> t = MultiViewTransform([ViewTransform(8, scale=(0.01, 0.02))] * 2, min_overlap=1.0, max_tries=3)
            >>> t.sample_crops(torch.zeros(3, 40, 40))  # tiny crops never nest: the center-crop fallback
            ([(0, 0, 40, 40), (0, 0, 40, 40)], [1, 3], True)
        """
        transforms: list[ViewTransform] = list(self.view_transforms)  # type: ignore[arg-type]
        first = transforms[0].sample_crop(image)
        crops, tries = [first], [1]
        fallback = False
        for t in transforms[1:]:
            crop = t.sample_crop(image)
            n = 1
            if self.min_overlap is not None and t.crop:
                while crop_overlap_fraction(crop, first) < self.min_overlap and n < self.max_tries:
                    crop = t.sample_crop(image)
                    n += 1
                if crop_overlap_fraction(crop, first) < self.min_overlap:
                    fallback = True
            crops.append(crop)
            tries.append(n)
            if fallback:
                break
        if fallback:
            # Only reachable when the first view crops (a full first view contains every crop).
            center = transforms[0].center_crop(image)
            tries += [0] * (len(transforms) - len(tries))
            crops = [center if t.crop else t.sample_crop(image) for t in transforms]
        return crops, tries, fallback

    def sample_with_info(self, image: Any) -> tuple[list[Tensor], list[ViewGeometry], dict[str, Tensor]]:
        """Make the views of one image and report how their crops were sampled.

        Args:
            image: a PIL image or a ``(C, H, W)`` ``uint8``/float tensor.

        Returns:
            ``(views, geometries, info)``: as :meth:`forward`, plus
            ``info = {"fallback": bool tensor (), "tries": long tensor (V,)}`` (``tries[v]`` =
            crops drawn for view ``v``; ``1`` for the first view and for views that are not
            re-sampled; ``0`` for views after the one that triggered the fallback). A dataset
            can return ``info`` with the views; ``collate_views`` batches it like any extra.

        Examples:
            >>> _ = torch.manual_seed(0)
            >>> t = MultiViewTransform([ViewTransform(8, scale=(0.01, 0.02))] * 2, min_overlap=1.0, max_tries=3)
            >>> views, geoms, info = t.sample_with_info(torch.zeros(3, 40, 40))
            >>> info["fallback"], info["tries"], t.fallback_count
            (tensor(True), tensor([1, 3]), 1)
        """
        x = to_image_tensor(image)
        crops, tries, fallback = self.sample_crops(x)
        views: list[Tensor] = []
        geometries: list[ViewGeometry] = []
        for t, crop in zip(self.view_transforms, crops):
            flip = t.sample_flip()  # type: ignore[operator]
            view, geom = t.apply(x, crop, flip, vflip=t.sample_vflip())  # type: ignore[operator]
            views.append(view)
            geometries.append(geom)
        self.call_count += 1
        self.fallback_count += int(fallback)
        info = {"fallback": torch.tensor(fallback), "tries": torch.tensor(tries, dtype=torch.long)}
        return views, geometries, info

    def forward(self, image: Any) -> tuple[list[Tensor], list[ViewGeometry]]:
        """Make the views of one image: ``(views, geometries)``, see the class docstring."""
        views, geometries, _ = self.sample_with_info(image)
        return views, geometries

    def extra_repr(self) -> str:
        return f"min_overlap={self.min_overlap}, max_tries={self.max_tries}"


# ---------------------------------------------------------------------------------------- presets
def _pipeline(color: bool, normalize: bool, **kwargs: Any) -> v2.Compose:
    return color_pipeline(color=color, normalize=normalize, **kwargs)


def _byol_photometric(color: bool, normalize: bool, size: SizeLike, blur_kernel: int | None) -> list[v2.Compose]:
    """BYOL's asymmetric colour pipelines: view 1 always blurred, view 2 rarely blurred and sometimes solarized."""
    k = blur_kernel if blur_kernel is not None else blur_kernel_size(size)
    common = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_kernel=k)
    return [
        _pipeline(color, normalize, blur_p=1.0, solarize_p=0.0, **common),
        _pipeline(color, normalize, blur_p=0.1, solarize_p=0.2, **common),
    ]


def byol_views(
    size: SizeLike,
    *,
    min_overlap: float | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    color: bool = True,
    normalize: bool = True,
    blur_kernel: int | None = None,
    max_tries: int = 10,
    antialias: bool = True,
) -> MultiViewTransform:
    """BYOL's asymmetric two-view augmentation (PixCon, PixPro, LC-loss's global views).

    Both views: random resized crop (``scale``, ``ratio``), flip p=0.5, ``ColorJitter(0.4, 0.4,
    0.2, 0.1)`` p=0.8, grayscale p=0.2. View 1: blur p=1.0, no solarize. View 2: blur p=0.1,
    solarize p=0.2. Blur sigma in ``(0.1, 2.0)``; kernel ``blur_kernel`` or
    [`blur_kernel_size`][densecontrast.transforms.blur_kernel_size] of ``size`` (23 at 224).
    PixCon uses ``min_overlap=0.01``.

    Args:
        size: view size, ``int`` (square) or ``(height, width)``.
        min_overlap: see [`MultiViewTransform`][densecontrast.transforms.MultiViewTransform].
        scale: crop area range.
        ratio: crop aspect-ratio range.
        color: ``False`` drops jitter, grayscale, blur and solarize (geometry checks).
        normalize: end with the ImageNet ``Normalize``.
        blur_kernel: override the blur kernel size (odd).
        max_tries: see [`MultiViewTransform`][densecontrast.transforms.MultiViewTransform].
        antialias: low-pass filter when downscaling.

    Returns:
        A two-view [`MultiViewTransform`][densecontrast.transforms.MultiViewTransform] producing float32
        ``(3, h, w)`` views.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> views, geoms = byol_views(32)(torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8))
        >>> [tuple(v.shape) for v in views], views[0].dtype
        ([(3, 32, 32), (3, 32, 32)], torch.float32)
    """
    views = [
        ViewTransform(size, scale=scale, ratio=ratio, flip_p=0.5, antialias=antialias, photometric=photometric)
        for photometric in _byol_photometric(color, normalize, size, blur_kernel)
    ]
    return MultiViewTransform(views, min_overlap=min_overlap, max_tries=max_tries)


def mocov2_views(
    size: SizeLike,
    *,
    min_overlap: float | None = None,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    color: bool = True,
    normalize: bool = True,
    blur_kernel: int | None = None,
    max_tries: int = 10,
    antialias: bool = True,
) -> MultiViewTransform:
    """MoCo v2's symmetric two-view augmentation (DenseCL, DenseSiam).

    Both views: random resized crop (``scale`` default ``(0.2, 1)``), flip p=0.5,
    ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` p=0.8, grayscale p=0.2, blur p=0.5 with sigma in
    ``(0.1, 2.0)``, no solarize.

    Args:
        size: view size, ``int`` (square) or ``(height, width)``.
        min_overlap: see [`MultiViewTransform`][densecontrast.transforms.MultiViewTransform] (``None`` in the papers).
        scale: crop area range.
        ratio: crop aspect-ratio range.
        color: ``False`` drops jitter, grayscale and blur.
        normalize: end with the ImageNet ``Normalize``.
        blur_kernel: override the blur kernel size (odd); default
            [`blur_kernel_size`][densecontrast.transforms.blur_kernel_size].
        max_tries: see [`MultiViewTransform`][densecontrast.transforms.MultiViewTransform].
        antialias: low-pass filter when downscaling.

    Returns:
        A two-view [`MultiViewTransform`][densecontrast.transforms.MultiViewTransform] producing float32 views.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> views, geoms = mocov2_views((24, 32))(torch.rand(3, 50, 50))
        >>> [tuple(v.shape) for v in views]
        [(3, 24, 32), (3, 24, 32)]
    """
    k = blur_kernel if blur_kernel is not None else blur_kernel_size(size)
    kwargs = dict(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5, blur_kernel=k, solarize_p=0.0)
    views = [
        ViewTransform(
            size,
            scale=scale,
            ratio=ratio,
            flip_p=0.5,
            antialias=antialias,
            photometric=_pipeline(color, normalize, **kwargs),
        )
        for _ in range(2)
    ]
    return MultiViewTransform(views, min_overlap=min_overlap, max_tries=max_tries)


def lc_views(
    size: SizeLike,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    color: bool = True,
    normalize: bool = True,
    blur_kernel: int | None = None,
    antialias: bool = True,
) -> MultiViewTransform:
    """LC-loss's two views: a colour-only full-image view and a cropped, flipped, coloured view.

    View 1 (``I_c``): the whole image resized to ``size`` (no crop, no flip) with BYOL's view-1
    colour (jitter ``(0.4, 0.4, 0.2, 0.1)`` p=0.8, gray p=0.2, blur p=1.0). View 2 (``I_sc``):
    random resized crop (``scale``, ``ratio``) + flip p=0.5 with BYOL's view-2 colour (blur p=0.1,
    solarize p=0.2). Every crop of view 2 lies inside view 1, so no overlap rule is needed.

    Args:
        size: view size, ``int`` (square) or ``(height, width)``.
        scale: crop area range of view 2.
        ratio: crop aspect-ratio range of view 2.
        color: ``False`` drops jitter, grayscale, blur and solarize.
        normalize: end with the ImageNet ``Normalize``.
        blur_kernel: override the blur kernel size (odd); default
            [`blur_kernel_size`][densecontrast.transforms.blur_kernel_size].
        antialias: low-pass filter when downscaling.

    Returns:
        A two-view [`MultiViewTransform`][densecontrast.transforms.MultiViewTransform] producing float32 views.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> views, geoms = lc_views(32)(torch.rand(3, 40, 60))
        >>> geoms[0].boxes, geoms[0].flips
        (tensor([[ 0.,  0., 60., 40.]]), tensor([False]))
    """
    colour_only, spatial = _byol_photometric(color, normalize, size, blur_kernel)
    views = [
        ViewTransform(size, crop=False, flip_p=0.0, antialias=antialias, photometric=colour_only),
        ViewTransform(size, scale=scale, ratio=ratio, flip_p=0.5, antialias=antialias, photometric=spatial),
    ]
    return MultiViewTransform(views)
