"""Exact, batched view geometry: where every pixel and feature cell of a view came from.

Convention:
    * A point is ``(x, y)``: x to the right, y down, **normalized to [0, 1] over the
      original image** ("image space"). Pixel ``(i, j)`` of an image covers the area
      ``[j, j + 1) x [i, i + 1)`` in pixel units, so image space is
      ``(x_px / W, y_px / H)``.
    * "View space" is normalized ``[0, 1]^2`` over the view as the network sees it (after
      crop, resize and the horizontal and vertical flips). A view's geometry is the affine map
      view -> image. The two flips commute, so their order does not matter.
    * An ``h x w`` feature map over a view has cell centers at view-space
      ``((j + 0.5) / w, (i + 0.5) / h)``, which is the ``align_corners=False`` convention of
      :func:`torch.nn.functional.grid_sample`. Cells are flattened row-major: ``i * w + j``.
    * "Feature-cell space" of an ``h x w`` map: continuous ``(u, v)`` with cell centers at
      integers, ``u = x_view * w - 0.5``.
    * A point lies in a view iff its view-space coordinates lie in ``[0, 1]^2`` (closed).
    * Flags are bools: flips are ``torch.bool`` tensors or Python bools; ``0``/``1`` and floats
      are refused. Feature-map sizes ``h``, ``w`` are ``int`` (not ``float``, not ``bool``).
    * Constructors from other pipelines: :meth:`ViewGeometry.from_torchvision_crop` reads
      ``RandomResizedCrop.get_params`` output ``(top, left, height, width)`` with the image size in
      torchvision's ``(H, W)`` order; :meth:`ViewGeometry.from_lightly_location` reads lightly's
      crop ``Location``. Both equal :meth:`ViewGeometry.from_crops` on the same crop.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor

from densecontrast._checks import (
    check_bool_tensor,
    check_choice,
    check_finite,
    check_int,
    check_number,
    check_shape,
    check_type,
    compute_dtype,
)

__all__ = ["ViewGeometry", "in_box_mask"]

_LIGHTLY_FIELDS = ("top", "left", "height", "width", "image_height", "image_width")
_LIGHTLY_FLAGS = ("horizontal_flip", "vertical_flip")
_MISSING = object()


def _is_scalar(value: object) -> bool:
    """A single number or bool: Python, NumPy or a 0-d tensor."""
    return isinstance(value, numbers.Number) or getattr(value, "ndim", None) == 0


def _flags(
    value: object, name: str, b: int, device: torch.device, *, of: str = "boxes", scalar: bool = False
) -> Tensor:
    """``(B,)`` bool flags on ``device``: ``None`` is all ``False``; with ``scalar``, one bool applies to every view."""
    if value is None:
        return torch.zeros(b, dtype=torch.bool, device=device)
    if scalar and _is_scalar(value):
        value = check_bool_tensor(value, name, ()).expand(b)
    return check_bool_tensor(value, name, ("B",), sizes={"B": b}, of=of).to(device)


def _float_rows(x: object, name: str, k: int, what: str) -> Tensor:
    """``(B, k)`` float64 rows from one row (``k`` numbers or a ``(k,)`` tensor) or ``B`` rows."""
    if isinstance(x, Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)  # type: ignore[arg-type]
            if t.is_floating_point():  # Python floats are doubles: read them without rounding to float32
                t = torch.as_tensor(x, dtype=torch.float64)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be {what}: {k} numbers or B rows of them, but got {x!r}") from None
    if t.dim() == 1:
        check_shape(t, name, (k,), note=f"or (B, {k}) as {what}")
        t = t[None]
    check_shape(t, name, ("B", k), note=f"as {what}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold real numbers ({what}), but got dtype {t.dtype}")
    return t.double()


def _number_column(value: object, name: str) -> Tensor:
    """A 1-D tensor of real numbers (a tensor, an array or a list)."""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    try:
        t = value if isinstance(value, Tensor) else torch.as_tensor(value)  # type: ignore[arg-type]
        if not isinstance(value, Tensor) and t.is_floating_point():  # Python floats are doubles: keep them exact
            t = torch.as_tensor(value, dtype=torch.float64)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number (pixels) or a list of numbers, but got {shown}") from None
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be a number (pixels) or a list of numbers, but got {shown} (dtype {t.dtype})")
    check_shape(t, name, ("N",), note="(one number per view)")
    return t


def _field(record: object, name: str) -> object:
    """``record[name]`` for a mapping, ``record.name`` otherwise; ``_MISSING`` when absent."""
    if isinstance(record, Mapping):
        return record.get(name, _MISSING)
    return getattr(record, name, _MISSING)


def _fmt_pair(t: Tensor) -> str:
    a, b = t.tolist()
    return f"({a:g}, {b:g})"


def _cells(h: object, w: object) -> tuple[int, int]:
    """Feature-map sizes: ``h`` and ``w`` are ints >= 1 (``1.5``, ``7.0`` and ``True`` are refused)."""
    check_int(h, "h", 1, note="(feature-map height in cells)")
    check_int(w, "w", 1, note="(feature-map width in cells)")
    return int(h), int(w)  # type: ignore[call-overload]


@dataclass(frozen=True, eq=False)
class ViewGeometry:
    """A batch of B views: the crop box, flips and image size of each, and the maps they imply.

    Build it with :meth:`from_crops` (validated), or from another pipeline's crop record with
    :meth:`from_torchvision_crop`, :meth:`from_lightly_location` or :meth:`from_pixpro`; the
    dataclass fields are read-only.

    Attributes:
        boxes: ``(B, 4)`` float crop boxes ``x0, y0, x1, y1`` in **pixel coordinates of the
            original image** (continuous, pixel areas, ``x1 > x0``, ``y1 > y0``).
        flips: ``(B,)`` bool, horizontal flip applied after the crop.
        image_size: ``(B, 2)`` float original image ``(W, H)`` in pixels.
        vflips: ``(B,)`` bool, vertical flip applied after the crop (all ``False`` when the
            geometry is built without it).

    Convention:
        View space and image space are both normalized to ``[0, 1]`` (see the module
        docstring). For a view-space point ``(s, t)`` the view -> image map is
        ``x = x0n + (x1n - x0n) * (1 - s if flip else s)``,
        ``y = y0n + (y1n - y0n) * (1 - t if vflip else t)``
        with ``x0n = x0 / W`` etc. (``(u, v)`` is reserved for feature-cell coordinates.)
        A horizontal flip mirrors the columns of every feature grid, a vertical flip its rows.

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
        >>> v = ViewGeometry.from_crops(g.boxes, None, g.image_size, vflips=torch.tensor([True]))
        >>> v.grid(2, 1)  # two cells stacked; flipped vertically, so the top cell comes from the bottom
        tensor([[[0.3000, 0.5750],
                 [0.3000, 0.3250]]])
    """

    boxes: Tensor
    flips: Tensor
    image_size: Tensor
    vflips: Tensor = None  # type: ignore[assignment]  # None: no vertical flips (set in __post_init__)

    def __post_init__(self) -> None:
        if self.vflips is None:
            no_flips = torch.zeros(self.boxes.shape[0], dtype=torch.bool, device=self.boxes.device)
            object.__setattr__(self, "vflips", no_flips)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_crops(
        cls,
        boxes: Tensor,
        flips: Tensor | Sequence[bool] | None = None,
        image_size: Tensor | Sequence[float] | None = None,
        *,
        vflips: Tensor | Sequence[bool] | None = None,
        tolerance: float = 1e-2,
    ) -> ViewGeometry:
        """Validate crop boxes and build the geometry.

        Args:
            boxes: ``(B, 4)`` crop boxes ``x0, y0, x1, y1`` in original-image pixels.
            flips: ``(B,)`` horizontal flips applied after the crop (default: none): a
                ``torch.bool`` tensor or a sequence of Python bools.
            image_size: ``(B, 2)`` or ``(2,)`` original ``(W, H)`` in pixels.
            vflips: ``(B,)`` vertical flips applied after the crop (default: none), as ``flips``.
            tolerance: how far (pixels) a box may stick out of the image before it is an error.

        Returns:
            The validated :class:`ViewGeometry` (float64 boxes stay float64, others become
            float32).

        Raises:
            ValueError: wrong shapes, non-finite values, ``x1 <= x0`` or ``y1 <= y0``, a box
                outside the image by more than ``tolerance`` pixels, a non-positive size, or
                flips that are not bools (``0.7``, or the ints ``0`` and ``1``).

        Convention:
            Flags must have the bool dtype: a probability or a score passed by mistake is an
            error, never rounded to a flip.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 32.0]]),
            ...                             torch.tensor([False]), torch.tensor([64.0, 32.0]))
            >>> g.affine
            tensor([[[1., 0., 0.],
                     [0., 1., 0.]]])
            >>> ViewGeometry.from_crops(g.boxes, None, g.image_size, vflips=[True]).affine
            tensor([[[ 1.,  0.,  0.],
                     [ 0., -1.,  1.]]])
            >>> ViewGeometry.from_crops(g.boxes, torch.tensor([0.7]), g.image_size)
            Traceback (most recent call last):
            ...
            ValueError: flips must hold bools (a torch.bool tensor or Python bools), but got a tensor of dtype ...
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
        flips = _flags(flips, "flips", b, boxes.device)
        vflips = _flags(vflips, "vflips", b, boxes.device)
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
        return cls(boxes=boxes, flips=flips, image_size=image_size, vflips=vflips)

    @classmethod
    def from_torchvision_crop(
        cls,
        params: Tensor | Sequence[float] | Sequence[Sequence[float]],
        image_size: Tensor | Sequence[float] | Sequence[Sequence[float]],
        hflip: bool | Tensor | Sequence[bool] | None = None,
        vflip: bool | Tensor | Sequence[bool] | None = None,
        *,
        tolerance: float = 1e-2,
    ) -> ViewGeometry:
        """Build from torchvision's crop parameters ``(top, left, height, width)`` and the flips applied.

        ``torchvision.transforms.v2.RandomResizedCrop.get_params(image, scale, ratio)`` (and
        ``RandomCrop.get_params``) return ``(top, left, height, width)``, the arguments of
        ``torchvision.transforms.v2.functional.resized_crop`` / ``crop``. Record them with the flip
        decisions (``functional.horizontal_flip`` / ``vertical_flip``) and pass them here.

        Args:
            params: one crop ``(top, left, height, width)`` (a tuple or a ``(4,)`` tensor), or B
                crops as a ``(B, 4)`` tensor or a list of 4-tuples, in original-image pixels.
            image_size: original ``(H, W)`` in pixels, **torchvision's order** (as
                ``image.shape[-2:]`` or ``functional.get_size(image)``): a pair, ``(2,)`` or
                ``(B, 2)``.
            hflip: horizontal flips applied after the crop: ``None`` (none), one Python bool for
                every view, or ``(B,)`` bools.
            vflip: vertical flips applied after the crop, as ``hflip``.
            tolerance: how far (pixels) a crop may stick out of the image before it is an error.

        Returns:
            The same :class:`ViewGeometry` as :meth:`from_crops` with
            ``boxes = [[left, top, left + width, top + height]]`` and ``image_size = [[W, H]]``
            (float64 ``params`` stay float64, others become float32).

        Raises:
            ValueError: ``params`` not ``(4,)`` / ``(B, 4)`` numbers, a crop with ``height <= 0``
                or ``width <= 0`` or outside the image, a non-positive image size, or flips that
                are not bools.

        Convention:
            Crops are pixel areas: ``(top, left, height, width)`` covers rows ``top`` to
            ``top + height - 1``, i.e. the continuous box ``[left, left + width] x [top, top + height]``
            (see the module docstring); torchvision's resize samples it with
            ``align_corners=False``, the convention of :meth:`grid`.

        Examples:
            >>> g = ViewGeometry.from_torchvision_crop((10, 20, 30, 40), (100, 200), hflip=True)
            >>> g.boxes, g.flips, g.vflips, g.image_size
            (tensor([[20., 10., 60., 40.]]), tensor([True]), tensor([False]), tensor([[200., 100.]]))
            >>> ViewGeometry.from_torchvision_crop(torch.tensor([[0, 0, 8, 8], [4, 2, 4, 6]]), (8, 8),
            ...                                    vflip=[False, True]).vflips
            tensor([False,  True])
        """
        rows = _float_rows(params, "params", 4, "crops (top, left, height, width)")
        b = rows.shape[0]
        size = _float_rows(image_size, "image_size", 2, "(H, W) pixels")
        if size.shape[0] == 1:
            size = size.expand(b, 2)
        elif size.shape[0] != b:
            raise ValueError(
                f"image_size must be one (H, W) or one per crop of params (B = {b}), but got {size.shape[0]} rows"
            )
        top, left, height, width = rows.unbind(-1)
        img_h, img_w = size.unbind(-1)

        def row(i: int) -> str:
            crop = ", ".join(f"{v:g}" for v in rows[i].tolist())
            return f"row {i} is (top, left, height, width) = ({crop}) in an image of (H, W) = {_fmt_pair(size[i])}"

        return cls._from_top_left(
            top, left, height, width, img_h, img_w,
            _flags(hflip, "hflip", b, rows.device, of="params", scalar=True),
            _flags(vflip, "vflip", b, rows.device, of="params", scalar=True),
            dtype=compute_dtype(params if isinstance(params, Tensor) else None),
            tolerance=tolerance, name="params", size_name="image_size", row=row,
        )  # fmt: skip

    @classmethod
    def from_lightly_location(
        cls,
        location: Any,
        *,
        tolerance: float = 1e-2,
    ) -> ViewGeometry:
        """Build from lightly's crop ``Location`` records (``lightly.transforms.random_crop_and_flip_with_grid``).

        A location has the fields ``top, left, height, width`` (the crop, pixels),
        ``image_height, image_width`` (the original image, pixels) and ``horizontal_flip,
        vertical_flip`` (bools, default ``False``). lightly is not needed: any object with these
        attributes, or a mapping with these keys, is read.

        Args:
            location: one location (an object or a mapping), a list of them (one view each), or
                one whose fields are ``(B,)`` tensors or lists (a batch, e.g. collated dicts; a
                single value, such as an absent flip, then applies to every view).

        Returns:
            The same :class:`ViewGeometry` as :meth:`from_crops` with
            ``boxes = [[left, top, left + width, top + height]]``,
            ``image_size = [[image_width, image_height]]``, ``flips = horizontal_flip`` and
            ``vflips = vertical_flip`` (float64 tensor fields stay float64, others become float32).

        Raises:
            ValueError: a missing crop or image field, a field that is not a number (or, for the
                flips, not a bool), fields of different lengths, an empty list, or a crop with
                ``height <= 0`` or ``width <= 0``, outside the image, or of a non-positive image.

        Convention:
            lightly's ``Location`` stores torchvision's ``(top, left, height, width)`` crop, so this
            is :meth:`from_torchvision_crop` with named fields.

        Examples:
            >>> loc = {"top": 10, "left": 20, "height": 30, "width": 40, "image_height": 100,
            ...        "image_width": 200, "horizontal_flip": False, "vertical_flip": True}
            >>> g = ViewGeometry.from_lightly_location(loc)
            >>> g.boxes, g.flips, g.vflips, g.image_size
            (tensor([[20., 10., 60., 40.]]), tensor([False]), tensor([True]), tensor([[200., 100.]]))
            >>> len(ViewGeometry.from_lightly_location([loc, loc]))
            2
        """
        if isinstance(location, (str, bytes, Tensor)):
            raise ValueError(
                f"location must be a lightly Location (or a mapping with its fields) or a list of them, "
                f"but got {type(location).__name__}"
            )
        if isinstance(location, Sequence):
            if len(location) == 0:
                raise ValueError(
                    "location must be a lightly Location or a non-empty list of them, but got an empty list"
                )
            records = [(f"location[{k}]", rec) for k, rec in enumerate(location)]
        else:
            records = [("location", location)]
        numeric: dict[str, list[Tensor]] = {f: [] for f in _LIGHTLY_FIELDS}
        flags: dict[str, list[Tensor]] = {f: [] for f in _LIGHTLY_FLAGS}
        float64 = False
        for where, rec in records:
            columns: dict[str, Tensor] = {}
            scalars: set[str] = set()
            for f in (*_LIGHTLY_FIELDS, *_LIGHTLY_FLAGS):
                value = _field(rec, f)
                if value is _MISSING and f in _LIGHTLY_FLAGS:
                    value = False  # the dataclass default
                if value is _MISSING:
                    raise ValueError(
                        f"{where} must have lightly's Location fields {', '.join(_LIGHTLY_FIELDS)}, "
                        f"but {where} ({type(rec).__name__}) has no {f!r}"
                    )
                if f in _LIGHTLY_FIELDS:  # float64 tensors keep float64, as in from_crops
                    float64 |= isinstance(value, Tensor) and value.dtype == torch.float64
                if _is_scalar(value):
                    scalars.add(f)
                    value = [value]
                if f in _LIGHTLY_FLAGS:
                    columns[f] = check_bool_tensor(value, f"{where}.{f}", ("N",))
                else:
                    columns[f] = _number_column(value, f"{where}.{f}")
            # one value per view; a scalar field (e.g. a default flip) applies to every view of the record
            lengths = {f: c.shape[0] for f, c in columns.items() if f not in scalars}
            first = next(iter(lengths), None)
            n = 1 if first is None else lengths[first]
            for f, m in lengths.items():
                if m != n:
                    raise ValueError(
                        f"{where}.{f} must have one value per view like {where}.{first} ({n}) or be a "
                        f"single value, but got {m}"
                    )
            for f, c in columns.items():
                c = c.expand(n) if f in scalars else c
                if f in _LIGHTLY_FLAGS:
                    flags[f].append(c.cpu())
                else:
                    numeric[f].append(c.double())
        top, left, height, width, img_h, img_w = (torch.cat(numeric[f]) for f in _LIGHTLY_FIELDS)
        hflips, vflips = (torch.cat(flags[f]) for f in _LIGHTLY_FLAGS)

        def row(i: int) -> str:
            columns = (top, left, height, width, img_h, img_w)
            values = ", ".join(f"{f}={float(c[i]):g}" for f, c in zip(_LIGHTLY_FIELDS, columns))
            return f"view {i} has {values}"

        return cls._from_top_left(
            top, left, height, width, img_h, img_w, hflips, vflips,
            dtype=torch.float64 if float64 else torch.float32,
            tolerance=tolerance, name="location", size_name="location", row=row,
        )  # fmt: skip

    @classmethod
    def _from_top_left(
        cls,
        top: Tensor,
        left: Tensor,
        height: Tensor,
        width: Tensor,
        img_h: Tensor,
        img_w: Tensor,
        hflips: Tensor,
        vflips: Tensor,
        *,
        dtype: torch.dtype,
        tolerance: float,
        name: str,
        size_name: str,
        row: Callable[[int], str],
    ) -> ViewGeometry:
        """Shared core of the constructors from ``(top, left, height, width)`` crops: ``(B,)`` float64 columns."""
        tolerance = check_number(tolerance, "tolerance", 0.0)

        def first(bad: Tensor) -> int:
            return int(bad.nonzero()[0, 0])

        crop = torch.stack([top, left, height, width], dim=-1)
        size = torch.stack([img_h, img_w], dim=-1)
        if not torch.isfinite(crop).all():
            raise ValueError(f"{name} must be finite, but {row(first(~torch.isfinite(crop).all(-1)))}")
        bad = ~torch.isfinite(size).all(-1) | (size <= 0).any(-1)
        if bad.any():
            raise ValueError(f"{size_name} must give a finite, positive image height and width, but {row(first(bad))}")
        bad = (height <= 0) | (width <= 0)
        if bad.any():
            raise ValueError(f"{name} must have crops with height > 0 and width > 0, but {row(first(bad))}")
        bad = (
            (top < -tolerance) | (left < -tolerance)
            | (top + height > img_h + tolerance) | (left + width > img_w + tolerance)
        )  # fmt: skip
        if bad.any():
            raise ValueError(
                f"{name} must have crops inside the image (tolerance {tolerance:g} px), but {row(first(bad))}"
            )
        boxes = torch.stack([left, top, left + width, top + height], dim=-1).to(dtype)
        return cls.from_crops(
            boxes, hflips, torch.stack([img_w, img_h], dim=-1).to(dtype), vflips=vflips, tolerance=tolerance
        )

    @classmethod
    def from_pixpro(cls, coords: Tensor, image_size: Tensor) -> ViewGeometry:
        """Build from PixPro's per-view coordinates.

        PixPro records a crop of ``h x w`` pixels at row ``i``, column ``j`` as
        ``(j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1))`` (inclusive pixel ends) and
        encodes a horizontal flip by swapping the two x values. PixPro never flips vertically;
        a vertical flip is read the same way, from swapped y values (as :meth:`to_pixpro` writes it).

        Args:
            coords: ``(B, 4)`` PixPro coordinates.
            image_size: ``(B, 2)`` or ``(2,)`` original ``(W, H)`` in pixels.

        Returns:
            The equivalent geometry, with the crop box ``[j, i, j + w, i + h]``,
            ``flips = x1 < x0`` and ``vflips = y1 < y0`` (of the PixPro coordinates).

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
        vflips = coords[:, 3] < coords[:, 1]
        xa = torch.minimum(coords[:, 0], coords[:, 2])
        xb = torch.maximum(coords[:, 0], coords[:, 2])
        ya = torch.minimum(coords[:, 1], coords[:, 3])
        yb = torch.maximum(coords[:, 1], coords[:, 3])
        wm1, hm1 = size[:, 0] - 1, size[:, 1] - 1
        boxes = torch.stack([xa * wm1, ya * hm1, xb * wm1 + 1, yb * hm1 + 1], dim=-1)
        return cls.from_crops(boxes, flips, size, vflips=vflips)

    def to_pixpro(self) -> Tensor:
        """PixPro's coordinates of these views (inverse of :meth:`from_pixpro`).

        Returns:
            ``(B, 4)`` ``(x0, y0, x1, y1)`` normalized by ``(W - 1, H - 1)`` with inclusive pixel
            ends, x swapped for horizontally flipped views and y for vertically flipped ones.

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
        ya, yb = y0 / hm1, (y1 - 1) / hm1
        ya, yb = torch.where(self.vflips, yb, ya), torch.where(self.vflips, ya, yb)
        return torch.stack([xa, ya, xb, yb], dim=-1)

    # ------------------------------------------------------------------ batch handling
    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> ViewGeometry:
        """Select views; an integer index keeps the batch dimension (a batch of one).

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3), None, torch.tensor([8.0, 8.0]),
            ...                             vflips=[False, True, False])
            >>> g[1].vflips, g[[0, 1]].vflips
            (tensor([True]), tensor([False,  True]))
        """
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"index {index} is out of range for a ViewGeometry of {n} views")
            index = slice(index % n, index % n + 1)
        return ViewGeometry(self.boxes[index], self.flips[index], self.image_size[index], self.vflips[index])

    def to(self, *args: object, **kwargs: object) -> ViewGeometry:
        """Move to a device and/or cast the float fields (both flips stay bool), like ``Tensor.to``.

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
            self.vflips.to(device=boxes.device),
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
            torch.cat([g.vflips for g in geometries]),
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
        sy = torch.where(self.vflips, y0 - y1, y1 - y0)
        ty = torch.where(self.vflips, y1, y0)
        scale = torch.stack([sx, sy], dim=-1)
        offset = torch.stack([tx, ty], dim=-1)
        return scale, offset

    @property
    def affine(self) -> Tensor:
        """``(B, 2, 3)`` affine map from view space to image space: ``p_img = A[:, :, :2] p + A[:, :, 2]``.

        Diagonal: ``A[:, 0, 0] < 0`` for a horizontally flipped view, ``A[:, 1, 1] < 0`` for a
        vertically flipped one.
        """
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

        View space is after the flips, so this grid is the same for every view.

        Raises:
            ValueError: ``h`` or ``w`` is not an int ``>= 1``.

        Examples:
            >>> ViewGeometry.view_grid(1, 2)
            tensor([[0.2500, 0.5000],
                    [0.7500, 0.5000]])
        """
        h, w = _cells(h, w)
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
            ``(B, h*w, 2)`` image-space ``(x, y)``, row-major (index ``i * w + j``). A horizontally
            flipped view takes column ``w - 1 - j`` of the crop for cell ``j``, a vertically
            flipped one row ``h - 1 - i`` for cell ``i``.

        Raises:
            ValueError: ``h`` or ``w`` is not an int ``>= 1`` (``grid(1.5, 7)``, ``grid(7.0, 7)``).

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), None,
            ...                             torch.tensor([10.0, 10.0]))
            >>> g.grid(2, 2)
            tensor([[[0.2500, 0.2500],
                     [0.7500, 0.2500],
                     [0.2500, 0.7500],
                     [0.7500, 0.7500]]])
        """
        h, w = _cells(h, w)
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

        Args:
            h: feature-map height (cells), an int ``>= 1``.
            w: feature-map width (cells), an int ``>= 1``.

        Returns:
            ``(B, 2)`` cell ``(width, height)``.

        Examples:
            >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 50.0, 100.0]]), torch.tensor([True]),
            ...                             torch.tensor([100.0, 100.0]))
            >>> g.cell_size(7, 5)
            tensor([[0.1000, 0.1429]])
        """
        h, w = _cells(h, w)
        nb = self.normalized_boxes
        return torch.stack([(nb[:, 2] - nb[:, 0]) / w, (nb[:, 3] - nb[:, 1]) / h], dim=-1)

    def to_cells(self, points: Tensor, h: int, w: int) -> Tensor:
        """Image-space points to continuous coordinates in this view's ``h x w`` feature-cell space.

        Cell ``(i, j)`` (row, column) has its center at ``(u, v) = (j, i)``; the view spans
        ``[-0.5, w - 0.5] x [-0.5, h - 0.5]``. Flips are applied (a horizontal flip mirrors ``u``,
        a vertical flip ``v``).

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
        h, w = _cells(h, w)
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
            in the query view's frame (mirrored in x by a horizontal flip, in y by a vertical
            one), ``a = floor(size * box)`` and mark
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
    h, w = _cells(h, w)
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
