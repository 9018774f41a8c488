"""Tests for densecontrast.data.collate.collate_views (shapes, geometry order, DataLoader workers, errors)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from densecontrast.data.collate import collate_views
from densecontrast.geometry import ViewGeometry
from densecontrast.transforms import MultiViewTransform, ViewTransform, byol_views


def coordinate_image(h: int, w: int) -> torch.Tensor:
    """(3, H, W) float32 image whose channels are the image-space (x, y) of each pixel's center, and 0."""
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    return torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.zeros(h, w)])


class CoordinateImages(Dataset):
    """Coordinate images of varying sizes through a multi-view transform, with a label and a mask extra."""

    def __init__(self, n: int, transform: MultiViewTransform) -> None:
        self.n = n
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        views, geoms, info = self.transform.sample_with_info(coordinate_image(20 + 3 * i, 30 + 2 * i))
        return views, geoms, torch.tensor(i), {"mask": torch.full((2, 2), i), "info": info}


def make_transform() -> MultiViewTransform:
    # no antialias and no colour: a bilinear resample of a linear ramp, exact up to half a source pixel
    vts = [ViewTransform(12, scale=(0.3, 1.0), antialias=False), ViewTransform((10, 14), scale=(0.3, 1.0))]
    return MultiViewTransform(vts, min_overlap=0.1)


def test_collate_shapes_and_geometry_is_concatenation():
    torch.manual_seed(0)
    t = byol_views(16)
    samples = [t.sample_with_info(torch.rand(3, 20 + i, 30 - i)) for i in range(5)]
    views, geoms, info = collate_views(samples)
    assert [tuple(v.shape) for v in views] == [(5, 3, 16, 16), (5, 3, 16, 16)]
    assert info["fallback"].shape == (5,) and info["tries"].shape == (5, 2)
    for v in range(2):
        assert isinstance(geoms[v], ViewGeometry) and len(geoms[v]) == 5
        for b, (sv, sg, _) in enumerate(samples):
            assert torch.equal(views[v][b], sv[v])
            assert torch.equal(geoms[v].boxes[b], sg[v].boxes[0])
            assert torch.equal(geoms[v].flips[b], sg[v].flips[0])
            assert torch.equal(geoms[v].image_size[b], sg[v].image_size[0])
        # batched geometry maps behave like the per-sample ones
        grid = torch.cat([s[1][v].grid(3, 4) for s in samples])
        torch.testing.assert_close(geoms[v].grid(3, 4), grid)


def test_collate_two_item_samples_and_batch_of_one():
    torch.manual_seed(0)
    t = byol_views(8)
    views, geoms = collate_views([t(torch.rand(3, 9, 9))])
    assert views[0].shape == (1, 3, 8, 8) and len(geoms[1]) == 1


def test_geometry_and_transform_pickle():
    torch.manual_seed(0)
    t = make_transform()
    _, geoms = t(coordinate_image(20, 30))
    g = pickle.loads(pickle.dumps(geoms[0]))
    assert torch.equal(g.boxes, geoms[0].boxes) and torch.equal(g.flips, geoms[0].flips)
    t2 = pickle.loads(pickle.dumps(t))
    torch.manual_seed(1)
    a = t(coordinate_image(20, 30))
    torch.manual_seed(1)
    b = t2(coordinate_image(20, 30))
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][1].boxes, b[1][1].boxes)


def test_dataloader_with_workers_keeps_views_and_geometry_aligned():
    ds = CoordinateImages(8, make_transform())
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_views, shuffle=False)
    seen = []
    for views, geoms, labels, extra in loader:
        bsz = labels.shape[0]
        assert views[0].shape == (bsz, 3, 12, 12) and views[1].shape == (bsz, 3, 10, 14)
        assert extra["mask"].shape == (bsz, 2, 2) and torch.equal(extra["mask"][:, 0, 0], labels)
        assert extra["info"]["tries"].shape == (bsz, 2)
        for v in range(2):
            assert len(geoms[v]) == bsz
            # image sizes identify the sample: row b of the geometry belongs to row b of the views
            expected_size = torch.stack([30 + 2 * labels, 20 + 3 * labels], dim=-1).float()
            assert torch.equal(geoms[v].image_size, expected_size)
            # decode the coordinate views at a 4 x 4 grid and compare with the batched geometry
            pts = ViewGeometry.view_grid(4, 4)
            dec = F.grid_sample(views[v][:, :2], (2 * pts - 1).expand(bsz, 1, -1, 2), align_corners=False)
            dec = dec[:, :, 0].transpose(1, 2)  # (B, 16, 2)
            src = 1 / geoms[v].image_size  # one source pixel, normalized
            vp = (
                (geoms[v].boxes[:, 2:] - geoms[v].boxes[:, :2])
                / geoms[v].image_size
                / torch.tensor([views[v].shape[-1], views[v].shape[-2]])
            )
            # half a source pixel (edge clamping); view 2 uses antialias: + 0.125 view pixel when downscaling
            tol = 0.5 * src + 1e-5 + (0.125 * vp if v == 1 else 0.0)
            assert ((dec - geoms[v].grid(4, 4)).abs() <= tol[:, None, :]).all()
        seen += labels.tolist()
    assert seen == list(range(8))


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([], "batch must be a non-empty list"),
        ([(torch.zeros(3, 4, 4),)], r"batch\[0\] must be a tuple"),
        ([(torch.zeros(3, 4, 4), [])], r"batch\[0\]\[0\] \(views\)"),
    ],
)
def test_collate_bad_structure_raises(batch, match):
    with pytest.raises(ValueError, match=match):
        collate_views(batch)


def test_collate_inconsistent_samples_raise():
    torch.manual_seed(0)
    t = byol_views(8)
    a = t(torch.rand(3, 10, 10))
    b = byol_views(6)(torch.rand(3, 10, 10))
    with pytest.raises(ValueError, match="view 0 must have the same shape"):
        collate_views([a, b])
    with pytest.raises(ValueError, match=r"batch\[1\] must have 2 views"):
        collate_views([a, (a[0][:1], a[1][:1])])
    with pytest.raises(ValueError, match=r"batch\[1\] must have 3 items"):
        collate_views([(*a, torch.tensor(0)), a])
    with pytest.raises(ValueError, match=r"batch\[0\]\[1\]\[0\] must be a ViewGeometry"):
        collate_views([(a[0], [a[1][0].boxes, a[1][1]])])
