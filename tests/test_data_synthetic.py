from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from densecontrast.data.synthetic import SyntheticScenes, render_scene


def test_same_index_and_seed_is_identical() -> None:
    a = SyntheticScenes(num_images=20, image_size=48, seed=3)
    b = SyntheticScenes(num_images=20, image_size=48, seed=3)
    for i in (0, 7, 19):
        ia, ma = a[i]
        ib, mb = b[i]
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    # Access order does not matter (no hidden state).
    first = a[5][0].clone()
    _ = a[6], a[2]
    assert torch.equal(a[5][0], first)
    assert torch.equal(a[-1][0], a[19][0])


def test_different_seeds_and_indices_differ() -> None:
    a = SyntheticScenes(num_images=10, image_size=48, seed=0)
    b = SyntheticScenes(num_images=10, image_size=48, seed=1)
    assert not torch.equal(a[0][0], b[0][0])
    assert not torch.equal(a[0][0], a[1][0])
    # Masks differ too across many images (not just pixel noise).
    assert any(not torch.equal(a[i][1], b[i][1]) for i in range(10))


def test_types_shapes_and_labels() -> None:
    ds = SyntheticScenes(num_images=12, image_size=40, num_classes=5, seed=2)
    labels_seen = set()
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (3, 40, 40) and image.dtype == torch.uint8
        assert mask.shape == (40, 40) and mask.dtype == torch.int64
        assert int(mask.min()) >= 0 and int(mask.max()) <= 5
        assert (mask > 0).any() and (mask == 0).any()  # objects and some background
        labels_seen |= set(mask.unique().tolist())
    assert labels_seen == set(range(6))
    assert ds.num_labels == 6
    assert len(ds.class_info) == 5
    only = SyntheticScenes(num_images=2, image_size=32, return_mask=False)[0]
    assert isinstance(only, torch.Tensor) and only.shape == (3, 32, 32)
    pil, mask = SyntheticScenes(num_images=2, image_size=32, as_pil=True)[1]
    assert pil.size == (32, 32) and pil.mode == "RGB"
    assert torch.equal(TF.pil_to_tensor(pil), SyntheticScenes(num_images=2, image_size=32)[1][0])


def test_class_table_is_independent_of_seed() -> None:
    assert SyntheticScenes(1, seed=0).class_info == SyntheticScenes(1, seed=9).class_info


def _region_colours(ds: SyntheticScenes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, labels, image_ids = [], [], []
    for i in range(len(ds)):
        image, mask = ds[i]
        x = image.float() / 255
        for c in mask.unique().tolist():
            if c == 0:
                continue
            sel = mask == c
            if sel.sum() < 40:
                continue
            px = x[:, sel]  # (3, P)
            feats.append(torch.cat([px.mean(1), px.std(1)]))
            labels.append(c)
            image_ids.append(i)
    return torch.stack(feats), torch.tensor(labels), torch.tensor(image_ids)


def test_mask_pixels_have_class_consistent_colour_statistics() -> None:
    # The mask must follow what was drawn: the colour statistics of the pixels a mask assigns to a
    # class identify the class. Nearest centroid (centroids from the OTHER half of the images).
    ds = SyntheticScenes(num_images=40, image_size=64, num_classes=6, seed=11)
    feats, labels, ids = _region_colours(ds)
    train, test = ids < 20, ids >= 20
    cents = torch.stack([feats[train & (labels == c)].mean(0) for c in range(1, 7)])
    pred = torch.cdist(feats[test], cents).argmin(1) + 1
    acc = (pred == labels[test]).float().mean().item()
    assert acc > 0.85, acc
    # A shuffled mask breaks it (the check is not vacuous).
    g = torch.Generator().manual_seed(0)
    shuffled = labels[test][torch.randperm(int(test.sum()), generator=g)]
    assert (pred == shuffled).float().mean().item() < 0.6


def test_background_differs_from_objects() -> None:
    # Background is low-saturation; objects are saturated: mean saturation separates them.
    ds = SyntheticScenes(num_images=10, image_size=64, seed=4)
    bg_sat, obj_sat = [], []
    for i in range(len(ds)):
        image, mask = ds[i]
        x = image.float() / 255
        sat = (x.amax(0) - x.amin(0)) / x.amax(0).clamp_min(1e-3)
        bg_sat.append(sat[mask == 0].mean())
        obj_sat.append(sat[mask > 0].mean())
    assert torch.stack(obj_sat).mean() > torch.stack(bg_sat).mean() + 0.1


def test_render_scene_is_a_function_of_the_generator_state() -> None:
    a = render_scene(torch.Generator().manual_seed(5), image_size=24, num_classes=3)
    b = render_scene(torch.Generator().manual_seed(5), image_size=24, num_classes=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int(a[1].max()) <= 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_images": -1}, "num_images"),
        ({"image_size": 4}, "image_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"seed": -2}, "seed"),
        ({"min_objects": 5, "max_objects": 2}, "min_objects"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SyntheticScenes(**kwargs)


def test_index_out_of_range() -> None:
    with pytest.raises(IndexError):
        SyntheticScenes(num_images=3)[3]
