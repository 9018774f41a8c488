"""Plots of matches, weights, attention maps and training curves (matplotlib, imported lazily).

Every function returns a ``matplotlib.figure.Figure`` and writes a PNG when given ``save=path``.
Figures are created with the object-oriented API (no ``pyplot`` state), so they work headless
(the Agg backend) and in notebooks. Install the extra: ``pip install densecontrast[viz]``.

Convention:
    Views are ``(3, H, W)`` float tensors in ``[0, 1]`` or ImageNet-normalized (pass
    ``unnormalize=True``), or ``uint8``. Matches follow :class:`~densecontrast.matching.Matches`:
    query cells of an ``h x w`` grid over view 1 (row-major), key cells / key points in view 2's
    feature-cell space (cell ``(i, j)`` centred at pixel ``((j + 0.5) W / w, (i + 0.5) H / h)``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from densecontrast._checks import check_choice
from densecontrast.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from densecontrast.matching.matches import Matches

__all__ = ["plot_attention", "plot_matches", "plot_training", "plot_weights", "to_display"]


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover
        raise ImportError("densecontrast.viz needs matplotlib: pip install 'densecontrast[viz]'") from error
    return Figure(figsize=(width, height), dpi=100)


def _finish(fig: Figure, save: str | os.PathLike[str] | None) -> Figure:
    fig.tight_layout()
    if save is not None:
        fig.savefig(os.fspath(save), format="png")
    return fig


def to_display(image: Tensor, unnormalize: bool = False) -> Tensor:
    """A ``(3, H, W)`` / ``(1, 3, H, W)`` view -> ``(H, W, 3)`` float in ``[0, 1]`` for ``imshow``.

    Args:
        image: ``uint8`` or float view (a leading batch dimension of 1 is dropped).
        unnormalize: undo the ImageNet ``Normalize`` first.

    Examples:
        >>> to_display(torch.zeros(3, 4, 5), unnormalize=True)[0, 0]
        tensor([0.4850, 0.4560, 0.4060])
    """
    x = image.detach().cpu()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (3, H, W), but got {tuple(image.shape)}")
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if unnormalize:
        x = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.clamp(0, 1).permute(1, 2, 0)


def _grid_shape(n: int, shape: tuple[int, int] | None, view: Tensor) -> tuple[int, int]:
    if shape is not None:
        if shape[0] * shape[1] != n:
            raise ValueError(f"query_shape must satisfy h * w = N = {n}, but got {shape}")
        return shape
    h, w = view.shape[-2:]
    # The grid with the view's aspect ratio: h * w = n, h / w ~ H / W.
    best = min(
        ((d, n // d) for d in range(1, n + 1) if n % d == 0),
        key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(h / w)),
    )
    return best


def plot_matches(
    view1: Tensor,
    view2: Tensor,
    matches: Matches,
    *,
    index: int = 0,
    max_lines: int = 64,
    color_by: Literal["weight", "correct", "none"] = "weight",
    correct: Tensor | None = None,
    query_shape: tuple[int, int] | None = None,
    unnormalize: bool = False,
    seed: int = 0,
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Figure:
    """The two views side by side with lines from query cell centers to their matched key locations.

    Args:
        view1: ``(3, H, W)`` query view.
        view2: ``(3, H2, W2)`` key view.
        matches: a :class:`~densecontrast.matching.Matches`; ``key_index`` ``(B, N)`` (first
            positive of ``(B, N, k)``) or ``key_points`` ``(B, N, 2)``. Only valid queries are drawn.
        index: which batch element to draw.
        max_lines: draw at most this many matches (an evenly spread random subset).
        color_by: ``"weight"`` (viridis by ``matches.weight``), ``"correct"`` (green / red from
            ``correct``) or ``"none"``.
        correct: ``(B, N)`` or ``(N,)`` bool, required for ``color_by="correct"`` (e.g.
            ``match_correctness(...)["within_one"]`` from :mod:`densecontrast.eval.correspondence`).
        query_shape: ``(h, w)`` of the query grid (default: the factorization of ``N`` closest to
            the view's aspect ratio; ``matches.query_points`` are used when present).
        unnormalize: undo the ImageNet normalization of the views.
        seed: seed of the subset choice.
        title: figure title.
        save: write a PNG here.

    Returns:
        The figure.

    Examples:
        >>> from densecontrast.matching import Matches
        >>> m = Matches(valid=torch.ones(1, 4, dtype=torch.bool), weight=torch.rand(1, 4),
        ...             key_index=torch.tensor([[1, 0, 3, 2]]), key_shape=(2, 2))
        >>> fig = plot_matches(torch.rand(3, 32, 32), torch.rand(3, 32, 32), m)
        >>> len(fig.axes)  # two views and the weight colour bar
        3
    """
    check_choice(color_by, "color_by", ("weight", "correct", "none"))
    b, n = matches.valid.shape
    if not 0 <= index < b:
        raise ValueError(f"index must be in [0, {b}), but got {index}")
    img1, img2 = to_display(view1, unnormalize), to_display(view2, unnormalize)
    (h1, w1), (h2, w2) = img1.shape[:2], img2.shape[:2]

    if matches.query_points is not None:
        qs = query_shape or _grid_shape(n, None, view1)
        qp = matches.query_points[index].detach().cpu().float()
    else:
        qs = _grid_shape(n, query_shape, view1)
        ii, jj = torch.meshgrid(torch.arange(qs[0]), torch.arange(qs[1]), indexing="ij")
        qp = torch.stack([jj.reshape(-1), ii.reshape(-1)], dim=-1).float()
    q_px = torch.stack([(qp[:, 0] + 0.5) * w1 / qs[1], (qp[:, 1] + 0.5) * h1 / qs[0]], dim=-1)

    if matches.key_points is not None:
        ks = matches.key_shape or qs
        kp = matches.key_points[index].detach().cpu().float()
    else:
        assert matches.key_index is not None
        ks = matches.key_shape or qs
        ki = matches.key_index[index].detach().cpu()
        if ki.dim() == 2:  # (N, k): first positive
            mask = matches.key_mask[index].cpu() if matches.key_mask is not None else torch.ones_like(ki, dtype=bool)
            first = mask.float().argmax(dim=1)
            ki = ki.gather(1, first[:, None])[:, 0]
        kp = torch.stack([ki % ks[1], ki // ks[1]], dim=-1).float()
    k_px = torch.stack([(kp[:, 0] + 0.5) * w2 / ks[1], (kp[:, 1] + 0.5) * h2 / ks[0]], dim=-1)

    valid = matches.valid[index].detach().cpu()
    if matches.key_mask is not None and matches.key_index is not None and matches.key_index.dim() == 3:
        valid = valid & matches.key_mask[index].cpu().any(dim=1)
    sel = valid.nonzero()[:, 0]
    if sel.numel() > max_lines:
        g = torch.Generator().manual_seed(seed)
        sel = sel[torch.randperm(sel.numel(), generator=g)[:max_lines]].sort().values

    fig = _figure(8, 4.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.imshow(img1.numpy())
    ax2.imshow(img2.numpy())
    ax1.set_title("view 1 (queries)")
    ax2.set_title("view 2 (keys)")
    for ax in (ax1, ax2):
        ax.set_axis_off()

    import matplotlib as mpl
    from matplotlib.patches import ConnectionPatch

    if color_by == "correct":
        if correct is None:
            raise ValueError("correct must be a (B, N) or (N,) bool tensor when color_by='correct', but got None")
        c = correct[index] if correct.dim() == 2 else correct
        colors = [("#1a9850" if bool(c[i]) else "#d73027") for i in sel.tolist()]
    elif color_by == "weight":
        w = matches.weight[index].detach().cpu().float()
        lo, hi = float(w[valid].min()) if valid.any() else 0.0, float(w[valid].max()) if valid.any() else 1.0
        # weights usually lie in [0, 1]: use that scale so constant weights get a readable colour bar
        norm = mpl.colors.Normalize(vmin=min(lo, 0.0), vmax=max(hi, 1.0))
        cmap = mpl.colormaps["viridis"]
        colors = [cmap(norm(float(w[i]))) for i in sel.tolist()]
        sm = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=[ax1, ax2], fraction=0.025, pad=0.02, label="weight")
    else:
        colors = ["#ffcc00"] * int(sel.numel())
    for col, i in zip(colors, sel.tolist()):
        xy1, xy2 = q_px[i].tolist(), k_px[i].tolist()
        ax1.plot(*xy1, "o", ms=3, color=col)
        ax2.plot(*xy2, "o", ms=3, color=col)
        fig.add_artist(ConnectionPatch(xyA=xy1, xyB=xy2, coordsA="data", coordsB="data",
                                       axesA=ax1, axesB=ax2, color=col, lw=0.8, alpha=0.8))
    if title:
        fig.suptitle(title)
    if save is not None:
        fig.savefig(os.fspath(save), format="png")
    return fig


def plot_weights(
    view: Tensor,
    weights: Tensor,
    *,
    unnormalize: bool = False,
    alpha: float = 0.55,
    cmap: str = "magma",
    title: str | None = "match weights",
    save: str | os.PathLike[str] | None = None,
) -> Figure:
    """A per-cell weight map (e.g. PixCon-SR semantic weights) as a heat map over the query view.

    Args:
        view: ``(3, H, W)`` query view.
        weights: ``(h, w)`` map or ``(N,)`` / ``(1, N)`` flat row-major weights (``N = h * w``,
            grid shape from the view's aspect ratio). Shown with nearest-cell blocks.
        unnormalize: undo the ImageNet normalization of the view.
        alpha: heat-map opacity.
        cmap: matplotlib colour map.
        title: axes title.
        save: write a PNG here.

    Returns:
        The figure (view on the left, view + heat map with a colour bar on the right).

    Examples:
        >>> fig = plot_weights(torch.rand(3, 32, 48), torch.rand(4, 6))
        >>> len(fig.axes)  # two images and the colour bar
        3
    """
    img = to_display(view, unnormalize)
    w = weights.detach().cpu().float()
    if w.dim() == 2 and w.shape[0] == 1 and w.shape[1] > 1 and tuple(w.shape) != tuple(img.shape[:2]):
        w = w[0]
    if w.dim() == 1:
        w = w.reshape(*_grid_shape(w.numel(), None, view))
    if w.dim() != 2:
        raise ValueError(f"weights must have shape (h, w) or (N,), but got {tuple(weights.shape)}")
    h, ww = img.shape[:2]
    fig = _figure(8, 4)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.imshow(img.numpy())
    ax1.set_title("view")
    ax2.imshow(img.numpy())
    im = ax2.imshow(w.numpy(), cmap=cmap, alpha=alpha, extent=(0, ww, h, 0), interpolation="nearest")
    fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
    if title:
        ax2.set_title(title)
    for ax in (ax1, ax2):
        ax.set_axis_off()
    return _finish(fig, save)


@torch.no_grad()
def plot_attention(
    backbone: Any,
    image: Tensor,
    points: Tensor | Sequence[Sequence[float]],
    *,
    normalize: bool = True,
    unnormalize: bool = False,
    cmap: str = "inferno",
    save: str | os.PathLike[str] | None = None,
) -> Figure:
    """Cosine "self-attention" maps: how similar every feature cell is to the feature at chosen points.

    The image is run through ``backbone``; the feature at each point is sampled bilinearly
    (:func:`~densecontrast.matching.sample_points`) and its cosine similarity to every cell is
    upsampled (bilinear) over the image.

    Args:
        backbone: module or callable ``(1, 3, H, W) -> (1, C, h, w)``.
        image: ``(3, H, W)`` image, ``[0, 1]`` float or ``uint8`` (or already normalized with
            ``normalize=False, unnormalize=True``).
        points: ``(P, 2)`` image-space ``(x, y)`` in ``[0, 1]`` (x right, y down).
        normalize: ImageNet-normalize the ``[0, 1]`` image before the backbone.
        unnormalize: the image is ImageNet-normalized (display only; the backbone gets it as is
            unless ``normalize``).
        cmap: colour map of the similarity maps.
        save: write a PNG here.

    Returns:
        The figure: the image with the points, then one similarity map per point (range ``[-1, 1]``).

    Examples:
        >>> from torch import nn
        >>> fig = plot_attention(nn.Conv2d(3, 8, 4, stride=4), torch.rand(3, 32, 32), [[0.25, 0.5], [0.75, 0.5]])
        >>> len(fig.axes)
        3
    """
    from densecontrast.backbones import extract_features
    from densecontrast.matching.matches import sample_points

    pts = torch.as_tensor(points, dtype=torch.float32)
    if pts.dim() != 2 or pts.shape[-1] != 2 or pts.shape[0] < 1:
        raise ValueError(f"points must have shape (P, 2) as image-space (x, y), but got {tuple(pts.shape)}")
    x = image.detach()
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.dim() != 3:
        raise ValueError(f"image must have shape (3, H, W), but got {tuple(image.shape)}")
    was_training = getattr(backbone, "training", False)
    if hasattr(backbone, "eval"):
        backbone.eval()
    try:
        dev = next(iter(backbone.parameters())).device if hasattr(backbone, "parameters") else torch.device("cpu")
    except StopIteration:
        dev = torch.device("cpu")
    try:
        feats = extract_features(backbone, x[None].to(dev), normalize).float().cpu()  # (1, C, h, w)
    finally:
        if hasattr(backbone, "train"):
            backbone.train(was_training)
    _, c, h, w = feats.shape
    uv = pts * torch.tensor([w, h]) - 0.5  # feature-cell coordinates
    q = F.normalize(sample_points(feats, uv[None])[0], dim=-1)  # (P, C)
    k = F.normalize(feats[0].reshape(c, -1), dim=0)  # (C, h*w)
    sims = (q @ k).reshape(-1, 1, h, w)
    H, W = x.shape[-2:]
    sims = F.interpolate(sims, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    img = to_display(image, unnormalize)
    n = pts.shape[0]
    fig = _figure(3.2 * (n + 1), 3.4)
    ax0 = fig.add_subplot(1, n + 1, 1)
    ax0.imshow(img.numpy())
    ax0.set_title("image")
    colors = ["#00e5ff", "#76ff03", "#ff4081", "#ffea00", "#ffffff", "#ff9100"]
    for i, (px, py) in enumerate(pts.tolist()):
        col = colors[i % len(colors)]
        ax0.plot(px * W - 0.5, py * H - 0.5, "o", ms=7, mec="black", color=col)
        ax = fig.add_subplot(1, n + 1, i + 2)
        ax.imshow(img.numpy())
        ax.imshow(sims[i].numpy(), cmap=cmap, vmin=-1, vmax=1, alpha=0.7)
        ax.plot(px * W - 0.5, py * H - 0.5, "o", ms=7, mec="black", color=col)
        ax.set_title(f"point {i} ({px:.2f}, {py:.2f})")
    for ax in fig.axes:
        ax.set_axis_off()
    return _finish(fig, save)


def _load_records(metrics: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(metrics, (str, os.PathLike)):
        records = []
        with open(metrics) as fh:
            for line_no, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    where = f"metrics file {os.fspath(metrics)!r} line {line_no}"
                    raise ValueError(f"{where} is not JSON: {error}") from None
        return records
    return list(metrics)


def plot_training(
    metrics: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    *,
    x: str = "step",
    keys: Sequence[str] | None = None,
    ncols: int = 3,
    save: str | os.PathLike[str] | None = None,
) -> Figure:
    """Training curves: every numeric key of a metrics log against the step.

    Args:
        metrics: a JSON-lines file (one dict per line, as the training scripts write) or a list
            of dicts.
        x: the key used as x axis (records without it use their position in the log).
        keys: which keys to plot (default: every key holding a finite number in some record,
            except ``x``; booleans are skipped).
        ncols: subplot columns.
        save: write a PNG here.

    Returns:
        The figure, one subplot per key.

    Examples:
        >>> fig = plot_training([{"step": s, "loss": 1.0 / (s + 1), "lr": 0.1} for s in range(10)])
        >>> len(fig.axes), fig.axes[0].get_title(), fig.axes[1].get_title()
        (2, 'loss', 'lr')
    """
    records = _load_records(metrics)
    if not records:
        raise ValueError("metrics must hold at least one record, but it is empty")

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))

    if keys is None:
        seen: dict[str, None] = {}
        for r in records:
            for k, v in r.items():
                if k != x and is_num(v):
                    seen.setdefault(k, None)
        keys = list(seen)
    if not keys:
        raise ValueError("metrics has no numeric keys to plot")
    ncols = max(1, min(ncols, len(keys)))
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(4 * ncols, 2.8 * nrows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        xs, ys = [], []
        for pos, r in enumerate(records):
            v = r.get(key)
            if is_num(v):
                xs.append(float(r[x]) if is_num(r.get(x)) else float(pos))
                ys.append(float(v))
        ax.plot(xs, ys, lw=1.2, marker="." if len(xs) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    return _finish(fig, save)
