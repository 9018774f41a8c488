"""Correspondence accuracy of a backbone's dense features (LC-loss paper, Section 4.6).

Each image is shown to the backbone twice: a clean **query** view and a **key** view made by a
known spatial transform (a horizontal flip, or random resized crops + flips) plus colour
transforms. Every query feature cell is matched to its most cosine-similar key cell (argmax),
and the match is compared with the true correspondence, which the view geometry gives exactly.

Convention:
    * Images are float ``(B, 3, H, W)`` in ``[0, 1]`` (``uint8`` is divided by 255). The ImageNet
      normalization is applied to every view just before the backbone (``normalize=True``).
    * Feature cell ``(i, j)`` of an ``h x w`` map has view-space center
      ``((j + 0.5) / w, (i + 0.5) / h)``; cells are flattened row-major (``i * w + j``).
    * The **true key cell** of a query cell is the key cell whose area contains the query cell
      center's image point: ``round(to_cells(point))`` in the key view. A query is **valid** iff
      that point lies inside the key view (always, in ``"flip"`` mode).
    * **exact**: the matched cell is the true cell. **within one**: Chebyshev distance (in key
      cells) ``max(|di|, |dj|) <= 1``. Both are fractions of the valid queries.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from densecontrast._checks import check_choice, check_geometry_pair, check_int, check_interval, check_shape, check_size
from densecontrast.backbones import Backbone, backbone_device, extract_features
from densecontrast.geometry import ViewGeometry
from densecontrast.matching.coordinate import cell_distance, nearest_coordinate_match
from densecontrast.matching.similarity import similarity_match

__all__ = [
    "color_augment",
    "correspondence_accuracy",
    "iter_image_batches",
    "match_correctness",
    "random_crops",
    "render_views",
]

# ------------------------------------------------------------------------------------ helpers
def _to_float_image(x: Any, name: str = "images") -> Tensor:
    """A PIL image / ``(3, H, W)`` tensor -> float32 ``(3, H, W)`` in ``[0, 1]``."""
    if not isinstance(x, Tensor):
        if type(x).__module__.startswith("PIL.") and hasattr(x, "convert"):
            x = TF.pil_to_tensor(x.convert("RGB"))
        else:
            raise ValueError(f"{name} must yield PIL images or (3, H, W) tensors, but got {type(x).__name__}")
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"{name} must yield (3, H, W) images, but got shape {tuple(x.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _resize(x: Tensor, size: tuple[int, int] | None, mode: str = "bilinear") -> Tensor:
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x[None, None].float(), size=size, mode="nearest")[0, 0].to(x.dtype)
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def iter_image_batches(
    images: Tensor | Iterable[Any],
    batch_size: int,
    size: int | Sequence[int] | None = None,
    max_images: int | None = None,
    with_masks: bool = False,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Batches ``(images (B, 3, H, W) float [0, 1], masks (B, H, W) long | None)`` from a tensor or a dataset.

    Dataset items may be images or tuples ``(image, mask, ...)``; with ``with_masks`` the second
    element is taken as the ``(H, W)`` mask (resized with nearest neighbour when ``size`` is set).
    """
    hw = None if size is None else check_size(size)
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 3, H, W), but got {tuple(images.shape)}")
        if with_masks:
            raise ValueError("images must be a dataset yielding (image, mask) pairs when masks are needed")
        x = images[:max_images] if max_images is not None else images
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        for s in range(0, x.shape[0], batch_size):
            b = x[s : s + batch_size]
            if hw is not None and tuple(b.shape[-2:]) != hw:
                b = F.interpolate(b, size=hw, mode="bilinear", align_corners=False, antialias=True)
            yield b, None
        return
    buf: list[Tensor] = []
    mbuf: list[Tensor] = []
    n = 0
    for item in images:
        if max_images is not None and n >= max_images:
            break
        image = item[0] if isinstance(item, (tuple, list)) else item
        img = _resize(_to_float_image(image), hw)
        if buf and img.shape != buf[0].shape:
            raise ValueError(
                f"images must all have the same size to be batched (got {tuple(buf[0].shape)} and "
                f"{tuple(img.shape)}); pass size=(H, W) to resize them"
            )
        buf.append(img)
        if with_masks:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError("the dataset must yield (image, mask) pairs, but an item has no mask")
            mask = torch.as_tensor(item[1]).long()
            if mask.dim() != 2:
                raise ValueError(f"masks must have shape (H, W), but got {tuple(mask.shape)}")
            mbuf.append(_resize(mask, tuple(img.shape[-2:]), mode="nearest"))
        n += 1
        if len(buf) == batch_size:
            yield torch.stack(buf), (torch.stack(mbuf) if with_masks else None)
            buf, mbuf = [], []
    if buf:
        yield torch.stack(buf), (torch.stack(mbuf) if with_masks else None)


def color_augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    gray_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> Tensor:
    """Per-image colour jitter, random grayscale and Gaussian blur, drawn from ``generator``.

    The LC-loss evaluation's colour transforms (BYOL strengths), deterministic given the
    generator (unlike ``torchvision``'s global-RNG transforms). Pixels do not move.

    Args:
        x: ``(B, 3, H, W)`` float in ``[0, 1]``.
        generator: CPU generator for the random parameters.
        jitter: ``(brightness, contrast, saturation, hue)`` strengths.
        jitter_p: probability of the jitter (the four factors applied in a random order).
        gray_p: probability of grayscale.
        blur_p: probability of a Gaussian blur, sigma uniform in ``blur_sigma`` pixels
            (kernel about 10% of the view size, odd).

    Returns:
        ``(B, 3, H, W)`` float in ``[0, 1]``.

    Examples:
        >>> out = color_augment(torch.rand(2, 3, 8, 8), torch.Generator().manual_seed(0))
        >>> out.shape, bool((out >= 0).all() and (out <= 1).all())
        (torch.Size([2, 3, 8, 8]), True)
    """
    g = generator
    out = []
    h, w = x.shape[-2:]
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    for img in x:
        u = torch.rand(9, generator=g).tolist()
        if u[0] < jitter_p:
            b, c, s, hue = jitter
            ops = [
                lambda t, f=1 + b * (2 * u[1] - 1): TF.adjust_brightness(t, f),
                lambda t, f=1 + c * (2 * u[2] - 1): TF.adjust_contrast(t, f),
                lambda t, f=1 + s * (2 * u[3] - 1): TF.adjust_saturation(t, f),
                lambda t, f=hue * (2 * u[4] - 1): TF.adjust_hue(t, f),
            ]
            for i in torch.randperm(4, generator=g).tolist():
                img = ops[i](img).clamp(0, 1)
        if u[5] < gray_p:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if u[6] < blur_p:
            sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[7]
            img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
        out.append(img)
    return torch.stack(out)


_COLOR_ARGS = tuple(
    name for name, p in inspect.signature(color_augment).parameters.items() if p.kind is p.KEYWORD_ONLY
)
"""The strengths :func:`color_augment` takes by keyword (what a ``color=`` mapping may set)."""


def _color_kwargs(color: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """``color`` as :func:`color_augment` keyword arguments (``None``: no colour transforms)."""
    if isinstance(color, bool):
        return {} if color else None
    if not isinstance(color, Mapping):
        raise TypeError(f"color must be a bool or a mapping of color_augment arguments, but got {type(color).__name__}")
    unknown = sorted(set(color) - set(_COLOR_ARGS))
    if unknown:
        raise ValueError(f"color has unknown color_augment arguments {unknown}; expected some of {list(_COLOR_ARGS)}")
    return dict(color)


def random_crops(
    image_size: tuple[int, int],
    batch: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> ViewGeometry:
    """Random resized crop boxes (continuous pixels) and flips as a :class:`~densecontrast.geometry.ViewGeometry`.

    Args:
        image_size: ``(H, W)`` of the images in pixels.
        batch: number of views ``B``.
        generator: CPU generator.
        scale: crop area range, fractions of the image area.
        ratio: aspect-ratio (width / height) range, sampled log-uniformly.
        flip_p: probability of a horizontal flip.

    Returns:
        ``B`` views; boxes lie inside the image.

    Examples:
        >>> g = random_crops((32, 48), 4, torch.Generator().manual_seed(0))
        >>> len(g), bool((g.boxes[:, 2] <= 48).all() and (g.boxes[:, 3] <= 32).all())
        (4, True)
    """
    h, w = image_size
    u = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * h * w
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    cw = torch.sqrt(area * torch.exp(logr)).clamp(1.0, w)
    ch = torch.sqrt(area / torch.exp(logr)).clamp(1.0, h)
    x0 = (w - cw) * u[:, 2]
    y0 = (h - ch) * u[:, 3]
    boxes = torch.stack([x0, y0, x0 + cw, y0 + ch], dim=-1).float()
    flips = u[:, 4] < flip_p
    return ViewGeometry.from_crops(boxes, flips, torch.tensor([float(w), float(h)]))


def render_views(images: Tensor, geometry: ViewGeometry, size: tuple[int, int]) -> Tensor:
    """Resample ``(B, 3, H, W)`` images into views of ``size = (h, w)`` pixels, exactly as ``geometry`` says.

    View pixel centers are sampled bilinearly at their image points (``ViewGeometry.grid``), so
    the views agree with the geometry to floating point.

    Examples:
        >>> img = torch.rand(1, 3, 4, 6)
        >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 6.0, 4.0]]), torch.tensor([True]),
        ...                             torch.tensor([6.0, 4.0]))
        >>> torch.allclose(render_views(img, g, (4, 6)), img.flip(-1), atol=1e-5)
        True
    """
    pts = geometry.to(images.device).grid(*size).to(images.dtype)  # (B, h*w, 2) image space
    grid = rearrange(2 * pts - 1, "b (h w) p -> b h w p", h=size[0], w=size[1])
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------------------ core
def match_correctness(
    query_features: Tensor,
    key_features: Tensor,
    query_geometry: ViewGeometry,
    key_geometry: ViewGeometry,
    *,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """Argmax-cosine matches of every query cell and whether they hit the true correspondence.

    The per-batch core of :func:`correspondence_accuracy`, usable as a training diagnostic
    ("how often does the similarity matcher agree with the geometry?").

    Args:
        query_features: ``(B, C, h, w)`` features of the query views.
        key_features: ``(B, C, h_k, w_k)`` features of the key views.
        query_geometry: ``B`` query views.
        key_geometry: ``B`` key views of the same images.
        chunk_size: query rows held at once by :func:`~densecontrast.matching.similarity.similarity_match`.

    Returns:
        dict of ``(B, N)`` tensors (``N = h * w``): ``"key_index"`` long matched key cell,
        ``"true_index"`` long true key cell, ``"valid"`` bool (query point inside the key view),
        ``"exact"`` / ``"within_one"`` bool (and valid), ``"distance"`` float Chebyshev distance
        in key cells (0 where invalid).

    Examples:
        >>> size = torch.tensor([8.0, 8.0])
        >>> q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), None, size)
        >>> k = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([True]), size)
        >>> f = torch.eye(4).reshape(1, 4, 2, 2)  # one-hot cells
        >>> out = match_correctness(f, f.flip(-1), q, k)
        >>> out["exact"].all().item(), out["true_index"].tolist()
        (True, [[1, 0, 3, 2]])
    """
    dims: dict[str, int] = {}
    b, _, h, w = check_shape(query_features, "query_features", ("B", "C", "h", "w"), sizes=dims)
    _, _, hk, wk = check_shape(key_features, "key_features", ("B", "C", "h_k", "w_k"), sizes=dims, of="query_features")
    check_geometry_pair(query_geometry, key_geometry, batch=b)  # validation only: both become float64 below
    m = similarity_match(query_features.float(), key_features.float(), chunk_size=chunk_size)
    idx = m.key_index
    assert idx is not None
    dev = query_features.device
    qg = query_geometry.to(device=dev, dtype=torch.float64)
    kg = key_geometry.to(device=dev, dtype=torch.float64)
    truth = nearest_coordinate_match(qg, kg, (h, w), (hk, wk))  # true cell; valid = point inside the key view
    assert truth.key_index is not None
    valid = truth.valid
    dist = cell_distance(idx, truth.key_index, wk).float()
    return {
        "key_index": idx,
        "true_index": truth.key_index,
        "valid": valid,
        "exact": valid & (dist == 0),
        "within_one": valid & (dist <= 1),
        "distance": torch.where(valid, dist, torch.zeros_like(dist)),
    }


@torch.no_grad()
def correspondence_accuracy(
    backbone: Backbone,
    images: Tensor | Iterable[Any],
    mode: Literal["flip", "crop"] = "flip",
    *,
    size: int | Sequence[int] | None = None,
    view_size: int | Sequence[int] | None = None,
    color: bool | Mapping[str, Any] = True,
    scale: tuple[float, float] = (0.2, 1.0),
    normalize: bool = True,
    generator: torch.Generator | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """How often argmax cosine similarity of dense features finds the true correspondence.

    Protocol (LC-loss, Section 4.6): the **query** is the clean image; the **key** is
    ``mode="flip"``: the horizontally flipped image (true match: the mirrored column) or
    ``mode="crop"``: a random resized crop + random flip of the image, while the query is then
    another random resized crop + flip (true match from the two
    :class:`~densecontrast.geometry.ViewGeometry`; queries whose point is outside the key view
    are not counted, see ``fraction_valid``). With ``color=True`` the key also gets colour
    jitter, random grayscale and Gaussian blur (:func:`color_augment`). Each query feature cell
    is matched to the key cell of maximum cosine similarity (:func:`match_correctness`).

    Args:
        backbone: ``nn.Module`` or callable mapping ``(B, 3, H, W)`` to a ``(B, C, h, w)`` feature map
            (a tuple/list output uses its last element). Modules are put in ``eval()`` mode during
            the call and restored afterwards.
        images: ``(B, 3, H, W)`` tensor (float ``[0, 1]`` or ``uint8``), or a dataset/iterable of
            PIL images / ``(3, H, W)`` tensors / tuples whose first element is the image.
        mode: ``"flip"`` or ``"crop"``.
        size: resize images to ``(H, W)`` first (needed when a dataset's images differ in size).
        view_size: crop-mode view size (default: the image size).
        color: apply the colour transforms to the key view: ``True`` at the LC-loss evaluation's
            strengths, ``False`` none, or a mapping of :func:`color_augment` keyword arguments
            (e.g. ``{"jitter": (0.4, 0, 0, 0), "gray_p": 0, "blur_p": 0}``: brightness alone).
        scale: crop-mode crop area range.
        normalize: ImageNet-normalize every view before the backbone.
        generator: CPU generator for crops, flips and colours (default: a fresh one seeded 0,
            so results are reproducible).
        batch_size: images per backbone call.
        max_images: evaluate at most this many images.
        device: where to run (default: the backbone's parameter device, else CPU).
        chunk_size: similarity-matching chunk (memory bound).

    Returns:
        ``{"exact": float, "within_one": float, "num_queries": int (valid queries),
        "num_images": int, "fraction_valid": float, "mean_distance": float (Chebyshev, key cells),
        "chance_exact": float (1 / key cells), "feature_shape": (h, w), "mode": str}``.
        With zero valid queries the accuracies are 0.0 (never NaN).

    Examples:
        >>> backbone = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        >>> images = torch.rand(4, 3, 32, 32)
        >>> out = correspondence_accuracy(backbone, images, generator=torch.Generator().manual_seed(0))
        >>> out["num_queries"], out["feature_shape"], 0.0 <= out["exact"] <= out["within_one"] <= 1.0
        (64, (4, 4), True)
    """
    check_choice(mode, "mode", ("flip", "crop"))
    check_int(batch_size, "batch_size", 1)
    check_interval(scale, "scale", 0, 1)
    vsize = None if view_size is None else check_size(view_size, "view_size")
    color_kwargs = _color_kwargs(color)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    dev = backbone_device(backbone, device)
    was_training = isinstance(backbone, nn.Module) and backbone.training
    if isinstance(backbone, nn.Module):
        backbone.eval()
    n_exact = n_within = n_valid = n_total = n_images = 0
    dist_sum = 0.0
    shape: tuple[int, int] | None = None
    key_cells = 1
    try:
        for x, _ in iter_image_batches(images, batch_size, size, max_images):
            bsz, _, hh, ww = x.shape
            img_size = torch.tensor([float(ww), float(hh)])
            if mode == "flip":
                full = torch.tensor([[0.0, 0.0, float(ww), float(hh)]]).expand(bsz, 4)
                qg = ViewGeometry.from_crops(full, torch.zeros(bsz, dtype=torch.bool), img_size)
                kg = ViewGeometry.from_crops(full, torch.ones(bsz, dtype=torch.bool), img_size)
                qv, kv = x, x.flip(-1)
            else:
                out_hw = vsize or (hh, ww)
                qg = random_crops((hh, ww), bsz, g, scale)
                kg = random_crops((hh, ww), bsz, g, scale)
                qv, kv = render_views(x, qg, out_hw), render_views(x, kg, out_hw)
            if color_kwargs is not None:
                kv = color_augment(kv, g, **color_kwargs)
            fq = extract_features(backbone, qv.to(dev), normalize)
            fk = extract_features(backbone, kv.to(dev), normalize)
            res = match_correctness(fq, fk, qg, kg, chunk_size=chunk_size)
            n_exact += int(res["exact"].sum())
            n_within += int(res["within_one"].sum())
            n_valid += int(res["valid"].sum())
            n_total += res["valid"].numel()
            dist_sum += float(res["distance"].sum())
            n_images += bsz
            shape = (int(fq.shape[-2]), int(fq.shape[-1]))
            key_cells = int(fk.shape[-2] * fk.shape[-1])
    finally:
        if isinstance(backbone, nn.Module):
            backbone.train(was_training)
    if n_images == 0:
        raise ValueError("images must contain at least one image, but it is empty")
    denom = max(n_valid, 1)
    return {
        "exact": n_exact / denom,
        "within_one": n_within / denom,
        "num_queries": n_valid,
        "num_images": n_images,
        "fraction_valid": n_valid / max(n_total, 1),
        "mean_distance": dist_sum / denom,
        "chance_exact": 1.0 / key_cells,
        "feature_shape": shape,
        "mode": mode,
    }
