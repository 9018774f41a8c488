"""Procedurally generated scenes: the embedded default dataset (no download, deterministic).

Every image is a textured background with several overlapping objects. Each object belongs to
one of ``num_classes`` classes, and a class has a consistent identity:

* a **shape family** (ellipse, rectangle, triangle or wobbly blob), with random size, aspect
  ratio, rotation and position;
* a **texture** (stripes with a class-specific frequency and orientation, checkerboard, dots or
  fine noise), drawn at a fixed scale in image space so local appearance is scale-consistent;
* a **two-colour palette** (a class hue, evenly spaced around the colour wheel), jittered
  per object.

Classes are therefore recognisable from local appearance (colour and texture), which is what a
dense linear probe on top of a pre-trained backbone measures. The class table depends only on
``num_classes`` (not on ``seed``), so a training set and a validation set built with different
seeds share their classes.

Convention:
    Images are ``uint8`` tensors ``(3, H, W)`` (RGB, ``H = W = image_size``) or PIL images with
    ``as_pil=True``. Masks are ``(H, W)`` ``int64`` with ``0`` = background and ``1 ..
    num_classes`` = object classes; a pixel takes the class of the topmost object covering it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from densecontrast._checks import check_int

__all__ = ["SyntheticScenes", "render_scene"]

SHAPES = ("ellipse", "rectangle", "triangle", "blob")
TEXTURES = ("stripes", "checker", "dots", "noise")
_MASK64 = (1 << 63) - 1


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``(..., )`` hue/saturation/value in ``[0, 1]`` -> ``(..., 3)`` RGB in ``[0, 1]``."""
    k = torch.stack([torch.full_like(h, 5.0), torch.full_like(h, 3.0), torch.full_like(h, 1.0)], dim=-1)
    k = (k + h[..., None] * 6.0) % 6.0
    f = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[..., None] - v[..., None] * s[..., None] * f


def _class_table(num_classes: int) -> dict[str, Tensor]:
    """The fixed identity of each class (depends only on ``num_classes``)."""
    g = torch.Generator().manual_seed(90210 + num_classes)
    c = torch.arange(num_classes)
    shape = c % len(SHAPES)
    texture = (c + c // len(SHAPES)) % len(TEXTURES)
    hue = (c.float() + 0.5 * torch.rand(num_classes, generator=g)) / num_classes
    # Stripe/checker/dot frequency in cycles per image width; orientation in radians.
    freq = 7.0 + 3.0 * (c % 3).float() + 2.0 * torch.rand(num_classes, generator=g)
    angle = (c.float() * 2.399963) % math.pi  # golden-angle spread of orientations
    sat = 0.55 + 0.35 * torch.rand(num_classes, generator=g)
    return {"shape": shape, "texture": texture, "hue": hue, "freq": freq, "angle": angle, "sat": sat}


def _seed_for(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, index)`` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


def render_scene(
    generator: torch.Generator,
    image_size: int = 128,
    num_classes: int = 8,
    min_objects: int = 3,
    max_objects: int = 8,
    table: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one scene with the random numbers of ``generator`` (the work horse of :class:`SyntheticScenes`).

    Args:
        generator: a seeded CPU ``torch.Generator``; the scene is a pure function of its state.
        image_size: side ``S`` of the square image in pixels.
        num_classes: number of object classes.
        min_objects: fewest objects in a scene.
        max_objects: most objects in a scene.
        table: the class table (internal; built from ``num_classes`` when omitted).

    Returns:
        ``(image, mask)``: ``(3, S, S)`` uint8 RGB and ``(S, S)`` int64 labels in ``[0, num_classes]``.

    Examples:
        >>> image, mask = render_scene(torch.Generator().manual_seed(0), image_size=32)
        >>> image.shape, image.dtype, mask.shape, int(mask.max()) <= 8
        (torch.Size([3, 32, 32]), torch.uint8, torch.Size([32, 32]), True)
    """
    g = generator
    s = image_size
    t = table if table is not None else _class_table(num_classes)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731

    # ---------------------------------------------------------------- background
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S) image space
    bg_hsv = rand(2, 3)
    bg_cols = _hsv_to_rgb(bg_hsv[:, 0], 0.1 + 0.3 * bg_hsv[:, 1], 0.3 + 0.5 * bg_hsv[:, 2])  # (2, 3)
    theta = rand(1) * 2 * math.pi
    ramp = (xx - 0.5) * torch.cos(theta) + (yy - 0.5) * torch.sin(theta)
    ramp = (ramp / math.sqrt(0.5) + 1) / 2  # [0, 1]
    image = bg_cols[0, :, None, None] * (1 - ramp) + bg_cols[1, :, None, None] * ramp  # (3, S, S)
    low = F.interpolate(rand(1, 3, 5, 5) - 0.5, size=(s, s), mode="bilinear", align_corners=False)[0]
    image = image + 0.25 * low

    # ---------------------------------------------------------------- objects
    k = int(torch.randint(min_objects, max_objects + 1, (1,), generator=g))
    cls = torch.randint(0, num_classes, (k,), generator=g)
    p = rand(k, 10)
    center = 0.1 + 0.8 * p[:, 0:2]  # (k, 2) x, y
    radius = 0.07 + 0.18 * p[:, 2]
    aspect = 0.6 + 0.8 * p[:, 3]
    rx, ry = radius * aspect.sqrt(), radius / aspect.sqrt()
    rot = p[:, 4] * 2 * math.pi
    shape = t["shape"][cls]

    # Paint objects in order (painter's algorithm: the topmost object covering a pixel wins),
    # each evaluated only on its bounding square.
    top = torch.zeros(s, s, dtype=torch.int64)  # 0 = background, j + 1 = object j
    tri_ang = [math.pi / 2 + i * 2 * math.pi / 3 for i in range(3)]
    for j, (cx, cy, a_x, a_y, r_j, fam, ph1, ph2) in enumerate(
        zip(*(v.tolist() for v in (center[:, 0], center[:, 1], rx, ry, rot, shape, p[:, 5], p[:, 6])))
    ):
        ext = 1.25 * max(a_x, a_y)
        x0, x1 = max(0, int((cx - ext) * s)), min(s, int((cx + ext) * s) + 1)
        y0, y1 = max(0, int((cy - ext) * s)), min(s, int((cy + ext) * s) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        dx = coords[x0:x1][None, :] - cx
        dy = coords[y0:y1][:, None] - cy
        cr, sr = math.cos(r_j), math.sin(r_j)
        lx = (dx * cr + dy * sr) / a_x
        ly = (dy * cr - dx * sr) / a_y
        if fam == 0:  # ellipse
            inside = lx * lx + ly * ly <= 1.0
        elif fam == 1:  # rectangle
            inside = torch.maximum(lx.abs(), ly.abs()) <= 0.8
        elif fam == 2:  # triangle: three half-planes
            proj = [lx * math.cos(a) + ly * math.sin(a) for a in tri_ang]
            inside = torch.maximum(torch.maximum(proj[0], proj[1]), proj[2]) <= 0.6
        else:  # blob: a wobbly radius
            ang = torch.atan2(ly, lx)
            edge = 0.9 + 0.2 * torch.sin(3 * ang + ph1 * 2 * math.pi) + 0.12 * torch.sin(5 * ang + ph2 * 2 * math.pi)
            inside = lx * lx + ly * ly <= edge * edge
        top[y0:y1, x0:x1].masked_fill_(inside, j + 1)
    covered = top > 0
    idx = (top - 1).clamp_min(0)  # (S, S) index of the visible object

    # Per-object parameters, gathered once per pixel for the visible object.
    hue = (t["hue"][cls] + (p[:, 8] - 0.5) * 0.04) % 1.0
    sat = (t["sat"][cls] + (p[:, 9] - 0.5) * 0.15).clamp(0, 1)
    bright = 0.8 + 0.2 * rand(k)
    params = torch.cat(
        [
            t["texture"][cls, None].float(),
            (t["angle"][cls] + (p[:, 7] - 0.5) * 0.3)[:, None],  # class orientation + small jitter
            t["freq"][cls, None],
            _hsv_to_rgb(hue, sat, bright),
            _hsv_to_rgb((hue + 0.06) % 1.0, sat, 0.35 * bright),
            (cls + 1)[:, None].float(),
        ],
        dim=1,
    )  # (k, 10)
    px = params.index_select(0, idx.view(-1)).view(s, s, 10)
    tex, ta, freq = px[..., 0], px[..., 1], px[..., 2]
    col_a, col_b = px[..., 3:6].permute(2, 0, 1), px[..., 6:9].permute(2, 0, 1)

    # Texture in image space (fixed scale), so local appearance does not depend on object size.
    ca, sa = torch.cos(ta), torch.sin(ta)
    tu = (xx * ca + yy * sa) * freq
    tv = (yy * ca - xx * sa) * freq
    value = 0.5 + 0.5 * torch.sin(2 * math.pi * tu)  # stripes
    checker = ((torch.floor(tu) + torch.floor(tv)) % 2).float()
    value = torch.where(tex == 1, checker, value)
    dots = ((tu - torch.round(tu)) ** 2 + (tv - torch.round(tv)) ** 2 < 0.09).float()
    value = torch.where(tex == 2, dots, value)
    fine = F.interpolate(rand(1, 1, s // 2 + 1, s // 2 + 1), size=(s, s), mode="nearest")[0, 0]
    value = torch.where(tex == 3, fine, value)

    painted = col_b + (col_a - col_b) * value
    image = torch.where(covered[None], painted, image)
    mask = torch.where(covered, px[..., 9].long(), torch.zeros_like(top))

    image = image + 0.03 * (rand(3, s, s) - 0.5)
    image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image, mask.long()


class SyntheticScenes(Dataset):
    """Procedurally generated scene images with per-pixel class masks (see the module docstring).

    Each item is generated on the fly from ``(seed, index)`` alone, so the dataset is fully
    deterministic, costs no disk, and works with any number of DataLoader workers.

    Args:
        num_images: dataset length.
        image_size: side of the square images in pixels.
        num_classes: number of object classes (labels ``1 .. num_classes``; ``0`` is background).
        seed: dataset seed; use different seeds for training and validation sets.
        return_mask: return ``(image, mask)`` rather than the image alone.
        min_objects: fewest objects per scene.
        max_objects: most objects per scene.
        as_pil: return PIL images instead of ``uint8`` tensors.

    Returns (per item):
        ``image`` ``(3, S, S)`` uint8 RGB tensor (or PIL image), and with ``return_mask`` the
        ``(S, S)`` int64 mask.

    Examples:
        >>> ds = SyntheticScenes(num_images=10, image_size=64, seed=0)
        >>> image, mask = ds[3]
        >>> image.shape, image.dtype, mask.shape, mask.dtype
        (torch.Size([3, 64, 64]), torch.uint8, torch.Size([64, 64]), torch.int64)
        >>> again, _ = ds[3]
        >>> bool((again == image).all()), ds.num_labels
        (True, 9)
    """

    def __init__(
        self,
        num_images: int = 1000,
        image_size: int = 128,
        num_classes: int = 8,
        seed: int = 0,
        return_mask: bool = True,
        *,
        min_objects: int = 3,
        max_objects: int = 8,
        as_pil: bool = False,
    ) -> None:
        check_int(num_images, "num_images", 0)
        check_int(image_size, "image_size", 8, note="(pixels)")
        check_int(num_classes, "num_classes", 1)
        check_int(min_objects, "min_objects", 1)
        check_int(max_objects, "max_objects", 1)
        if min_objects > max_objects:
            raise ValueError(
                f"min_objects and max_objects must satisfy 1 <= min_objects <= max_objects, "
                f"but got {min_objects} and {max_objects}"
            )
        check_int(seed, "seed", 0)
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.return_mask = return_mask
        self.min_objects = int(min_objects)
        self.max_objects = int(max_objects)
        self.as_pil = as_pil
        self._table = _class_table(self.num_classes)

    @property
    def num_labels(self) -> int:
        """Number of mask labels including background (``num_classes + 1``)."""
        return self.num_classes + 1

    @property
    def class_info(self) -> list[dict[str, object]]:
        """The identity of each class: shape family, texture, hue, frequency and orientation.

        Examples:
            >>> first = SyntheticScenes(num_images=1, num_classes=2).class_info[0]
            >>> first.get("shape")
            'ellipse'
        """
        t = self._table
        return [
            {
                "label": c + 1,
                "shape": SHAPES[int(t["shape"][c])],
                "texture": TEXTURES[int(t["texture"][c])],
                "hue": float(t["hue"][c]),
                "frequency": float(t["freq"][c]),
                "orientation": float(t["angle"][c]),
            }
            for c in range(self.num_classes)
        ]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> object:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} is out of range for a SyntheticScenes of {self.num_images} images")
        index = int(index) % self.num_images
        g = torch.Generator().manual_seed(_seed_for(self.seed, index))
        image, mask = render_scene(
            g, self.image_size, self.num_classes, self.min_objects, self.max_objects, table=self._table
        )
        out: object = image
        if self.as_pil:
            from PIL import Image

            out = Image.fromarray(image.permute(1, 2, 0).numpy())
        return (out, mask) if self.return_mask else out

    def __repr__(self) -> str:
        return (
            f"SyntheticScenes(num_images={self.num_images}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )
