"""Convert a pre-trained ResNet backbone to the checkpoint format Detectron2 fine-tuning reads.

Input: a backbone file written by the reference scripts (``runs/<method>/backbone.pth``:
``{"arch": ..., "state_dict": {...}}`` in torchvision key layout), a bare torchvision
``state_dict``, or a full training checkpoint (``checkpoint.pth``; the online backbone is taken
from ``model`` under ``--prefix``, default ``encoder.backbone.``).

Output: a pickle ``{"model": {name: numpy array}, "__author__": "densecontrast",
"matching_heuristics": True}`` with Detectron2's ResNet names (``stem.conv1``, ``res2`` ...
``res5``, ``convK.norm``, ``shortcut``), which ``MODEL.WEIGHTS`` accepts. Use it with the
PyTorch-style input format, as for other self-supervised ResNets::

    python examples/convert_to_detectron2.py runs/pixcon/backbone.pth pixcon_r50.pkl
    python tools/train_net.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml \\
        MODEL.WEIGHTS pixcon_r50.pkl MODEL.PIXEL_MEAN "[123.675,116.280,103.530]" \\
        MODEL.PIXEL_STD "[58.395,57.120,57.375]" INPUT.FORMAT RGB MODEL.RESNETS.NORM SyncBN \\
        MODEL.FPN.NORM SyncBN

MMDetection / MMSegmentation read ``backbone.pth`` as it is (torchvision layout under
``state_dict``): ``model.backbone.init_cfg = dict(type="Pretrained", checkpoint="backbone.pth")``.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch

_LAYER = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def detectron2_name(name: str) -> str | None:
    """Detectron2 name of a torchvision ResNet parameter or buffer (None: not part of the backbone).

    Examples:
        >>> detectron2_name("bn1.running_mean"), detectron2_name("layer3.1.downsample.1.bias")
        ('stem.conv1.norm.running_mean', 'res4.1.shortcut.norm.bias')
    """
    if name.startswith("fc.") or name.endswith("num_batches_tracked"):
        return None
    if name.startswith("conv1."):
        return "stem." + name
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1."):]
    m = _LAYER.match(name)
    if m is None:
        raise ValueError(f"unexpected key {name!r}: expected torchvision ResNet names (conv1, bn1, layerN.*)")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def load_backbone_state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Read a backbone ``state_dict`` from any of the accepted input files."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in obj:
        return dict(obj["state_dict"])
    if "model" in obj and isinstance(obj["model"], dict):
        state = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"no key of {path}['model'] starts with --prefix {prefix!r}")
        return state
    return dict(obj)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="backbone.pth, a torchvision state_dict or checkpoint.pth")
    parser.add_argument("output", type=Path, help="output .pkl for Detectron2's MODEL.WEIGHTS")
    parser.add_argument("--prefix", default="encoder.backbone.", help="backbone prefix inside a checkpoint's model")
    args = parser.parse_args()
    state = load_backbone_state(args.input, args.prefix)
    model = {}
    for name, tensor in state.items():
        new = detectron2_name(name)
        if new is not None:
            model[new] = tensor.detach().cpu().numpy()
    with open(args.output, "wb") as f:
        pickle.dump({"model": model, "__author__": "densecontrast", "matching_heuristics": True}, f)
    print(f"wrote {len(model)} tensors to {args.output}")


if __name__ == "__main__":
    main()
