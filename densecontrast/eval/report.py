"""Live matching diagnostics and the end-of-run report of the reference scripts.

* :func:`true_cell_agreement`: for a similarity matcher, the fraction of in-view queries whose
  matched key cell lies within one cell (Chebyshev) of the true correspondence known from the
  geometry. Logged every step by the scripts as ``match_within_one``.
* :func:`final_report`: after training, on rank 0: correspondence accuracy of the trained
  backbone against a random-init one of the same architecture, the loss curves (``loss.png``),
  matches between two views (``matches.png``) and ``report.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from densecontrast.eval.correspondence import cell_distance
from densecontrast.geometry import ViewGeometry
from densecontrast.matching import Matches, nearest_coordinate_match

__all__ = ["final_report", "true_cell_agreement"]


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
    trainer: Any,
    backbone: nn.Module,
    transform: Callable[[Any], Any],
    match_fn: Callable[[Tensor, Tensor, ViewGeometry, ViewGeometry], Matches] | None = None,
    *,
    num_images: int = 64,
) -> dict[str, Any] | None:
    """Evaluate and draw the trained backbone (rank 0 only; returns None elsewhere).

    Args:
        trainer: the :class:`~densecontrast.engine.trainer.Trainer` that ran.
        backbone: the trained backbone (``(B, 3, H, W) -> (B, C, h, w)``).
        transform: the multi-view transform used in training (for the match picture).
        match_fn: ``(query_feats, key_feats, query_geometry, key_geometry) -> Matches`` of the
            method, drawn in ``matches.png`` (default: nearest coordinate match).
        num_images: held-out synthetic images for the correspondence accuracy.

    Returns:
        The report dict also written to ``<output_dir>/report.json``.
    """
    from densecontrast.data.synthetic import SyntheticScenes
    from densecontrast.engine.backbones import build_backbone
    from densecontrast.eval.correspondence import correspondence_accuracy

    if not trainer.dist.is_main:
        return None
    args = trainer.args
    out_dir = trainer.output_dir
    device = trainer.device
    held_out = SyntheticScenes(num_images=num_images, image_size=args.image_size, num_classes=args.num_classes,
                               seed=args.seed + 10_000, return_mask=False)
    images = torch.stack([held_out[i] for i in range(len(held_out))])
    torch.manual_seed(args.seed + 1)
    random_backbone, _ = build_backbone(args.arch)
    random_backbone.to(device)
    report: dict[str, Any] = {"method": out_dir.name, "steps": trainer.step, "final_loss": trainer.last_loss}
    for name, net in (("trained", backbone), ("random_init", random_backbone)):
        for mode in ("flip", "crop"):
            acc = correspondence_accuracy(
                net, images, mode=mode, view_size=args.crop_size, generator=torch.Generator().manual_seed(0),
                device=device,
            )
            report[f"{name}_{mode}_exact"] = acc["exact"]
            report[f"{name}_{mode}_within_one"] = acc["within_one"]
    try:
        _pictures(trainer, backbone, transform, held_out, match_fn)
        report["pictures"] = ["loss.png", "matches.png"]
    except ImportError:  # matplotlib is optional
        report["pictures"] = []
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(
        "correspondence accuracy (crop mode, within one cell): "
        f"trained {report['trained_crop_within_one']:.3f} vs random init {report['random_init_crop_within_one']:.3f}; "
        f"flip mode exact: trained {report['trained_flip_exact']:.3f} vs random init "
        f"{report['random_init_flip_exact']:.3f}"
    )
    return report


def _pictures(
    trainer: Any,
    backbone: nn.Module,
    transform: Callable[[Any], Any],
    dataset: Any,
    match_fn: Callable[[Tensor, Tensor, ViewGeometry, ViewGeometry], Matches] | None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from densecontrast.viz import plot_matches, plot_training

    out_dir = trainer.output_dir
    fig = plot_training(out_dir / "metrics.jsonl", save=out_dir / "loss.png")
    plt.close(fig)
    torch.manual_seed(0)
    views, geoms = transform(dataset[0])[:2]
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        f1 = backbone(views[0][None].to(trainer.device))
        f2 = backbone(views[1][None].to(trainer.device))
    backbone.train(was_training)
    g1, g2 = geoms[0].to(trainer.device), geoms[1].to(trainer.device)
    if match_fn is None:
        m = nearest_coordinate_match(g1, g2, tuple(f1.shape[-2:]), tuple(f2.shape[-2:]))
    else:
        m = match_fn(f1, f2, g1, g2)
    fig = plot_matches(views[0], views[1], m, query_shape=tuple(f1.shape[-2:]),
                       save=out_dir / "matches.png")
    plt.close(fig)
