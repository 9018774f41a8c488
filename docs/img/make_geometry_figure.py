"""Regenerate ``docs/img/geometry.png``, the figure of the geometry conventions page.

Usage::

    python docs/img/make_geometry_figure.py [output.png]

Everything drawn is computed by :mod:`densecontrast.geometry`: the crop boxes, view 1's feature-cell centers in the
image, the intersection of the two views, which of view 1's cells lie in view 2, and where they land in view 2's
(flipped) feature grid. Only matplotlib (Agg backend) and numpy are needed besides the library.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from densecontrast.geometry import ViewGeometry, in_box_mask

W, H = 640, 400  # original image, pixels (non-square on purpose)
CELLS = 7  # 7 x 7 feature maps, as a ResNet-50 gives for 224 px views


def synthetic_image(width: int, height: int) -> np.ndarray:
    """A deterministic picture with enough structure to see a flip: sky, ground, sun, house, tree."""
    y, x = np.mgrid[0:height, 0:width] + 0.5  # pixel centers
    img = np.empty((height, width, 3))
    sky = np.array([0.62, 0.80, 0.95]) * (1 - 0.3 * y / height)[..., None]
    ground = np.array([0.45, 0.65, 0.35]) * (1 - 0.2 * (y / height))[..., None]
    img[:] = np.where((y > 0.62 * height)[..., None], ground, sky)
    sun = (x - 0.15 * width) ** 2 + (y - 0.2 * height) ** 2 < (0.07 * height) ** 2
    img[sun] = [0.98, 0.85, 0.30]
    house = (x > 0.52 * width) & (x < 0.78 * width) & (y > 0.42 * height) & (y < 0.75 * height)
    img[house] = [0.80, 0.35, 0.25]
    roof = (y > 0.25 * height) & (y <= 0.42 * height) & (np.abs(x - 0.65 * width) < (y - 0.25 * height) * 0.85)
    img[roof] = [0.45, 0.25, 0.20]
    door = (x > 0.60 * width) & (x < 0.66 * width) & (y > 0.58 * height) & (y < 0.75 * height)
    img[door] = [0.30, 0.20, 0.15]
    trunk = (x > 0.30 * width) & (x < 0.33 * width) & (y > 0.45 * height) & (y < 0.72 * height)
    img[trunk] = [0.40, 0.28, 0.15]
    crown = (x - 0.315 * width) ** 2 + (y - 0.38 * height) ** 2 < (0.11 * height) ** 2
    img[crown] = [0.20, 0.50, 0.22]
    return img


def view_pixels(img: np.ndarray, box: list[float], flip: bool) -> np.ndarray:
    """The crop as the network sees it (before resizing): integer pixel box, optional horizontal flip."""
    x0, y0, x1, y1 = (round(v) for v in box)
    crop = img[y0:y1, x0:x1]
    return crop[:, ::-1] if flip else crop


def main(out: Path) -> None:
    size = torch.tensor([float(W), float(H)])
    g1 = ViewGeometry.from_crops(torch.tensor([[40.0, 30.0, 400.0, 330.0]]), torch.tensor([False]), size)
    g2 = ViewGeometry.from_crops(torch.tensor([[250.0, 90.0, 610.0, 390.0]]), torch.tensor([True]), size)

    centers = g1.grid(CELLS, CELLS)[0]  # (49, 2) image space
    inside = in_box_mask(g1, g2, CELLS, CELLS)[0]  # (49,) center rule
    landing = g2.to_cells(g1.grid(CELLS, CELLS), CELLS, CELLS)[0]  # (49, 2) (u, v) in view 2's cells
    box, area = g1.overlap(g2)
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, CELLS * CELLS))

    img = synthetic_image(W, H)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.6, 1, 1]})

    ax = axes[0]
    ax.imshow(img, extent=(0, W, H, 0))  # pixel k covers [k, k + 1)
    for g, color, name in ((g1, "tab:blue", "view 1"), (g2, "tab:orange", "view 2 (flipped)")):
        x0, y0, x1, y1 = g.boxes[0].tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.5, ec=color))
        ax.text(x0 + 4, y0 - 6, name, color=color, fontsize=11, fontweight="bold", va="bottom")
    ox0, oy0, ox1, oy1 = (box[0] * size.repeat(2)).tolist()
    ax.add_patch(Rectangle((ox0, oy0), ox1 - ox0, oy1 - oy0, fc="white", alpha=0.35, ec="none"))
    ax.text((ox0 + ox1) / 2, oy1 + 6, f"overlap: {area.item():.1%} of the image", ha="center", va="top", fontsize=9)
    px = (centers * size).numpy()
    ax.scatter(px[inside, 0], px[inside, 1], s=22, c=colors[inside.numpy()], ec="black", lw=0.5, zorder=3)
    ax.scatter(px[~inside, 0], px[~inside, 1], s=14, facecolors="none", ec="black", lw=0.6, zorder=3)
    x0, y0, x1, y1 = g2.boxes[0].tolist()
    ax.annotate(
        "", xy=(x0 + 30, y1 - 20), xytext=(x1 - 30, y1 - 20), arrowprops={"arrowstyle": "->", "color": "tab:orange"}
    )
    ax.text(
        (x0 + x1) / 2,
        y1 - 26,
        "flipped: u = 0 at the right edge, u grows to the left",
        color="tab:orange",
        fontsize=8,
        ha="center",
    )
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title("image space: view 1's 7x7 cell centers (filled: inside view 2)")

    for ax, g, flip, title in (
        (axes[1], g1, False, "view 1 in its feature-cell space (u, v)"),
        (axes[2], g2, True, "view 2 (flipped): where view 1's cells land"),
    ):
        ax.imshow(view_pixels(img, g.boxes[0].tolist(), flip), extent=(-0.5, CELLS - 0.5, CELLS - 0.5, -0.5))
        for k in range(CELLS + 1):
            ax.axhline(k - 0.5, color="white", lw=0.6, alpha=0.7)
            ax.axvline(k - 0.5, color="white", lw=0.6, alpha=0.7)
        ax.set_xlim(-0.5, CELLS - 0.5)
        ax.set_ylim(CELLS - 0.5, -0.5)
        ax.set_xticks(range(CELLS))
        ax.set_yticks(range(CELLS))
        ax.set_xlabel("u (column j)")
        ax.set_ylabel("v (row i)")
        ax.set_title(title, fontsize=10)
    jj, ii = np.meshgrid(np.arange(CELLS), np.arange(CELLS))
    axes[1].scatter(jj.reshape(-1), ii.reshape(-1), s=26, c=colors, ec="black", lw=0.5)
    lp = landing.numpy()
    axes[2].scatter(lp[inside, 0], lp[inside, 1], s=26, c=colors[inside.numpy()], ec="black", lw=0.5)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("geometry.png"))
