"""Draw ``docs/img/matches.png``: matches of each matcher between two augmented views of a synthetic image.

Run from the repository root: ``python docs/img/make_matches_figure.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.patches import ConnectionPatch, Rectangle

from densecontrast.geometry import ViewGeometry
from densecontrast.matching import (
    coordinate_match,
    correspondence_match,
    location_match,
    nearest_coordinate_match,
)

W, H = 320, 240
VIEW = 112  # rendered view size in pixels
GRID = 7  # feature grid of each view


def synthetic_image() -> np.ndarray:
    """A (H, W, 3) float image: sky gradient, ground, sun, house, tree, stripes."""
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    img = np.zeros((H, W, 3))
    img[...] = np.stack([0.45 + 0.3 * yy / H, 0.65 + 0.2 * yy / H, 0.95 * np.ones_like(yy)], -1)
    ground = yy > 160 + 10 * np.sin(xx / 40)
    img[ground] = [0.35, 0.62, 0.25]
    img[(xx - 260) ** 2 + (yy - 50) ** 2 < 25**2] = [1.0, 0.85, 0.2]
    img[(xx > 60) & (xx < 150) & (yy > 100) & (yy < 175)] = [0.8, 0.3, 0.25]
    roof = (yy > 60) & (yy <= 100) & (np.abs(xx - 105) < (yy - 60) * 1.3)
    img[roof] = [0.45, 0.2, 0.15]
    img[(xx > 95) & (xx < 115) & (yy > 140) & (yy < 175)] = [0.3, 0.2, 0.1]
    img[(xx > 212) & (xx < 222) & (yy > 120) & (yy < 190)] = [0.4, 0.25, 0.1]
    img[(xx - 217) ** 2 + (yy - 110) ** 2 < 28**2] = [0.15, 0.45, 0.15]
    stripes = ground & ((xx // 12) % 2 == 0) & (yy > 205)
    img[stripes] = [0.9, 0.9, 0.85]
    return img


def render(image: torch.Tensor, geometry: ViewGeometry, size: int) -> np.ndarray:
    """Crop, resize and flip ``image`` (1, 3, H, W) as ``geometry`` says, by sampling image space."""
    pts = geometry.to_image(ViewGeometry.view_grid(size, size)[None])  # (1, size*size, 2) in [0, 1]
    grid = (2 * pts - 1).reshape(1, size, size, 2).float()
    out = F.grid_sample(image, grid, mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def to_pixels(points_uv: torch.Tensor, grid: int = GRID, size: int = VIEW) -> np.ndarray:
    """Feature-cell (u, v) -> rendered view pixel coordinates."""
    return ((points_uv + 0.5) / grid * size).numpy()


def main() -> None:
    image = torch.from_numpy(synthetic_image()).permute(2, 0, 1)[None].float()
    size = torch.tensor([float(W), float(H)])
    g1 = ViewGeometry.from_crops(torch.tensor([[30.0, 40.0, 230.0, 200.0]]), torch.tensor([False]), size)
    g2 = ViewGeometry.from_crops(torch.tensor([[90.0, 70.0, 250.0, 230.0]]), torch.tensor([True]), size)
    v1, v2 = render(image, g1, VIEW), render(image, g2, VIEW)

    fig = plt.figure(figsize=(13, 7.2))
    gs = fig.add_gridspec(2, 4, height_ratios=[1.0, 1.0])
    ax0 = fig.add_subplot(gs[0, :2])
    ax0.imshow(synthetic_image(), extent=(0, W, H, 0))
    for g, color, name in ((g1, "tab:blue", "view 1"), (g2, "tab:orange", "view 2 (flipped)")):
        x0, y0, x1, y1 = g.boxes[0].tolist()
        ax0.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.5, ec=color, label=name))
    box, _ = g1.overlap(g2)
    bx0, by0, bx1, by1 = (box[0] * size.repeat(2)).tolist()
    ax0.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, lw=1.5, ls="--", ec="k", label="overlap"))
    ax0.set_title("original image, two random crops")
    ax0.legend(loc="lower left", fontsize=8)
    ax0.axis("off")

    ax_txt = fig.add_subplot(gs[0, 2:])
    ax_txt.axis("off")
    ax_txt.text(0.0, 0.95, "Panels below (7 x 7 feature grids):\n\n"
                "coordinate_match (PixPro, T = 0.7): key cells within\n  0.7 bin diagonals of 3 query cells\n\n"
                "nearest_coordinate_match (PixCon-Coord / VICRegL):\n  nearest key cell of in-box queries\n\n"
                "location_match (DenseSiam): 4 x 4 grid in the overlap\n\n"
                "correspondence_match (LC-loss): exact sub-cell\n  location; red = outside view 2 (invalid)",
                va="top", family="monospace", fontsize=9)

    def pair_axes(col: int, title: str) -> tuple[plt.Axes, plt.Axes]:
        sub = gs[1, col].subgridspec(2, 1, hspace=0.08)
        a, b = fig.add_subplot(sub[0]), fig.add_subplot(sub[1])
        for ax, v, name in ((a, v1, "view 1"), (b, v2, "view 2")):
            ax.imshow(v, extent=(0, VIEW, VIEW, 0))
            for t in np.linspace(0, VIEW, GRID + 1):
                ax.axhline(t, color="w", lw=0.3, alpha=0.6)
                ax.axvline(t, color="w", lw=0.3, alpha=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(name, fontsize=8)
        a.set_title(title, fontsize=9)
        return a, b

    def link(a: plt.Axes, b: plt.Axes, p: np.ndarray, q: np.ndarray, color: str) -> None:
        fig.add_artist(ConnectionPatch(xyA=tuple(p), coordsA=a.transData, xyB=tuple(q), coordsB=b.transData,
                                       color=color, lw=0.9, alpha=0.85))

    cells = torch.arange(GRID * GRID)
    centers = torch.stack([cells % GRID, cells // GRID], -1).float()  # (u, v) of query cells

    # coordinate threshold
    a, b = pair_axes(0, "coordinate_match")
    m = coordinate_match(g1, g2, (GRID, GRID), (GRID, GRID))
    colors = ["magenta", "tab:cyan", "yellow"]
    for color, i in zip(colors, [17, 33, 44]):
        p = to_pixels(centers[i])
        a.plot(*p, "o", color=color, ms=6, mec="k")
        for j in m.key_index[0, i][m.key_mask[0, i]].tolist():
            q = to_pixels(centers[j])
            b.add_patch(Rectangle(q - VIEW / GRID / 2, VIEW / GRID, VIEW / GRID, fill=False, ec=color, lw=2))
            link(a, b, p, q, color)

    # nearest coordinate
    a, b = pair_axes(1, "nearest_coordinate_match")
    m = nearest_coordinate_match(g1, g2, (GRID, GRID), (GRID, GRID))
    cmap = plt.get_cmap("viridis")
    for i in range(0, GRID * GRID, 2):
        if m.valid[0, i]:
            p, q = to_pixels(centers[i]), to_pixels(centers[int(m.key_index[0, i])])
            color = cmap(i / (GRID * GRID))
            a.plot(*p, "o", color=color, ms=3)
            b.plot(*q, "o", color=color, ms=3)
            link(a, b, p, q, color)

    # location points
    a, b = pair_axes(2, "location_match")
    m = location_match(g1, g2, 16, "grid", (GRID, GRID), (GRID, GRID))
    for n in range(16):
        p, q = to_pixels(m.query_points[0, n]), to_pixels(m.key_points[0, n])
        color = cmap(n / 16)
        a.plot(*p, "s", color=color, ms=4, mec="k")
        b.plot(*q, "s", color=color, ms=4, mec="k")
        link(a, b, p, q, color)

    # correspondence
    a, b = pair_axes(3, "correspondence_match")
    m = correspondence_match(g1, g2, (GRID, GRID), (GRID, GRID))
    for i in range(0, GRID * GRID, 3):
        p = to_pixels(centers[i])
        if m.valid[0, i]:
            q = to_pixels(m.key_points[0, i])
            color = cmap(i / (GRID * GRID))
            a.plot(*p, "o", color=color, ms=3)
            b.plot(*q, "x", color=color, ms=5)
            link(a, b, p, q, color)
        else:
            a.plot(*p, "o", color="red", ms=3)

    out = Path(__file__).with_name("matches.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
