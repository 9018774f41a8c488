"""The one evaluation protocol of the project: dense correspondence on real photographs, against random init.

The end-of-run report of the scripts, ``python -m densecontrast.eval`` and
``benchmarks/reproduce.py`` all call :func:`evaluate_backbone` with the same
:class:`CorrespondenceProtocol`, so they give the same numbers for the same backbone.

Convention:
    * Images: the scikit-image sample photographs (:mod:`densecontrast.data.photos`, 17 real
      photographs, the default when scikit-image is installed), a folder of the user's photos,
      or held-out synthetic scenes (said plainly in the result's ``"images"`` entry). Every image
      is cut to its centred square and resized to ``size x size`` pixels.
    * Correspondence accuracy (LC-loss, Section 4.6; ``correspondence_accuracy``):
      ``flip`` mode matches a clean image against its horizontal flip, ``crop`` mode two random
      resized crops (area ``scale`` of the image, random flips, rendered at ``size x size``),
      ``views_per_image`` pairs per image. The key view always gets the colour transforms of the
      LC-loss evaluation at BYOL's strengths: colour jitter (brightness 0.4, contrast 0.4,
      saturation 0.2, hue 0.1) with probability 0.8, grayscale 0.2, Gaussian blur 0.5 (sigma
      0.1 to 2 px) — the strengths the models were trained to be invariant to. ``exact``: the
      argmax-cosine key cell is the true one; ``within_one``: within one cell (Chebyshev).
    * Seeds: each evaluation seed draws its own crops, flips and colours; trained and random-init
      backbones see the *same* views for a seed, so their difference is paired. Results are
      mean ± std (sample std, ``ddof=1``) over the seeds. A difference is **within noise** when
      its mean is at most two standard errors of the paired differences (``2 std / sqrt(n)``).
    * Random init: a copy of the trained backbone's architecture with every parameter and
      buffer re-initialised under a fixed seed (:func:`random_init_like`).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densecontrast._checks import check_int, check_interval
from densecontrast.backbones import Backbone
from densecontrast.eval.correspondence import correspondence_accuracy, iter_image_batches

__all__ = [
    "METRICS",
    "CorrespondenceProtocol",
    "evaluate_backbone",
    "evaluation_images",
    "random_init_like",
    "summary_line",
]

METRICS: tuple[str, ...] = ("crop_within_one", "crop_exact", "flip_exact", "flip_within_one")
"""The four numbers of the protocol, ``<mode>_<accuracy>``."""


@dataclass(frozen=True)
class CorrespondenceProtocol:
    """The settings every entry point shares (see the module's Convention block).

    Attributes:
        size: side of the evaluation images and views in pixels.
        seeds: evaluation seeds (at least 3 for a mean ± std).
        views_per_image: crop-mode view pairs per image and seed.
        scale: crop-mode crop area range, fractions of the image.
        color: colour transforms on the key view (``True``: the strengths above; ``False``: none;
            a mapping: :func:`~densecontrast.eval.correspondence.color_augment` arguments, for
            diagnostics such as brightness alone).
        random_init_seed: seed of the random-init baseline's initialisation.
        batch_size: images per backbone call.

    Examples:
        >>> CorrespondenceProtocol().size, len(CorrespondenceProtocol().seeds)
        (128, 3)
    """

    size: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)
    views_per_image: int = 4
    scale: tuple[float, float] = (0.2, 1.0)
    color: bool | Mapping[str, Any] = True
    random_init_seed: int = 12345
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_int(self.size, "size", 8)
        check_int(self.views_per_image, "views_per_image", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_interval(self.scale, "scale", 0, 1)
        if len(self.seeds) < 1:
            raise ValueError(f"seeds must hold at least one seed, but got {self.seeds!r}")


def evaluation_images(
    source: str | Path | None = None, *, size: int = 128, num_synthetic: int = 64, seed: int = 0
) -> tuple[Tensor, str]:
    """The protocol's images ``(N, 3, size, size)`` uint8 and a plain description of what they are.

    Args:
        source: ``None`` (the scikit-image photographs when scikit-image is installed, else
            held-out synthetic scenes), ``"photos"``, ``"synthetic"``, or a folder of images.
        size: side in pixels (each image's centred square, resized).
        num_synthetic: number of synthetic scenes when they are used.
        seed: synthetic scenes are drawn with ``seed + 10000`` (held out from training's ``seed``).

    Examples:
        >>> images, what = evaluation_images("synthetic", size=32, num_synthetic=4)
        >>> tuple(images.shape), what
        ((4, 3, 32, 32), '4 held-out synthetic scenes (SyntheticScenes, seed 10000)')
    """
    from densecontrast.data.photos import photos_available, sample_photos

    check_int(size, "size", 8)
    if source is None:
        source = "photos" if photos_available() else "synthetic"
    if source == "photos":
        photos = sample_photos(size)
        return torch.stack(photos), f"{len(photos)} real photographs (scikit-image sample images)"
    if source == "synthetic":
        from densecontrast.data.synthetic import SyntheticScenes

        scenes = SyntheticScenes(num_images=num_synthetic, image_size=size, seed=seed + 10_000, return_mask=False)
        images = torch.stack([scenes[i] for i in range(len(scenes))])
        return images, f"{len(scenes)} held-out synthetic scenes (SyntheticScenes, seed {seed + 10_000})"
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"source must be None, 'photos', 'synthetic' or a folder of images, but got {str(source)!r}")
    from densecontrast.data.image_folder import ImageDataset
    from densecontrast.data.photos import square_resize

    dataset = ImageDataset(folder)
    images = [square_resize(x[0].mul(255).round().to(torch.uint8), size) for x, _ in iter_image_batches(dataset, 1)]
    return torch.stack(images), f"{len(images)} photographs from {str(folder)!r}"


def random_init_like(backbone: nn.Module, seed: int = 12345) -> nn.Module:
    """A copy of ``backbone`` with every parameter and buffer re-initialised under ``seed``.

    Modules with ``reset_parameters`` (convolutions, linear and norm layers) use it; any other
    parameter is drawn from ``N(0, 0.02)`` (e.g. a ViT's position embedding). The result does not
    depend on the trained weights, only on the architecture and the seed.

    Examples:
        >>> a, b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        >>> torch.equal(random_init_like(a).weight, random_init_like(b).weight)
        True
    """
    net = copy.deepcopy(backbone)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        covered: set[int] = set()
        for module in net.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
        for p in net.parameters():
            if id(p) not in covered:
                p.normal_(0.0, 0.02)
    return net


def _scores(
    backbone: Backbone, images: Tensor, protocol: CorrespondenceProtocol, device: Any
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    crops = images.repeat_interleave(protocol.views_per_image, dim=0)
    for seed in protocol.seeds:
        for mode, data in (("flip", images), ("crop", crops)):
            acc = correspondence_accuracy(
                backbone, data, mode, color=protocol.color, scale=protocol.scale, batch_size=protocol.batch_size,
                generator=torch.Generator().manual_seed(seed), device=device,
            )
            out[f"{mode}_exact"].append(acc["exact"])
            out[f"{mode}_within_one"].append(acc["within_one"])
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists and mappings as dicts (JSON-ready)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluate_backbone(
    backbone: nn.Module,
    images: Tensor,
    *,
    protocol: CorrespondenceProtocol | None = None,
    images_description: str = "",
    baseline: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Correspondence accuracy of ``backbone`` and of its random-init twin under the protocol.

    Args:
        backbone: maps ``(B, 3, H, W)`` to ``(B, C, h, w)`` (put in eval mode during the call).
        images: ``(N, 3, size, size)`` uint8 or float ``[0, 1]`` images (:func:`evaluation_images`).
        protocol: the settings (default: :class:`CorrespondenceProtocol`).
        images_description: what the images are, recorded in the result.
        baseline: also evaluate :func:`random_init_like` and the paired differences.
        device: where to run (default: the backbone's device).

    Returns:
        ``{"images": str, "protocol": dict, "trained": {metric: {"mean", "std", "values"}},
        "random_init": {...}, "margin": {metric: {"mean", "std", "values", "within_noise"}}}``
        (the last two only with ``baseline``); metrics are :data:`METRICS`.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU())
        >>> res = evaluate_backbone(net, torch.rand(2, 3, 32, 32), protocol=CorrespondenceProtocol(size=32))
        >>> sorted(res["margin"]["crop_within_one"])
        ['mean', 'std', 'values', 'within_noise']
    """
    protocol = protocol or CorrespondenceProtocol()
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), but got {tuple(images.shape)}")
    trained = _scores(backbone, images, protocol, device)
    result: dict[str, Any] = {
        "images": images_description,
        "protocol": {k: _plain(v) for k, v in protocol.__dict__.items()},
        "trained": {m: dict(zip(("mean", "std"), _mean_std(v)), values=v) for m, v in trained.items()},
    }
    if baseline:
        rand = _scores(random_init_like(backbone, protocol.random_init_seed), images, protocol, device)
        result["random_init"] = {m: dict(zip(("mean", "std"), _mean_std(v)), values=v) for m, v in rand.items()}
        margin = {}
        for m in METRICS:
            diffs = [a - b for a, b in zip(trained[m], rand[m])]
            mean, std = _mean_std(diffs)
            noise = 2 * std / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
            margin[m] = {"mean": mean, "std": std, "values": diffs, "within_noise": abs(mean) <= noise}
        result["margin"] = margin
    return result


def summary_line(result: dict[str, Any]) -> str:
    """One line: crop within-one and flip exact, trained vs random init, with the margin and its ±.

    Examples:
        >>> r = {"images": "17 real photographs", "trained": {}, "random_init": {}, "margin": {}}
        >>> for m, (t, b) in {"crop_within_one": (0.5, 0.4), "flip_exact": (0.2, 0.1)}.items():
        ...     r["trained"][m] = {"mean": t, "std": 0.01}; r["random_init"][m] = {"mean": b, "std": 0.01}
        ...     r["margin"][m] = {"mean": t - b, "std": 0.02, "within_noise": False}
        >>> summary_line(r)
        'on 17 real photographs: crop within-one 0.500 ± 0.010 vs random init 0.400 ± 0.010 (+0.100 ± 0.020); ...'
    """
    parts = []
    for m, label in (("crop_within_one", "crop within-one"), ("flip_exact", "flip exact")):
        t = result["trained"][m]
        text = f"{label} {t['mean']:.3f} ± {t['std']:.3f}"
        if "random_init" in result:
            b, d = result["random_init"][m], result["margin"][m]
            text += f" vs random init {b['mean']:.3f} ± {b['std']:.3f} ({d['mean']:+.3f} ± {d['std']:.3f}"
            text += ", within noise)" if d["within_noise"] else ")"
        parts.append(text)
    return f"on {result['images']}: " + "; ".join(parts)
