"""densecontrast.backbones: output shapes, strides and channels of every backbone; SyncBN conversion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from densecontrast.backbones import BACKBONES, ResNetTrunk, TinyConvNet, build_backbone, convert_sync_batchnorm

SIZES = [(32, 32), (33, 47), (17, 70)]  # exact multiples and sizes that need ceil()


def _check_shapes(net: nn.Module, c: int, stride: int, device: str = "cpu") -> None:
    assert net.stride == stride and net.out_channels == c
    net.eval()
    with torch.no_grad():
        for h, w in SIZES:
            y = net(torch.randn(2, 3, h, w, device=device))
            assert y.shape == (2, c, math.ceil(h / stride), math.ceil(w / stride)), (h, w)


@pytest.mark.parametrize(
    ("name", "kwargs", "channels", "stride"),
    [
        ("resnet18", {}, 512, 32),
        ("tiny", {}, 128, 16),
        ("tiny", {"output_stride": 8}, 128, 8),
        ("tiny", {"width": 8}, 32, 16),
    ],
)
def test_build_backbone_shapes_and_strides(name: str, kwargs: dict, channels: int, stride: int) -> None:
    torch.manual_seed(0)
    net, c = build_backbone(name, **kwargs)
    assert c == channels
    _check_shapes(net, c, stride)


@pytest.mark.parametrize(
    ("name", "output_stride", "channels"),
    [
        ("resnet34", 32, 512),
        ("resnet50", 32, 2048),
        ("resnet50", 16, 2048),
        ("resnet50", 8, 2048),
    ],
)
def test_large_backbone_shapes_on_meta_device(name: str, output_stride: int, channels: int) -> None:
    """Same checks without allocating or computing: shapes propagate through the meta device."""
    with torch.device("meta"):
        net, c = build_backbone(name, output_stride=output_stride)
    assert c == channels
    _check_shapes(net, c, output_stride, device="meta")


def test_resnet_output_stride_16_and_keys() -> None:
    import torchvision

    with torch.device("meta"):
        resnet = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True])  # stride 16
    trunk = ResNetTrunk(resnet)
    assert trunk.stride == 16 and trunk.out_channels == 2048
    expected = {k for k in resnet.state_dict() if not k.startswith("fc.")}
    assert set(trunk.state_dict()) == expected
    with pytest.raises(ValueError, match="ResNet"):
        ResNetTrunk(nn.Linear(1, 1))  # type: ignore[arg-type]


def test_tiny_conv_net_size_and_gradients() -> None:
    for stride in (8, 16):
        net = TinyConvNet(stride=stride)
        n = sum(p.numel() for p in net.parameters())
        assert 100_000 <= n <= 500_000, n
        y = net(torch.randn(2, 3, 24, 24))
        y.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="stride"):
        TinyConvNet(stride=4)
    with pytest.raises(ValueError, match="width"):
        TinyConvNet(width=0)


def test_build_backbone_errors() -> None:
    assert "tiny" in BACKBONES
    with pytest.raises(ValueError, match="name must be one of"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="output_stride must be 32 for resnet18"):
        build_backbone("resnet18", output_stride=16)
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet50", output_stride=4)


def test_convert_sync_batchnorm() -> None:
    net, _ = build_backbone("tiny")
    assert convert_sync_batchnorm(net) is net  # no process group: unchanged
    synced = convert_sync_batchnorm(net, enabled=True)
    kinds = {type(m) for m in synced.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    assert set(synced.state_dict()) == set(net.state_dict())


def _standardize_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per image and channel, in float64 with loops: (x - mean) / sqrt(biased var + eps)."""
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = x[i, c].double()
            out[i, c] = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + eps)
    return out


def test_tiny_standardizes_each_image_per_channel() -> None:
    from densecontrast.backbones import STANDARDIZE_EPS

    torch.manual_seed(0)
    x = torch.randn(3, 3, 20, 28) * torch.tensor([0.5, 2.0, 1.0]).view(1, 3, 1, 1) + 0.7
    x[1, 2] = 0.25  # a flat channel: zero after standardisation, never NaN
    net = TinyConvNet().eval()
    seen = []
    net.features[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        net(x)
    ref = _standardize_reference(x, STANDARDIZE_EPS)
    assert torch.allclose(seen[0].double(), ref, atol=1e-5)
    assert torch.equal(seen[0][1, 2], torch.zeros(20, 28))
    raw = TinyConvNet(standardize=False).eval()
    raw.features[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        raw(x)
    assert torch.equal(seen[1], x)


def test_tiny_standardized_features_ignore_brightness_and_contrast() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 48)
    for standardize in (True, False):
        net = TinyConvNet(standardize=standardize).eval()
        with torch.no_grad():
            a, b = net(x), net(1.7 * x - 0.4)
        change = float((a - b).norm() / a.norm())  # only the variance floor keeps it from 0
        assert (change < 1e-3) if standardize else (change > 0.1), (standardize, change)


def test_tiny_standardize_flag_is_in_the_state_dict() -> None:
    a, b = TinyConvNet(standardize=False), TinyConvNet()
    assert "standardize" in a.state_dict() and not bool(a.standardize) and bool(b.standardize)
    b.load_state_dict(a.state_dict())
    assert not bool(b.standardize)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    with pytest.raises(ValueError, match="standardize must be a bool"):
        TinyConvNet(standardize=1)  # type: ignore[arg-type]
