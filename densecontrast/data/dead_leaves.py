"""Dead-leaves images with natural-image statistics: occluding textured shapes of power-law sizes.

Procedural images that follow the statistics of natural photographs pre-train features that
transfer to real images (Baradad et al., "Learning to See by Looking at Noise", NeurIPS 2021).
This generator follows their dead-leaves model, with textured leaves:

* **Occlusion (dead-leaves model).** Leaves fall onto the canvas one after another and the
  first to fall stays on top; leaves are added underneath until at least ``coverage`` of the
  pixels is covered (or ``max_leaves`` have fallen). This is the same picture as painting
  leaves back to front until the canvas is covered; pixels left uncovered show the background.
* **Scale invariance.** A leaf's size is the radius ``r`` of the disc of equal area; its
  density is ``p(r) ∝ r^-radius_exponent`` on ``[r_min, r_max] * image_size`` (default exponent
  3, the scale-invariant value, under which the image power spectrum falls roughly as
  ``1/f^2`` like that of natural photographs). Centres are uniform on the square extended by
  ``r`` on each side, so large leaves also enter from outside the frame.
* **Shapes.** Discs, ellipses (aspect ratio 1 to 3) and rectangles (aspect 1 to 3: squares
  included), each rotated uniformly.
* **Textures.** ``1/f^alpha`` coloured noise (power spectrum ``∝ 1/|f|^alpha``, ``alpha``
  random per texture in ``alpha_range``), coloured through a random per-leaf palette, a
  quadratic path between three colours of related hue, so brightness and hue vary together
  (colour mixing); oriented gratings (sine to square stripes, period about 4 px to ``S / 4``,
  any orientation) between two random colours; or a flat colour.
* **Background** (uncovered pixels): ``1/f^alpha`` colour noise (or a flat colour). Finally a
  mild global blur of ``blur`` pixels standard deviation (the optics of a camera).

Speed: what does not depend on the image is computed once per dataset (seeded by ``seed``): a
bank of 32,768 leaf shapes (radius from the power law, class, aspect, orientation, and the
rasteriser's per-shape constants), and a texture bank of ``bank_size`` periodic ``1/f^alpha``
noise fields and as many gratings, quantised to 64 levels. An image draws its leaves from the
shape bank (with new positions), its textures from the texture bank at random toroidal offsets,
and new palettes (64-colour lookup tables) for every leaf. Leaves are rasterised exactly at pixel
centres by row runs: for every row a leaf crosses, the run of pixels inside it is solved in
closed form, and all runs are written with one ``scatter_reduce`` that keeps the front-most
leaf per pixel. No per-leaf image is made: an image costs a fixed number of tensor operations
plus work proportional to its area (1.6 to 2.6 ms at 128 px on one core of a shared AMD EPYC, see
``docs/benchmarks.md``).

Classes: a leaf's class is its **(shape, texture) category**, ``num_classes`` of the 9 pairs in
the order of :data:`CATEGORIES` (texture varies fastest), so even small ``num_classes`` keep all
three textures. The mask label of a pixel is the class of the leaf on top there.

Convention:
    Images are ``uint8`` tensors ``(3, H, W)`` (RGB, ``H = W = image_size``) or PIL images with
    ``as_pil=True``. Masks are ``(H, W)`` ``int64`` with ``0`` = background (no leaf) and
    ``1 .. num_classes`` = the category of the topmost leaf; ``num_labels = num_classes + 1``.
    Sizes (``radius_range``) are fractions of ``image_size``; :meth:`DeadLeavesScenes.layout`
    reports radii and centres in pixels, with pixel ``(i, j)`` centred at ``(x, y) = (j + 0.5,
    i + 0.5)``. Item ``i`` is a pure function of ``(seed, i)`` and the constructor arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from densecontrast._checks import check_int, check_interval, check_number
from densecontrast.data.synthetic import _seed_for

__all__ = ["CATEGORIES", "DeadLeavesScenes", "power_law_radii"]

LEAF_SHAPES = ("disc", "ellipse", "rectangle")
LEAF_TEXTURES = ("noise", "grating", "flat")
#: The (shape, texture) category of each class: class ``c`` (mask label ``c + 1``) is ``CATEGORIES[c]``.
CATEGORIES: tuple[tuple[str, str], ...] = tuple((s, t) for s in LEAF_SHAPES for t in LEAF_TEXTURES)
_MAX_ASPECT = 3.0
_LEVELS = 64  # texture levels: a palette is a lookup table of this many colours
_MAX_LEAVES = 1 << 20
_NONE = 1 << 62  # canvas value of a pixel no leaf covers yet
_EPS = 1e-6  # smallest |cos| and sin of a leaf angle
_LEAF_BANK = 1 << 15  # leaf shapes drawn once per dataset; an image picks its leaves among them
_BANK_SALT = 0x5DEECE66D
_LEAF_SALT = 0x2545F4914F6CDD1D
_FIRST_BATCH = 1.3  # first batch: this many times the leaves a Poisson estimate needs for the coverage
# Palette colours live in an opponent space (luminance, red-green, blue-yellow): uniform draws u
# become (0.05 + 0.9 u_L, sat * 0.5 (u_a - 0.5), sat * 0.5 (u_b - 0.5)), then RGB.
_OPP_LUM_SCALE = torch.tensor([0.9, 0.0, 0.0])
_OPP_CHROMA_SCALE = torch.tensor([0.0, 0.5, 0.5])  # times a per-leaf saturation in [0, 1)
_OPP_CENTER = torch.tensor([0.0, 0.5, 0.5])
_OPP_SHIFT = torch.tensor([0.05, 0.0, 0.0])
_OPP_TO_RGB255 = 255.0 * torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])  # rows: L, a, b
_HALF = torch.tensor(0.5)
# Per texture, per control point, per opponent channel: how far a point moves from the base colour
# towards its own random colour (noise: related colours; grating: independent; flat: one colour).
_PULL = torch.tensor(
    [
        [[0.0, 0.0, 0.0], [0.3, 0.3, 0.3], [0.6, 0.3, 0.3]],
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    ]
)


def power_law_radii(u: Tensor, exponent: float, r_min: float, r_max: float) -> Tensor:
    """Map uniform numbers ``u`` in ``[0, 1)`` to radii with density ``∝ r^-exponent`` on ``[r_min, r_max]``.

    Inverse-CDF sampling; ``exponent = 1`` is the log-uniform law.

    Args:
        u: uniform numbers, any shape.
        exponent: the exponent ``a`` of ``p(r) ∝ r^-a`` (any real).
        r_min: smallest radius (> 0).
        r_max: largest radius (>= ``r_min``).

    Returns:
        Radii, same shape and dtype as ``u``.

    Examples:
        >>> r = power_law_radii(torch.tensor([0.0, 0.75, 1.0], dtype=torch.float64), 3.0, 1.0, 100.0)
        >>> [round(v, 2) for v in r.tolist()]  # a quarter of the radii are >= 2 r_min when r_max >> r_min
        [1.0, 2.0, 100.0]
    """
    if r_max == r_min:
        return torch.full_like(u, r_min)
    e = 1.0 - exponent
    if abs(e) < 1e-9:
        return r_min * torch.exp(u * math.log(r_max / r_min))
    lo, hi = r_min**e, r_max**e
    return (lo + u * (hi - lo)).pow(1.0 / e)


def _texture_bank(
    count: int, size: int, alpha_range: tuple[float, float], generator: torch.Generator
) -> tuple[Tensor, dict[str, Tensor]]:
    """``count`` periodic ``1/f^alpha`` noise fields, then ``count`` gratings, of period ``size``.

    Values are quantised to ``_LEVELS`` levels (noise: mean +- 2 std spans them). Each field is
    stored tiled 2 x 2 as ``(2 size, 2 size)``, so a ``size x size`` window at any offset
    ``(oy, ox)`` in ``[0, size)^2`` reads without wrapping.

    Returns:
        ``(bank, info)``: ``(2 count * 4 size^2,)`` uint8 (flat), and the ``(count,)`` noise
        exponents ``alpha``, grating periods (pixels), orientations (radians) and sharpness.
    """
    g = generator
    lo, hi = alpha_range
    alphas = lo + (hi - lo) * torch.rand(count, generator=g, dtype=torch.float64)
    fy = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
    f = torch.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    white = torch.randn(count, size, size, generator=g, dtype=torch.float64)
    spectrum = torch.fft.rfft2(white) * f[None].pow(-alphas[:, None, None] / 2)  # power ∝ 1/f^alpha
    spectrum[:, 0, 0] = 0.0
    noise = torch.fft.irfft2(spectrum, s=(size, size))
    noise = noise / noise.flatten(1).std(1)[:, None, None]
    noise = (noise / 4 + 0.5) * (_LEVELS - 1)

    # Gratings with an integer number of cycles across the period (seamless when tiled).
    p = torch.rand(count, 3, generator=g, dtype=torch.float64)
    cycles_max = max(size / 4.0, 4.0)
    cycles = 4.0 * torch.exp(p[:, 0] * math.log(cycles_max / 4.0))  # period size/4 .. 4 px
    angle = p[:, 1] * math.pi
    nx = torch.round(cycles * torch.cos(angle))
    ny = torch.round(cycles * torch.sin(angle))
    nx = torch.where((nx == 0) & (ny == 0), torch.ones_like(nx), nx)
    sharp = 1.0 + 4.0 * p[:, 2]  # 1: sine .. 5: nearly square stripes
    coords = torch.arange(size, dtype=torch.float64)
    phase = 2 * math.pi / size * (nx[:, None, None] * coords[None, None, :] + ny[:, None, None] * coords[None, :, None])
    grating = (torch.sin(phase) * sharp[:, None, None]).clamp(-1.0, 1.0)
    grating = (grating + 1.0) / 2 * (_LEVELS - 1)

    fields = torch.cat([noise, grating]).round().clamp(0, _LEVELS - 1).to(torch.uint8)
    info = {
        "alpha": alphas.float(),
        "grating_period": (size / torch.sqrt(nx * nx + ny * ny)).float(),
        "grating_angle": torch.atan2(ny, nx).float(),
        "grating_sharpness": sharp.float(),
    }
    return fields.repeat(1, 2, 2).reshape(-1).contiguous(), info


def _leaf_table(
    count: int,
    size: int,
    radius_range: tuple[float, float],
    exponent: float,
    class_cdf: Tensor,
    class_shape: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``count`` random leaf shapes (pixels), with what the rasteriser needs precomputed.

    Radius ``r`` (of the disc of equal area) from the power law on ``radius_range * size``;
    class from ``class_cdf``; aspect ratio log-uniform in ``[1, 3]`` (discs: 1); orientation
    uniform in ``[0, pi)``. Rectangles have half-sides ``sqrt(pi) / 2 * r * (sqrt(aspect),
    1 / sqrt(aspect))``, ellipses semi-axes ``r * (sqrt(aspect), 1 / sqrt(aspect))``.

    A row at height ``dy`` from the centre crosses a leaf on the intersection of two slabs,
    ``x in m1 dy +- sqrt(h1 dy^2 + h0)`` and ``x in m2 dy +- w2`` (``x`` from the centre).
    Ellipse: the quadratic form of the leaf (``a2 = c^2 / a^2 + s^2 / b^2``, ``h0 = 1 / a2``,
    ``h1 = -h0^2 / (a b)^2``, ``m1 = c s (1 / b^2 - 1 / a^2) h0``), the second slab unbounded.
    Rectangle: ``|u| <= 1`` (slope ``-s / c``, half width ``a / |c|``) and ``|v| <= 1`` (slope
    ``c / s``, half width ``b / s``).

    Returns:
        ``(table, cls)``: ``(9, count)`` float32 rows ``radius, aspect, angle, m1, h1, h0, m2, w2,
        vertical half extent``, and the ``(count,)`` int64 classes.
    """
    g = generator
    u = torch.rand(4, count, generator=g, dtype=torch.float64)
    r = power_law_radii(u[0], exponent, radius_range[0] * size, radius_range[1] * size)
    cls = torch.bucketize(u[1], class_cdf.double(), right=True)
    shape = class_shape[cls]
    rect = shape == 2
    aspect = torch.where(shape == 0, 1.0, torch.exp(u[2] * math.log(_MAX_ASPECT)))
    angle = u[3] * math.pi
    scale = r * torch.where(rect, math.sqrt(math.pi) / 2, 1.0)  # rectangles: the area of the disc
    ha, hb = scale * aspect.sqrt(), scale / aspect.sqrt()
    c, si = torch.cos(angle), torch.sin(angle).clamp(min=_EPS)  # angle in [0, pi): sin >= 0
    c = torch.where(c.abs() < _EPS, _EPS, c)  # a slab of a nearly axis-aligned rectangle is then all or nothing
    ia2, ib2 = ha**-2, hb**-2
    h0 = 1.0 / (c * c * ia2 + si * si * ib2)
    ellipse = [c * si * (ib2 - ia2) * h0, -ia2 * ib2 * h0 * h0, h0, 0 * h0, 1e6 + 0 * h0, ha * hb / h0.sqrt()]
    rectangle = [-si / c, 0 * h0, (ha / c) ** 2, c / si, hb / si, ha * si + hb * c.abs()]
    slabs = [torch.where(rect, x, y) for x, y in zip(rectangle, ellipse)]
    return torch.stack([r, aspect, angle, *slabs]).float(), cls


def _check_probs(value: object, name: str, n: int) -> tuple[float, ...]:
    message = f"{name} must be a sequence of {n} numbers >= 0 with a positive sum, but got {value!r}"
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        raise ValueError(message)
    probs = tuple(check_number(v, f"{name}[{i}]", 0.0) for i, v in enumerate(value))
    if sum(probs) <= 0:
        raise ValueError(message)
    return probs


class DeadLeavesScenes(Dataset):
    """Dead-leaves images with textured leaves and per-pixel category masks (see the module docstring).

    Each item is generated on the fly from ``(seed, index)`` alone (the per-dataset shape and
    texture banks are themselves functions of ``seed``), so the dataset is deterministic, costs no
    disk and gives the same items in any DataLoader worker and any access order.

    Args:
        num_images: dataset length.
        image_size: side ``S`` of the square images in pixels (>= 16).
        num_classes: number of (shape, texture) categories used, 1 to 9 (labels ``1 ..
            num_classes``; ``0`` is background). Class ``c`` is ``CATEGORIES[c]``.
        seed: dataset seed (images and texture bank); use different seeds for training and validation.
        return_mask: return ``(image, mask)`` rather than the image alone.
        radius_range: ``(r_min, r_max)``, the smallest and largest leaf radius (radius of the disc
            of equal area) as fractions of ``image_size``.
        radius_exponent: ``a`` of the radius density ``p(r) ∝ r^-a`` (3: scale invariant).
        alpha_range: range of the noise exponent ``alpha`` (power spectrum ``∝ 1/|f|^alpha``;
            natural photographs average ``alpha ≈ 2``), drawn once per bank texture.
        texture_probs: relative frequency of the textures ``("noise", "grating", "flat")``;
            the three shapes are equally likely. Only the first ``num_classes`` categories are drawn.
        coverage: leaves are added until at least this fraction of the pixels is covered
            (``max_leaves`` permitting); the rest shows the background.
        max_leaves: most leaves per image.
        noise_background: background of ``1/f^alpha`` colour noise (``False``: a flat colour).
        blur: standard deviation in pixels of the final global blur (a 3-tap kernel), 0 to 0.8.
        bank_size: number of noise fields, and of gratings, in the per-dataset texture bank
            (memory: ``8 x bank_size x S^2`` bytes, 4 MiB at the defaults; the leaf-shape bank
            adds 1.4 MiB).
        as_pil: return PIL images instead of ``uint8`` tensors.

    Returns (per item):
        ``image`` ``(3, S, S)`` uint8 RGB tensor (or PIL image), and with ``return_mask`` the
        ``(S, S)`` int64 mask in ``[0, num_classes]``.

    Convention:
        Mask label ``0`` is background (no leaf), label ``c + 1`` is class ``c`` =
        ``CATEGORIES[c]``, the (shape, texture) category of the leaf on top at that pixel.
        Lengths are in pixels of the ``S x S`` image, pixel ``(i, j)`` centred at ``(x, y) =
        (j + 0.5, i + 0.5)``; ``radius_range`` is in fractions of ``S``.

    Raises:
        ValueError: an argument is out of range (the message names it, says what was expected
            and shows what was received).

    Examples:
        >>> ds = DeadLeavesScenes(num_images=10, image_size=64, seed=0)
        >>> image, mask = ds[3]
        >>> image.shape, image.dtype, mask.shape, mask.dtype
        (torch.Size([3, 64, 64]), torch.uint8, torch.Size([64, 64]), torch.int64)
        >>> again, _ = ds[3]
        >>> bool((again == image).all()), ds.num_labels, 0 <= int(mask.min()) <= int(mask.max()) <= 9
        (True, 10, True)
        >>> ds.class_info[4]
        {'label': 5, 'shape': 'ellipse', 'texture': 'grating'}
    """

    def __init__(
        self,
        num_images: int = 1000,
        image_size: int = 128,
        num_classes: int = 9,
        seed: int = 0,
        return_mask: bool = True,
        *,
        radius_range: tuple[float, float] = (0.03, 1.0),
        radius_exponent: float = 3.0,
        alpha_range: tuple[float, float] = (1.5, 2.5),
        texture_probs: tuple[float, float, float] = (0.5, 0.3, 0.2),
        coverage: float = 0.95,
        max_leaves: int = 5000,
        noise_background: bool = True,
        blur: float = 0.5,
        bank_size: int = 32,
        as_pil: bool = False,
    ) -> None:
        check_int(num_images, "num_images", 0)
        check_int(image_size, "image_size", 16, note="(pixels)")
        check_int(num_classes, "num_classes", 1)
        if num_classes > len(CATEGORIES):
            raise ValueError(
                f"num_classes must be an int in [1, {len(CATEGORIES)}] (one class per leaf shape x texture "
                f"category), but got {num_classes!r}"
            )
        check_int(seed, "seed", 0)
        self.radius_range = check_interval(radius_range, "radius_range", 0.0, 4.0)
        self.radius_exponent = check_number(radius_exponent, "radius_exponent", 0.0, 10.0)
        self.alpha_range = check_interval(alpha_range, "alpha_range", 0.0, 4.0)
        probs = _check_probs(texture_probs, "texture_probs", len(LEAF_TEXTURES))
        self.coverage = check_number(coverage, "coverage", 0.0, 1.0, open_low=True)
        check_int(max_leaves, "max_leaves", 1)
        if max_leaves > _MAX_LEAVES:
            raise ValueError(f"max_leaves must be an int in [1, {_MAX_LEAVES}], but got {max_leaves!r}")
        self.blur = check_number(blur, "blur", 0.0, 0.8, note="(pixels)")
        check_int(bank_size, "bank_size", 1)
        weights = [probs[c % len(LEAF_TEXTURES)] for c in range(num_classes)]
        if sum(weights) <= 0:
            raise ValueError(
                f"texture_probs must give a positive probability to a texture of the first num_classes = "
                f"{num_classes} categories {CATEGORIES[:num_classes]}, but got {texture_probs!r}"
            )
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.return_mask = return_mask
        self.texture_probs = probs
        self.max_leaves = int(max_leaves)
        self.noise_background = bool(noise_background)
        self.bank_size = int(bank_size)
        self.as_pil = as_pil

        w = torch.tensor(weights, dtype=torch.float64)
        self._class_cdf = (w.cumsum(0) / w.sum()).float()
        self._class_cdf[-1] = 2.0  # every u < 1 falls in a class
        cls = torch.arange(self.num_classes)
        self._class_shape = cls // len(LEAF_TEXTURES)
        self._class_texture = cls % len(LEAF_TEXTURES)
        # Leaf classes plus the background (class ``num_classes``, label 0).
        self._background_class = torch.tensor([self.num_classes])
        self._class_texture_bg = torch.cat([self._class_texture, torch.tensor([0 if self.noise_background else 2])])
        self._class_label_bg = torch.cat([cls + 1, torch.zeros(1, dtype=torch.long)])
        # Expected area of a leaf inside the image (fraction of it): a leaf of radius r has its
        # centre uniform on the square extended by r, so on average pi r^2 / (1 + 2r)^2 of it is
        # inside. A Poisson (Boolean model) estimate of the leaves the coverage needs sizes the
        # first batch.
        u = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096
        r = power_law_radii(u, self.radius_exponent, *self.radius_range)
        self._mean_area = float((math.pi * r * r / (1 + 2 * r) ** 2).mean())
        leaves_needed = -math.log(max(1.0 - self.coverage, 1e-3)) / self._mean_area
        self._batch = max(32, math.ceil(_FIRST_BATCH * leaves_needed))
        self._bank: Tensor | None = None
        self._bank_info: dict[str, Tensor] = {}
        self._leaves: tuple[Tensor, Tensor] | None = None
        self._cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def num_labels(self) -> int:
        """Number of mask labels including background (``num_classes + 1``)."""
        return self.num_classes + 1

    @property
    def class_info(self) -> list[dict[str, object]]:
        """The (shape, texture) category of each class, with its mask label.

        Examples:
            >>> DeadLeavesScenes(num_images=1, num_classes=2).class_info
            [{'label': 1, 'shape': 'disc', 'texture': 'noise'}, {'label': 2, 'shape': 'disc', 'texture': 'grating'}]
        """
        return [
            {"label": c + 1, "shape": CATEGORIES[c][0], "texture": CATEGORIES[c][1]} for c in range(self.num_classes)
        ]

    @property
    def bank_info(self) -> dict[str, Tensor]:
        """The texture bank: ``alpha`` of each noise field, ``grating_period`` (pixels), ``grating_angle``
        (radians) and ``grating_sharpness`` of each grating, all ``(bank_size,)``."""
        self._get_bank()
        return dict(self._bank_info)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> object:
        image, mask, _ = self._render(self._check_index(index), with_layout=False)
        out: object = image
        if self.as_pil:
            from PIL import Image

            out = Image.fromarray(image.permute(1, 2, 0).numpy())
        return (out, mask) if self.return_mask else out

    def layout(self, index: int) -> dict[str, Tensor]:
        """The leaves of item ``index``, front (on top) to back, and which one is visible where.

        Returns:
            A dict of tensors over the ``L`` leaves that fell: ``radius`` (pixels, radius of the
            disc of equal area), ``center`` ``(L, 2)`` ``(x, y)`` pixels, ``aspect``, ``angle``
            (radians), ``label`` (mask label, ``1 .. num_classes``), ``shape`` and ``texture``
            (indices into ``("disc", "ellipse", "rectangle")`` and ``("noise", "grating",
            "flat")``), and ``leaf_map`` ``(S, S)`` int64: the index of the leaf on top at each
            pixel, ``-1`` for background. ``mask == where(leaf_map >= 0, label[leaf_map], 0)``.

        Examples:
            >>> ds = DeadLeavesScenes(num_images=2, image_size=32, seed=0)
            >>> info = ds.layout(1)
            >>> m = info["leaf_map"]
            >>> labels = torch.where(m >= 0, info["label"][m.clamp_min(0)], 0)
            >>> bool((labels == ds[1][1]).all())
            True
        """
        _, _, info = self._render(self._check_index(index), with_layout=True)
        assert info is not None
        return info

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_bank"] = None  # rebuilt (identically) where needed: the dataset pickles small
        state["_bank_info"] = {}
        state["_leaves"] = None
        state["_cache"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"DeadLeavesScenes(num_images={self.num_images}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )

    # ------------------------------------------------------------------ internals
    def _check_index(self, index: int) -> int:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} is out of range for a DeadLeavesScenes of {self.num_images} images")
        return int(index) % self.num_images

    def _get_bank(self) -> Tensor:
        if self._bank is None:
            g = torch.Generator().manual_seed(_seed_for(self.seed ^ _BANK_SALT, self.image_size))
            self._bank, self._bank_info = _texture_bank(self.bank_size, self.image_size, self.alpha_range, g)
        return self._bank

    def _get_leaf_bank(self) -> tuple[Tensor, Tensor]:
        if self._leaves is None:
            g = torch.Generator().manual_seed(_seed_for(self.seed ^ _LEAF_SALT, self.image_size))
            self._leaves = _leaf_table(
                _LEAF_BANK, self.image_size, self.radius_range, self.radius_exponent, self._class_cdf,
                self._class_shape, g,
            )
        return self._leaves

    def _get_cache(self) -> dict[str, Any]:
        if self._cache is None:
            s = self.image_size
            ar = torch.arange(s)
            yy, xx = torch.meshgrid(ar, ar, indexing="ij")
            pr = torch.arange(-1, s + 1).clamp_(0, s - 1)  # padded coordinate -> source coordinate
            t = torch.linspace(0.0, 1.0, _LEVELS, dtype=torch.float32)
            self._cache = {
                "bank_off": (yy * (2 * s) + xx).reshape(-1),  # pixel offset inside a tiled bank field
                "basis": torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t * t], dim=1),  # (levels, 3) Bernstein
                # Replicate padding by one pixel, as indices into the flat image.
                "pad_index": (pr[:, None] * s + pr[None, :]).reshape(-1),
                "bank_off_pad": (pr[:, None] * (2 * s) + pr[None, :]).reshape(-1),
                "bank_scale": torch.tensor([float(self.bank_size), float(s), float(s)]),
                "bank_stride": torch.tensor([4 * s * s, 2 * s, 1]),
                "texture_field": torch.tensor([0, self.bank_size * 4 * s * s, 0]),  # gratings follow the noise
            }
        return self._cache

    def _sample_leaves(self, g: torch.Generator, n: int) -> dict[str, Tensor]:
        """``n`` leaves: shapes drawn from the leaf bank, centres uniform on the square extended by ``r``."""
        table = self._get_leaf_bank()[0]
        pick = torch.randint(table.shape[1], (n,), generator=g)
        geo = table.index_select(1, pick)  # (9, n), rows as in _leaf_table
        r = geo[0]
        center = torch.rand(2, n, generator=g).mul_(self.image_size + 2 * r).sub_(r)  # (2, n) x, y pixels
        return {"pick": pick, "geo": geo, "center": center}

    def _paint(self, canvas: Tensor, leaves: dict[str, Tensor], first_run: int) -> Tensor:
        """Lower each pixel of the flat ``(S * S,)`` int64 ``canvas`` to the front-most run covering it.

        Exact rasterisation by row runs: for every image row a leaf crosses, the run of pixel
        centres inside it is the intersection of the leaf's two slabs (see :func:`_leaf_table`).
        Runs are numbered from ``first_run`` in leaf order (a leaf's runs lie on different
        rows), so the smallest run number at a pixel is the front-most leaf there; one
        ``scatter_reduce`` over all expanded runs keeps it. Work is proportional to the leaves'
        area inside the image, with a fixed number of tensor operations.

        Returns:
            ``(R,)`` int64: the leaf (index into ``leaves``) of each run.
        """
        s = self.image_size
        m1, h1, h0, m2, w2, ey = leaves["geo"][3:].unbind(0)
        cx, cy = leaves["center"].unbind(0)
        row_lo = torch.ceil(cy - ey - 0.5).clamp_(min=0)
        rows = (torch.floor(cy + ey - 0.5).clamp_(max=s - 1) - row_lo + 1).clamp_(min=0).long()
        n_rows = int(rows.sum())
        if n_rows == 0:
            return rows.new_zeros(0)
        row_lo -= rows.cumsum(0) - rows  # + row number in the run list = image row
        table = torch.stack([row_lo, row_lo + 0.5 - cy, cx - 0.5, m1, h1, h0, m2, w2])
        # One column per (leaf, row): image row, dy of the row's pixel centres, then the slabs.
        row, dy, x0, m1, h1, h0, m2, w2 = torch.repeat_interleave(table, rows, dim=1, output_size=n_rows).unbind(0)
        k = self._arange(n_rows)
        row += k
        dy += k
        hw = torch.addcmul(h0, h1, dy * dy)
        hw /= hw.abs().sqrt_().clamp_(min=1e-12)  # signed sqrt: negative = the row misses the ellipse
        c1 = torch.addcmul(x0, m1, dy)  # slab centres, pixel-centre x coordinates
        c2 = torch.addcmul(x0, m2, dy)
        j_lo = torch.maximum(c1 - hw, c2 - w2).ceil_().clamp_(0, s)
        length = torch.minimum(c1.add_(hw), c2.add_(w2)).floor_().clamp_(-1, s - 1).sub_(j_lo).add_(1).clamp_(min=0)
        length = length.long()
        n_pix = int(length.sum())
        if n_pix > 0:
            # Expand the runs: pixel = base of its run + position in the whole list of pixels.
            base = row.mul_(s).add_(j_lo).long().sub_(length.cumsum(0)).add_(length)
            run = torch.repeat_interleave(length)  # (n_pix,) run of each pixel
            pix = base.index_select(0, run).add_(self._arange(n_pix, torch.long))
            canvas.scatter_reduce_(0, pix, run.add_(first_run) if first_run else run, "amin")
        return torch.repeat_interleave(rows)

    def _arange(self, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``arange(n)`` in ``dtype`` (float32 or int64), a view of a cached buffer."""
        cache = self._get_cache()
        key = f"arange_{dtype}"
        buf = cache.get(key)
        if buf is None or len(buf) < n:
            buf = torch.arange(max(n, 8 * self.image_size * self.image_size), dtype=dtype)
            cache[key] = buf
        return buf[:n]

    def _render(self, index: int, with_layout: bool) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
        s = self.image_size
        c = self._get_cache()
        bank = self._get_bank()
        g = torch.Generator().manual_seed(_seed_for(self.seed, index))

        # ------------------------------------------------------------ occlusion: front to back
        # Leaves are painted in batches (leaf j of the sequence lies under leaves 0 .. j-1);
        # the sequence is then cut right after the first leaf at which the covered fraction
        # reaches ``coverage``, exactly as if leaves had been added one at a time.
        canvas = torch.full((s * s,), _NONE, dtype=torch.long)
        need = math.ceil(self.coverage * s * s)
        batches, run_leaf = [], []
        total = runs = 0
        n = min(self._batch, self.max_leaves)
        while True:
            leaves = self._sample_leaves(g, n)
            run_leaf.append(self._paint(canvas, leaves, runs) + total)
            runs += len(run_leaf[-1])
            batches.append(leaves)
            total += n
            # Leaf on top at each pixel (``total`` = none): the leaf of the run on top.
            leaf_of = F.pad(torch.cat(run_leaf) if len(run_leaf) > 1 else run_leaf[0], (0, 1), value=total)
            idx = leaf_of.take(canvas.clamp(max=runs))
            covered = torch.bincount(idx, minlength=total + 1)[:total].cumsum_(0)
            if int(covered[-1]) >= need or total >= self.max_leaves:
                break
            missing = 1.0 - float(covered[-1]) / (s * s)
            extra = 1.5 * math.log(missing / max(1.0 - self.coverage, 0.5 / (s * s))) / self._mean_area
            n = min(max(32, math.ceil(extra)), self.max_leaves - total)
        kept = min(int(torch.searchsorted(covered, need)) + 1, total)
        if len(batches) > 1:
            leaves = {k: torch.cat([b[k] for b in batches], dim=-1) for k in leaves}
        leaves = {k: v[..., :kept] for k, v in leaves.items()}
        idx = idx.clamp_max_(kept)  # ``kept`` = background
        m = kept + 1  # the background is one more "leaf"

        # ------------------------------------------------------------ per leaf: texture and palette
        leaf_cls = self._get_leaf_bank()[1].take(leaves["pick"])
        cls = torch.cat([leaf_cls, self._background_class])
        texture = self._class_texture_bg[cls]  # (m,): 0 noise, 1 grating, 2 flat
        p = torch.rand(m, 13, generator=g)
        # Palette: three control colours in an opponent space (luminance, red-green, blue-yellow),
        # luminance 0.05 .. 0.95 and chroma within +-0.25 times a per-leaf saturation (photographs
        # are mostly muted); the second and third are pulled towards the first by a texture-
        # dependent amount (noise: related colours; grating: independent; flat: one colour).
        scale = torch.addcmul(_OPP_LUM_SCALE, p[:, 12:13], _OPP_CHROMA_SCALE)  # (m, 3)
        opp = torch.addcmul(_OPP_SHIFT, p[:, :9].view(m, 3, 3) - _OPP_CENTER, scale[:, None, :])
        base = opp[:, :1]
        opp = torch.addcmul(base, _PULL[texture], opp - base)
        # RGB control colours in 0.5 .. 255.5 (the rounding offset folded in).
        ctrl = torch.addmm(_HALF, opp.view(3 * m, 3), _OPP_TO_RGB255).clamp_(0.5, 255.5).view(m, 3, 3)
        # Colour table (3, levels * m): entry t * m + j is level t of leaf j, a Bernstein path
        # through its three control colours.
        lut = torch.matmul(c["basis"], ctrl.permute(2, 1, 0)).view(3, _LEVELS * m)
        # Texture source: a bank field (noise or grating by texture) at a random toroidal offset.
        field = (p[:, 9:12] * c["bank_scale"]).long()  # (m, 3) field, oy, ox
        start = (field * c["bank_stride"]).sum(1).add_(c["texture_field"][texture])

        # ------------------------------------------------------------ per pixel: gather and compose
        # With blur, colours are gathered on the image padded by one replicated pixel.
        src, off, side = (idx, c["bank_off"], s)
        if self.blur > 0:
            src, off, side = idx.take(c["pad_index"]), c["bank_off_pad"], s + 2
        level = bank.take(start.take(src).add_(off))
        image = lut.index_select(1, torch.add(src, level.long(), alpha=m)).view(3, side, side)
        if self.blur > 0:
            # Kernel [w, 1 - 2w, w] (variance 2w = blur^2) along y, then x.
            w = 0.5 * self.blur**2
            image = torch.add(image[:, :-2], image[:, 2:]).mul_(w).add_(image[:, 1:-1], alpha=1 - 2 * w)
            image = torch.add(image[:, :, :-2], image[:, :, 2:]).mul_(w).add_(image[:, :, 1:-1], alpha=1 - 2 * w)
        image = image.to(torch.uint8)  # values in [0.5, 255.5]: truncation rounds

        mask = self._class_label_bg.take(cls).take(idx).view(s, s)
        if not with_layout:
            return image, mask, None
        radius, aspect, angle = leaves["geo"][:3]
        info = {
            "radius": radius,
            "center": leaves["center"].t(),
            "aspect": aspect,
            "angle": angle,
            "label": leaf_cls + 1,
            "shape": self._class_shape[leaf_cls],
            "texture": texture[:-1],
            "leaf_map": torch.where(idx == kept, -1, idx).view(s, s),
        }
        return image, mask, info
