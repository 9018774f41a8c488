"""Tests for densecontrast.heads: MLP / dense heads, DensePredictor BN pooling, PPM, factories."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densecontrast.heads import (
    DensePredictor,
    DenseProjection,
    PixelPropagation,
    ProjectionMLP,
    densecl_heads,
    densesiam_heads,
    lc_heads,
    pixcon_heads,
    pixel_propagation,
    pixpro_heads,
)


def _param_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------------
# MLPs and dense heads


def test_projection_mlp_layers_and_shapes() -> None:
    torch.manual_seed(0)
    head = ProjectionMLP(12, 20, 6)
    kinds = [type(m) for m in head.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(5, 12)).shape == (5, 6)
    no_bn = ProjectionMLP(12, 20, 6, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.modules())
    last = ProjectionMLP(12, 20, 6, last_bn=True)
    assert isinstance(last.net[-1], nn.BatchNorm1d) and not last.net[-1].affine
    out = last(torch.randn(8, 12))
    # affine-free BN in training mode: every output feature has zero batch mean
    assert torch.allclose(out.mean(0), torch.zeros(6), atol=1e-5)


def test_projection_mlp_matches_manual_computation() -> None:
    torch.manual_seed(1)
    head = ProjectionMLP(7, 9, 4, batch_norm=False).double()
    x = torch.randn(3, 7, dtype=torch.float64)
    l1, l2 = head.net[0], head.net[2]
    expected = torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(head(x), expected)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_dense_projection_is_a_per_pixel_mlp(batch_norm: bool) -> None:
    """A 1x1-conv head equals the MLP on the flattened (B*h*w, C) matrix, BN statistics included."""
    torch.manual_seed(2)
    dense = DenseProjection(6, 10, 5, batch_norm=batch_norm).double()
    mlp = ProjectionMLP(6, 10, 5, batch_norm=batch_norm).double()
    conv1, conv2 = dense.net[0], dense.net[-1]
    with torch.no_grad():
        mlp.net[0].weight.copy_(conv1.weight[:, :, 0, 0])
        mlp.net[0].bias.copy_(conv1.bias)
        mlp.net[-1].weight.copy_(conv2.weight[:, :, 0, 0])
        mlp.net[-1].bias.copy_(conv2.bias)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    out = dense(x)
    ref = mlp(x.permute(0, 2, 3, 1).reshape(-1, 6)).reshape(3, 4, 5, 5).permute(0, 3, 1, 2)
    assert out.shape == (3, 5, 4, 5)
    torch.testing.assert_close(out, ref)


def test_dense_predictor_bn_pools_over_all_pixels() -> None:
    torch.manual_seed(3)
    pred = DensePredictor(8, 16, 8).double()
    ref_lin1, ref_bn, ref_lin2 = nn.Linear(8, 16).double(), nn.BatchNorm1d(16).double(), nn.Linear(16, 8).double()
    ref_lin1.load_state_dict(pred.mlp.net[0].state_dict())
    ref_bn.load_state_dict(pred.mlp.net[1].state_dict())
    ref_lin2.load_state_dict(pred.mlp.net[3].state_dict())
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64) * 3 + 1
    out = pred(x)
    flat = x.permute(0, 2, 3, 1).reshape(-1, 8)  # (B*h*w, D): 24 pixel rows
    ref = ref_lin2(torch.relu(ref_bn(ref_lin1(flat)))).reshape(2, 3, 4, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, ref)
    # running statistics were computed over the 24 pixel rows of the whole batch
    hidden = ref_lin1(flat)
    torch.testing.assert_close(pred.mlp.net[1].running_mean, 0.1 * hidden.mean(0).detach())
    torch.testing.assert_close(pred.mlp.net[1].running_var, 0.9 + 0.1 * hidden.var(0, unbiased=True).detach())
    # statistics pooled per image would give a different output
    per_image = torch.stack([ref_bn(ref_lin1(flat[:12])), ref_bn(ref_lin1(flat[12:]))]).reshape(-1, 16)
    assert not torch.allclose(ref_lin2(torch.relu(per_image)).reshape(2, 3, 4, 8).permute(0, 3, 1, 2), out)


def test_heads_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="hidden_dim"):
        ProjectionMLP(4, 0, 2)
    with pytest.raises(ValueError, match="in_dim"):
        DenseProjection(-1, 4, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C\) with C = 4, but got \(2, 3\)"):
        ProjectionMLP(4, 8, 2)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, h, w\)"):
        DenseProjection(4, 8, 2)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, D, h, w\) with D = 4, but got \(2, 5, 3, 3\)"):
        DensePredictor(4, 8, 2)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="transform_layers"):
        PixelPropagation(4, transform_layers=3)
    with pytest.raises(ValueError, match="gamma"):
        PixelPropagation(4, gamma=0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, D, h, w\) with D = 4"):
        PixelPropagation(4)(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"gx must have shape \(B, D', h, w\) with \(B, h, w\) = \(1, 2, 2\) as x"):
        pixel_propagation(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 3))


# ---------------------------------------------------------------------------------------------
# Pixel propagation module


def _naive_ppm(x: torch.Tensor, gx: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loops over images and pixels, float64: y_i = sum_j max(cos(x_i, x_j), 0)^gamma gx_j."""
    b, _, h, w = x.shape
    out = torch.zeros(b, gx.shape[1], h * w, dtype=torch.float64)
    xs, gs = x.double().flatten(2), gx.double().flatten(2)
    for bi in range(b):
        for i in range(h * w):
            for j in range(h * w):
                xi, xj = xs[bi, :, i], xs[bi, :, j]
                c = float(xi @ xj / (xi.norm() * xj.norm()))
                s = max(c, 0.0)
                s = (s + 1e-6) ** gamma if gamma < 1 else s**gamma
                out[bi, :, i] += s * gs[bi, :, j]
    return out.reshape(b, -1, h, w)


@pytest.mark.parametrize(("shape", "gamma"), [((2, 5, 3, 3), 2.0), ((1, 4, 2, 3), 1.0), ((3, 3, 2, 2), 0.5)])
def test_pixel_propagation_functional_matches_naive(shape: tuple[int, int, int, int], gamma: float) -> None:
    torch.manual_seed(4)
    x, gx = torch.randn(shape), torch.randn(shape)
    out = pixel_propagation(x, gx, gamma)
    assert out.dtype == torch.float32 and out.shape == shape
    torch.testing.assert_close(out.double(), _naive_ppm(x, gx, gamma), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_ppm_module_matches_naive(layers: int) -> None:
    torch.manual_seed(5)
    ppm = PixelPropagation(6, gamma=2, transform_layers=layers).eval()
    x = torch.randn(2, 6, 3, 2)
    if layers == 0:
        g = x
    elif layers == 1:
        conv = ppm.transform
        assert conv.bias is not None
        g = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]
    else:
        c1, bn, _, c2 = ppm.transform
        hid = torch.einsum("oc,bchw->bohw", c1.weight[:, :, 0, 0], x) + c1.bias[None, :, None, None]
        hid = (hid - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var + bn.eps)[None, :, None, None]
        hid = torch.relu(hid * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
        g = torch.einsum("oc,bchw->bohw", c2.weight[:, :, 0, 0], hid) + c2.bias[None, :, None, None]
    g = g / g.norm(dim=1, keepdim=True)  # L2-normalized per pixel before propagation
    out = ppm(x)
    torch.testing.assert_close(out.double(), _naive_ppm(x, g.detach(), 2.0), rtol=1e-4, atol=1e-5)


def test_pixel_propagation_gradcheck() -> None:
    torch.manual_seed(6)
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    gx = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    # shift x so that all cosines are well away from the clamp at 0
    x0 = (x.detach() + 3.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: pixel_propagation(a, b, 2.0), (x0, gx))


def test_ppm_bf16_autocast_close_to_float32() -> None:
    torch.manual_seed(7)
    ppm = PixelPropagation(16)
    x = torch.randn(2, 16, 4, 4)
    ref = ppm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ppm(x.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (F.cosine_similarity(out, ref, dim=1) > 0.99).all()


# ---------------------------------------------------------------------------------------------
# factories (spec dims table)


def test_pixcon_heads_dims() -> None:
    h = pixcon_heads()
    assert _param_shapes(h["projector"]) == {
        "net.0.weight": (2048, 2048), "net.0.bias": (2048,), "net.1.weight": (2048,), "net.1.bias": (2048,),
        "net.3.weight": (128, 2048), "net.3.bias": (128,),
    }
    dp = _param_shapes(h["dense_projector"])
    assert dp["net.0.weight"] == (2048, 2048, 1, 1) and dp["net.1.weight"] == (2048,)
    assert dp["net.3.weight"] == (128, 2048, 1, 1)
    assert _param_shapes(h["predictor"])["net.0.weight"] == (2048, 128)
    assert _param_shapes(h["predictor"])["net.3.weight"] == (128, 2048)
    dpr = _param_shapes(h["dense_predictor"])
    assert dpr["mlp.net.0.weight"] == (2048, 128) and dpr["mlp.net.1.weight"] == (2048,)
    assert dpr["mlp.net.3.weight"] == (128, 2048)


def test_densecl_heads_have_no_bn() -> None:
    h = densecl_heads()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in h.modules())
    assert _param_shapes(h["projector"])["net.0.weight"] == (2048, 2048)
    assert _param_shapes(h["projector"])["net.2.weight"] == (128, 2048)
    assert _param_shapes(h["dense_projector"])["net.2.weight"] == (128, 2048, 1, 1)


def test_pixpro_heads_dims() -> None:
    h = pixpro_heads(instance=True)
    dp = _param_shapes(h["dense_projector"])
    assert dp["net.0.weight"] == (4096, 2048, 1, 1) and dp["net.3.weight"] == (256, 4096, 1, 1)
    assert _param_shapes(h["ppm"]) == {"transform.weight": (256, 256, 1, 1), "transform.bias": (256,)}
    assert h["ppm"].gamma == 2.0
    assert _param_shapes(h["instance_projector"])["net.3.weight"] == (256, 4096, 1, 1)
    assert _param_shapes(h["instance_predictor"])["mlp.net.0.weight"] == (4096, 256)
    assert "instance_projector" not in pixpro_heads(in_dim=8, hidden_dim=8, out_dim=4)


def test_lc_heads_dims() -> None:
    h = lc_heads()
    assert _param_shapes(h["projector"])["net.0.weight"] == (4096, 2048)
    assert _param_shapes(h["projector"])["net.3.weight"] == (256, 4096)
    assert _param_shapes(h["predictor"])["net.0.weight"] == (4096, 256)
    dp = _param_shapes(h["dense_projector"])
    assert dp["net.0.weight"] == (2048, 2048, 1, 1) and dp["net.1.weight"] == (2048,)
    assert dp["net.3.weight"] == (256, 2048, 1, 1)


def test_densesiam_heads_dims() -> None:
    h = densesiam_heads(num_regions=27)
    assert _param_shapes(h["projector"])["net.3.weight"] == (2048, 2048)
    assert isinstance(h["projector"].net[-1], nn.BatchNorm1d)
    assert _param_shapes(h["predictor"])["net.0.weight"] == (512, 2048)
    assert _param_shapes(h["dense_predictor"])["mlp.net.3.weight"] == (2048, 512)
    assert _param_shapes(h["region_logits"])["0.net.3.weight"] == (27, 2048, 1, 1)
    last = h["region_logits"][-1]
    assert isinstance(last, torch.nn.BatchNorm2d) and not last.affine
    assert _param_shapes(h["region_projector"])["net.0.weight"] == (2048, 2048)


def test_factories_work_for_resnet18_channels() -> None:
    torch.manual_seed(8)
    feats = torch.randn(2, 512, 7, 7)
    small = {"hidden_dim": 64}
    for heads in (pixcon_heads(512, **small), densecl_heads(512, **small), pixpro_heads(512, **small),
                  lc_heads(512, **small, dense_hidden_dim=64), densesiam_heads(512, **small, out_dim=32)):
        z = heads["dense_projector"](feats)
        assert z.shape[0] == 2 and z.shape[2:] == (7, 7)
        if "projector" in heads:
            assert heads["projector"](feats.mean((2, 3))).shape[0] == 2
        if "dense_predictor" in heads:
            assert heads["dense_predictor"](z).shape == z.shape
        if "ppm" in heads:
            assert heads["ppm"](z).shape == z.shape
    # BN layers convert to SyncBatchNorm for multi-GPU training
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(pixcon_heads(512, **small))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
