"""Geometry from other pipelines: torchvision crop parameters, lightly's crop ``Location``, and vertical flips.

Each constructor is compared with :meth:`ViewGeometry.from_crops` on the same crop, and the vertical flip is
checked pixel by pixel: an image whose channels hold each pixel's own image coordinates goes through a real
torchvision crop, resize and flip, and the coordinates read back at the cells of a grid must equal ``grid()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from densecontrast.data.collate import collate_views
from densecontrast.geometry import ViewGeometry
from densecontrast.transforms import MultiViewTransform, ViewTransform, crop_geometry, resized_crop_flip


@dataclass
class Location:
    """Stand-in for ``lightly.transforms.random_crop_and_flip_with_grid.Location`` (same fields and defaults)."""

    top: float
    left: float
    height: float
    width: float
    image_height: float
    image_width: float
    horizontal_flip: bool = False
    vertical_flip: bool = False


# ---------------------------------------------------------------------------------------------- strategies, helpers
@st.composite
def crops(draw: st.DrawFn, integer: bool = True) -> tuple[tuple[float, ...], tuple[int, int], bool, bool]:
    """One crop ``(top, left, height, width)`` inside an ``(H, W)`` image, and a horizontal and a vertical flip."""
    h, w = draw(st.integers(1, 900)), draw(st.integers(1, 900))
    if integer:
        top, left = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        height, width = draw(st.integers(1, h - top)), draw(st.integers(1, w - left))
    else:
        height, width = draw(st.floats(0.05, float(h))), draw(st.floats(0.05, float(w)))
        top, left = draw(st.floats(0.0, h - height)), draw(st.floats(0.0, w - width))
    return (top, left, height, width), (h, w), draw(st.booleans()), draw(st.booleans())


def reference(
    rows: list[tuple[float, float, float, float]],
    sizes: list[tuple[int, int]],
    hflips: list[bool],
    vflips: list[bool],
    dtype: torch.dtype = torch.float32,
) -> ViewGeometry:
    """``from_crops`` of the same crops: box ``[left, top, left + width, top + height]``, size ``(W, H)``."""
    boxes = torch.tensor([[c[1], c[0], c[1] + c[3], c[0] + c[2]] for c in rows], dtype=torch.float64).to(dtype)
    size = torch.tensor([[s[1], s[0]] for s in sizes], dtype=torch.float64).to(dtype)
    return ViewGeometry.from_crops(boxes, torch.tensor(hflips), size, vflips=torch.tensor(vflips))


def assert_same(g: ViewGeometry, ref: ViewGeometry) -> None:
    for name in ("boxes", "flips", "vflips", "image_size"):
        a, b = getattr(g, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), (name, a, b)
    assert torch.equal(g.grid(3, 2), ref.grid(3, 2))


def coordinate_image(h: int, w: int) -> torch.Tensor:
    """(3, H, W) float64 image whose channels are the image-space (x, y) of each pixel's center, and 0."""
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    return torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.zeros(h, w, dtype=torch.float64)])


def decoded_and_interior(view: torch.Tensor, g: ViewGeometry, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y) read bilinearly from a coordinate-image view at the cells of a ``gh x gw`` grid, ``(gh*gw, 2)``,
    and which cells lie far enough inside the crop (half a source pixel plus one view pixel) that no resampling tap
    was clamped at the crop edge: there bilinear resampling of a linear ramp is exact."""
    pts = ViewGeometry.view_grid(gh, gw, dtype=torch.float64)
    out = F.grid_sample(
        view[None, :2], (2 * pts - 1).view(1, 1, -1, 2), mode="bilinear", align_corners=False, padding_mode="border"
    )
    dec = out[0, :, 0].T
    w_img, h_img = g.image_size[0].double().tolist()
    x0, y0, x1, y1 = g.boxes[0].double().tolist()
    h_out, w_out = view.shape[-2:]
    margin = torch.tensor(
        [0.5 / w_img + (x1 - x0) / (w_img * w_out), 0.5 / h_img + (y1 - y0) / (h_img * h_out)], dtype=torch.float64
    )
    lo = torch.tensor([x0 / w_img, y0 / h_img], dtype=torch.float64) + margin
    hi = torch.tensor([x1 / w_img, y1 / h_img], dtype=torch.float64) - margin
    exp = g.to(torch.float64).grid(gh, gw)[0]
    return dec, ((exp >= lo) & (exp <= hi)).all(-1)


# ---------------------------------------------------------------------------------------------- torchvision
@given(data=st.data(), n=st.integers(1, 5), integer=st.booleans())
def test_from_torchvision_crop_equals_from_crops(data: st.DataObject, n: int, integer: bool) -> None:
    drawn = [data.draw(crops(integer)) for _ in range(n)]
    rows, sizes = [d[0] for d in drawn], [d[1] for d in drawn]
    hflips, vflips = [d[2] for d in drawn], [d[3] for d in drawn]
    ref = reference(rows, sizes, hflips, vflips)
    ref64 = reference(rows, sizes, hflips, vflips, torch.float64)
    # a list of tuples (Python numbers) and (B, 2) sizes; flips as lists, tuples and tensors
    assert_same(ViewGeometry.from_torchvision_crop(rows, sizes, tuple(hflips), torch.tensor(vflips)), ref)
    # a (B, 4) tensor: integer parameters give float32, float64 parameters keep float64
    if integer:
        assert_same(ViewGeometry.from_torchvision_crop(torch.tensor(rows), torch.tensor(sizes), hflips, vflips), ref)
    params64 = torch.tensor(rows, dtype=torch.float64)
    assert_same(ViewGeometry.from_torchvision_crop(params64, torch.tensor(sizes), torch.tensor(hflips), vflips), ref64)
    # one crop at a time: a tuple, a (4,) tensor, a torch.Size image size, Python bools
    for k in range(n):
        one = ViewGeometry.from_torchvision_crop(rows[k], torch.Size(sizes[k]), hflips[k], vflips[k])
        assert_same(one, ref[k])
        one = torch.tensor(rows[k]) if integer else torch.tensor(rows[k], dtype=torch.float64)
        assert_same(
            ViewGeometry.from_torchvision_crop(one, sizes[k], hflip=hflips[k], vflip=vflips[k]),
            ref[k] if integer else ref64[k],
        )
    # the same image for every crop: one (H, W) and one flip decision for all
    same = [(0, 0, 1, 1)] * n
    assert_same(
        ViewGeometry.from_torchvision_crop(same, sizes[0], True, False),
        reference(same, [sizes[0]] * n, [True] * n, [False] * n),
    )


@given(data=st.data())
def test_from_torchvision_crop_equals_crop_geometry_of_the_transforms(data: st.DataObject) -> None:
    (top, left, height, width), (h, w), hflip, vflip = data.draw(crops())
    g = ViewGeometry.from_torchvision_crop((top, left, height, width), (h, w), hflip, vflip)
    assert_same(g, crop_geometry((top, left, height, width), hflip, (h, w), vflip=vflip))


@settings(max_examples=40)
@given(
    img_h=st.integers(6, 64),
    img_w=st.integers(6, 64),
    out=st.tuples(st.integers(4, 40), st.integers(4, 40)),
    scale_lo=st.floats(0.05, 1.0),
    flips=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
    antialias=st.booleans(),
    grid_frac=st.tuples(st.floats(0.1, 1.0), st.floats(0.1, 1.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_torchvision_v2_pipeline_reproduces_grid_pixel_exactly(
    img_h, img_w, out, scale_lo, flips, antialias, grid_frac, seed
) -> None:
    """A real torchvision v2 crop, resize and flips on a coordinate image, decoded at the cells of a grid.

    The grid is no finer than the view (a cell center beyond the outermost pixel centers would read a clamped value).
    """
    grid = (max(1, int(grid_frac[0] * out[0])), max(1, int(grid_frac[1] * out[1])))
    image = coordinate_image(img_h, img_w)
    torch.manual_seed(seed)
    top, left, height, width = v2.RandomResizedCrop.get_params(image, scale=[scale_lo, 1.0], ratio=[3 / 4, 4 / 3])
    view = TF.resized_crop(image, top, left, height, width, list(out), antialias=antialias)
    hflip, vflip = flips
    if hflip:
        view = TF.horizontal_flip(view)
    if vflip:
        view = TF.vertical_flip(view)
    g = ViewGeometry.from_torchvision_crop((top, left, height, width), TF.get_size(image), hflip, vflip)
    dec, interior = decoded_and_interior(view, g, *grid)
    exp = g.to(torch.float64).grid(*grid)[0]
    err = (dec - exp).abs()
    # everywhere: within half a source pixel, plus the antialias filter's truncation at the border (1/8 view pixel)
    x0, y0, x1, y1 = g.boxes[0].double().tolist()
    vp = torch.tensor([(x1 - x0) / (img_w * out[1]), (y1 - y0) / (img_h * out[0])], dtype=torch.float64)
    src = torch.tensor([1 / img_w, 1 / img_h], dtype=torch.float64)
    tol = 0.5 * src + 1e-6 + (0.125 * vp * (vp > src) if antialias else 0.0)
    assert (err <= tol).all(), (err.max(0).values, tol)
    # inside (and without an antialias filter when downscaling): exact to float64 rounding
    if not antialias or not (vp > src).any():
        assert (err[interior] <= 1e-9).all(), err[interior].max()


def test_a_real_vertical_flip_matches_grid_exactly() -> None:
    """The vertical twin of the horizontal-flip check: the full view of a coordinate image, flipped, read per pixel."""
    h, w = 12, 20
    image = coordinate_image(h, w)
    for hflip, vflip in ((False, True), (True, True), (True, False)):
        view = TF.vertical_flip(image) if vflip else image
        view = TF.horizontal_flip(view) if hflip else view
        g = ViewGeometry.from_torchvision_crop((0, 0, h, w), (h, w), hflip, vflip)
        # one cell per pixel: the cell centers are the pixel centers, so the view's pixels are the grid
        torch.testing.assert_close(
            view[:2].permute(1, 2, 0).reshape(-1, 2), g.to(torch.float64).grid(h, w)[0], atol=1e-15, rtol=0
        )
    # a crop that is resized exactly by 2 (an integer zoom has no interpolation error at the cell centers)
    crop = (2, 4, 6, 10)
    view = TF.vertical_flip(TF.resized_crop(image, *crop, [12, 20], antialias=False))
    g = ViewGeometry.from_torchvision_crop(crop, (h, w), vflip=True)
    dec, interior = decoded_and_interior(view, g, 3, 5)
    assert interior.any()
    torch.testing.assert_close(dec[interior], g.to(torch.float64).grid(3, 5)[0][interior], atol=1e-12, rtol=0)
    assert g.vflips.tolist() == [True] and g.flips.tolist() == [False]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((3, 11, 30), (40, 60)), r"^params must have shape \(4,\) or \(B, 4\)"),
        ((torch.zeros(2, 3), (40, 60)), r"^params must have shape \(B, 4\)"),
        (("abc", (40, 60)), r"^params must be crops \(top, left, height, width\)"),
        ((torch.tensor([[True, True, True, True]]), (40, 60)), r"^params must hold real numbers"),
        (((3, 11, 0, 31), (40, 60)), r"^params must have crops with height > 0 and width > 0, but row 0 is"),
        (((3, 11, 38, 31), (40, 60)), r"^params must have crops inside the image \(tolerance 0.01 px\), but row 0"),
        (((-1, 11, 30, 31), (40, 60)), r"^params must have crops inside the image"),
        (((3, float("nan"), 30, 31), (40, 60)), r"^params must be finite, but row 0"),
        (((3, 11, 30, 31), (40, 0)), r"^image_size must give a finite, positive image height and width"),
        (((3, 11, 30, 31), (40, 60, 3)), r"^image_size must have shape \(2,\) or \(B, 2\)"),
        (([(3, 11, 30, 3)] * 3, [(40, 60)] * 2), r"^image_size must be one \(H, W\) or one per crop"),
    ],
)
def test_from_torchvision_crop_rejects_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViewGeometry.from_torchvision_crop(*args)


@pytest.mark.parametrize("name", ["hflip", "vflip"])
def test_from_torchvision_crop_flips_must_be_bools(name: str) -> None:
    crops3 = [(3, 11, 30, 3)] * 3
    for bad in (0.5, 1, [1, 0, 0], torch.tensor([0.7, 0.1, 0.2])):
        with pytest.raises(ValueError, match=rf"^{name} must hold bools"):
            ViewGeometry.from_torchvision_crop(crops3, (40, 60), **{name: bad})
    with pytest.raises(ValueError, match=rf"^{name} must have the shape \(B,\) = \(3,\) of params, but got \(2,\)"):
        ViewGeometry.from_torchvision_crop(crops3, (40, 60), **{name: [True, False]})
    g = ViewGeometry.from_torchvision_crop(crops3, (40, 60), **{name: np.bool_(True)})
    assert getattr(g, "flips" if name == "hflip" else "vflips").all()


# ---------------------------------------------------------------------------------------------- lightly
@given(data=st.data(), n=st.integers(1, 5), integer=st.booleans())
def test_from_lightly_location_equals_from_crops(data: st.DataObject, n: int, integer: bool) -> None:
    drawn = [data.draw(crops(integer)) for _ in range(n)]
    locations = [Location(*c, *s, hflip, vflip) for c, s, hflip, vflip in drawn]
    ref = reference([d[0] for d in drawn], [d[1] for d in drawn], [d[2] for d in drawn], [d[3] for d in drawn])
    assert_same(ViewGeometry.from_lightly_location(locations), ref)  # a list of Location objects
    assert_same(ViewGeometry.from_lightly_location([asdict(loc) for loc in locations]), ref)  # a list of dicts
    for k, loc in enumerate(locations):  # one object, one dict
        assert_same(ViewGeometry.from_lightly_location(loc), ref[k])
        assert_same(ViewGeometry.from_lightly_location(asdict(loc)), ref[k])
    # a batch: each field a (B,) tensor, as default_collate makes of a list of dicts (float64 stays float64)
    columns = {f: torch.tensor([getattr(loc, f) for loc in locations]) for f in asdict(locations[0])}
    if not integer:
        columns = {
            f: torch.tensor([getattr(loc, f) for loc in locations], dtype=torch.float64) if c.is_floating_point() else c
            for f, c in columns.items()
        }
        ref64 = reference(
            [d[0] for d in drawn], [d[1] for d in drawn], [d[2] for d in drawn], [d[3] for d in drawn], torch.float64
        )
    assert_same(ViewGeometry.from_lightly_location(columns), ref if integer else ref64)
    # the same crops through the torchvision constructor
    tv = ViewGeometry.from_torchvision_crop(
        [d[0] for d in drawn], [d[1] for d in drawn], [d[2] for d in drawn], [d[3] for d in drawn]
    )
    assert_same(tv, ref)


def test_from_lightly_location_defaults_and_float64() -> None:
    loc = {"top": 3, "left": 11, "height": 30, "width": 3, "image_height": 40, "image_width": 60}
    g = ViewGeometry.from_lightly_location(loc)  # flips default to False, as in lightly's dataclass
    assert g.flips.tolist() == [False] and g.vflips.tolist() == [False]
    assert g.boxes.tolist() == [[11.0, 3.0, 14.0, 33.0]] and g.image_size.tolist() == [[60.0, 40.0]]
    batch = {**loc, "top": torch.tensor([3, 4], dtype=torch.float64), "vertical_flip": torch.tensor([True, False])}
    g = ViewGeometry.from_lightly_location(batch)  # single values apply to every view of a batch
    assert g.dtype == torch.float64 and g.boxes[:, 1].tolist() == [3.0, 4.0]
    assert g.flips.tolist() == [False, False] and g.vflips.tolist() == [True, False]


@pytest.mark.parametrize(
    ("location", "match"),
    [
        ([], r"^location must be a lightly Location or a non-empty list of them, but got an empty list$"),
        ("top", r"^location must be a lightly Location .* but got str$"),
        (5, r"^location must have lightly's Location fields .* but location \(int\) has no 'top'$"),
        ({"top": 1}, r"^location must have lightly's Location fields .* has no 'left'$"),
        ([Location(0, 0, 1, 1, 2, 2), {"top": 1}], r"^location\[1\] must have lightly's Location fields"),
        (Location(0, 0, 1, 1, 2, 2, horizontal_flip=1), r"^location.horizontal_flip must hold bools"),  # type: ignore
        (Location(0, 0, 1, 1, 2, 2, vertical_flip=0.7), r"^location.vertical_flip must hold bools"),  # type: ignore
        (Location(True, 0, 1, 1, 2, 2), r"^location.top must be a number \(pixels\)"),
        (Location("a", 0, 1, 1, 2, 2), r"^location.top must be a number \(pixels\)"),  # type: ignore[arg-type]
        (
            {**asdict(Location(0, 0, 1, 1, 2, 2)), "top": [0, 1], "left": [0, 1, 0]},
            r"^location.left must have one value per view like location.top \(2\) or be a single value, but got 3$",
        ),
        (Location(0, 0, 0, 1, 2, 2), r"^location must have crops with height > 0 and width > 0, but view 0 has top=0"),
        (Location(0, 0, 1, 3, 2, 2), r"^location must have crops inside the image .* width=3, image_height=2"),
        (Location(0, 0, 1, 1, 2, -2), r"^location must give a finite, positive image height and width"),
    ],
)
def test_from_lightly_location_rejects_bad_input(location: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViewGeometry.from_lightly_location(location)


def test_lightly_style_pipeline_reproduces_grid() -> None:
    """lightly's order: torchvision crop parameters, resized crop, then a horizontal and a vertical flip."""
    image = coordinate_image(48, 64)
    torch.manual_seed(0)
    for hflip, vflip in ((False, False), (True, False), (False, True), (True, True)):
        top, left, height, width = v2.RandomResizedCrop.get_params(image, scale=[0.3, 0.6], ratio=[3 / 4, 4 / 3])
        loc = Location(top, left, height, width, image_height=48, image_width=64)
        view = TF.resized_crop(image, top, left, height, width, [24, 24], antialias=False)
        if hflip:
            view, loc.horizontal_flip = TF.horizontal_flip(view), True
        if vflip:
            view, loc.vertical_flip = TF.vertical_flip(view), True
        g = ViewGeometry.from_lightly_location(loc)
        dec, interior = decoded_and_interior(view, g, 4, 4)
        assert interior.any()
        torch.testing.assert_close(dec[interior], g.to(torch.float64).grid(4, 4)[0][interior], atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------- PixPro, transforms
@given(data=st.data())
def test_pixpro_round_trip_keeps_vertical_flips(data: st.DataObject) -> None:
    (top, left, height, width), (h, w), hflip, vflip = data.draw(crops())
    if h < 2 or w < 2 or height < 2 or width < 2:  # PixPro's (W - 1) normalization; one-pixel crops lose the flip
        return
    g = ViewGeometry.from_torchvision_crop((top, left, height, width), (h, w), hflip, vflip)
    coords = g.to_pixpro()
    assert bool(coords[0, 3] < coords[0, 1]) == vflip and bool(coords[0, 2] < coords[0, 0]) == hflip
    back = ViewGeometry.from_pixpro(coords, g.image_size)
    assert torch.equal(back.flips, g.flips) and torch.equal(back.vflips, g.vflips)
    torch.testing.assert_close(back.boxes, g.boxes, atol=1e-3, rtol=1e-5)


def test_view_transform_records_vertical_flips_and_keeps_the_default_stream() -> None:
    image = coordinate_image(30, 40)
    assert ViewTransform(16).vflip_p == 0.0 and "vflip_p" not in repr(ViewTransform(16))
    assert "vflip_p=0.5" in repr(ViewTransform(16, vflip_p=0.5))
    with pytest.raises(ValueError, match=r"^vflip_p must be in \[0, 1\]"):
        ViewTransform(16, vflip_p=1.5)

    # vflip_p = 1: the view is the vertically mirrored view of the same crop, and the geometry says so
    a, b = ViewTransform(16, scale=(0.3, 0.6), flip_p=0.0), ViewTransform(16, scale=(0.3, 0.6), flip_p=0.0, vflip_p=1.0)
    torch.manual_seed(0)
    crop = a.sample_crop(image)
    va, ga = a.apply(image, crop, False)
    vb, gb = b.apply(image, crop, False, vflip=b.sample_vflip())
    assert torch.equal(vb, va.flip(-2)) and gb.vflips.tolist() == [True] and ga.vflips.tolist() == [False]
    torch.testing.assert_close(gb.grid(4, 4).view(4, 4, 2), ga.grid(4, 4).view(4, 4, 2).flip(0), atol=1e-6, rtol=0)
    assert torch.equal(resized_crop_flip(image, crop, True, 16, vflip=True), va.flip(-1).flip(-2))

    # through MultiViewTransform and collate_views, the decoded coordinates agree with the recorded geometry
    t = MultiViewTransform([ViewTransform((12, 16), scale=(0.3, 1.0), flip_p=0.5, vflip_p=0.5, antialias=False)] * 2)
    torch.manual_seed(1)
    batch = [t(image) for _ in range(8)]
    views, geoms = collate_views(batch)
    assert {bool(v) for g in geoms for v in g.vflips} == {False, True}
    for view_batch, g in zip(views, geoms):
        for k in range(len(g)):
            dec, interior = decoded_and_interior(view_batch[k], g[k], 3, 4)
            torch.testing.assert_close(dec[interior], g[k].to(torch.float64).grid(3, 4)[0][interior], atol=1e-9, rtol=0)

    # vflip_p = 0 draws no random number: the stream (and so every seeded view) is what it was without the option
    torch.manual_seed(5)
    ViewTransform(16, flip_p=0.5)(image)
    after = torch.rand(3)
    torch.manual_seed(5)
    ref = ViewTransform(16, flip_p=0.5)
    ref.sample_crop(image)
    ref.sample_flip()
    assert torch.equal(after, torch.rand(3))
