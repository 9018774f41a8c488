"""Live matching diagnostics and the end-of-run report of the reference scripts (explicit arguments, no run object).

* :func:`true_cell_agreement`: for a similarity matcher, the fraction of in-view queries whose
  matched key cell lies within one cell (Chebyshev) of the true correspondence known from the
  geometry. Logged every step by the scripts as ``match_within_one``.
* :func:`final_report`: after training, on rank 0: correspondence accuracy of the trained
  backbone against a random-init one of the same architecture, the loss curves (``loss.png``),
  matches between two views (``matches.png``) and ``report.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densecontrast.geometry import ViewGeometry
from densecontrast.matching import Matches, cell_distance, nearest_coordinate_match

__all__ = ["final_report", "report_line", "true_cell_agreement"]


def true_cell_agreement(
    matches: Matches,
    query_geometry: ViewGeometry,
    key_geometry: ViewGeometry,
    query_shape: tuple[int, int],
    key_shape: tuple[int, int],
    radius: int = 1,
) -> float:
    """Fraction of in-view queries whose matched key cell is within ``radius`` cells of the truth.

    Args:
        matches: single-index matches ``key_index (B, N)`` (e.g. from the similarity matcher).
        query_geometry: the ``B`` query views.
        key_geometry: the ``B`` key views.
        query_shape: ``(h, w)`` of the query grid.
        key_shape: ``(h_k, w_k)`` of the key grid.
        radius: Chebyshev radius in key cells (1: the 3 x 3 neighbourhood).

    Returns:
        A float in ``[0, 1]``; 0.0 when no query lies in the key view.

    Examples:
        >>> size = torch.tensor([8.0, 8.0])
        >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), None, size)
        >>> m = Matches(valid=torch.ones(1, 4, dtype=torch.bool), weight=torch.ones(1, 4),
        ...             key_index=torch.tensor([[0, 1, 2, 3]]))
        >>> true_cell_agreement(m, g, g, (2, 2), (2, 2), radius=0)
        1.0
    """
    if matches.key_index is None or matches.key_index.dim() != 2:
        raise ValueError("matches must hold a single key_index (B, N) per query")
    truth = nearest_coordinate_match(query_geometry, key_geometry, query_shape, key_shape)
    assert truth.key_index is not None
    ok = (cell_distance(matches.key_index, truth.key_index, key_shape[1]) <= radius) & truth.valid
    n = int(truth.valid.sum())
    return float(ok.sum()) / n if n else 0.0


def final_report(
    backbone: nn.Module,
    *,
    arch: str,
    output_dir: str | os.PathLike[str],
    image_size: int,
    num_classes: int,
    view_size: int,
    seed: int,
    steps: int,
    final_loss: float,
    transform: Callable[[Any], Any] | None = None,
    match_fn: Callable[[Tensor, Tensor, ViewGeometry, ViewGeometry], Matches] | None = None,
    device: torch.device | str | None = None,
    num_images: int = 64,
) -> dict[str, Any]:
    """Evaluate and draw a trained backbone: correspondence accuracy against random init, loss curves, matches.

    The trained backbone and a random-init one of the same architecture (seeded with ``seed + 1``)
    are scored with :func:`~densecontrast.eval.correspondence.correspondence_accuracy` on
    ``num_images`` held-out synthetic scenes (seed ``seed + 10000``), in ``"flip"`` and ``"crop"``
    mode. With matplotlib installed it also writes ``loss.png`` (from ``metrics.jsonl``) and
    ``matches.png`` (``match_fn`` on two views made by ``transform``). Call it on one process.

    Args:
        backbone: the trained backbone ``(B, 3, H, W) -> (B, C, h, w)``.
        arch: its :func:`~densecontrast.backbones.build_backbone` name (for the random-init baseline).
        output_dir: the run directory (holds ``metrics.jsonl``; receives ``report.json`` and pictures).
        image_size: side of the held-out synthetic scenes.
        num_classes: object classes of the scenes.
        view_size: side of the evaluation views (the training crop size).
        seed: the run's seed.
        steps: optimiser steps done (recorded).
        final_loss: the last logged loss (recorded).
        transform: the training multi-view transform, for ``matches.png`` (no picture when ``None``).
        match_fn: ``(query_feats, key_feats, query_geometry, key_geometry) -> Matches`` of the
            method, drawn in ``matches.png`` (default: nearest coordinate match).
        device: where to evaluate (default: the backbone's device).
        num_images: held-out images for the correspondence accuracy.

    Returns:
        The report dict also written to ``<output_dir>/report.json``.
    """
    from densecontrast.backbones import backbone_device, build_backbone
    from densecontrast.data.synthetic import SyntheticScenes
    from densecontrast.eval.correspondence import correspondence_accuracy

    out_dir = Path(output_dir)
    device = backbone_device(backbone, device)
    held_out = SyntheticScenes(num_images=num_images, image_size=image_size, num_classes=num_classes,
                               seed=seed + 10_000, return_mask=False)
    images = torch.stack([held_out[i] for i in range(len(held_out))])
    torch.manual_seed(seed + 1)
    random_backbone, _ = build_backbone(arch)
    random_backbone.to(device)
    report: dict[str, Any] = {"method": out_dir.name, "steps": steps, "final_loss": final_loss}
    for name, net in (("trained", backbone), ("random_init", random_backbone)):
        for mode in ("flip", "crop"):
            acc = correspondence_accuracy(
                net, images, mode=mode, view_size=view_size, generator=torch.Generator().manual_seed(0),
                device=device,
            )
            report[f"{name}_{mode}_exact"] = acc["exact"]
            report[f"{name}_{mode}_within_one"] = acc["within_one"]
    report["pictures"] = _pictures(out_dir, backbone, transform, held_out, match_fn, device)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def report_line(report: dict[str, Any]) -> str:
    """The one-line summary of :func:`final_report` that the scripts print last.

    Examples:
        >>> r = {"trained_crop_within_one": 0.5, "random_init_crop_within_one": 0.4,
        ...      "trained_flip_exact": 0.2, "random_init_flip_exact": 0.1}
        >>> report_line(r)
        'correspondence accuracy (crop mode, within one cell): trained 0.500 vs random init 0.400; flip mode ...'
    """
    return (
        "correspondence accuracy (crop mode, within one cell): "
        f"trained {report['trained_crop_within_one']:.3f} vs random init {report['random_init_crop_within_one']:.3f}; "
        f"flip mode exact: trained {report['trained_flip_exact']:.3f} vs random init "
        f"{report['random_init_flip_exact']:.3f}"
    )


def _pictures(
    out_dir: Path,
    backbone: nn.Module,
    transform: Callable[[Any], Any] | None,
    dataset: Any,
    match_fn: Callable[[Tensor, Tensor, ViewGeometry, ViewGeometry], Matches] | None,
    device: torch.device,
) -> list[str]:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("pictures skipped: install matplotlib (pip install 'densecontrast[viz]')")
        return []
    from densecontrast.viz import plot_matches, plot_training

    written = []
    if (out_dir / "metrics.jsonl").is_file():
        plt.close(plot_training(out_dir / "metrics.jsonl", save=out_dir / "loss.png"))
        written.append("loss.png")
    if transform is None:
        return written
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        views, geoms = transform(dataset[0])
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        f1 = backbone(views[0][None].to(device))
        f2 = backbone(views[1][None].to(device))
    backbone.train(was_training)
    g1, g2 = geoms[0].to(device), geoms[1].to(device)
    if match_fn is None:
        m = nearest_coordinate_match(g1, g2, tuple(f1.shape[-2:]), tuple(f2.shape[-2:]))
    else:
        m = match_fn(f1, f2, g1, g2)
    plt.close(plot_matches(views[0], views[1], m, query_shape=tuple(f1.shape[-2:]), save=out_dir / "matches.png"))
    written.append("matches.png")
    return written
