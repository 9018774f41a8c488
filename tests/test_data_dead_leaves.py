from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from densecontrast.data.dead_leaves import CATEGORIES, DeadLeavesScenes, _texture_bank, power_law_radii
from densecontrast.data.synthetic import SyntheticScenes


# ------------------------------------------------------------------------------------ helpers
def _spectral_slope(images: list[torch.Tensor], f_min: float = 3.0, f_max: float = 0.2) -> float:
    """Log-log slope of the radially averaged power spectrum of grey images.

    Images ``(3, S, S)`` (or ``(S, S)``) are averaged to grey, mean-removed, Hann-windowed; the
    spectrum is averaged over images and over rings of integer radius ``f`` (cycles per image),
    and a line is fitted to ``log P(f)`` against ``log f`` for ``f_min <= f <= f_max * S``.
    """
    x = torch.stack([im.double().mean(0) if im.ndim == 3 else im.double() for im in images])
    s = x.shape[-1]
    x = x - x.mean((1, 2), keepdim=True)
    w = torch.hann_window(s, periodic=False, dtype=torch.float64)
    power = torch.fft.fftshift(torch.fft.fft2(x * w[:, None] * w[None, :]).abs().square().mean(0))
    yy, xx = torch.meshgrid(torch.arange(s) - s // 2, torch.arange(s) - s // 2, indexing="ij")
    ring = torch.sqrt((xx * xx + yy * yy).double()).round().long().view(-1)
    radial = torch.bincount(ring, power.view(-1)) / torch.bincount(ring)
    f = torch.arange(len(radial), dtype=torch.float64)
    sel = (f >= f_min) & (f <= f_max * s)
    design = torch.stack([f[sel].log(), torch.ones(int(sel.sum()), dtype=torch.float64)], dim=1)
    return float(torch.linalg.lstsq(design, radial[sel].log()[:, None]).solution[0, 0])


def _brute_force_leaf_map(info: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Front-most leaf at each pixel centre, one leaf at a time in float64 (the reference)."""
    c = torch.arange(size, dtype=torch.float64) + 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    out = torch.full((size, size), -1, dtype=torch.long)
    cx, cy = info["center"].double().unbind(1)
    for j in reversed(range(len(info["radius"]))):  # back to front: the front-most leaf is painted last
        rect = int(info["shape"][j]) == 2
        scale = float(info["radius"][j]) * (math.sqrt(math.pi) / 2 if rect else 1.0)
        sq = math.sqrt(float(info["aspect"][j]))
        a, b, ang = scale * sq, scale / sq, float(info["angle"][j])
        dx, dy = xs - cx[j], ys - cy[j]
        u = (dx * math.cos(ang) + dy * math.sin(ang)) / a
        v = (-dx * math.sin(ang) + dy * math.cos(ang)) / b
        inside = torch.maximum(u.abs(), v.abs()) <= 1 if rect else u * u + v * v <= 1
        out[inside] = j
    return out


def _truncated_power_law_mle(r: torch.Tensor, r_min: float, r_max: float) -> float:
    """Maximum-likelihood exponent ``a`` of ``p(r) ∝ r^-a`` on ``[r_min, r_max]`` (grid search, step 0.005)."""
    a = torch.arange(1.2, 5.0, 0.005, dtype=torch.float64)
    e = 1.0 - a
    norm = (r_max**e - r_min**e) / e  # ∫ r^-a dr over [r_min, r_max] (a != 1 on this grid)
    loglik = -a * r.double().log().sum() - len(r) * norm.log()
    return float(a[loglik.argmax()])


# ------------------------------------------------------------------------------------ determinism
def test_same_index_and_seed_is_identical() -> None:
    a = DeadLeavesScenes(num_images=20, image_size=48, seed=3)
    b = DeadLeavesScenes(num_images=20, image_size=48, seed=3)
    for i in (0, 7, 19):
        ia, ma = a[i]
        ib, mb = b[i]
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    # Access order does not matter (no hidden state), and negative indices wrap.
    first = a[5][0].clone()
    _ = a[6], a[2], b[5]
    assert torch.equal(a[5][0], first)
    assert torch.equal(a[-1][0], a[19][0])
    # A pickled copy (what a DataLoader worker gets) rebuilds the same texture bank.
    clone = pickle.loads(pickle.dumps(a))
    assert clone._bank is None and torch.equal(clone[5][0], first)


def test_different_seeds_and_indices_differ() -> None:
    a = DeadLeavesScenes(num_images=10, image_size=48, seed=0)
    b = DeadLeavesScenes(num_images=10, image_size=48, seed=1)
    assert not torch.equal(a[0][0], b[0][0])
    assert not torch.equal(a[0][0], a[1][0])
    assert all(not torch.equal(a[i][1], b[i][1]) for i in range(10))  # layouts differ, not just colours


def test_dataloader_workers_do_not_change_the_items() -> None:
    ds = DeadLeavesScenes(num_images=8, image_size=40, seed=2)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=3, num_workers=workers, shuffle=False)
        images, masks = zip(*[(im, m) for im, m in loader])
        batches[workers] = (torch.cat(images), torch.cat(masks))
    assert torch.equal(batches[0][0], batches[2][0]) and torch.equal(batches[0][1], batches[2][1])
    assert torch.equal(batches[2][0][5], ds[5][0])


# ------------------------------------------------------------------------------------ item contract
def test_types_shapes_and_labels() -> None:
    ds = DeadLeavesScenes(num_images=12, image_size=40, seed=2)
    labels_seen = set()
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (3, 40, 40) and image.dtype == torch.uint8 and image.is_contiguous()
        assert mask.shape == (40, 40) and mask.dtype == torch.int64
        assert 0 <= int(mask.min()) and int(mask.max()) <= 9
        labels_seen |= set(mask.unique().tolist())
    assert labels_seen == set(range(10))  # background and all nine categories within a few images
    assert ds.num_labels == 10 and len(ds) == 12
    assert [(d["shape"], d["texture"]) for d in ds.class_info] == list(CATEGORIES)
    only = DeadLeavesScenes(num_images=2, image_size=32, return_mask=False)[0]
    assert isinstance(only, torch.Tensor) and only.shape == (3, 32, 32)
    pil, mask = DeadLeavesScenes(num_images=2, image_size=32, as_pil=True)[1]
    assert pil.size == (32, 32) and pil.mode == "RGB"
    assert torch.equal(TF.pil_to_tensor(pil), DeadLeavesScenes(num_images=2, image_size=32)[1][0])


def test_fewer_classes_keep_all_textures() -> None:
    ds = DeadLeavesScenes(num_images=6, image_size=32, num_classes=3, seed=1)
    assert [d["texture"] for d in ds.class_info] == ["noise", "grating", "flat"]
    assert {d["shape"] for d in ds.class_info} == {"disc"}
    seen = set().union(*(ds[i][1].unique().tolist() for i in range(len(ds))))
    assert seen == {0, 1, 2, 3} and ds.num_labels == 4


# ------------------------------------------------------------------------------------ masks follow the leaves
def test_leaf_map_is_the_exact_front_most_leaf_and_the_mask_its_label() -> None:
    # The fast row-run rasteriser against a one-leaf-at-a-time float64 reference, pixel for pixel.
    for size in (32, 64, 96):
        ds = DeadLeavesScenes(num_images=4, image_size=size, seed=5)
        for i in range(len(ds)):
            info = ds.layout(i)
            assert torch.equal(info["leaf_map"], _brute_force_leaf_map(info, size))
            leaf_map = info["leaf_map"]
            expected = torch.where(leaf_map >= 0, info["label"][leaf_map.clamp_min(0)], 0)
            assert torch.equal(ds[i][1], expected)


def test_mask_regions_match_the_image() -> None:
    # Pixels of one mask region come from one leaf, and what is drawn there is that leaf's
    # texture: inside flat leaves the colour is constant, inside noise and grating leaves it varies.
    ds = DeadLeavesScenes(num_images=12, image_size=96, seed=4)
    spread = {0: [], 1: [], 2: []}
    for i in range(len(ds)):
        image, _ = ds[i]
        info = ds.layout(i)
        m = info["leaf_map"]
        # Interior pixels: the 3 x 3 neighbourhood is one leaf (the blur mixes only within it).
        pad = torch.nn.functional.pad(m[None, None].float(), (1, 1, 1, 1), value=-2.0)[0, 0]
        same = torch.stack([pad[1 + dy : 97 + dy, 1 + dx : 97 + dx] == m for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        interior = same.all(0) & (m >= 0)
        x = image.float()
        for leaf in m[interior].unique().tolist():
            sel = interior & (m == leaf)
            if sel.sum() >= 100:
                spread[int(info["texture"][leaf])].append(float(x[:, sel].std(1).max()))
    flat, noise, grating = (torch.tensor(spread[k]) for k in (2, 0, 1))
    assert len(flat) >= 5 and len(noise) >= 5 and len(grating) >= 5
    assert flat.max() < 1.0  # uint8 rounding only
    assert (noise > 1.0).float().mean() > 0.9 and (grating > 1.0).float().mean() > 0.9


def test_leaves_are_added_until_the_coverage_is_reached_and_no_further() -> None:
    for coverage in (0.5, 0.95):
        ds = DeadLeavesScenes(num_images=6, image_size=48, coverage=coverage, seed=7)
        need = math.ceil(coverage * 48 * 48)
        for i in range(len(ds)):
            info = ds.layout(i)
            leaf_map = info["leaf_map"]
            covered = int((leaf_map >= 0).sum())
            assert covered >= need
            # Without the last leaf that fell (the back-most), the target would not be reached.
            last = len(info["radius"]) - 1
            assert covered - int((leaf_map == last).sum()) < need
            assert torch.equal(ds[i][1] == 0, leaf_map < 0)


# ------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("exponent", [3.0, 2.0])
def test_leaf_radii_follow_the_configured_power_law(exponent: float) -> None:
    # Pooled over images, the radii of the leaves that fell have density ∝ r^-exponent on
    # [r_min, r_max] * S. Tolerance 0.1 on the maximum-likelihood exponent: with the 2,500 to
    # 8,000 radii pooled here its standard error is 0.02 to 0.03.
    size, r_range = 64, (0.03, 1.0)
    ds = DeadLeavesScenes(num_images=30, image_size=size, radius_exponent=exponent, radius_range=r_range, seed=8)
    radii = torch.cat([ds.layout(i)["radius"] for i in range(len(ds))])
    lo, hi = r_range[0] * size, r_range[1] * size
    assert len(radii) > 2000
    assert float(radii.min()) >= lo * (1 - 1e-5) and float(radii.max()) <= hi * (1 + 1e-5)
    assert abs(_truncated_power_law_mle(radii, lo, hi) - exponent) < 0.1
    # The sampler itself, on many draws.
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(_truncated_power_law_mle(power_law_radii(u, exponent, 1.0, 30.0), 1.0, 30.0) - exponent) < 0.02


def test_image_power_spectrum_falls_like_a_natural_image_at_every_size() -> None:
    # Natural photographs: power ∝ 1/f^~2 at any scale. The log-log slope of the radially averaged
    # spectrum (3 to 0.2 S cycles per image, 24 grey images) must lie in [-3.0, -1.5] at 64 and
    # 128 px and change by at most 0.5 between them. SyntheticScenes (flat-coloured shapes with
    # fixed-scale textures and pixel noise) is not scale invariant: its slope moves by > 0.7.
    slopes, synthetic = {}, {}
    for size in (64, 128):
        dl = DeadLeavesScenes(num_images=24, image_size=size, seed=1)
        slopes[size] = _spectral_slope([dl[i][0] for i in range(len(dl))])
        sy = SyntheticScenes(num_images=24, image_size=size, seed=1)
        synthetic[size] = _spectral_slope([sy[i][0] for i in range(len(sy))])
    assert all(-3.0 <= v <= -1.5 for v in slopes.values()), slopes
    assert abs(slopes[64] - slopes[128]) <= 0.5, slopes
    assert abs(synthetic[64] - synthetic[128]) > 0.7, synthetic


def test_image_power_spectrum_is_close_to_photographs() -> None:
    data = pytest.importorskip("skimage.data")
    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "coins", "moon", "brick", "grass"):
        a = torch.from_numpy(getattr(data, name)())
        a = (a[..., None].expand(-1, -1, 3) if a.ndim == 2 else a[..., :3]).permute(2, 0, 1).double()
        side = min(a.shape[1:])
        photos.append(torch.nn.functional.interpolate(a[None, :, :side, :side], size=(128, 128), mode="area")[0])
    dl = DeadLeavesScenes(num_images=24, image_size=128, seed=2)
    ours = _spectral_slope([dl[i][0] for i in range(len(dl))])
    assert abs(ours - _spectral_slope(photos)) < 0.4, (ours, _spectral_slope(photos))


def test_noise_textures_have_the_configured_spectrum() -> None:
    bank, info = _texture_bank(8, 64, (1.0, 3.0), torch.Generator().manual_seed(0))
    fields = bank.view(16, 128, 128)[:, :64, :64]  # noise fields first, then gratings; tiled 2 x 2
    assert torch.equal(fields[0], bank.view(16, 128, 128)[0, 64:, 64:])  # periodic tiling
    assert int(fields.max()) <= 63
    err = torch.tensor([_spectral_slope([fields[j]], 2.0, 0.4) + float(info["alpha"][j]) for j in range(8)])
    assert float(err.abs().mean()) < 0.3 and float(err.abs().max()) < 0.6, err
    assert bool(((info["alpha"] >= 1.0) & (info["alpha"] <= 3.0)).all())
    assert bool((info["grating_period"] >= 4.0 - 1e-4).all() and (info["grating_period"] <= 64 / 3.5).all())


# ------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": -1}, "num_images must be an int >= 0, but got -1"),
        ({"image_size": 8}, "image_size must be an int >= 16 (pixels), but got 8"),
        ({"num_classes": 10}, "num_classes must be an int in [1, 9] (one class per leaf shape x texture category), "
                              "but got 10"),
        ({"seed": -2}, "seed must be an int >= 0, but got -2"),
        ({"radius_range": (0.5, 0.1)}, "radius_range must be a pair (min, max) with 0 < min <= max <= 4, "
                                       "but got (0.5, 0.1)"),
        ({"radius_exponent": -1.0}, "radius_exponent must be in [0, 10], but got -1.0"),
        ({"alpha_range": (0.0, 2.0)}, "alpha_range must be a pair (min, max) with 0 < min <= max <= 4, "
                                      "but got (0.0, 2.0)"),
        ({"texture_probs": (1.0, 2.0)}, "texture_probs must be a sequence of 3 numbers >= 0 with a positive sum, "
                                        "but got (1.0, 2.0)"),
        ({"texture_probs": (1.0, -1.0, 0.0)}, "texture_probs[1] must be a finite number >= 0, but got -1.0"),
        ({"num_classes": 1, "texture_probs": (0.0, 1.0, 1.0)}, "texture_probs must give a positive probability"),
        ({"coverage": 0.0}, "coverage must be in (0, 1], but got 0.0"),
        ({"max_leaves": 0}, "max_leaves must be an int >= 1, but got 0"),
        ({"blur": 1.0}, "blur must be in [0, 0.8] (pixels), but got 1.0"),
        ({"bank_size": 0}, "bank_size must be an int >= 1, but got 0"),
    ],
)
def test_bad_arguments_name_the_argument_the_expectation_and_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        DeadLeavesScenes(**kwargs)
    assert str(err.value).startswith(message), str(err.value)


def test_index_out_of_range() -> None:
    with pytest.raises(IndexError, match="out of range"):
        DeadLeavesScenes(num_images=3)[3]
