"""Exact, batched view geometry: where every pixel and feature cell of a view came from.

Convention:
    * A point is ``(x, y)``: x to the right, y down, **normalized to [0, 1] over the
      original image** ("image space"). Pixel ``(i, j)`` of an image covers the area
      ``[j, j + 1) x [i, i + 1)`` in pixel units, so image space is
      ``(x_px / W, y_px / H)``.
    * "View space" is normalized ``[0, 1]^2`` over the view as the network sees it (after
      crop, resize and horizontal flip). A view's geometry is the affine map view -> image.
    * An ``h x w`` feature map over a view has cell centers at view-space
      ``((j + 0.5) / w, (i + 0.5) / h)``, which is the ``align_corners=False`` convention of
      :func:`torch.nn.functional.grid_sample`. Cells are flattened row-major: ``i * w + j``.
    * "Feature-cell space" of an ``h x w`` map: continuous ``(u, v)`` with cell centers at
      integers, ``u = x_view * w - 0.5``.
    * A point lies in a view iff its view-space coordinates lie in ``[0, 1]^2`` (closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor

from densecontrast._checks import check_choice, check_finite, check_shape, check_type, compute_dtype

__all__ = ["ViewGeometry", "in_box_mask"]


@dataclass(frozen=True, eq=False)
class ViewGeometry:
    """A batch of B views: the crop box, flip and image size of each, and the maps they imply.

    Build it with :meth:`from_crops` (validated); the dataclass fields are read-only.

    Attributes:
        boxes: ``(B, 4)`` float crop boxes ``x0, y0, x1, y1`` in **pixel coordinates of the
            original image** (continuous, pixel areas, ``x1 > x0``, ``y1 > y0``).
        flips: ``(B,)`` bool, horizontal flip applied after the crop.
        image_size: ``(B, 2)`` float original image ``(W, H)`` in pixels.

    Convention:
        View space and image space are both normalized to ``[0, 1]`` (see the module
        docstring). For a view-space point ``(s, t)`` the view -> image map is
        ``x = x0n + (x1n - x0n) * (1 - s if flip else s)``, ``y = y0n + (y1n - y0n) * t``
        with ``x0n = x0 / W`` etc. (``(u, v)`` is reserved for feature-cell coordinates.)

    Examples:
        >>> import torch
        >>> g = ViewGeometry.from_crops(
        ...     boxes=torch.tensor([[10.0, 20.0, 110.0, 70.0]]),
        ...     flips=torch.tensor([True]),
        ...     image_size=torch.tensor([[200.0, 100.0]]),
        ... )
        >>> g.grid(1, 2)  # two cells side by side; flipped, so the left cell comes from the right
        tensor([[[0.4250, 0.4500],
                 [0.1750, 0.4500]]])
        >>> g.to_view(g.to_image(torch.tensor([[[0.25, 0.5]]])))
        tensor([[[0.2500, 0.5000]]])
    """

    boxes: Tensor
    flips: Tensor
    image_size: Tensor

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_crops(
        cls,
        boxes: Tensor,
        flips: Tensor | None = None,
        image_size: Tensor | None = None,
        *,
        tolerance: float = 1e-2,
    ) -> ViewGeometry:
        """Validate crop boxes and build the geometry.

        Args:
            boxes: ``(B, 4)`` crop boxes ``x0, y0, x1, y1`` in original-image pixels.
            flips: ``(B,)`` bool horizontal flips applied after the crop (default: none).
            image_size: ``(B, 2)`` or ``(2,)`` original ``(W, H)`` in pixels.
            tolerance: how far (pixels) a box may stick out of the image before it is an error.

        Returns:
            The validated :class:`ViewGeometry` (float64 boxes stay float64, others become
            float32).

        Raises:
            ValueError: wrong shapes, non-finite values, ``x1 <= x0`` or ``y1 <= y0``, a box
                outside the image by more than ``tolerance`` pixels, or a non-positive size.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 32.0]]),
            ...                             torch.tensor([False]), torch.tensor([64.0, 32.0]))
            >>> g.affine
            tensor([[[1., 0., 0.],
                     [0., 1., 0.]]])
        """
        if image_size is None:
            raise ValueError("image_size is required: expected shape (B, 2) or (2,) as (W, H) pixels")
        b, _ = check_shape(boxes, "boxes", ("B", 4), note="as x0, y0, x1, y1 pixels")
        dtype = compute_dtype(boxes)
        boxes = boxes.to(dtype)
        if not isinstance(image_size, Tensor):
            image_size = torch.as_tensor(image_size)
        image_size = image_size.to(device=boxes.device, dtype=dtype)
        if image_size.dim() == 1:
            check_shape(image_size, "image_size", (2,), note="or (B, 2) as (W, H) pixels")
            image_size = image_size.expand(b, 2).contiguous()
        check_shape(image_size, "image_size", ("B", 2), sizes={"B": b}, note="as (W, H) pixels")
        if flips is None:
            flips = torch.zeros(b, dtype=torch.bool, device=boxes.device)
        if not isinstance(flips, Tensor):
            flips = torch.as_tensor(flips)
        check_shape(flips, "flips", ("B",), sizes={"B": b}, note="bool")
        flips = flips.to(device=boxes.device, dtype=torch.bool)
        check_finite(boxes, "boxes")
        check_finite(image_size, "image_size")
        if (image_size <= 0).any():
            raise ValueError(f"image_size must be positive (W, H) pixels, but got {image_size.tolist()}")
        x0, y0, x1, y1 = boxes.unbind(-1)
        bad = (x1 <= x0) | (y1 <= y0)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"boxes must satisfy x1 > x0 and y1 > y0 (pixels), but row {i} is {boxes[i].tolist()}"
            )
        w, h = image_size.unbind(-1)
        out = (x0 < -tolerance) | (y0 < -tolerance) | (x1 > w + tolerance) | (y1 > h + tolerance)
        if out.any():
            i = int(out.nonzero()[0, 0])
            raise ValueError(
                f"boxes must lie inside the image [0, W] x [0, H] (tolerance {tolerance} px), but row {i} "
                f"is {boxes[i].tolist()} for image size (W, H) = {image_size[i].tolist()}"
            )
        return cls(boxes=boxes, flips=flips, image_size=image_size)

    @classmethod
    def from_pixpro(cls, coords: Tensor, image_size: Tensor) -> ViewGeometry:
        """Build from PixPro's per-view coordinates.

        PixPro records a crop of ``h x w`` pixels at row ``i``, column ``j`` as
        ``(j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1))`` (inclusive pixel ends) and
        encodes a horizontal flip by swapping the two x values.

        Args:
            coords: ``(B, 4)`` PixPro coordinates.
            image_size: ``(B, 2)`` or ``(2,)`` original ``(W, H)`` in pixels.

        Returns:
            The equivalent geometry, with the crop box ``[j, i, j + w, i + h]``.

        Examples:
            >>> g = ViewGeometry.from_pixpro(torch.tensor([[0.5, 0.0, 0.0, 1.0]]), torch.tensor([101.0, 11.0]))
            >>> g.boxes, g.flips
            (tensor([[ 0.,  0., 51., 11.]]), tensor([True]))
        """
        check_shape(coords, "coords", ("B", 4), note="as PixPro coordinates")
        dtype = compute_dtype(coords)
        coords = coords.to(dtype)
        size = torch.as_tensor(image_size, dtype=dtype, device=coords.device).expand(coords.shape[0], 2)
        flips = coords[:, 2] < coords[:, 0]
        xa = torch.minimum(coords[:, 0], coords[:, 2])
        xb = torch.maximum(coords[:, 0], coords[:, 2])
        wm1, hm1 = size[:, 0] - 1, size[:, 1] - 1
        boxes = torch.stack(
            [xa * wm1, coords[:, 1] * hm1, xb * wm1 + 1, coords[:, 3] * hm1 + 1], dim=-1
        )
        return cls.from_crops(boxes, flips, size)

    def to_pixpro(self) -> Tensor:
        """PixPro's coordinates of these views (inverse of :meth:`from_pixpro`).

        Returns:
            ``(B, 4)`` ``(x0, y0, x1, y1)`` normalized by ``(W - 1, H - 1)`` with inclusive pixel
            ends, x swapped for flipped views.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 51.0, 11.0]]),
            ...                             torch.tensor([True]), torch.tensor([101.0, 11.0]))
            >>> g.to_pixpro()
            tensor([[0.5000, 0.0000, 0.0000, 1.0000]])
        """
        wm1, hm1 = self.image_size[:, 0] - 1, self.image_size[:, 1] - 1
        x0, y0, x1, y1 = self.boxes.unbind(-1)
        xa, xb = x0 / wm1, (x1 - 1) / wm1
        xa, xb = torch.where(self.flips, xb, xa), torch.where(self.flips, xa, xb)
        return torch.stack([xa, y0 / hm1, xb, (y1 - 1) / hm1], dim=-1)

    # ------------------------------------------------------------------ batch handling
    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> ViewGeometry:
        """Select views; an integer index keeps the batch dimension (a batch of one)."""
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"index {index} is out of range for a ViewGeometry of {n} views")
            index = slice(index % n, index % n + 1)
        return ViewGeometry(self.boxes[index], self.flips[index], self.image_size[index])

    def to(self, *args: object, **kwargs: object) -> ViewGeometry:
        """Move to a device and/or cast the float fields (flips stay bool), like ``Tensor.to``.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), None, torch.tensor([8.0, 8.0]))
            >>> g.to(torch.float64).affine.dtype
            torch.float64
        """
        boxes = self.boxes.to(*args, **kwargs)  # type: ignore[arg-type]
        return ViewGeometry(
            boxes,
            self.flips.to(device=boxes.device),
            self.image_size.to(device=boxes.device, dtype=boxes.dtype),
        )

    @property
    def device(self) -> torch.device:
        """Device of the geometry tensors."""
        return self.boxes.device

    @property
    def dtype(self) -> torch.dtype:
        """Float dtype of the geometry tensors."""
        return self.boxes.dtype

    @classmethod
    def cat(cls, geometries: Sequence[ViewGeometry]) -> ViewGeometry:
        """Concatenate along the batch dimension.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), None, torch.tensor([8.0, 8.0]))
            >>> len(ViewGeometry.cat([g, g, g]))
            3
        """
        if len(geometries) == 0:
            raise ValueError("geometries must be a non-empty sequence of ViewGeometry, but got an empty one")
        return cls(
            torch.cat([g.boxes for g in geometries]),
            torch.cat([g.flips for g in geometries]),
            torch.cat([g.image_size for g in geometries]),
        )

    # ------------------------------------------------------------------ affine maps
    @property
    def normalized_boxes(self) -> Tensor:
        """``(B, 4)`` crop boxes in image space (``x / W``, ``y / H``), ``x0 < x1`` always."""
        wh = self.image_size.repeat(1, 2)
        return self.boxes / wh

    def _scale_offset(self) -> tuple[Tensor, Tensor]:
        nb = self.normalized_boxes
        x0, y0, x1, y1 = nb.unbind(-1)
        sx = torch.where(self.flips, x0 - x1, x1 - x0)
        tx = torch.where(self.flips, x1, x0)
        scale = torch.stack([sx, y1 - y0], dim=-1)
        offset = torch.stack([tx, y0], dim=-1)
        return scale, offset

    @property
    def affine(self) -> Tensor:
        """``(B, 2, 3)`` affine map from view space to image space: ``p_img = A[:, :, :2] p + A[:, :, 2]``."""
        scale, offset = self._scale_offset()
        a = scale.new_zeros(len(self), 2, 3)
        a[:, 0, 0] = scale[:, 0]
        a[:, 1, 1] = scale[:, 1]
        a[:, :, 2] = offset
        return a

    @property
    def inverse_affine(self) -> Tensor:
        """``(B, 2, 3)`` affine map from image space to view space (closed-form inverse of :attr:`affine`)."""
        scale, offset = self._scale_offset()
        a = scale.new_zeros(len(self), 2, 3)
        a[:, 0, 0] = 1 / scale[:, 0]
        a[:, 1, 1] = 1 / scale[:, 1]
        a[:, :, 2] = -offset / scale
        return a

    def to_image(self, points: Tensor) -> Tensor:
        """Map view-space points to image space.

        Args:
            points: ``(B, N, 2)`` view-space ``(x, y)``.

        Returns:
            ``(B, N, 2)`` image-space ``(x, y)``, in the dtype of ``points`` promoted with the geometry.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[50.0, 0.0, 100.0, 100.0]]), None,
            ...                             torch.tensor([100.0, 100.0]))
            >>> g.to_image(torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
            tensor([[[0.5000, 0.0000],
                     [1.0000, 1.0000]]])
        """
        check_shape(points, "points", ("B", "N", 2), sizes={"B": len(self)})
        scale, offset = self._scale_offset()
        return points * scale[:, None, :] + offset[:, None, :]

    def to_view(self, points: Tensor) -> Tensor:
        """Map image-space points to this view's view space (inverse of :meth:`to_image`).

        Args:
            points: ``(B, N, 2)`` image-space ``(x, y)``.

        Returns:
            ``(B, N, 2)`` view-space ``(x, y)``; points outside the view fall outside ``[0, 1]``.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[50.0, 0.0, 100.0, 100.0]]), None,
            ...                             torch.tensor([100.0, 100.0]))
            >>> g.to_view(torch.tensor([[[0.25, 0.5]]]))
            tensor([[[-0.5000,  0.5000]]])
        """
        check_shape(points, "points", ("B", "N", 2), sizes={"B": len(self)})
        scale, offset = self._scale_offset()
        return (points - offset[:, None, :]) / scale[:, None, :]

    @staticmethod
    def view_grid(h: int, w: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """``(h*w, 2)`` view-space cell centers ``((j + 0.5) / w, (i + 0.5) / h)``, row-major.

        Examples:
            >>> ViewGeometry.view_grid(1, 2)
            tensor([[0.2500, 0.5000],
                    [0.7500, 0.5000]])
        """
        if h <= 0 or w <= 0:
            raise ValueError(f"h and w must be positive feature-map sizes, but got h={h}, w={w}")
        dtype = dtype or torch.get_default_dtype()
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)

    def grid(self, h: int, w: int) -> Tensor:
        """Image-space centers of the cells of an ``h x w`` feature map over each view.

        Args:
            h: feature-map height (cells).
            w: feature-map width (cells).

        Returns:
            ``(B, h*w, 2)`` image-space ``(x, y)``, row-major (index ``i * w + j``).

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), None,
            ...                             torch.tensor([10.0, 10.0]))
            >>> g.grid(2, 2)
            tensor([[[0.2500, 0.2500],
                     [0.7500, 0.2500],
                     [0.2500, 0.7500],
                     [0.7500, 0.7500]]])
        """
        pts = self.view_grid(h, w, device=self.device, dtype=self.dtype)
        return self.to_image(pts.expand(len(self), -1, -1))

    def contains(self, points: Tensor) -> Tensor:
        """Whether image-space points lie inside each view (closed box).

        Args:
            points: ``(B, N, 2)`` image-space ``(x, y)``.

        Returns:
            ``(B, N)`` bool.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[50.0, 0.0, 100.0, 100.0]]), None,
            ...                             torch.tensor([100.0, 100.0]))
            >>> g.contains(torch.tensor([[[0.25, 0.5], [0.75, 0.5]]]))
            tensor([[False,  True]])
        """
        check_shape(points, "points", ("B", "N", 2), sizes={"B": len(self)})
        nb = self.normalized_boxes
        x, y = points[..., 0], points[..., 1]
        return (
            (x >= nb[:, None, 0]) & (x <= nb[:, None, 2]) & (y >= nb[:, None, 1]) & (y <= nb[:, None, 3])
        )

    def cell_size(self, h: int, w: int) -> Tensor:
        """Image-space extent of one cell of an ``h x w`` feature map over each view.

        Units are **normalized image coordinates**: ``(width / W, height / H)`` of a cell, i.e.
        fractions of the original image width and height (always positive, flips included).
        Multiply by :attr:`image_size` for pixels. PixPro's bin diagonal is the norm of this
        vector (in the same anisotropic normalized units PixPro uses).

        Returns:
            ``(B, 2)`` cell ``(width, height)``.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 50.0, 100.0]]), torch.tensor([True]),
            ...                             torch.tensor([100.0, 100.0]))
            >>> g.cell_size(7, 5)
            tensor([[0.1000, 0.1429]])
        """
        if h <= 0 or w <= 0:
            raise ValueError(f"h and w must be positive feature-map sizes, but got h={h}, w={w}")
        nb = self.normalized_boxes
        return torch.stack([(nb[:, 2] - nb[:, 0]) / w, (nb[:, 3] - nb[:, 1]) / h], dim=-1)

    def to_cells(self, points: Tensor, h: int, w: int) -> Tensor:
        """Image-space points to continuous coordinates in this view's ``h x w`` feature-cell space.

        Cell ``(i, j)`` (row, column) has its center at ``(u, v) = (j, i)``; the view spans
        ``[-0.5, w - 0.5] x [-0.5, h - 0.5]``. Flips are applied.

        Args:
            points: ``(B, N, 2)`` image-space ``(x, y)``.
            h: feature-map height.
            w: feature-map width.

        Returns:
            ``(B, N, 2)`` ``(u, v)`` = (column, row) coordinates.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([True]),
            ...                             torch.tensor([10.0, 10.0]))
            >>> g.to_cells(g.grid(2, 3), 2, 3).round(decimals=4) + 0.0  # flipped: column 0 comes from the right
            tensor([[[0., 0.],
                     [1., 0.],
                     [2., 0.],
                     [0., 1.],
                     [1., 1.],
                     [2., 1.]]])
        """
        if h <= 0 or w <= 0:
            raise ValueError(f"h and w must be positive feature-map sizes, but got h={h}, w={w}")
        v = self.to_view(points)
        size = v.new_tensor([w, h])
        return v * size - 0.5

    def overlap(self, other: ViewGeometry) -> tuple[Tensor, Tensor]:
        """Image-space intersection of each view with the matching view of ``other``.

        Args:
            other: a geometry of the same length over the same images.

        Returns:
            ``(boxes, area)``: ``(B, 4)`` intersection ``x0, y0, x1, y1`` in image space, and
            ``(B,)`` its area in image-space units (fraction of the image area). Disjoint views
            give a zero-area box (``x1 == x0`` or ``y1 == y0``), never an inverted one, and area 0.

        Examples:
            >>> size = torch.tensor([100.0, 100.0])
            >>> a = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 60.0, 60.0]]), None, size)
            >>> b = ViewGeometry.from_crops(torch.tensor([[40.0, 50.0, 100.0, 100.0]]), None, size)
            >>> a.overlap(b)
            (tensor([[0.4000, 0.5000, 0.6000, 0.6000]]), tensor([0.0200]))
        """
        check_type(other, "other", ViewGeometry)
        if len(other) != len(self):
            raise ValueError(f"other must have the same number of views, expected {len(self)}, got {len(other)}")
        if not torch.allclose(self.image_size, other.image_size.to(self.image_size)):
            raise ValueError("other must describe views of the same images, but image_size differs")
        a, b = self.normalized_boxes, other.normalized_boxes.to(self.boxes)
        lo = torch.maximum(a[:, :2], b[:, :2])
        hi = torch.minimum(a[:, 2:], b[:, 2:])
        hi = torch.maximum(hi, lo)
        ext = hi - lo
        return torch.cat([lo, hi], dim=-1), ext[:, 0] * ext[:, 1]

    def __repr__(self) -> str:
        return f"ViewGeometry(B={len(self)}, dtype={self.dtype}, device={self.device})"


def in_box_mask(
    query: ViewGeometry,
    key: ViewGeometry,
    h: int,
    w: int,
    rule: Literal["center", "pixcon"] = "center",
) -> Tensor:
    """Which query cells lie inside the key view ("in-box", PixCon).

    Args:
        query: geometry of the query views (B views).
        key: geometry of the key views (B views of the same images).
        h: query feature-map height.
        w: query feature-map width.
        rule: ``"center"`` (default): a cell is in-box iff its center's image point lies in
            the key view. ``"pixcon"``: the upstream PixCon rule: express the intersection box
            in the query view's (flipped) frame, ``a = floor(size * box)`` and mark
            ``a_y0 <= i < a_y1``, ``a_x0 <= j < a_x1``. It is asymmetric (a 1/7-covered cell on
            the left counts, a 93%-covered cell on the right does not) and empties for thin
            overlaps; use it only for parity.

    Returns:
        ``(B, h*w)`` bool, row-major over the query grid.

    Examples:
        >>> size = torch.tensor([70.0, 70.0])
        >>> q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 70.0, 70.0]]), None, size)
        >>> k = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 66.0, 70.0]]), None, size)
        >>> in_box_mask(q, k, 1, 7).int()  # the last cell's center (65 px) is inside the key view
        tensor([[1, 1, 1, 1, 1, 1, 1]], dtype=torch.int32)
        >>> in_box_mask(q, k, 1, 7, rule="pixcon").int()  # floor(7 * 66 / 70) = 6 drops it
        tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.int32)
    """
    check_choice(rule, "rule", ("center", "pixcon"))
    if rule == "center":
        return key.contains(query.grid(h, w))
    box, _ = query.overlap(key)
    corners = torch.stack([box[:, :2], box[:, 2:]], dim=1)  # (B, 2, 2) image space
    v = query.to_view(corners)
    lo = torch.minimum(v[:, 0], v[:, 1]).clamp(0, 1)
    hi = torch.maximum(v[:, 0], v[:, 1]).clamp(0, 1)
    size = lo.new_tensor([w, h])
    a_lo = torch.floor(lo * size)
    a_hi = torch.floor(hi * size)
    jj = torch.arange(w, device=lo.device, dtype=lo.dtype)
    ii = torch.arange(h, device=lo.device, dtype=lo.dtype)
    col = (jj[None] >= a_lo[:, 0:1]) & (jj[None] < a_hi[:, 0:1])
    row = (ii[None] >= a_lo[:, 1:2]) & (ii[None] < a_hi[:, 1:2])
    return rearrange(row[:, :, None] & col[:, None, :], "b h w -> b (h w)")
