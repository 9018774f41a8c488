"""Tests for densecontrast.transforms: recorded geometry vs the pixels actually produced, overlap rule, presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import v2

from densecontrast.geometry import ViewGeometry
from densecontrast.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiViewTransform,
    ViewTransform,
    blur_kernel_size,
    byol_views,
    center_crop_params,
    color_pipeline,
    crop_geometry,
    crop_overlap_fraction,
    lc_views,
    mocov2_views,
    resized_crop_flip,
)


# ------------------------------------------------------------------------------------------ helpers
def coordinate_image(h: int, w: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(3, H, W) image whose channels are the image-space (x, y) of each pixel's center, and 0."""
    xs = (torch.arange(w, dtype=dtype) + 0.5) / w
    ys = (torch.arange(h, dtype=dtype) + 0.5) / h
    return torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.zeros(h, w, dtype=dtype)])


def decode_at_cells(view: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Bilinearly read channels 0, 1 of a (C, h, w) view at the cell centers of a gh x gw grid -> (gh*gw, 2)."""
    pts = ViewGeometry.view_grid(gh, gw, dtype=torch.float64)
    grid = (2 * pts - 1).view(1, 1, -1, 2).to(view.dtype)
    out = F.grid_sample(view[None, :2], grid, mode="bilinear", align_corners=False, padding_mode="border")
    return out[0, :, 0].T.double()  # (N, 2)


def naive_center_crop(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """Independent statement of the fallback rule: whole image if its aspect fits, else clamp the aspect."""
    r = w / h
    if ratio[0] <= r <= ratio[1]:
        return 0, 0, h, w
    if r > ratio[1]:
        cw = round(h * ratio[1])
        return 0, (w - cw) // 2, h, cw
    ch = round(w / ratio[0])
    return (h - ch) // 2, 0, ch, w


def box_of(g: ViewGeometry) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a one-view geometry (integer pixels)."""
    x0, y0, x1, y1 = (round(v) for v in g.boxes[0].tolist())
    return y0, x0, y1 - y0, x1 - x0


def check_decoded(view: torch.Tensor, g: ViewGeometry, gh: int, gw: int, antialias: bool, extra: float = 0.0) -> None:
    """Assert that the coordinates read from a coordinate-image view equal ``g.grid(gh, gw)``.

    Tolerance, per axis, in normalized image units (src = one source pixel = 1/W or 1/H, vp = one
    view pixel = crop_extent / (W * w_out)):
    * Bilinear interpolation (align_corners=False) of a linear ramp is exact wherever both taps lie
      inside the crop, and the grid_sample read-out on the view is again bilinear between two view
      pixels, so cells whose point is at least 0.5 src + 1 vp away from the crop edges must match to
      float32 precision (1e-5).
    * Near the crop edges, upsampling clamps the tap to the edge pixel: an error below half a source pixel.
    * Downscaling with antialias applies a triangle filter of radius one view pixel. Inside, its weights
      are symmetric about the target (up to the source-lattice sampling, a fraction of a source pixel); at
      an edge the filter is truncated, which shifts its mean by at most 2/21 ~ 0.095 view pixel (continuous
      truncated triangle), plus the lattice term, below half a source pixel. Bound: 0.125 vp + 0.5 src.
    """
    dec = decode_at_cells(view, gh, gw)
    exp = g.grid(gh, gw)[0].double()
    w_img, h_img = g.image_size[0].tolist()
    x0, y0, x1, y1 = g.boxes[0].tolist()
    h_out, w_out = view.shape[-2:]
    src = torch.tensor([1 / w_img, 1 / h_img], dtype=torch.float64)
    vp = torch.tensor([(x1 - x0) / (w_img * w_out), (y1 - y0) / (h_img * h_out)], dtype=torch.float64)
    down = vp > src
    tol = 0.5 * src + 1e-5 + extra
    if antialias:
        tol = tol + torch.where(down, 0.125 * vp, torch.zeros_like(vp))
    err = (dec - exp).abs()
    assert (err <= tol).all(), f"max error {err.max(0).values.tolist()} > tolerance {tol.tolist()}"
    lo = torch.tensor([x0 / w_img, y0 / h_img], dtype=torch.float64)
    hi = torch.tensor([x1 / w_img, y1 / h_img], dtype=torch.float64)
    margin = 0.5 * src + vp
    inner = ((exp >= lo + margin) & (exp <= hi - margin)).all(-1)
    if not antialias or not down.any():
        inner_err = err[inner]
        assert (inner_err <= 1e-5 + extra).all(), f"interior error {inner_err.max().item()} is not exact"


# ------------------------------------------------------------------------------------------ pixel-exact
@settings(max_examples=40)
@given(
    img_h=st.integers(6, 64),
    img_w=st.integers(6, 64),
    out_h=st.integers(4, 40),
    out_w=st.integers(4, 40),
    lo=st.floats(0.05, 1.0),
    span=st.floats(0.0, 1.0),
    flips=st.tuples(st.booleans(), st.booleans()),
    antialias=st.booleans(),
    grid_frac=st.tuples(st.floats(0.1, 1.0), st.floats(0.1, 1.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_views_reproduce_geometry_grid_pixel_exactly(
    img_h, img_w, out_h, out_w, lo, span, flips, antialias, grid_frac, seed
):
    """Decode a coordinate image after the real augmentation and compare with geometry.grid."""
    scale = (lo, lo + span * (1.0 - lo))
    views_t = [
        ViewTransform((out_h, out_w), scale=scale, flip_p=float(flips[0]), antialias=antialias),
        ViewTransform((out_h, out_w), scale=scale, flip_p=float(flips[1]), antialias=antialias),
        ViewTransform((out_h, out_w), crop=False, flip_p=float(flips[1]), antialias=antialias),
    ]
    t = MultiViewTransform(views_t)
    image = coordinate_image(img_h, img_w)
    torch.manual_seed(seed)
    views, geoms = t(image)
    gh = max(1, int(grid_frac[0] * out_h))
    gw = max(1, int(grid_frac[1] * out_w))
    for view, g, flip in zip(views, geoms, (flips[0], flips[1], flips[1])):
        assert view.shape == (3, out_h, out_w) and view.dtype == torch.float64
        assert bool(g.flips[0]) == flip
        check_decoded(view, g, gh, gw, antialias)
    assert geoms[2].boxes.tolist() == [[0.0, 0.0, float(img_w), float(img_h)]]


@settings(max_examples=15)
@given(
    img_h=st.integers(20, 70),
    img_w=st.integers(20, 70),
    size=st.integers(8, 32),
    seed=st.integers(0, 2**31 - 1),
    preset=st.sampled_from(["byol", "mocov2", "lc"]),
)
def test_presets_without_colour_keep_geometry(img_h, img_w, size, seed, preset):
    """Same check through the presets (colour off, ImageNet normalization undone), random flips."""
    make = {"byol": byol_views, "mocov2": mocov2_views, "lc": lc_views}[preset]
    t = make(size, color=False)
    torch.manual_seed(seed)
    views, geoms = t(coordinate_image(img_h, img_w, torch.float32))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for view, g in zip(views, geoms):
        assert view.dtype == torch.float32
        check_decoded(view * std + mean, g, 7, 7, antialias=True, extra=1e-5)


def test_flip_mirrors_the_view_and_the_geometry():
    torch.manual_seed(0)
    image = coordinate_image(30, 40)
    a = ViewTransform(16, scale=(0.3, 0.6), flip_p=0.0)
    b = ViewTransform(16, scale=(0.3, 0.6), flip_p=1.0)
    crop = a.sample_crop(image)
    va, ga = a.apply(image, crop, a.sample_flip())
    vb, gb = b.apply(image, crop, b.sample_flip())
    assert torch.equal(vb, va.flip(-1))
    assert torch.equal(ga.boxes, gb.boxes) and not ga.flips[0] and gb.flips[0]
    assert torch.allclose(gb.grid(4, 4).view(4, 4, 2), ga.grid(4, 4).view(4, 4, 2).flip(1))


def test_pil_input_matches_uint8_tensor_input():
    pil = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(3)
    arr = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=g)
    img = pil.fromarray(arr.permute(1, 2, 0).numpy())
    t = byol_views(24)
    torch.manual_seed(7)
    v1, g1 = t(img)
    torch.manual_seed(7)
    v2_, g2 = t(arr)
    for a, b, ga, gb in zip(v1, v2_, g1, g2):
        assert torch.equal(a, b)
        assert torch.equal(ga.boxes, gb.boxes) and torch.equal(ga.flips, gb.flips)
        assert ga.image_size.tolist() == [[53.0, 37.0]]


def test_uint8_without_photometric_stays_uint8_and_matches_functional():
    torch.manual_seed(1)
    x = torch.randint(0, 256, (3, 21, 33), dtype=torch.uint8)
    t = ViewTransform((10, 12), scale=(0.2, 0.9))
    view, g = t(x)
    assert view.dtype == torch.uint8 and view.shape == (3, 10, 12)
    top, left, h, w = box_of(g)
    ref = v2.functional.resized_crop(x, top, left, h, w, [10, 12], antialias=True)
    if g.flips[0]:
        ref = ref.flip(-1)
    assert torch.equal(view, ref)


@given(h=st.integers(1, 50), w=st.integers(1, 50), data=st.data(), flip=st.booleans())
def test_crop_geometry_equals_validated_from_crops(h, w, data, flip):
    top = data.draw(st.integers(0, h - 1))
    left = data.draw(st.integers(0, w - 1))
    ch = data.draw(st.integers(1, h - top))
    cw = data.draw(st.integers(1, w - left))
    g = crop_geometry((top, left, ch, cw), flip, (h, w))
    ref = ViewGeometry.from_crops(
        torch.tensor([[left, top, left + cw, top + ch]], dtype=torch.float32),
        torch.tensor([flip]),
        torch.tensor([[w, h]], dtype=torch.float32),
    )
    for a, b in ((g.boxes, ref.boxes), (g.flips, ref.flips), (g.image_size, ref.image_size)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="crop must be"):
        crop_geometry((top, left, ch, cw + w), flip, (h, w))


def test_resized_crop_flip_reads_the_crop():
    x = torch.arange(48.0).view(1, 6, 8)
    out = resized_crop_flip(x, (1, 2, 3, 4), False, (3, 4))
    assert torch.equal(out, x[:, 1:4, 2:6])
    assert torch.equal(resized_crop_flip(x, (1, 2, 3, 4), True, (3, 4)), x[:, 1:4, 2:6].flip(-1))


# ------------------------------------------------------------------------------------------ min overlap
def overlap_frac_naive(later: tuple[int, int, int, int], first: tuple[int, int, int, int]) -> float:
    """Count pixels of ``later`` that are inside ``first`` (loops over the small later crop's rows/cols)."""
    t0, l0, h0, w0 = later
    t1, l1, h1, w1 = first
    cols = sum(1 for x in range(l0, l0 + w0) if l1 <= x < l1 + w1)
    rows = sum(1 for y in range(t0, t0 + h0) if t1 <= y < t1 + h1)
    return cols * rows / (h0 * w0)


@settings(max_examples=40)
@given(
    img_h=st.integers(8, 60),
    img_w=st.integers(8, 60),
    lo=st.floats(0.01, 0.5),
    min_overlap=st.floats(0.01, 1.0),
    max_tries=st.integers(1, 6),
    n_views=st.integers(2, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_min_overlap_is_met_or_documented_fallback(img_h, img_w, lo, min_overlap, max_tries, n_views, seed):
    ratio = (3 / 4, 4 / 3)
    vts = [ViewTransform(8, scale=(lo, 1.0), ratio=ratio, flip_p=0.5) for _ in range(n_views)]
    t = MultiViewTransform(vts, min_overlap=min_overlap, max_tries=max_tries)
    torch.manual_seed(seed)
    fallbacks = 0
    for _ in range(5):
        views, geoms, info = t.sample_with_info(torch.rand(1, img_h, img_w))
        boxes = [box_of(g) for g in geoms]
        assert len(views) == n_views and info["tries"].shape == (n_views,)
        if bool(info["fallback"]):
            fallbacks += 1
            center = naive_center_crop(img_h, img_w, ratio)
            assert all(b == center for b in boxes)
            assert info["tries"].max() == max_tries
        else:
            assert all(1 <= int(n) <= max_tries for n in info["tries"])
            for b in boxes[1:]:
                assert overlap_frac_naive(b, boxes[0]) >= min_overlap - 1e-12
                assert crop_overlap_fraction(b, boxes[0]) == pytest.approx(overlap_frac_naive(b, boxes[0]))
        # never an empty intersection of a later view with the first
        for g in geoms[1:]:
            assert float(g.overlap(geoms[0])[1]) > 0
    assert t.fallback_count == fallbacks and t.call_count == 5


def test_fallback_is_forced_deterministically():
    torch.manual_seed(0)
    vts = [ViewTransform(12, scale=(0.01, 0.02), flip_p=0.0) for _ in range(2)]
    t = MultiViewTransform(vts, min_overlap=1.0, max_tries=1)
    image = coordinate_image(40, 90)
    views, geoms, info = t.sample_with_info(image)
    assert bool(info["fallback"]) and info["tries"].tolist() == [1, 1]
    assert t.fallback_count == 1
    expected = naive_center_crop(40, 90, (3 / 4, 4 / 3))  # too wide: a centered 53 x 40 crop
    assert box_of(geoms[0]) == box_of(geoms[1]) == expected == (0, 18, 40, 53)
    assert torch.equal(views[0], views[1])
    _, area = geoms[1].overlap(geoms[0])
    assert float(area) == pytest.approx(53 * 40 / (90 * 40))


def test_min_overlap_actually_resamples():
    """With the rule on, low-overlap pairs vanish; without it they occur (so the test could fail)."""
    vts = [ViewTransform(8, scale=(0.05, 0.2), flip_p=0.0) for _ in range(2)]
    image = torch.rand(1, 50, 50)
    torch.manual_seed(0)
    free = MultiViewTransform(vts)
    fr = [overlap_frac_naive(box_of(g[1]), box_of(g[0])) for g in (free(image)[1] for _ in range(200))]
    assert min(fr) < 0.3
    torch.manual_seed(0)
    ruled = MultiViewTransform(vts, min_overlap=0.3, max_tries=50)
    outs = [ruled.sample_with_info(image) for _ in range(200)]
    for _, g, info in outs:
        if not bool(info["fallback"]):
            assert overlap_frac_naive(box_of(g[1]), box_of(g[0])) >= 0.3
    assert sum(int(o[2]["tries"][1]) for o in outs) > 200  # some re-sampling happened


def test_first_view_without_crop_never_falls_back():
    torch.manual_seed(0)
    t = MultiViewTransform(
        [ViewTransform(8, crop=False), ViewTransform(8, scale=(0.01, 0.05))], min_overlap=1.0
    )
    for _ in range(20):
        _, _geoms, info = t.sample_with_info(torch.rand(3, 30, 30))
        assert not bool(info["fallback"]) and int(info["tries"][1]) == 1


# ------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("make", [byol_views, mocov2_views, lc_views])
@pytest.mark.parametrize("size", [24, (16, 20)])
def test_presets_shapes_and_dtypes(make, size):
    torch.manual_seed(0)
    t = make(size)
    assert t.num_views == 2
    h, w = (size, size) if isinstance(size, int) else size
    for image in (torch.randint(0, 256, (3, 41, 29), dtype=torch.uint8), torch.rand(3, 64, 48)):
        views, geoms = t(image)
        assert len(views) == len(geoms) == 2
        for v, g in zip(views, geoms):
            assert v.shape == (3, h, w) and v.dtype == torch.float32 and torch.isfinite(v).all()
            assert len(g) == 1 and g.image_size.tolist() == [[float(image.shape[2]), float(image.shape[1])]]


def test_lc_views_first_view_is_full_image_unflipped():
    torch.manual_seed(0)
    t = lc_views(16, color=False)
    flips2 = set()
    for _ in range(30):
        _views, geoms = t(torch.rand(3, 23, 31))
        assert geoms[0].boxes.tolist() == [[0.0, 0.0, 31.0, 23.0]] and not bool(geoms[0].flips[0])
        flips2.add(bool(geoms[1].flips[0]))
        assert geoms[1].contains(geoms[1].grid(4, 4)).all()
        assert geoms[0].contains(geoms[1].grid(4, 4)).all()
    assert flips2 == {True, False}


def _steps(t: MultiViewTransform, v: int) -> dict[str, object]:
    """Flatten a preset's photometric pipeline into {step name: transform}."""
    out: dict[str, object] = {}
    for s in t.view_transforms[v].photometric.transforms:
        if isinstance(s, v2.RandomApply):
            out[type(s.transforms[0]).__name__] = (s.transforms[0], s.p)
        else:
            out[type(s).__name__] = (s, getattr(s, "p", 1.0))
    return out


def test_preset_photometric_parameters_follow_the_papers():
    byol = byol_views(224)
    s1, s2 = _steps(byol, 0), _steps(byol, 1)
    for s in (s1, s2):
        jitter, p = s["ColorJitter"]
        assert p == 0.8 and jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.8, 1.2)
        assert jitter.hue == (-0.1, 0.1) and s["RandomGrayscale"][1] == 0.2
        assert s["GaussianBlur"][0].kernel_size == (23, 23) and list(s["GaussianBlur"][0].sigma) == [0.1, 2.0]
    assert s1["GaussianBlur"][1] == 1.0 and "RandomSolarize" not in s1
    assert s2["GaussianBlur"][1] == 0.1 and s2["RandomSolarize"][1] == 0.2
    assert s2["RandomSolarize"][0].threshold == 0.5
    moco = mocov2_views(224)
    for v in range(2):
        s = _steps(moco, v)
        assert s["ColorJitter"][0].saturation == (0.6, 1.4) and s["ColorJitter"][1] == 0.8
        assert s["GaussianBlur"][1] == 0.5 and "RandomSolarize" not in s and s["RandomGrayscale"][1] == 0.2
        assert moco.view_transforms[v].scale == (0.2, 1.0) and moco.view_transforms[v].flip_p == 0.5
    assert byol.view_transforms[0].scale == (0.08, 1.0)
    lc = lc_views(224)
    assert not lc.view_transforms[0].crop and lc.view_transforms[0].flip_p == 0.0
    assert lc.view_transforms[1].crop and lc.view_transforms[1].flip_p == 0.5
    assert "GaussianBlur" in _steps(lc, 0) and "RandomSolarize" in _steps(lc, 1)
    off = _steps(byol_views(32, color=False), 1)
    assert set(off) == {"_ToRGB", "ToDtype", "Normalize"}


def test_presets_accept_grayscale_and_reject_other_channel_counts():
    torch.manual_seed(0)
    t = byol_views(8, color=False, normalize=False)
    gray = torch.rand(1, 20, 20)
    views, geoms = t(gray)
    for v, g in zip(views, geoms):
        assert v.shape == (3, 8, 8)
        assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])
        ref = resized_crop_flip(gray, box_of(g), bool(g.flips[0]), 8)
        torch.testing.assert_close(v[:1], ref)
    with pytest.raises(ValueError, match="image must have 1 or 3 channels"):
        t(torch.rand(2, 20, 20))


def test_colour_off_equals_normalized_resized_crop():
    torch.manual_seed(5)
    x = torch.randint(0, 256, (3, 50, 40), dtype=torch.uint8)
    views, geoms = mocov2_views(20, color=False)(x)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for v, g in zip(views, geoms):
        ref = resized_crop_flip(x, box_of(g), bool(g.flips[0]), 20).float() / 255
        torch.testing.assert_close(v, (ref - mean) / std)


@given(size=st.integers(1, 1024))
def test_blur_kernel_size_is_odd_and_about_a_tenth(size):
    k = blur_kernel_size(size)
    assert k % 2 == 1 and k >= 3
    if size >= 30:
        assert abs(k - 0.1 * size) <= 1.0
    assert blur_kernel_size(224) == 23


def test_center_crop_params_matches_naive_rule():
    for h in range(1, 40, 3):
        for w in range(1, 40, 4):
            assert center_crop_params(h, w) == naive_center_crop(h, w, (3 / 4, 4 / 3))


def test_color_pipeline_changes_colours_but_not_pixels_positions():
    torch.manual_seed(0)
    x = torch.zeros(3, 8, 8)
    x[:, 2, 5] = 1.0
    out = color_pipeline(jitter_p=1.0, gray_p=0.0, normalize=False)(x)
    assert out.shape == x.shape
    # the bright pixel stays the brightest
    assert int(out.sum(0).flatten().argmax()) == 2 * 8 + 5


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("image", "match"),
    [
        (torch.rand(8, 8), r"image must have shape \(C, H, W\)"),
        (torch.rand(1, 3, 8, 8), r"image must have shape \(C, H, W\)"),
        (torch.rand(3, 0, 8), r"image must have shape \(C, H, W\)"),
        (torch.ones(3, 8, 8, dtype=torch.int32), "image must have dtype uint8"),
        (torch.ones(3, 8, 8, dtype=torch.bool), "image must have dtype uint8"),
        ([[1, 2]], "image must be a PIL image"),
    ],
)
def test_bad_image_raises(image, match):
    t = MultiViewTransform([ViewTransform(8)])
    with pytest.raises(ValueError, match=match):
        t(image)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_overlap": 0.0}, "min_overlap"),
        ({"min_overlap": 1.5}, "min_overlap"),
        ({"min_overlap": -0.2}, "min_overlap"),
        ({"min_overlap": math.nan}, "min_overlap"),
        ({"max_tries": 0}, "max_tries"),
        ({"max_tries": 2.5}, "max_tries"),
        ({"view_transforms": []}, "view_transforms"),
        ({"view_transforms": [v2.RandomResizedCrop(8)]}, "view_transforms"),
    ],
)
def test_bad_multiview_arguments_raise(kwargs, match):
    args = {"view_transforms": [ViewTransform(8)], **kwargs}
    with pytest.raises(ValueError, match=match):
        MultiViewTransform(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "size"),
        ({"size": (8, 8, 8)}, "size"),
        ({"size": 8, "scale": (0.5, 0.2)}, "scale"),
        ({"size": 8, "scale": (0.0, 1.0)}, "scale"),
        ({"size": 8, "scale": (0.5, 1.2)}, "scale"),
        ({"size": 8, "ratio": (0.0, 1.0)}, "ratio"),
        ({"size": 8, "flip_p": 1.5}, "flip_p"),
        ({"size": 8, "photometric": 3}, "photometric"),
    ],
)
def test_bad_view_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViewTransform(**kwargs)


def test_bad_pipeline_arguments_raise():
    with pytest.raises(ValueError, match="blur_kernel"):
        color_pipeline(blur_kernel=4)
    with pytest.raises(ValueError, match="solarize_p"):
        color_pipeline(solarize_p=2.0)
    with pytest.raises(ValueError, match="min_overlap"):
        byol_views(32, min_overlap=0.0)


def test_forward_returns_views_and_geometries_only():
    """One return type: the call gives (views, geometries); the re-sampling record is a separate method."""
    torch.manual_seed(0)
    t = MultiViewTransform([ViewTransform(8), ViewTransform(8)], min_overlap=0.5)
    out = t(torch.rand(3, 20, 20))
    assert isinstance(out, tuple) and len(out) == 2
    views, geoms, info = t.sample_with_info(torch.rand(3, 20, 20))
    assert len(views) == len(geoms) == 2 and set(info) == {"fallback", "tries"}
    assert info["tries"].dtype == torch.long and info["tries"].shape == (2,)
    assert t.call_count == 2


@pytest.mark.parametrize("make", [byol_views, mocov2_views, lc_views])
def test_presets_take_the_size_positionally_and_everything_else_by_keyword(make):
    assert make(8, scale=(0.5, 1.0)).view_transforms[-1].scale == (0.5, 1.0)
    with pytest.raises(TypeError):
        make(8, (0.5, 1.0))
