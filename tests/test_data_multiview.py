from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from densecontrast.data.collate import collate_views
from densecontrast.data.multiview import MultiViewDataset
from densecontrast.data.synthetic import SyntheticScenes
from densecontrast.transforms import mocov2_views


class _Tuples(torch.utils.data.Dataset):
    def __init__(self, n: int = 3) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        return torch.rand(3, 30, 40), i, f"name{i}"


def test_items_and_collate_with_targets() -> None:
    torch.manual_seed(0)
    ds = MultiViewDataset(_Tuples(), mocov2_views(16, color=False, normalize=False))
    views, geoms, label, name = ds[1]
    assert len(views) == 2 and len(geoms) == 2 and label == 1 and name == "name1"
    views, geoms, labels, names = collate_views([ds[i] for i in range(3)])
    assert views[0].shape == (3, 3, 16, 16) and len(geoms[1]) == 3
    assert labels.tolist() == [0, 1, 2] and list(names) == ["name0", "name1", "name2"]
    dropped = MultiViewDataset(_Tuples(), mocov2_views(16), keep_targets=False)[0]
    assert len(dropped) == 2


def test_bare_image_dataset() -> None:
    torch.manual_seed(0)
    ds = MultiViewDataset(SyntheticScenes(4, 32, return_mask=False), mocov2_views(16))
    item = ds[0]
    assert len(item) == 2 and len(ds) == 4


def test_views_agree_with_their_geometry() -> None:
    # Without colour transforms a view is the original image resampled at the geometry's grid.
    torch.manual_seed(1)
    base = SyntheticScenes(6, 64, seed=5, return_mask=False)
    ds = MultiViewDataset(base, mocov2_views(32, color=False, normalize=False, antialias=False))
    loader = DataLoader(ds, batch_size=6, collate_fn=collate_views)
    views, geoms = next(iter(loader))
    images = torch.stack([base[i] for i in range(6)]).float() / 255
    for v, g in zip(views, geoms):
        pts = g.grid(32, 32)  # (B, 1024, 2) image space
        ref = F.grid_sample(images, (2 * pts - 1)[:, None].float(), mode="bilinear", align_corners=False)
        ref = ref[:, :, 0].reshape(6, 3, 32, 32)
        err = (v.float() - ref).abs().mean()
        other = (v.float() - ref.flip(-1)).abs().mean()
        assert err < 0.08 and err < other, (err, other)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dataset"):
        MultiViewDataset(object(), mocov2_views(16))
    with pytest.raises(ValueError, match="transform"):
        MultiViewDataset(_Tuples(), "not callable")  # type: ignore[arg-type]
