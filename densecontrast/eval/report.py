"""Live matching diagnostics and the end-of-run report of the reference scripts (explicit arguments, no run object).

* :func:`true_cell_agreement`: for a similarity matcher, the fraction of in-view queries whose
  matched key cell lies within one cell (Chebyshev) of the true correspondence known from the
  geometry. Logged every step by the scripts as ``match_within_one``.
* :func:`final_report`: after training, on rank 0: the project's one evaluation protocol
  (:mod:`densecontrast.eval.protocol`: correspondence on real photographs, trained vs random
  init, mean ± std over seeds), the loss curves (``loss.png``), matches between two views
  (``matches.png``) and ``report.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densecontrast.eval.protocol import CorrespondenceProtocol, summary_line
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
    output_dir: str | os.PathLike[str],
    steps: int,
    final_loss: float,
    images: str | os.PathLike[str] | None = None,
    protocol: CorrespondenceProtocol | None = None,
    transform: Callable[[Any], Any] | None = None,
    match_fn: Callable[[Tensor, Tensor, ViewGeometry, ViewGeometry], Matches] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Evaluate and draw a trained backbone under the project's one protocol; writes ``report.json``.

    The correspondence accuracy of the backbone and of its random-init twin, mean ± std over the
    protocol's seeds (:func:`~densecontrast.eval.protocol.evaluate_backbone`) on the real
    photographs (or ``images``); with matplotlib also ``loss.png`` (from ``metrics.jsonl``) and
    ``matches.png`` (``match_fn`` on two views made by ``transform``). Call it on one process.

    Args:
        backbone: the trained backbone ``(B, 3, H, W) -> (B, C, h, w)``.
        output_dir: the run directory (holds ``metrics.jsonl``; receives ``report.json`` and pictures).
        steps: optimiser steps done (recorded).
        final_loss: the last logged loss (recorded).
        images: evaluation images (see :func:`~densecontrast.eval.protocol.evaluation_images`).
        protocol: the evaluation settings (default: the project's protocol).
        transform: the training multi-view transform, for ``matches.png`` (no picture when ``None``).
        match_fn: ``(query_feats, key_feats, query_geometry, key_geometry) -> Matches`` of the
            method, drawn in ``matches.png`` (default: nearest coordinate match).
        device: where to evaluate (default: the backbone's device).

    Returns:
        The report dict also written to ``<output_dir>/report.json``: ``method``, ``steps``,
        ``final_loss``, ``correspondence`` (the protocol's result) and ``pictures``.
    """
    from densecontrast.backbones import backbone_device
    from densecontrast.eval.protocol import evaluate_backbone, evaluation_images

    out_dir = Path(output_dir)
    device = backbone_device(backbone, device)
    protocol = protocol or CorrespondenceProtocol()
    eval_images, what = evaluation_images(images, size=protocol.size)
    report: dict[str, Any] = {"method": out_dir.name, "steps": steps, "final_loss": final_loss}
    report["correspondence"] = evaluate_backbone(backbone, eval_images, protocol=protocol, images_description=what,
                                                 device=device)
    report["pictures"] = _pictures(out_dir, backbone, transform, match_fn, device)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def report_line(report: dict[str, Any]) -> str:
    """The one-line summary of :func:`final_report` that the scripts print last.

    Examples:
        >>> r = {"images": "17 real photographs", "trained": {}, "random_init": {}, "margin": {}}
        >>> for m, (t, b) in {"crop_within_one": (0.5, 0.4), "flip_exact": (0.2, 0.1)}.items():
        ...     r["trained"][m] = {"mean": t, "std": 0.01}; r["random_init"][m] = {"mean": b, "std": 0.01}
        ...     r["margin"][m] = {"mean": t - b, "std": 0.02, "within_noise": False}
        >>> report_line({"correspondence": r})
        'correspondence accuracy on 17 real photographs: crop within-one 0.500 ± 0.010 vs random init ...'
    """
    return "correspondence accuracy " + summary_line(report["correspondence"])


def _pictures(
    out_dir: Path,
    backbone: nn.Module,
    transform: Callable[[Any], Any] | None,
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
    from densecontrast.data.synthetic import SyntheticScenes

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        views, geoms = transform(SyntheticScenes(num_images=1, image_size=128, seed=10_000, return_mask=False)[0])
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
