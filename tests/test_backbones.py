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
        ("tiny", {}, 128, 8),
        ("tiny", {"output_stride": 16}, 128, 16),
        ("tiny", {"width": 8}, 32, 8),
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
