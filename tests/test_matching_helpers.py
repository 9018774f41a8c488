"""Shared hypothesis strategies for the matcher tests (random view pairs), and checks of them."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from densecontrast.geometry import ViewGeometry

KINDS = ("random", "random", "identical", "disjoint", "tiny", "zoom", "flip_only")


def _box(draw: st.DrawFn, w: float, h: float) -> list[float]:
    fx0, fy0, fw, fh = (draw(st.floats(0, 1)) for _ in range(4))
    x0 = fx0 * (w - 1)
    y0 = fy0 * (h - 1)
    return [x0, y0, x0 + 1 + fw * (w - x0 - 1), y0 + 1 + fh * (h - y0 - 1)]


@st.composite
def view_pairs(
    draw: st.DrawFn, max_batch: int = 3, kinds: tuple[str, ...] = KINDS
) -> tuple[ViewGeometry, ViewGeometry]:
    """Random (query, key) geometries over the same images: flips, tiny/zero overlaps, zooms, identical."""
    b = draw(st.integers(1, max_batch))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    qb, kb, qf, kf, sizes = [], [], [], [], []
    for _ in range(b):
        w = float(draw(st.integers(16, 400)))
        h = float(draw(st.integers(16, 400)))
        kind = draw(st.sampled_from(kinds))
        q = _box(draw, w, h)
        if kind in ("identical", "flip_only"):
            k = list(q)
        elif kind == "disjoint":
            cut = draw(st.floats(0.3, 0.7)) * w
            q = [q[0] * cut / w, q[1], max(q[0] * cut / w + 0.5, q[2] * cut / w), q[3]]
            k0 = cut + draw(st.floats(0, 0.2)) * (w - cut)
            k = [k0, 0.0, k0 + 0.5 + draw(st.floats(0, 1)) * (w - k0 - 0.5), h]
        elif kind == "tiny":
            eps = draw(st.floats(0.01, 2.0))
            k0 = max(0.0, q[2] - eps)
            k = [k0, q[1], min(w, k0 + 1 + draw(st.floats(0, 1)) * (w - k0 - 1)), q[3]]
            if k[2] <= k[0]:
                k = [w - 1, q[1], w, q[3]]
        elif kind == "zoom":
            s = draw(st.floats(0.03, 0.3))
            cw, ch = (q[2] - q[0]) * s, (q[3] - q[1]) * s
            k = [q[0] + draw(st.floats(0, 1)) * (q[2] - q[0] - cw), q[1] + draw(st.floats(0, 1)) * (q[3] - q[1] - ch)]
            k += [k[0] + cw, k[1] + ch]
            if draw(st.booleans()):
                q, k = k, q
        else:
            k = _box(draw, w, h)
        flip_q = draw(st.booleans())
        flip_k = (not flip_q) if kind == "flip_only" else draw(st.booleans())
        qb.append(q)
        kb.append(k)
        qf.append(flip_q)
        kf.append(flip_k)
        sizes.append([w, h])
    size = torch.tensor(sizes, dtype=dtype)
    qg = ViewGeometry.from_crops(torch.tensor(qb, dtype=dtype), torch.tensor(qf), size)
    kg = ViewGeometry.from_crops(torch.tensor(kb, dtype=dtype), torch.tensor(kf), size)
    return qg, kg


grid_shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))


def cells_to_image(geometry: ViewGeometry, points: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Feature-cell (u, v) of a view -> image space, written out independently of the library."""
    h, w = shape
    view = torch.stack([(points[..., 0] + 0.5) / w, (points[..., 1] + 0.5) / h], dim=-1)
    return geometry.to_image(view)


@given(view_pairs())
def test_view_pairs_are_valid_geometries(pair: tuple[ViewGeometry, ViewGeometry]) -> None:
    qg, kg = pair
    assert len(qg) == len(kg)
    assert qg.dtype == kg.dtype
    assert torch.equal(qg.image_size, kg.image_size)
    assert bool((qg.boxes[:, 2] > qg.boxes[:, 0]).all()) and bool((kg.boxes[:, 3] > kg.boxes[:, 1]).all())


def test_cells_to_image_inverts_to_cells() -> None:
    size = torch.tensor([50.0, 40.0])
    g = ViewGeometry.from_crops(torch.tensor([[3.0, 5.0, 40.0, 30.0]]), torch.tensor([True]), size)
    pts = torch.rand(1, 10, 2, generator=torch.Generator().manual_seed(0))
    back = cells_to_image(g, g.to_cells(pts, 3, 5), (3, 5))
    torch.testing.assert_close(back, pts)
