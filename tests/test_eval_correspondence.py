from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densecontrast.data.synthetic import SyntheticScenes
from densecontrast.eval.correspondence import (
    correspondence_accuracy,
    match_correctness,
    random_crops,
    render_views,
)
from densecontrast.geometry import ViewGeometry


def coordinate_images(b: int, h: int, w: int) -> torch.Tensor:
    """Images whose channels 0 and 1 are the image-space x and y of each pixel center."""
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy, torch.zeros_like(gx)])[None].expand(b, 3, h, w).clone()


class PositionOracle(nn.Module):
    """Pools the coordinate channels over stride x stride cells and embeds them with Fourier features.

    Cosine similarity of two embeddings is the mean of cos(2 pi a (p - q)) over a few frequencies
    a <= 0.5, which is strictly largest at p = q: argmax recovers the true position.
    """

    def __init__(self, stride: int = 8) -> None:
        super().__init__()
        self.stride = stride
        self.freqs = torch.tensor([0.25, 0.5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.avg_pool2d(x[:, :2].double(), self.stride)  # (B, 2, h, w) image x, y
        ang = 2 * math.pi * p[:, :, None] * self.freqs[None, None, :, None, None].double()  # (B, 2, F, h, w)
        feats = torch.cat([ang.cos(), ang.sin()], dim=2)
        return feats.flatten(1, 2).float()


class RandomFeatures(nn.Module):
    """Features that ignore the input entirely."""

    def __init__(self, c: int = 16, stride: int = 8) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(123)
        self.c, self.stride = c, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return torch.randn(b, self.c, h // self.stride, w // self.stride, generator=self.g)


def test_oracle_flip_is_perfect() -> None:
    out = correspondence_accuracy(
        PositionOracle(), coordinate_images(3, 64, 48), "flip", color=False, normalize=False
    )
    assert out["exact"] == 1.0 and out["within_one"] == 1.0
    assert out["num_queries"] == 3 * 8 * 6 and out["fraction_valid"] == 1.0 and out["feature_shape"] == (8, 6)
    assert out["mean_distance"] == 0.0


def test_oracle_crop_is_near_perfect() -> None:
    out = correspondence_accuracy(
        PositionOracle(), coordinate_images(16, 64, 64), "crop", color=False, normalize=False,
        scale=(0.3, 1.0), generator=torch.Generator().manual_seed(0),
    )
    assert 0 < out["fraction_valid"] < 1.0
    assert out["within_one"] == 1.0
    assert out["exact"] > 0.8


def test_view_space_positional_features_fail_under_flip() -> None:
    # Features that encode the position in the VIEW (not the image) match cell (i, j) to (i, j)
    # instead of the mirrored (i, w - 1 - j): the check can fail.
    class ViewPosition(PositionOracle):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(coordinate_images(x.shape[0], *x.shape[-2:]))

    out = correspondence_accuracy(ViewPosition(), torch.rand(2, 3, 64, 64), color=False, normalize=False)
    assert out["exact"] == 0.0
    assert out["within_one"] == pytest.approx(2 / 8)  # only the two middle columns are within one


def test_random_features_are_at_chance() -> None:
    out = correspondence_accuracy(RandomFeatures(), torch.rand(16, 3, 64, 64), "flip")
    m = 64  # 8 x 8 key cells
    assert out["chance_exact"] == pytest.approx(1 / m)
    assert out["num_queries"] == 16 * 64
    assert out["exact"] < 4 / m
    assert out["within_one"] < 0.3  # chance ~ 9 / 64 away from the borders


def _naive(fq: torch.Tensor, fk: torch.Tensor, qg: ViewGeometry, kg: ViewGeometry) -> dict[str, torch.Tensor]:
    """Loops, float64, geometry straight from the boxes."""
    b, _, h, w = fq.shape
    hk, wk = fk.shape[-2:]
    exact = torch.zeros(b, h * w, dtype=torch.bool)
    within = torch.zeros(b, h * w, dtype=torch.bool)
    valid = torch.zeros(b, h * w, dtype=torch.bool)
    true = torch.full((b, h * w), -1, dtype=torch.long)
    for bi in range(b):
        q = F.normalize(fq[bi].double().reshape(fq.shape[1], -1).T, dim=1)
        k = F.normalize(fk[bi].double().reshape(fk.shape[1], -1).T, dim=1)
        sim = q @ k.T
        qb, kb = qg.boxes[bi].double(), kg.boxes[bi].double()
        for i in range(h):
            for j in range(w):
                n = i * w + j
                vx, vy = (j + 0.5) / w, (i + 0.5) / h
                if qg.flips[bi]:
                    vx = 1 - vx
                px = float(qb[0] + (qb[2] - qb[0]) * vx)
                py = float(qb[1] + (qb[3] - qb[1]) * vy)
                kx = (px - float(kb[0])) / float(kb[2] - kb[0])
                ky = (py - float(kb[1])) / float(kb[3] - kb[1])
                if kg.flips[bi]:
                    kx = 1 - kx
                if not (0 <= kx <= 1 and 0 <= ky <= 1):
                    continue
                valid[bi, n] = True
                tj, ti = min(int(kx * wk), wk - 1), min(int(ky * hk), hk - 1)
                true[bi, n] = ti * wk + tj
                best = int(sim[n].argmax())
                pi, pj = divmod(best, wk)
                d = max(abs(pi - ti), abs(pj - tj))
                exact[bi, n] = d == 0
                within[bi, n] = d <= 1
    return {"exact": exact, "within_one": within, "valid": valid, "true_index": true}


@pytest.mark.parametrize(
    ("b", "c", "h", "w", "hk", "wk"), [(2, 8, 4, 5, 4, 5), (3, 4, 6, 6, 3, 4), (1, 16, 7, 3, 5, 5)]
)
def test_match_correctness_against_naive_loops(b: int, c: int, h: int, w: int, hk: int, wk: int) -> None:
    g = torch.Generator().manual_seed(b * 100 + h)
    qg = random_crops((50, 70), b, g, scale=(0.3, 1.0))
    kg = random_crops((50, 70), b, g, scale=(0.3, 1.0))
    fq = torch.randn(b, c, h, w, generator=g)
    fk = torch.randn(b, c, hk, wk, generator=g)
    res = match_correctness(fq, fk, qg, kg)
    ref = _naive(fq, fk, qg, kg)
    for key in ("valid", "exact", "within_one"):
        assert torch.equal(res[key], ref[key]), key
    assert res["valid"].any()
    v = res["valid"]
    assert torch.equal(res["true_index"][v], ref["true_index"][v])
    # Matching features sampled at the true key cells must be exact wherever valid.
    fk_true = torch.randn(b, c, hk, wk, generator=g)
    fq_true = fk_true.flatten(2).gather(2, res["true_index"][:, None].expand(b, c, h * w)).reshape(b, c, h, w)
    hit = match_correctness(fq_true, fk_true, qg, kg)
    assert torch.equal(hit["exact"], v) and torch.equal(hit["within_one"], v)


def test_flip_accuracy_matches_naive_aggregate() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(), nn.Conv2d(16, 16, 2, stride=2))
    x = SyntheticScenes(6, 48, seed=1, return_mask=False)
    images = torch.stack([x[i] for i in range(6)]).float() / 255
    out = correspondence_accuracy(backbone, images, "flip", color=False, normalize=False, batch_size=4)
    with torch.no_grad():
        fq, fk = backbone(images), backbone(images.flip(-1))
    full = torch.tensor([[0.0, 0.0, 48.0, 48.0]]).expand(6, 4)
    size = torch.tensor([48.0, 48.0])
    ref = _naive(fq, fk, ViewGeometry.from_crops(full, torch.zeros(6, dtype=torch.bool), size),
                 ViewGeometry.from_crops(full, torch.ones(6, dtype=torch.bool), size))
    assert out["exact"] == pytest.approx(ref["exact"].float().mean().item())
    assert out["within_one"] == pytest.approx(ref["within_one"].float().mean().item())


def test_dataset_input_color_and_determinism() -> None:
    ds = SyntheticScenes(5, 40, seed=2)
    backbone = nn.Conv2d(3, 8, 8, stride=8)
    a = correspondence_accuracy(backbone, ds, "crop", size=32, batch_size=2,
                                generator=torch.Generator().manual_seed(1))
    b = correspondence_accuracy(backbone, ds, "crop", size=32, batch_size=2,
                                generator=torch.Generator().manual_seed(1))
    assert a == b
    assert a["num_images"] == 5 and a["feature_shape"] == (4, 4)
    c = correspondence_accuracy(backbone, ds, "flip", max_images=3)
    assert c["num_images"] == 3 and c["num_queries"] == 3 * 25


def test_backbone_mode_is_restored() -> None:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.BatchNorm2d(4))
    backbone.train()
    correspondence_accuracy(backbone, torch.rand(2, 3, 32, 32))
    assert backbone.training


def test_disjoint_views_give_no_valid_queries() -> None:
    size = torch.tensor([100.0, 100.0])
    q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 40.0, 40.0]]), None, size)
    k = ViewGeometry.from_crops(torch.tensor([[50.0, 50.0, 100.0, 100.0]]), None, size)
    res = match_correctness(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), q, k)
    assert not res["valid"].any() and not res["exact"].any()


def test_render_views_matches_geometry() -> None:
    g = random_crops((32, 32), 4, torch.Generator().manual_seed(3))
    views = render_views(coordinate_images(4, 32, 32), g, (16, 16))
    # Interior view pixels show their own image coordinates (bilinear of a linear ramp is exact).
    pts = g.grid(16, 16).reshape(4, 16, 16, 2)
    inner = (pts > 0.5 / 32) & (pts < 1 - 0.5 / 32)
    inner = inner.all(-1)
    assert torch.allclose(views[:, 0][inner], pts[..., 0][inner], atol=1e-5)
    assert torch.allclose(views[:, 1][inner], pts[..., 1][inner], atol=1e-5)


def test_bad_arguments() -> None:
    backbone = nn.Conv2d(3, 4, 8, stride=8)
    with pytest.raises(ValueError, match="mode"):
        correspondence_accuracy(backbone, torch.rand(1, 3, 16, 16), "rotate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="images"):
        correspondence_accuracy(backbone, torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="feature map"):
        correspondence_accuracy(lambda x: x.mean((2, 3)), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="batch_size"):
        correspondence_accuracy(backbone, torch.rand(1, 3, 16, 16), batch_size=0)


class Recorder(nn.Module):
    """A stride-8 conv that keeps every input batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.conv(x)


def test_color_mapping_selects_the_transforms() -> None:
    images = torch.rand(3, 3, 32, 32) * 0.5  # factors up to 1.4 never clip
    rec = Recorder()
    brightness = {"jitter": (0.4, 0.0, 0.0, 0.0), "jitter_p": 1.0, "gray_p": 0.0, "blur_p": 0.0}
    correspondence_accuracy(rec, images, "flip", color=brightness, normalize=False,
                            generator=torch.Generator().manual_seed(0))
    query, key = rec.seen
    assert torch.equal(query, images)
    flipped = images.flip(-1)
    factor = key.sum((1, 2, 3)) / flipped.sum((1, 2, 3))  # brightness alone: one factor per image
    assert torch.allclose(key, factor.view(3, 1, 1, 1) * flipped, atol=1e-5)
    assert ((factor >= 0.6 - 1e-6) & (factor <= 1.4 + 1e-6)).all() and not torch.allclose(factor, torch.ones(3))

    backbone = nn.Conv2d(3, 8, 8, stride=8)
    data = torch.rand(4, 3, 32, 32)

    def acc(color):
        return correspondence_accuracy(backbone, data, "crop", color=color, generator=torch.Generator().manual_seed(5))

    assert acc({"jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0}) == acc(False)
    assert acc({}) == acc(True)
    with pytest.raises(ValueError, match="unknown color_augment arguments"):
        acc({"brightness": 0.4})
    with pytest.raises(TypeError, match="color must be a bool or a mapping"):
        acc(0.4)
