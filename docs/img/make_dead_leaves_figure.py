"""Regenerate docs/img/dead_leaves.png: sample DeadLeavesScenes images and their masks.

Run from the repository root: ``python docs/img/make_dead_leaves_figure.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure

from densecontrast.data.dead_leaves import DeadLeavesScenes

OUT = Path(__file__).with_name("dead_leaves.png")


def main(out: Path = OUT) -> None:
    ds = DeadLeavesScenes(num_images=6, image_size=128, seed=0)
    cmap = mpl.colormaps["tab10"].resampled(ds.num_labels)
    fig = Figure(figsize=(12, 4.3), dpi=100)
    for i in range(6):
        image, mask = ds[i]
        ax = fig.add_subplot(2, 6, i + 1)
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_axis_off()
        ax = fig.add_subplot(2, 6, i + 7)
        ax.imshow(mask.numpy(), cmap=cmap, vmin=0, vmax=ds.num_labels - 1, interpolation="nearest")
        ax.set_axis_off()
    fig.suptitle(
        "DeadLeavesScenes(image_size=128): images (top), shape x texture masks (bottom, 0 = background)"
    )
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
