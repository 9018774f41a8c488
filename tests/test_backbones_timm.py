"""build_backbone("timm:<name>"): CNNs give their last map, ViTs their patch tokens as a map; dense pieces on them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from densecontrast.backbones import TimmFeatureMap, TimmTokenMap, build_backbone
from densecontrast.engine import export_backbone
from densecontrast.geometry import ViewGeometry
from densecontrast.losses import DenseInfoNCE
from densecontrast.matching import nearest_coordinate_match, similarity_match
from densecontrast.weighting import SemanticReweighting

ROOT = Path(__file__).resolve().parents[1]
NEEDS_TIMM = "timm is an optional extra: pip install 'densecontrast[timm]'"


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm", reason=NEEDS_TIMM)


@pytest.fixture(scope="module")
def vit(timm):
    torch.manual_seed(0)
    net, channels = build_backbone("timm:vit_tiny_patch16_224")
    return net, channels


def test_missing_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'densecontrast\[timm\]'"):
        build_backbone("timm:vit_tiny_patch16_224")


def test_unknown_names(timm) -> None:
    with pytest.raises(ValueError, match=r"timm\.list_models"):
        build_backbone("timm:no_such_model")
    with pytest.raises(ValueError, match="timm:<model name>"):
        build_backbone("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="only built in for 'timm:'"):
        build_backbone("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="patch size"):
        build_backbone("timm:vit_tiny_patch16_224", output_stride=8)


def test_timm_cnn_last_feature_map_on_a_non_square_input(timm) -> None:
    torch.manual_seed(0)
    net, channels = build_backbone("timm:resnet10t")
    assert isinstance(net, TimmFeatureMap) and channels == net.out_channels == 512 and net.stride == 32
    x = torch.rand(2, 3, 48, 80)
    y = net(x)
    assert y.shape == (2, 512, 2, 3) and torch.isfinite(y).all()  # ceil(48 / 32) x ceil(80 / 32)
    y.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.model.conv1[0].weight.grad.abs().sum() > 0  # the stem receives a gradient


def test_timm_cnn_output_stride(timm) -> None:
    net, _ = build_backbone("timm:resnet18", output_stride=16)
    assert net.stride == 16 and net(torch.rand(1, 3, 64, 96)).shape == (1, 512, 4, 6)


def test_vit_patch_tokens_as_a_non_square_map(vit) -> None:
    net, channels = vit
    assert isinstance(net, TimmTokenMap)
    assert channels == net.out_channels == 192 and net.stride == 16 and net.num_prefix_tokens == 1
    x = torch.rand(2, 3, 48, 80)
    y = net(x)
    assert y.shape == (2, 192, 3, 5) and torch.isfinite(y).all()  # a 3 x 5 grid of 16-px patches
    tokens = net.model.forward_features(x)  # (B, 1 + 15, C): the class token first
    assert tokens.shape == (2, 16, 192)
    for i in range(3):
        for j in range(5):  # cell (i, j) is patch row i, column j (row-major), class token dropped
            torch.testing.assert_close(y[:, :, i, j], tokens[:, 1 + 5 * i + j])
    net.zero_grad()
    y.square().mean().backward()
    assert net.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert net.model.cls_token.grad is not None  # the class token still attends to the patches
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # other sizes the model accepts (multiples of the patch size), square or not
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 192, 2, 2)
    assert net(torch.rand(1, 3, 96, 64)).shape == (1, 192, 6, 4)


@pytest.mark.parametrize(("name", "prefix"), [("deit_tiny_distilled_patch16_224", 2),
                                              ("vit_little_patch16_reg4_gap_256", 4)])
def test_vit_class_distillation_and_register_tokens_are_dropped(timm, name: str, prefix: int) -> None:
    torch.manual_seed(0)
    net, channels = build_backbone(f"timm:{name}")
    assert net.num_prefix_tokens == net.model.num_prefix_tokens == prefix
    x = torch.rand(1, 3, 48, 80)
    y = net(x)
    assert y.shape == (1, channels, 3, 5) and torch.isfinite(y).all()
    tokens = net.model.forward_features(x)[:, prefix:]
    if net.token_norm:  # an average-pooled model: its final norm is fc_norm, applied to every token
        tokens = net.model.fc_norm(tokens)
    torch.testing.assert_close(y.flatten(2).transpose(1, 2), tokens)


def test_vit_with_a_fixed_img_size(timm) -> None:
    net, _ = build_backbone("timm:vit_tiny_patch16_224", img_size=(48, 80))
    assert net(torch.rand(1, 3, 48, 80)).shape == (1, 192, 3, 5)


def _views(batch: int) -> tuple[ViewGeometry, ViewGeometry]:
    """Two overlapping 48 x 80 (h x w) crops of 96 x 160 images, the second one flipped."""
    size = torch.tensor([160.0, 96.0])
    b1 = torch.tensor([[10.0, 8.0, 110.0, 68.0]]).repeat(batch, 1)
    b2 = torch.tensor([[40.0, 20.0, 150.0, 86.0]]).repeat(batch, 1)
    g1 = ViewGeometry.from_crops(b1, torch.zeros(batch, dtype=torch.bool), size)
    g2 = ViewGeometry.from_crops(b2, torch.ones(batch, dtype=torch.bool), size)
    return g1, g2


def test_dense_pieces_on_a_non_square_vit_token_map(vit) -> None:
    net, channels = vit
    net.zero_grad()
    torch.manual_seed(1)
    g1, g2 = _views(2)
    q = net(torch.rand(2, 3, 48, 80))  # (2, 192, 3, 5)
    with torch.no_grad():
        k = net(torch.rand(2, 3, 48, 80))
    shape = tuple(q.shape[-2:])
    assert shape == (3, 5)

    coord = nearest_coordinate_match(g1, g2, shape, shape)
    assert coord.valid.shape == (2, 15) and coord.valid.any() and not coord.valid.all()
    sim = similarity_match(q.detach(), k, query_geometry=g1, key_geometry=g2, query_shape=shape, key_shape=shape)
    assert sim.key_index.shape == (2, 15) and int(sim.key_index.max()) < 15
    sr = SemanticReweighting(gamma=2.0)(sim)
    assert ((sr.weight >= 0) & (sr.weight <= 1)).all()

    queue = F.normalize(torch.randn(32, channels), dim=1)
    criterion = DenseInfoNCE(temperature=0.2)
    loss = criterion(q, k, coord, queue) + criterion(q, k, sr, queue)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert net.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_identical_views_match_every_token_to_itself(vit) -> None:
    # the token grid is the view's cell grid: for the same crop, each patch's image point is its own cell
    g1, _ = _views(1)
    m = nearest_coordinate_match(g1, g1, (3, 5), (3, 5))
    assert m.valid.all() and torch.equal(m.key_index[0], torch.arange(15))


def test_export_of_a_timm_backbone(vit, tmp_path: Path, timm) -> None:
    net, _ = vit
    path = tmp_path / "backbone.pth"
    assert export_backbone(net, path, arch="timm:vit_tiny_patch16_224")  # verify skips non-torchvision names
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["arch"] == "timm:vit_tiny_patch16_224"
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    fresh.load_state_dict(state)  # strict: exactly timm's keys without the classifier
    cnn, _ = build_backbone("timm:resnet10t")
    assert export_backbone(cnn, tmp_path / "cnn.pth", arch="timm:resnet10t")


@pytest.mark.slow
def test_pixcon_script_runs_two_steps_with_a_timm_vit(timm, tmp_path: Path) -> None:
    out = tmp_path / "pixcon_vit"
    cmd = [sys.executable, str(ROOT / "examples" / "pixcon" / "train.py"), "--arch", "timm:vit_tiny_patch16_224",
           "--crop-size", "32", "--image-size", "48", "--num-images", "8", "--batch-size", "4", "--workers", "0",
           "--max-steps", "2", "--no-eval", "--queue-size", "64", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2
    exported = torch.load(out / "backbone.pth", map_location="cpu", weights_only=True)
    assert exported["arch"] == "timm:vit_tiny_patch16_224"
    net, _ = build_backbone("timm:vit_tiny_patch16_224")
    net.load_state_dict(exported["state_dict"])
    assert net(torch.rand(1, 3, 32, 48)).shape == (1, 192, 2, 3)
