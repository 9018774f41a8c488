"""Which colour transform of the evaluation costs a backbone its correspondence accuracy?

Scores exported backbones and their random-init twins with the project's one evaluation
protocol (:mod:`densecontrast.eval.protocol`) once per colour setting of the key view: the
protocol's full set (jitter, grayscale, blur at BYOL's strengths), none, and each transform alone
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 — each with probability 0.8 — grayscale 0.2,
blur 0.5). A backbone that loses much more than its random twin under one transform has not
learned to ignore it. Prints one table row per backbone and setting: crop within-one and flip
exact, trained vs random init, with the paired margin (mean ± std over the evaluation seeds).

    python benchmarks/colour_sensitivity.py runs/pixcon/backbone.pth
    python benchmarks/colour_sensitivity.py a.pth b.pth --images synthetic --json colour.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from densecontrast.eval.__main__ import load_backbone
from densecontrast.eval.protocol import CorrespondenceProtocol, evaluate_backbone, evaluation_images

ALONE = {"gray_p": 0.0, "blur_p": 0.0}
SETTINGS: dict[str, bool | dict[str, Any]] = {
    "protocol (all)": True,
    "none": False,
    "brightness": {"jitter": (0.4, 0, 0, 0), **ALONE},
    "contrast": {"jitter": (0, 0.4, 0, 0), **ALONE},
    "saturation": {"jitter": (0, 0, 0.2, 0), **ALONE},
    "hue": {"jitter": (0, 0, 0, 0.1), **ALONE},
    "grayscale": {"jitter_p": 0.0, "blur_p": 0.0},
    "blur": {"jitter_p": 0.0, "gray_p": 0.0},
}
"""Colour settings of the key view: ``True`` / ``False`` or :func:`color_augment` arguments."""


def _cell(result: dict[str, Any], metric: str) -> str:
    t, b, d = (result[k][metric] for k in ("trained", "random_init", "margin"))
    noise = ", noise" if d["within_noise"] else ""
    return f"{t['mean']:.3f} vs {b['mean']:.3f} ({d['mean']:+.3f} ± {d['std']:.3f}{noise})"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="exported backbone.pth files")
    parser.add_argument("--images", default=None, help="'photos', 'synthetic' or a folder (default: the protocol's)")
    parser.add_argument("--size", type=int, default=CorrespondenceProtocol.size, help="evaluation image side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, what = evaluation_images(args.images, size=args.size)
    print(f"images: {what}; size {args.size}; device cpu; torch {torch.__version__}")
    print("| backbone | key-view colour | crop within-one: trained vs random (margin) "
          "| flip exact: trained vs random (margin) |")
    print("|---|---|---|---|")
    rows = []
    t0 = time.time()
    for path in args.checkpoints:
        net, arch = load_backbone(path)
        for name, color in SETTINGS.items():
            protocol = dataclasses.replace(CorrespondenceProtocol(), size=args.size, color=color)
            res = evaluate_backbone(net, images, protocol=protocol, images_description=what)
            rows.append({"checkpoint": str(path), "arch": arch, "setting": name, "result": res})
            label = "/".join(path.parts[-3:-1]) or path.name  # e.g. pixcon_coord/seed0
            print(f"| {label} | {name} | {_cell(res, 'crop_within_one')} | "
                  f"{_cell(res, 'flip_exact')} |", flush=True)
    print(f"[{time.time() - t0:.0f} s]", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
