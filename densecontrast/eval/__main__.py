"""Evaluate a pre-trained backbone checkpoint and write a markdown report with numbers and pictures.

Usage::

    python -m densecontrast.eval CHECKPOINT [--out DIR] [--arch resnet18|resnet50|...]
        [--images photos|synthetic|DIR] [--no-probe] [--probe-train 200] [--probe-val 100]
        [--epochs 30] [--device cpu|cuda] [--no-baseline] [--seed 0]

Accepted checkpoint files (``torch.load(..., weights_only=True)``):

* ``{"arch": "resnet50", "state_dict": {...}}`` as written by
  :func:`densecontrast.engine.export_backbone` (the example scripts' ``backbone.pth``);
* ``{"arch": "resnet18", "backbone": {...}}``;
* a bare torchvision-layout state dict (``conv1.weight``, ``layer1.0...``), ``fc.*`` ignored;
* a full training checkpoint (``{"model": {...}, ...}``): the online backbone's keys are found
  by their prefix (``...backbone.conv1.weight``; momentum/target copies are skipped).

``module.`` / ``_orig_mod.`` prefixes are stripped. The ResNet depth is inferred from the keys
when ``--arch`` is not given. The backbone is a torchvision ResNet truncated before ``avgpool``
(the C5 feature map, stride 32), or ``tiny`` (:class:`densecontrast.backbones.TinyConvNet`).

The report (``DIR/report.md``, plus ``report.json`` and PNG figures) holds:

* correspondence accuracy under the project's one protocol (:mod:`densecontrast.eval.protocol`,
  the same function and settings as the training scripts' end-of-run report): ``flip`` and
  ``crop`` modes, mean ± std over 3 evaluation seeds, on the scikit-image sample photographs
  (default when scikit-image is installed), held-out synthetic scenes, or ``--images DIR``;
* a dense linear probe on ``SyntheticScenes`` masks (:mod:`densecontrast.eval.linear_probe`);
* the same numbers for the **same architecture with random weights** (unless ``--no-baseline``),
  with the paired margin and whether it is within noise;
* pictures: argmax-similarity matches between two crops coloured by correctness, cosine
  attention maps of a few points, and (when present next to the checkpoint) the training
  curves from ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densecontrast.backbones import plain_state_dict
from densecontrast.eval.protocol import (
    METRICS,
    CorrespondenceProtocol,
    evaluate_backbone,
    evaluation_images,
    random_init_like,
)
from densecontrast.eval.report import report_line

PROTOCOL = CorrespondenceProtocol()
"""The evaluation settings: the project's one protocol, unchanged."""

__all__ = ["extract_backbone_state", "infer_arch", "load_backbone", "main"]

_RESNET_BLOCKS = {
    (2, 2, 2, 2, False): "resnet18",
    (3, 4, 6, 3, False): "resnet34",
    (3, 4, 6, 3, True): "resnet50",
    (3, 4, 23, 3, True): "resnet101",
    (3, 8, 36, 3, True): "resnet152",
}
_SKIP = ("momentum", "target", "ema", "teacher", "key_encoder", "encoder_k")


def extract_backbone_state(obj: Any) -> tuple[dict[str, Tensor], str | None]:
    """Find the backbone state dict (torchvision key layout) and the stored arch in a loaded checkpoint.

    Args:
        obj: what ``torch.load`` returned (see the module docstring for the accepted layouts).

    Returns:
        ``(state_dict, arch or None)`` with keys like ``conv1.weight`` (``fc.*`` dropped) or, for
        the ``tiny`` backbone, ``features.*``.

    Raises:
        ValueError: no backbone keys found.

    Examples:
        >>> sd = {"model": {"encoder.backbone.conv1.weight": torch.zeros(1),
        ...                 "target.backbone.conv1.weight": torch.ones(1)}}
        >>> extract_backbone_state(sd)
        ({'conv1.weight': tensor([0.])}, None)
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint must hold a dict (state dict or wrapper), but got {type(obj).__name__}")
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    for key in ("state_dict", "backbone", "model", "online", "state"):
        if isinstance(obj.get(key), Mapping):
            inner, inner_arch = extract_backbone_state(obj[key])
            return inner, arch or inner_arch
    sd = plain_state_dict(obj)
    if not sd:
        raise ValueError("checkpoint holds no tensors")
    # Candidate prefixes: anything before "conv1.weight" of a ResNet or "features.0.weight" of tiny.
    cands = []
    for k in sd:
        for leaf in ("conv1.weight", "features.0.weight"):
            if k.endswith(leaf) and not re.search(r"layer\d", k):
                prefix = k[: -len(leaf)]
                if prefix == "" or prefix.endswith("."):
                    cands.append(prefix)
    cands = [p for p in cands if not any(s in p for s in _SKIP)] or cands
    if not cands:
        raise ValueError(
            "checkpoint has no backbone keys (expected torchvision ResNet keys like 'conv1.weight', "
            f"possibly under a prefix such as 'encoder.backbone.'); first keys: {list(sd)[:5]}"
        )
    prefix = min(cands, key=lambda p: (0 if "backbone" in p or p == "" else 1, len(p)))
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {k: v for k, v in out.items() if not k.startswith("fc.")}
    return out, arch


def infer_arch(state_dict: Mapping[str, Tensor]) -> str:
    """Name the torchvision ResNet (or ``"tiny"``) that a backbone state dict belongs to.

    Examples:
        >>> import torchvision
        >>> with torch.device("meta"):
        ...     sd = torchvision.models.resnet50().state_dict()
        >>> infer_arch(sd)
        'resnet50'
    """
    if any(k.startswith("features.") for k in state_dict) and "conv1.weight" not in state_dict:
        return "tiny"
    blocks = []
    for layer in range(1, 5):
        idx = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        blocks.append(len(idx))
    bottleneck = any(re.match(r"layer1\.0\.conv3\.", k) for k in state_dict)
    name = _RESNET_BLOCKS.get((*blocks, bottleneck))
    if name is None:
        raise ValueError(f"cannot infer the architecture from the keys (blocks per stage {blocks}, "
                         f"bottleneck={bottleneck}); pass --arch")
    return name


def _build_matching(arch: str, sd: Mapping[str, Tensor]) -> nn.Module:
    """A randomly initialised backbone of ``arch`` whose keys and shapes match ``sd``."""
    from densecontrast.backbones import build_backbone

    variants: list[dict[str, Any]] = [{}]
    if arch == "tiny":
        width = int(sd["features.0.weight"].shape[0]) if "features.0.weight" in sd else 32
        variants = [{"width": width, "output_stride": 16}, {"width": width, "output_stride": 8}]
    errors = []
    for kw in variants:
        net, _ = build_backbone(arch, **kw)
        ref = net.state_dict()
        missing = [k for k in ref if k not in sd]
        unexpected = [k for k in sd if k not in ref]
        shapes = [k for k in ref if k in sd and tuple(ref[k].shape) != tuple(sd[k].shape)]
        if not (missing or unexpected or shapes):
            return net
        errors.append(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}")
    raise ValueError(f"the checkpoint does not match {arch}: " + "; ".join(errors))


def load_backbone(
    path: str | Path, arch: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, str]:
    """Build the backbone of a checkpoint file (C5 feature map) and load its weights.

    Args:
        path: checkpoint file (see the module docstring).
        arch: architecture (default: stored in the file, else inferred from the keys).
        device: where to put the module.

    Returns:
        ``(backbone in eval mode, arch)``.

    Raises:
        ValueError: no backbone keys, an unknown architecture, or keys/shapes that do not match.

    Examples:
        >>> import os, tempfile
        >>> from densecontrast.backbones import build_backbone
        >>> p = os.path.join(tempfile.mkdtemp(), "backbone.pth")
        >>> torch.save({"arch": "resnet18", "state_dict": plain_state_dict(build_backbone("resnet18")[0])}, p)
        >>> net, arch = load_backbone(p)
        >>> arch, net(torch.zeros(1, 3, 64, 64)).shape
        ('resnet18', torch.Size([1, 512, 2, 2]))
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd, stored = extract_backbone_state(obj)
    arch = arch or stored or infer_arch(sd)
    if arch == "tiny" and "standardize" not in sd:  # written before tiny recorded it: raw inputs
        sd = {**sd, "standardize": torch.tensor(False)}
    net = _build_matching(arch, sd)
    net.load_state_dict(sd, strict=True)
    return net.to(device).eval(), arch


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _stage(name: str, t0: float) -> None:
    """A sign of life per stage, on stderr so the results on stdout stay clean."""
    print(f"[{time.time() - t0:6.0f} s] {name}", file=sys.stderr, flush=True)


def _probe(backbone: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from densecontrast.data.synthetic import SyntheticScenes
    from densecontrast.eval.linear_probe import dense_linear_probe

    train = SyntheticScenes(args.probe_train, PROTOCOL.size, seed=args.seed + 100)
    val = SyntheticScenes(args.probe_val, PROTOCOL.size, seed=args.seed + 101)
    return dense_linear_probe(backbone, train, val, num_classes=train.num_labels, epochs=args.epochs,
                              batch_size=PROTOCOL.batch_size, device=device, seed=args.seed)


def _figures(backbone: nn.Module, args: argparse.Namespace, out_dir: Path, device: torch.device) -> list[str]:
    from densecontrast.backbones import extract_features
    from densecontrast.data.synthetic import SyntheticScenes
    from densecontrast.eval.correspondence import match_correctness, random_crops, render_views
    from densecontrast.matching.similarity import similarity_match
    from densecontrast.viz import plot_attention, plot_matches, plot_training

    made = []
    size = PROTOCOL.size
    image = SyntheticScenes(1, max(size, 128), seed=args.seed + 7, return_mask=False)[0]
    x = image[None].float() / 255
    g = torch.Generator().manual_seed(args.seed)
    qg, kg = random_crops(tuple(x.shape[-2:]), 1, g, (0.4, 1.0)), random_crops(tuple(x.shape[-2:]), 1, g, (0.4, 1.0))
    v1, v2 = render_views(x, qg, (size, size)), render_views(x, kg, (size, size))
    with torch.no_grad():
        f1, f2 = extract_features(backbone, v1.to(device)), extract_features(backbone, v2.to(device))
    m = similarity_match(f1.float(), f2.float())
    res = match_correctness(f1, f2, qg, kg)
    m = m.replace(valid=res["valid"].cpu(), key_index=m.key_index.cpu(), weight=m.weight.cpu())
    plot_matches(v1[0], v2[0], m, color_by="correct", correct=res["within_one"].cpu(), query_shape=tuple(f1.shape[-2:]),
                 title="argmax-cosine matches (green: within one cell of the truth)", save=out_dir / "matches.png")
    made.append("matches.png")
    plot_attention(backbone, image, [[0.25, 0.3], [0.5, 0.5], [0.75, 0.7]], save=out_dir / "attention.png")
    made.append("attention.png")
    metrics = Path(args.checkpoint).with_name("metrics.jsonl")
    if metrics.exists():
        try:
            plot_training(metrics, save=out_dir / "training.png")
            made.append("training.png")
        except ValueError as error:
            print(f"skipping training curves: {error}", file=sys.stderr)
    return made


def _report(path: Path, arch: str, args: argparse.Namespace, results: dict[str, Any], figures: Sequence[str],
            seconds: float) -> str:
    corr = results["correspondence"]
    lines = [
        "# Backbone evaluation",
        "",
        f"- checkpoint: `{args.checkpoint}`",
        f"- architecture: `{arch}`",
        f"- correspondence images: {corr['images']}, {PROTOCOL.size} px, seeds {list(PROTOCOL.seeds)}",
        f"- time: {seconds:.0f} s",
        "",
        "## Correspondence accuracy",
        "",
        "Fraction of query feature cells whose argmax-cosine match in the other view is the true cell "
        "(exact) or within one cell (Chebyshev distance <= 1). `flip`: horizontal flip + colour; "
        "`crop`: two random resized crops + flips + colour (only queries visible in both views count). "
        "Mean ± std over the evaluation seeds; the margin is paired (same views for both models).",
        "",
        "| metric | trained | random init | margin |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        t = corr["trained"][m]
        row = f"| {m} | {t['mean']:.3f} ± {t['std']:.3f} |"
        if "random_init" in corr:
            b, d = corr["random_init"][m], corr["margin"][m]
            noise = " (within noise)" if d["within_noise"] else ""
            row += f" {b['mean']:.3f} ± {b['std']:.3f} | {d['mean']:+.3f} ± {d['std']:.3f}{noise} |"
        else:
            row += " - | - |"
        lines.append(row)
    if "linear_probe" in results:
        lines += [
            "",
            "## Dense linear probe (SyntheticScenes)",
            "",
            "A 1x1-conv classifier on frozen features, logits upsampled bilinearly to the masks; held-out images.",
            "",
            "| model | mIoU | pixel accuracy |",
            "|---|---|---|",
        ]
        for name, p in results["linear_probe"].items():
            lines.append(f"| {name} | {_fmt(p['miou'])} | {_fmt(p['pixel_accuracy'])} |")
    if figures:
        lines += ["", "## Pictures", ""]
        for f in figures:
            lines += [f"![{f}]({f})", ""]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (see the module docstring); returns the results dict."""
    parser = argparse.ArgumentParser(prog="python -m densecontrast.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="backbone checkpoint (.pth)")
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint stem>_eval next to it)")
    parser.add_argument("--arch", default=None, help="resnet18|resnet34|resnet50|resnet101|resnet152|tiny "
                        "(default: stored in the file or inferred)")
    parser.add_argument("--images", default=None,
                        help="photos (scikit-image sample photographs), synthetic, or a folder of your photos "
                             "(default: photos when scikit-image is installed, else synthetic)")
    parser.add_argument("--no-probe", action="store_true", help="skip the dense linear probe")
    parser.add_argument("--probe-train", type=int, default=200, help="linear-probe training images")
    parser.add_argument("--probe-val", type=int, default=100, help="linear-probe validation images")
    parser.add_argument("--epochs", type=int, default=30, help="linear-probe epochs")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    parser.add_argument("--no-figures", action="store_true", help="skip the pictures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the linear probe and the pictures")
    args = parser.parse_args(argv)

    t0 = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone, arch = load_backbone(args.checkpoint, args.arch, device)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "_eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    images, what = evaluation_images(args.images, size=PROTOCOL.size)
    _stage(f"correspondence accuracy on {what} (trained and random init, {len(PROTOCOL.seeds)} seeds)", t0)
    results: dict[str, Any] = {"arch": arch, "checkpoint": str(args.checkpoint)}
    results["correspondence"] = evaluate_backbone(backbone, images, protocol=PROTOCOL, images_description=what,
                                                  baseline=not args.no_baseline, device=device)
    if not args.no_probe:
        results["linear_probe"] = {}
        models = [("trained", backbone)]
        if not args.no_baseline:
            models.append(("random init", random_init_like(backbone, PROTOCOL.random_init_seed)))
        for name, net in models:
            _stage(f"{name}: dense linear probe ({args.epochs} epochs on {args.probe_train} images)", t0)
            results["linear_probe"][name] = _probe(net, args, device)
    figures: list[str] = []
    if not args.no_figures:
        _stage("pictures", t0)
        figures = _figures(backbone, args, out_dir, device)
    (out_dir / "report.json").write_text(json.dumps(results, indent=2, default=str))
    _report(out_dir / "report.md", arch, args, results, figures, time.time() - t0)
    print(f"wrote {out_dir / 'report.md'}")
    print(report_line(results))
    for name, p in results.get("linear_probe", {}).items():
        print(f"linear probe ({name}): mIoU {p['miou']:.3f}, pixel accuracy {p['pixel_accuracy']:.3f}")
    return results


if __name__ == "__main__":
    main()
