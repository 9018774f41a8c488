"""PixPro's coordinate convention and our converters :meth:`ViewGeometry.to_pixpro` / :meth:`~ViewGeometry.from_pixpro`.

PixPro records a crop of ``h x w`` pixels whose top-left pixel is at row ``i``, column ``j`` of a ``W x H`` image as
``(j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1))``: pixel *indices* of the first and last pixel (inclusive ends),
normalized so that pixel index ``W-1`` maps to 1. A horizontal flip swaps the two x values. Our geometry records the
same crop as the pixel-area box ``[j, i, j+w, i+h]`` with pixel ``k`` covering ``[k, k+1)``.

The recorder and the cell-center formula below are written from that description, independently of the library.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from densecontrast.geometry import ViewGeometry

DTYPES = [torch.float32, torch.float64]


def pixpro_record(i: int, j: int, h: int, w: int, img_w: int, img_h: int, flip: bool) -> list[float]:
    """PixPro's record of crop (i, j, h, w) (row, col, height, width in pixels) of an img_w x img_h image."""
    x1, y1 = j / (img_w - 1), i / (img_h - 1)
    x2, y2 = (j + w - 1) / (img_w - 1), (i + h - 1) / (img_h - 1)
    if flip:
        x1, x2 = x2, x1
    return [x1, y1, x2, y2]


def pixpro_cell_center(coord: list[float], r: int, c: int, rows: int, cols: int) -> tuple[float, float]:
    """PixPro's center of feature cell (r, c) of a rows x cols map, in its (W-1)-normalized image units."""
    x1, y1, x2, y2 = coord
    bw, bh = (x2 - x1) / cols, (y2 - y1) / rows  # bw < 0 for a flipped view
    return x1 + (c + 0.5) * bw, y1 + (r + 0.5) * bh


@st.composite
def crops(draw: st.DrawFn) -> tuple[torch.dtype, list[tuple[int, int, int, int, int, int, bool]]]:
    """A dtype and 1-5 integer crops (i, j, h, w, W, H, flip) of non-square images; flipped crops are >= 2 px wide."""
    dtype = draw(st.sampled_from(DTYPES))
    out = []
    for _ in range(draw(st.integers(1, 5))):
        img_w, img_h = draw(st.integers(2, 1200)), draw(st.integers(2, 1200))
        flip = draw(st.booleans())
        # a 1-pixel-wide crop has x1 == x2 in PixPro's record, so its flip cannot be recorded (it is a no-op anyway)
        w = draw(st.integers(2 if flip else 1, img_w))
        h = draw(st.integers(1, img_h))
        j, i = draw(st.integers(0, img_w - w)), draw(st.integers(0, img_h - h))
        out.append((i, j, h, w, img_w, img_h, flip))
    return dtype, out


def _ours(dtype: torch.dtype, rows: list[tuple[int, int, int, int, int, int, bool]]) -> ViewGeometry:
    boxes = torch.tensor([[j, i, j + w, i + h] for i, j, h, w, *_ in rows], dtype=dtype)
    flips = torch.tensor([r[6] for r in rows])
    size = torch.tensor([[r[4], r[5]] for r in rows], dtype=dtype)
    return ViewGeometry.from_crops(boxes, flips, size)


@given(data=crops())
def test_to_pixpro_equals_pixpro_recorder(data: tuple) -> None:
    dtype, rows = data
    got = _ours(dtype, rows).to_pixpro()
    assert got.shape == (len(rows), 4) and got.dtype == dtype
    expected = torch.tensor([pixpro_record(*r) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, atol=8 * torch.finfo(dtype).eps, rtol=0)


@given(data=crops())
def test_from_pixpro_round_trips(data: tuple) -> None:
    dtype, rows = data
    eps = torch.finfo(dtype).eps
    coords = torch.tensor([pixpro_record(*r) for r in rows], dtype=dtype)
    size = torch.tensor([[r[4], r[5]] for r in rows], dtype=dtype)
    g = ViewGeometry.from_pixpro(coords, size)
    boxes = torch.tensor([[j, i, j + w, i + h] for i, j, h, w, *_ in rows], dtype=torch.float64)
    torch.testing.assert_close(g.boxes.double(), boxes, atol=8 * eps * 1200, rtol=0)  # pixels
    assert g.flips.tolist() == [r[6] for r in rows]
    torch.testing.assert_close(g.to_pixpro(), coords, atol=16 * eps, rtol=0)
    # and the other direction: geometry -> PixPro -> geometry
    ours = _ours(dtype, rows)
    back = ViewGeometry.from_pixpro(ours.to_pixpro(), ours.image_size)
    torch.testing.assert_close(back.boxes, ours.boxes, atol=16 * eps * 1200, rtol=0)
    assert torch.equal(back.flips, ours.flips)


@given(data=crops(), cells=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_pixpro_cell_centers_agree_with_grid_within_half_a_pixel(data: tuple, cells: tuple[int, int]) -> None:
    """PixPro's centers vs ours, in pixels of the pixel-area convention.

    PixPro's x spans the w-1 steps between the first and last pixel *centers* (inclusive ends); ours spans the w pixel
    *widths* of the crop. PixPro's pixel index k is the pixel center k + 0.5 in our convention, so its cell center in
    our pixels is ``j + 0.5 + (c + 0.5) (w - 1) / cols`` against our ``j + (c + 0.5) w / cols``: they differ by exactly
    ``(c + 0.5) / cols - 0.5`` pixels (mirrored for flips), zero at the crop's middle and at most ``0.5 - 0.5 / cols``
    at the outermost cells, whatever the crop size.
    """
    dtype, rows = data
    n_rows, n_cols = cells
    g = _ours(dtype, rows)
    grid_px = (g.grid(n_rows, n_cols) * g.image_size[:, None, :]).double()
    coords = g.to_pixpro().double().tolist()
    tol = 32 * torch.finfo(dtype).eps * 1200  # pixels
    for b, (_, _, _, _, img_w, img_h, flip) in enumerate(rows):
        for r in range(n_rows):
            for c in range(n_cols):
                px, py = pixpro_cell_center(coords[b], r, c, n_rows, n_cols)
                px, py = px * (img_w - 1) + 0.5, py * (img_h - 1) + 0.5  # PixPro pixel index -> our pixel center
                ox, oy = grid_px[b, r * n_cols + c].tolist()
                dx = (c + 0.5) / n_cols - 0.5
                dx = -dx if flip else dx
                dy = (r + 0.5) / n_rows - 0.5
                assert ox - px == pytest.approx(dx, abs=tol)
                assert oy - py == pytest.approx(dy, abs=tol)
                assert abs(ox - px) <= 0.5 - 0.5 / n_cols + tol < 0.5 + tol
                assert abs(oy - py) <= 0.5 - 0.5 / n_rows + tol


def test_documented_example() -> None:
    # a 101 x 11 image, left half (51 px wide, all 11 rows), flipped: PixPro records x from 50/100 down to 0/100
    g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 51.0, 11.0]]), torch.tensor([True]), torch.tensor([101, 11]))
    assert g.to_pixpro()[0].tolist() == pytest.approx(pixpro_record(0, 0, 11, 51, 101, 11, True))
    assert g.to_pixpro()[0].tolist() == pytest.approx([0.5, 0.0, 0.0, 1.0])
