from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from densecontrast.data.synthetic import SyntheticScenes
from densecontrast.eval.linear_probe import dense_linear_probe, extract_dense_features, segmentation_metrics


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Small CPU ops are much faster single-threaded on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _naive_metrics(pred: torch.Tensor, target: torch.Tensor, k: int, ignore: int) -> tuple[float, float, list]:
    p, t = pred.flatten().tolist(), target.flatten().tolist()
    ious = []
    for c in range(k):
        tp = sum(1 for a, b in zip(p, t) if b != ignore and a == c and b == c)
        fp = sum(1 for a, b in zip(p, t) if b != ignore and a == c and b != c)
        fn = sum(1 for a, b in zip(p, t) if b != ignore and a != c and b == c)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else None)
    present = [v for v in ious if v is not None]
    n = sum(1 for b in t if b != ignore)
    acc = sum(1 for a, b in zip(p, t) if b != ignore and a == b) / n
    return sum(present) / len(present), acc, ious


@pytest.mark.parametrize(("shape", "k", "seed"), [((3, 7, 5), 4, 0), ((50,), 6, 1), ((2, 9, 9), 3, 2)])
def test_segmentation_metrics_against_naive_loops(shape: tuple, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, k, shape, generator=g))
    target[torch.rand(shape, generator=g) < 0.1] = 255
    out = segmentation_metrics(pred, target, k, ignore_index=255)
    miou, acc, ious = _naive_metrics(pred, target, k, 255)
    assert out["miou"] == pytest.approx(miou)
    assert out["pixel_accuracy"] == pytest.approx(acc)
    assert [None if v is None else pytest.approx(v) for v in ious] == out["per_class_iou"]
    assert int(out["confusion"].sum()) == int((target != 255).sum())


def test_segmentation_metrics_bad_labels() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        segmentation_metrics(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="same shape"):
        segmentation_metrics(torch.tensor([0]), torch.tensor([0, 1]), 3)


def _mask_stats(ds: SyntheticScenes) -> tuple[float, float]:
    masks = torch.stack([ds[i][1] for i in range(len(ds))])
    freq = torch.bincount(masks.flatten(), minlength=ds.num_labels).double() / masks.numel()
    majority = float(freq.max())
    return majority, majority / ds.num_labels  # accuracy and mIoU of "always the majority class"


def test_probe_beats_chance_with_a_random_conv_backbone() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 48, 4, stride=4), nn.ReLU())
    train, val = SyntheticScenes(80, 64, seed=0), SyntheticScenes(30, 64, seed=1)
    out = dense_linear_probe(backbone, train, val, num_classes=train.num_labels, epochs=8, batch_size=20)
    majority_acc, majority_miou = _mask_stats(val)
    assert 0.0 <= out["miou"] <= 1.0 and 0.0 <= out["pixel_accuracy"] <= 1.0
    assert out["pixel_accuracy"] > majority_acc + 0.05
    assert out["miou"] > 3 * majority_miou
    assert out["feature_shape"] == (16, 16) and out["num_train"] == 80 and out["num_val"] == 30
    assert len(out["per_class_iou"]) == train.num_labels


def test_uninformative_features_stay_at_chance() -> None:
    def zeros(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 4, x.shape[2] // 4, x.shape[3] // 4)

    train, val = SyntheticScenes(30, 48, seed=0), SyntheticScenes(20, 48, seed=1)
    out = dense_linear_probe(zeros, train, val, num_classes=9, epochs=5, batch_size=10)
    majority_acc, _ = _mask_stats(val)
    assert out["pixel_accuracy"] <= majority_acc + 1e-6
    assert out["miou"] < 0.15


def test_extract_dense_features_resizes_and_caches() -> None:
    backbone = nn.Conv2d(3, 5, 8, stride=8)
    f, m = extract_dense_features(backbone, SyntheticScenes(5, 40), size=32, batch_size=2, max_images=3)
    assert f.shape == (3, 5, 4, 4) and f.dtype == torch.float32 and m.shape == (3, 32, 32)
    assert int(m.max()) <= 8
    with pytest.raises(ValueError, match="mask"):
        extract_dense_features(backbone, SyntheticScenes(2, 32, return_mask=False))


def test_backbone_is_not_modified() -> None:
    backbone = nn.Conv2d(3, 4, 8, stride=8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    dense_linear_probe(backbone, SyntheticScenes(4, 32), SyntheticScenes(2, 32, seed=1), 9, epochs=2)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_bad_arguments() -> None:
    backbone = nn.Conv2d(3, 4, 8, stride=8)
    for kwargs, name in [({"num_classes": 1}, "num_classes"), ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr")]:
        args = {"num_classes": 9, **kwargs}
        with pytest.raises(ValueError, match=name):
            dense_linear_probe(backbone, SyntheticScenes(2, 32), SyntheticScenes(2, 32), **args)
