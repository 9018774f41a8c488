"""Dense linear probe: how linearly decodable are per-pixel classes from frozen dense features.

Protocol: the backbone is frozen and run **once** over the training and validation images (the
feature maps are cached on the CPU). A 1x1 convolution (a per-cell linear classifier) is
trained on the cached training features with cross-entropy; its logits are upsampled
**bilinearly to the mask size** before the loss and before the argmax, so the probe is scored
on full-resolution masks (no mask downsampling). Features are standardized per channel with
the training-set statistics first (an affine map, so the probe stays linear; it only makes
optimization insensitive to the backbone's feature scale).

Convention:
    Datasets yield ``(image, mask, ...)`` with ``image`` a PIL image or ``(3, H, W)`` tensor
    (``uint8`` or float ``[0, 1]``) and ``mask`` ``(H, W)`` integer labels in
    ``[0, num_classes)``; ``ignore_index`` pixels are skipped. For
    :class:`~densecontrast.data.synthetic.SyntheticScenes` use
    ``num_classes = dataset.num_labels`` (background included).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast._checks import check_int, check_positive
from densecontrast.backbones import Backbone, backbone_device, extract_features
from densecontrast.eval.correspondence import iter_image_batches

__all__ = ["dense_linear_probe", "extract_dense_features", "segmentation_metrics"]


@torch.no_grad()
def extract_dense_features(
    backbone: Backbone,
    dataset: Iterable[Any],
    *,
    size: int | Sequence[int] | None = None,
    batch_size: int = 32,
    normalize: bool = True,
    device: torch.device | str | None = None,
    max_images: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Frozen features and masks of a segmentation dataset, cached on the CPU.

    Args:
        backbone: module or callable ``(B, 3, H, W) -> (B, C, h, w)``; modules run in ``eval()``
            mode (restored afterwards).
        dataset: iterable of ``(image, mask, ...)``.
        size: resize images (bilinear) and masks (nearest) to ``(H, W)`` first.
        batch_size: images per backbone call.
        normalize: ImageNet-normalize images before the backbone.
        device: where the backbone runs (default: its parameters' device, else CPU).
        max_images: use at most this many images.

    Returns:
        ``(features (N, C, h, w) float32, masks (N, H, W) int64)`` on the CPU.

    Examples:
        >>> from densecontrast.data.synthetic import SyntheticScenes
        >>> f, m = extract_dense_features(nn.Conv2d(3, 4, 8, stride=8), SyntheticScenes(3, 32))
        >>> tuple(f.shape), tuple(m.shape)
        ((3, 4, 4, 4), (3, 32, 32))
    """
    dev = backbone_device(backbone, device)
    was_training = isinstance(backbone, nn.Module) and backbone.training
    if isinstance(backbone, nn.Module):
        backbone.eval()
    feats, masks = [], []
    try:
        for x, m in iter_image_batches(dataset, batch_size, size, max_images, with_masks=True):
            feats.append(extract_features(backbone, x.to(dev), normalize).float().cpu())
            assert m is not None
            masks.append(m)
    finally:
        if isinstance(backbone, nn.Module):
            backbone.train(was_training)
    if not feats:
        raise ValueError("dataset must contain at least one (image, mask) item, but it is empty")
    return torch.cat(feats), torch.cat(masks)


def segmentation_metrics(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU from predicted and true label maps.

    Args:
        pred: ``(...)`` integer predicted labels.
        target: ``(...)`` integer true labels, same shape.
        num_classes: number of labels ``K`` (labels ``0 .. K-1``).
        ignore_index: target value to skip (``None``: skip nothing).

    Returns:
        ``{"miou": float, "pixel_accuracy": float, "per_class_iou": list[float | None],
        "confusion": (K, K) long tensor [true, predicted]}``. A class absent from both the
        targets and the predictions has IoU ``None`` and is left out of the mean.

    Examples:
        >>> out = segmentation_metrics(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), 3)
        >>> round(out["miou"], 4), out["pixel_accuracy"], out["per_class_iou"]
        (0.5833, 0.75, [0.6666666666666666, 0.5, None])
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, but got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    p, t = p[keep], t[keep]
    if ((t < 0) | (t >= num_classes)).any() or ((p < 0) | (p >= num_classes)).any():
        raise ValueError(f"labels must lie in [0, num_classes) = [0, {num_classes}) (or be ignore_index)")
    conf = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    per_class = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(num_classes)]
    present = [v for v in per_class if v is not None]
    return {
        "miou": sum(present) / len(present) if present else 0.0,
        "pixel_accuracy": float(tp.sum() / max(int(conf.sum()), 1)),
        "per_class_iou": per_class,
        "confusion": conf,
    }


def dense_linear_probe(
    backbone: Backbone,
    train_set: Iterable[Any],
    val_set: Iterable[Any],
    num_classes: int,
    *,
    epochs: int = 30,
    lr: float = 0.01,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    size: int | Sequence[int] | None = None,
    normalize: bool = True,
    device: torch.device | str | None = None,
    ignore_index: int = 255,
    max_train: int | None = None,
    max_val: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a 1x1-conv linear classifier on frozen dense features and score it on held-out images.

    See the module docstring for the protocol. The classifier is trained with Adam
    (``lr``, ``weight_decay``) for ``epochs`` passes over the cached training features in
    shuffled mini-batches of ``batch_size`` images.

    Args:
        backbone: module or callable ``(B, 3, H, W) -> (B, C, h, w)`` (frozen; not modified).
        train_set: iterable of ``(image, mask, ...)`` for training the probe.
        val_set: iterable of ``(image, mask, ...)`` for scoring.
        num_classes: number of mask labels ``K`` (background included).
        epochs: passes over the training features.
        lr: Adam learning rate.
        batch_size: images per step (and per backbone call).
        weight_decay: Adam weight decay.
        size: resize images/masks to ``(H, W)`` first.
        normalize: ImageNet-normalize images before the backbone.
        device: where the backbone and the probe run (default: the backbone's device, else CPU).
        ignore_index: mask value excluded from loss and metrics.
        max_train: use at most this many training images.
        max_val: use at most this many validation images.
        seed: seed of the classifier initialization and batch order.

    Returns:
        ``{"miou", "pixel_accuracy", "per_class_iou", "train_loss" (last epoch mean),
        "train_miou", "feature_shape" (h, w), "num_train", "num_val"}`` (see
        :func:`segmentation_metrics`).

    Examples:
        >>> from densecontrast.data.synthetic import SyntheticScenes
        >>> backbone = nn.Conv2d(3, 8, 4, stride=4)
        >>> out = dense_linear_probe(backbone, SyntheticScenes(8, 32, seed=0), SyntheticScenes(4, 32, seed=1),
        ...                          num_classes=9, epochs=2)
        >>> 0.0 <= out["miou"] <= 1.0, out["feature_shape"], len(out["per_class_iou"])
        (True, (8, 8), 9)
    """
    check_int(num_classes, "num_classes", 2, note="(background included)")
    check_int(epochs, "epochs", 1)
    check_positive(lr, "lr")
    check_int(batch_size, "batch_size", 1)
    dev = backbone_device(backbone, device)
    kw = dict(size=size, batch_size=batch_size, normalize=normalize, device=dev)
    ftr, mtr = extract_dense_features(backbone, train_set, max_images=max_train, **kw)
    fva, mva = extract_dense_features(backbone, val_set, max_images=max_val, **kw)
    if ftr.shape[1:] != fva.shape[1:]:
        raise ValueError(f"train and val features differ in shape: {tuple(ftr.shape[1:])} vs {tuple(fva.shape[1:])}")
    mean = ftr.mean(dim=(0, 2, 3), keepdim=True)
    std = ftr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    ftr, fva = (ftr - mean) / std, (fva - mean) / std

    g = torch.Generator().manual_seed(seed)
    probe = nn.Conv2d(ftr.shape[1], num_classes, kernel_size=1)
    with torch.no_grad():
        bound = 1 / ftr.shape[1] ** 0.5
        probe.weight.copy_(torch.empty_like(probe.weight).uniform_(-bound, bound, generator=g))
        probe.bias.zero_()
    probe.to(dev)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    n = ftr.shape[0]
    last_loss = 0.0
    for _ in range(int(epochs)):
        order = torch.randperm(n, generator=g)
        total, count = 0.0, 0
        for s in range(0, n, int(batch_size)):
            idx = order[s : s + int(batch_size)]
            f, m = ftr[idx].to(dev), mtr[idx].to(dev)
            logits = F.interpolate(probe(f), size=m.shape[-2:], mode="bilinear", align_corners=False)
            valid = m != ignore_index
            if not valid.any():
                continue
            loss = F.cross_entropy(logits, m, ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last_loss = total / max(count, 1)

    @torch.no_grad()
    def predict(feats: Tensor, shape: tuple[int, int]) -> Tensor:
        out = []
        for s in range(0, feats.shape[0], int(batch_size)):
            logits = probe(feats[s : s + int(batch_size)].to(dev))
            out.append(F.interpolate(logits, size=shape, mode="bilinear", align_corners=False).argmax(1).cpu())
        return torch.cat(out)

    val = segmentation_metrics(predict(fva, tuple(mva.shape[-2:])), mva, num_classes, ignore_index)
    train = segmentation_metrics(predict(ftr, tuple(mtr.shape[-2:])), mtr, num_classes, ignore_index)
    return {
        "miou": val["miou"],
        "pixel_accuracy": val["pixel_accuracy"],
        "per_class_iou": val["per_class_iou"],
        "train_loss": last_loss,
        "train_miou": train["miou"],
        "feature_shape": (int(ftr.shape[-2]), int(ftr.shape[-1])),
        "num_train": int(ftr.shape[0]),
        "num_val": int(fva.shape[0]),
    }
