"""Argument checks shared by the whole library, and the one compute-dtype rule.

Every check raises ``ValueError`` with a message that names the argument, says what was expected
(shape, dtype, range or choices) and shows what was received, e.g.
``"key must have shape (B, D, h_k, w_k) with (B, D) = (2, 8) as query, but got (2, 6, 4, 5)"``.
Checks return the checked value (converted where that is their job: a ``float``, a size pair,
a shape), so a call can validate and bind in one line.

Shapes are written with named dimensions. A name is any string (``"B"``, ``"h_k"``); an int
requires that exact size and ``None`` accepts any size. Sizes can be bound across arguments by
passing one ``sizes`` dict to several :func:`check_shape` calls::

    dims: dict[str, int] = {}
    check_shape(query, "query", ("B", "D", "h", "w"), sizes=dims)          # binds B, D, h, w
    check_shape(key, "key", ("B", "D", "h_k", "w_k"), sizes=dims, of="query")  # B, D must agree

Compute dtype: losses, matchers and heads compute in float32, or in float64 when an input is
float64; half and bfloat16 inputs are upcast (:func:`compute_dtype`, :func:`to_compute`).

Value checks that read tensor contents (:func:`check_index`, :func:`check_nonnegative`,
:func:`check_finite` with ``asynchronous=True``) are asynchronous device asserts
(``torch._assert_async``) on CUDA and while ``torch.compile`` traces, so they never break a
compiled graph; a violation then raises ``RuntimeError`` when the assert runs.

This module sits at the bottom of the package: it imports nothing from ``densecontrast`` at run
time. Checks for library types (:class:`~densecontrast.geometry.ViewGeometry`,
:class:`~densecontrast.matching.Matches`) look the class up in the already-imported module: an
object can only be an instance of a class whose module has been imported.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from densecontrast.geometry import ViewGeometry

__all__ = [
    "check_bool_tensor",
    "check_choice",
    "check_finite",
    "check_floating",
    "check_geometry_pair",
    "check_grid_shape",
    "check_index",
    "check_int",
    "check_interval",
    "check_matches",
    "check_nonnegative",
    "check_number",
    "check_positive",
    "check_shape",
    "check_size",
    "check_weights_only",
    "check_type",
    "compute_dtype",
    "to_compute",
]

T = TypeVar("T")
Dim = str | int | None


def _suffix(note: str) -> str:
    return f" {note}" if note else ""


def _fmt_tuple(items: Sequence[object]) -> str:
    """``(a, b)``; a single item keeps Python's trailing comma: ``(a,)``."""
    inner = ", ".join(str(i) for i in items)
    return f"({inner},)" if len(items) == 1 else f"({inner})"


def _fmt_dims(dims: Sequence[Dim]) -> str:
    return _fmt_tuple(["*" if d is None else d for d in dims])


def _is_instance(x: object, module: str, name: str) -> bool:
    """``isinstance(x, module.name)`` without importing ``module`` (not imported: no instance can exist)."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(x, cls)


# ------------------------------------------------------------------------------------ types and tensors
def check_type(x: T, name: str, types: type | tuple[type, ...], *, what: str | None = None) -> T:
    """Raise ``ValueError`` unless ``x`` is an instance of ``types``; return ``x``.

    Args:
        x: the value.
        name: argument name for the message.
        types: a class or a tuple of classes.
        what: the expected type in the message, article included (default: ``"a "`` and the class names).

    Examples:
        >>> check_type(3, "n", int)
        3
        >>> check_type([0.0, 1.0], "boxes", Tensor)
        Traceback (most recent call last):
        ...
        ValueError: boxes must be a Tensor, but got list
    """
    if not isinstance(x, types):
        if what is None:
            what = "a " + " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"{name} must be {what}, but got {type(x).__name__}")
    return x


def check_shape(
    x: object,
    name: str,
    dims: Sequence[Dim],
    *,
    sizes: MutableMapping[str, int] | None = None,
    of: str | None = None,
    floating: bool = False,
    note: str = "",
) -> tuple[int, ...]:
    """Check that ``x`` is a tensor of shape ``dims``; return its shape and bind the named sizes.

    Args:
        x: the value to check.
        name: argument name for the message.
        dims: one entry per dimension: a name (``"B"``) accepts any size, or the size already
            bound to that name in ``sizes`` (or earlier in ``dims``); an int requires that exact
            size; ``None`` accepts any size (shown as ``*``).
        sizes: named sizes shared between calls. Names already in it must agree; the others are
            added after a successful check.
        of: the argument the bound sizes come from, named in the message.
        floating: also require a floating-point dtype.
        note: text appended to the expected shape in the message (e.g. ``"as (W, H) pixels"``).

    Returns:
        ``tuple(x.shape)``.

    Raises:
        ValueError: ``x`` is not a tensor, has another number of dimensions or sizes, or (with
            ``floating``) an integer or bool dtype.

    Examples:
        >>> dims = {}
        >>> check_shape(torch.zeros(2, 8, 3, 3), "query", ("B", "D", "h", "w"), sizes=dims)
        (2, 8, 3, 3)
        >>> check_shape(torch.zeros(2, 6, 4, 5), "key", ("B", "D", "h_k", "w_k"), sizes=dims, of="query")
        Traceback (most recent call last):
        ...
        ValueError: key must have shape (B, D, h_k, w_k) with (B, D) = (2, 8) as query, but got (2, 6, 4, 5)
        >>> check_shape(torch.zeros(3), "z", ("B", "N"), sizes={"B": 3, "N": 4}, of="p")
        Traceback (most recent call last):
        ...
        ValueError: z must have the shape (B, N) = (3, 4) of p, but got (3,)
    """
    expected = _fmt_dims(dims)
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {expected}{_suffix(note)}, but got {type(x).__name__}")
    got = tuple(x.shape)
    bound = {d: sizes[d] for d in dims if isinstance(d, str) and sizes is not None and d in sizes}
    seen = dict(bound)
    ok = len(got) == len(dims)
    for d, s in zip(dims, got):
        if not ok:
            break
        if isinstance(d, int):
            ok = s == d
        elif isinstance(d, str):
            ok = seen.setdefault(d, s) == s
    if not ok:
        if all(isinstance(d, int) or d in bound for d in dims) and (bound or of):
            concrete = f" = {_fmt_tuple([d if isinstance(d, int) else bound[d] for d in dims])}" if bound else ""
            source = f" of {of}" if of else ""
            expected = f"the shape {expected}{concrete}{source}"
        elif bound:
            names, values = list(bound), list(bound.values())
            pair = f"{names[0]} = {values[0]}" if len(names) == 1 else f"{_fmt_tuple(names)} = {_fmt_tuple(values)}"
            expected = f"shape {expected} with {pair}" + (f" as {of}" if of else "")
        else:
            expected = f"shape {expected}"
        raise ValueError(f"{name} must have {expected}{_suffix(note)}, but got {got}")
    if floating:
        check_floating(x, name)
    if sizes is not None:
        for d, s in zip(dims, got):
            if isinstance(d, str):
                sizes.setdefault(d, s)
    return got


def check_floating(x: T, name: str) -> T:
    """Raise ``ValueError`` unless ``x`` is a floating-point tensor (or a floating ``torch.dtype``).

    Examples:
        >>> check_floating(torch.float16, "dtype")
        torch.float16
        >>> check_floating(torch.zeros(2, dtype=torch.long), "keys")
        Traceback (most recent call last):
        ...
        ValueError: keys must be a floating-point tensor, but got dtype torch.int64
    """
    if isinstance(x, torch.dtype):
        if not x.is_floating_point:
            raise ValueError(f"{name} must be a floating-point dtype, but got {x}")
        return x
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a floating-point tensor, but got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, but got dtype {x.dtype}")
    return x


def check_finite(x: Tensor, name: str, *, note: str = "", asynchronous: bool = False) -> Tensor:
    """Raise ``ValueError`` if a floating tensor holds NaN or inf (other dtypes pass); return ``x``.

    This reads the result on the host: one synchronization for a CUDA tensor, unless
    ``asynchronous=True``: then a CUDA tensor (or any tensor under ``torch.compile``) is checked
    with an asynchronous device assert (as in :func:`check_index`) and other devices still raise
    ``ValueError``.

    Args:
        x: the tensor.
        name: argument name for the message.
        note: text appended to "must be finite" in the message (e.g. what was checked).
        asynchronous: on CUDA and under ``torch.compile``, assert on the device instead of synchronizing.

    Examples:
        >>> check_finite(torch.tensor([[0.0, float("nan")]]), "boxes")
        Traceback (most recent call last):
        ...
        ValueError: boxes must be finite, but it contains 1 NaN or inf values (first at index [0, 1]) in a tensor ...
    """
    if not x.is_floating_point() or x.numel() == 0:
        return x
    if asynchronous and _asynchronous(x):
        torch._assert_async(torch.isfinite(x).all(), f"{name} must be finite{_suffix(note)}")
        return x
    bad = ~torch.isfinite(x)
    if bad.any():
        first = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} must be finite{_suffix(note)}, but it contains {int(bad.sum())} NaN or inf values "
            f"(first at index {first}) in a tensor of shape {tuple(x.shape)}"
        )
    return x


def _asynchronous(x: Tensor) -> bool:
    """Whether value checks of ``x`` are asynchronous asserts: on CUDA, and while ``torch.compile`` traces."""
    return x.device.type == "cuda" or torch.compiler.is_compiling()


def _check_elementwise(x: Tensor, ok: Tensor, requirement: str, describe: Any) -> None:
    """Raise unless ``ok`` (a bool tensor shaped like ``x``) is all True; asynchronous on CUDA.

    On CUDA the condition is checked with ``torch._assert_async`` (no host synchronization: a
    violation surfaces as a device-side assert at a later synchronization and leaves the CUDA
    context unusable, as an out-of-range ``gather`` would), and so it is under ``torch.compile``
    on any device (no graph break; a violation raises ``RuntimeError`` with ``requirement``). On
    every other device the result is read on the host and a violation raises
    ``ValueError(requirement + describe(bad))``.
    """
    if x.numel() == 0:
        return
    if _asynchronous(x):
        torch._assert_async(ok.all(), requirement)
        return
    bad = ~ok
    if bool(bad.any()):
        raise ValueError(f"{requirement}, but got {describe(bad)}")


def _where_bad(x: Tensor, bad: Tensor, kind: str) -> str:
    """``"<count> <kind> (first <value> at index [i, j]) in a tensor of shape (...)"`` for the message."""
    first = bad.nonzero()[0].tolist()
    value = x[tuple(first)].item()
    return f"{int(bad.sum())} {kind} (first {value!r} at index {first}) in a tensor of shape {tuple(x.shape)}"


def check_index(index: Tensor, name: str, size: int | None, *, note: str = "") -> Tensor:
    """Require the entries of an integer tensor to lie in ``[0, size)`` (``size=None``: only ``>= 0``).

    No host synchronization on CUDA: there the check is an asynchronous device assert
    (``torch._assert_async``), so a bad index stops the program at the next synchronization
    (``RuntimeError: ... device-side assert triggered``, the CUDA context is then unusable)
    instead of raising here. On the CPU (and other devices) a ``ValueError`` is raised at once.

    Args:
        index: an integer tensor (dtype and shape are the caller's to check).
        name: argument name for the message.
        size: the number of entries indexed (``M``), or ``None`` when unknown.
        note: text appended to the range in the message (e.g. which grid the indices address).

    Returns:
        ``index``.

    Examples:
        >>> check_index(torch.tensor([[0, 3]]), "key_index", 4)
        tensor([[0, 3]])
        >>> check_index(torch.tensor([[0, 4, -1]]), "key_index", 4, note="(the cells of key_shape (2, 2))")
        Traceback (most recent call last):
        ...
        ValueError: key_index must hold indices in [0, 4) (the cells of key_shape (2, 2)), but got 2 out-of-range ...
        >>> check_index(torch.tensor([-2]), "key_index", None)
        Traceback (most recent call last):
        ...
        ValueError: key_index must hold indices >= 0, but got 1 out-of-range values (first -2 at index [0]) ...
    """
    ok = index >= 0
    if size is not None:
        ok = ok & (index < size)
    what = f"in [0, {size})" if size is not None else ">= 0"
    _check_elementwise(index, ok, f"{name} must hold indices {what}{_suffix(note)}",
                       lambda bad: _where_bad(index, bad, "out-of-range values"))
    return index


def check_nonnegative(x: Tensor, name: str, *, note: str = "") -> Tensor:
    """Require every entry of a tensor to be finite and ``>= 0`` (weights); return ``x``.

    Bool and integer tensors only need ``>= 0``. As :func:`check_index`: an asynchronous device
    assert on CUDA (no host synchronization), a ``ValueError`` elsewhere.

    Examples:
        >>> check_nonnegative(torch.tensor([0.0, 2.0]), "weight")
        tensor([0., 2.])
        >>> check_nonnegative(torch.tensor([1.0, -0.5, float("nan")]), "weight")
        Traceback (most recent call last):
        ...
        ValueError: weight must be finite and >= 0, but got 2 negative or non-finite values (first -0.5 ...
    """
    if x.dtype == torch.bool:
        return x
    ok = x >= 0
    if x.is_floating_point():
        ok = ok & torch.isfinite(x)
        requirement = f"{name} must be finite and >= 0{_suffix(note)}"
        kind = "negative or non-finite values"
    else:
        requirement = f"{name} must be >= 0{_suffix(note)}"
        kind = "negative values"
    _check_elementwise(x, ok, requirement, lambda bad: _where_bad(x, bad, kind))
    return x


# ------------------------------------------------------------------------------------ numbers and options
def _interval(low: float, high: float, open_low: bool, open_high: bool) -> str:
    lo_ok, hi_ok = math.isfinite(low), math.isfinite(high)
    if lo_ok and hi_ok:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if lo_ok:
        return f"{'>' if open_low else '>='} {low:g}"
    if hi_ok:
        return f"{'<' if open_high else '<='} {high:g}"
    return ""


def check_number(
    value: object,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
    finite: bool = True,
    note: str = "",
) -> float:
    """A real number in ``[low, high]`` (ends excluded with ``open_low`` / ``open_high``); returned as float.

    Anything ``float()`` accepts is a number (ints, floats, NumPy scalars, one-element tensors),
    except ``bool`` and strings. NaN is never accepted; infinities only with ``finite=False``.

    Args:
        value: the value.
        name: argument name for the message.
        low: lower bound (``-inf``: none).
        high: upper bound (``inf``: none).
        open_low: exclude ``low`` itself.
        open_high: exclude ``high`` itself.
        finite: reject ``inf`` (when a bound is infinite).
        note: text appended to the requirement in the message.

    Examples:
        >>> check_number(0.5, "momentum", 0, 1, open_high=True)
        0.5
        >>> check_number(1, "momentum", 0, 1, open_high=True)
        Traceback (most recent call last):
        ...
        ValueError: momentum must be in [0, 1), but got 1
        >>> check_number("x", "momentum", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: momentum must be a number in [0, 1], but got 'x'
        >>> check_number(-1, "gamma", 0)
        Traceback (most recent call last):
        ...
        ValueError: gamma must be a finite number >= 0, but got -1
    """
    bounded = math.isfinite(low) and math.isfinite(high)
    requirement = "number" if bounded or not finite else "finite number"
    interval = _interval(low, high, open_low, open_high)
    message = f"{name} must be a {requirement}{_suffix(interval)}{_suffix(note)}, but got {value!r}"
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(message)
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(message) from None
    if math.isnan(v):
        raise ValueError(message)
    in_range = (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    if not in_range or (finite and not math.isfinite(v)):
        if bounded:  # a number, but outside the interval
            message = f"{name} must be {interval}{_suffix(note)}, but got {value!r}"
        raise ValueError(message)
    return v


def check_positive(value: object, name: str, *, note: str = "") -> float:
    """A finite number > 0 (a temperature, a radius, a learning rate); returned as float.

    Examples:
        >>> check_positive(0.2, "temperature")
        0.2
        >>> check_positive(float("inf"), "temperature")
        Traceback (most recent call last):
        ...
        ValueError: temperature must be a finite number > 0, but got inf
    """
    return check_number(value, name, 0.0, open_low=True, note=note)


def check_int(value: Any, name: str, low: int | None = None, *, allow_none: bool = False, note: str = "") -> Any:
    """An integer (``int`` or NumPy, not ``bool``) ``>= low``, or ``None`` with ``allow_none``; returned unchanged.

    Examples:
        >>> check_int(3, "num_points", 1)
        3
        >>> check_int(0, "topk", 1, allow_none=True)
        Traceback (most recent call last):
        ...
        ValueError: topk must be None or an int >= 1, but got 0
    """
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        what = "an int" if low is None else f"an int >= {low}"
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}{what}{_suffix(note)}, but got {value!r}")
    return value


def check_choice(value: T, name: str, choices: Collection[object], *, note: str = "") -> T:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (``True`` is not ``1`` here); return it.

    Examples:
        >>> check_choice("mean", "reduction", ("mean", "sum", "none"))
        'mean'
        >>> check_choice("avg", "reduction", ("mean", "sum", "none"))
        Traceback (most recent call last):
        ...
        ValueError: reduction must be one of ('mean', 'sum', 'none'), but got 'avg'
    """
    is_bool = isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)
    if is_bool or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}{_suffix(note)}, but got {value!r}")
    return value


def check_size(size: object, name: str = "size") -> tuple[int, int]:
    """An image size: a positive int ``s`` (square) or a pair ``(height, width)``; returned as ``(h, w)``.

    Examples:
        >>> check_size(32), check_size((24, 32))
        ((32, 32), (24, 32))
        >>> check_size((24, 0))
        Traceback (most recent call last):
        ...
        ValueError: size must be a positive int or a pair (height, width) of positive ints, but got (24, 0)
    """
    message = f"{name} must be a positive int or a pair (height, width) of positive ints, but got {size!r}"
    if isinstance(size, int) and not isinstance(size, bool):
        pair: tuple[Any, ...] = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        pair = tuple(size)
    else:
        raise ValueError(message)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ValueError(message)
    return int(pair[0]), int(pair[1])


def check_grid_shape(shape: object, name: str) -> tuple[int, int]:
    """A feature-map size ``(h, w)`` of two positive ints (integral floats pass); returned as ints.

    Examples:
        >>> check_grid_shape((7, 7.0), "query_shape")
        (7, 7)
        >>> check_grid_shape((7,), "key_shape")
        Traceback (most recent call last):
        ...
        ValueError: key_shape must be a feature-map size (h, w) of two positive ints, but got (7,)
    """
    ok = isinstance(shape, Sequence) and not isinstance(shape, str) and len(shape) == 2
    if ok:
        try:
            h, w = (int(s) for s in shape)  # type: ignore[union-attr]
            ok = h > 0 and w > 0 and all(float(s) == int(s) for s in shape)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise ValueError(f"{name} must be a feature-map size (h, w) of two positive ints, but got {shape!r}")
    return h, w


def check_interval(value: object, name: str, low: float, high: float) -> tuple[float, float]:
    """A pair ``(min, max)`` of finite numbers with ``low < min <= max <= high``; returned as floats.

    Examples:
        >>> check_interval((0.08, 1), "scale", 0, 1)
        (0.08, 1.0)
        >>> check_interval((2, 1), "ratio", 0, math.inf)
        Traceback (most recent call last):
        ...
        ValueError: ratio must be a pair (min, max) with 0 < min <= max, but got (2, 1)
    """
    upper = f" <= {high:g}" if math.isfinite(high) else ""
    message = f"{name} must be a pair (min, max) with {low:g} < min <= max{upper}, but got {value!r}"
    try:
        a, b = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not (math.isfinite(a) and math.isfinite(b) and low < a <= b <= high):
        raise ValueError(message)
    return a, b


# ------------------------------------------------------------------------------------ library types
def check_geometry_pair(
    query_geometry: object, key_geometry: object, *, batch: int | None = None
) -> tuple[ViewGeometry, ViewGeometry]:
    """Two :class:`~densecontrast.geometry.ViewGeometry` of the same views; promoted to one dtype and device.

    Args:
        query_geometry: the query views.
        key_geometry: the key views (moved to the query geometry's device).
        batch: the number of views both must hold (e.g. the features' ``B``), or ``None``.

    Returns:
        ``(query_geometry, key_geometry)`` in their promoted float dtype.

    Examples:
        >>> from densecontrast.geometry import ViewGeometry
        >>> g = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), None, torch.tensor([4.0, 4.0]))
        >>> q, k = check_geometry_pair(g, g.to(torch.float64))
        >>> q.dtype
        torch.float64
        >>> check_geometry_pair(g, g, batch=2)
        Traceback (most recent call last):
        ...
        ValueError: query_geometry must hold B = 2 views like the features, but got 1
    """
    for name, g in (("query_geometry", query_geometry), ("key_geometry", key_geometry)):
        if not _is_instance(g, "densecontrast.geometry", "ViewGeometry"):
            raise ValueError(f"{name} must be a ViewGeometry, but got {type(g).__name__}")
    qg: ViewGeometry = query_geometry  # type: ignore[assignment]
    kg: ViewGeometry = key_geometry  # type: ignore[assignment]
    if batch is not None and len(qg) != batch:
        raise ValueError(f"query_geometry must hold B = {batch} views like the features, but got {len(qg)}")
    if len(kg) != len(qg):
        raise ValueError(f"key_geometry must hold as many views as query_geometry (B = {len(qg)}), but got {len(kg)}")
    dtype = torch.promote_types(qg.dtype, kg.dtype)
    if qg.dtype != dtype:
        qg = qg.to(dtype)
    if kg.dtype != dtype or kg.device != qg.device:
        kg = kg.to(device=qg.device, dtype=dtype)
    return qg, kg


def check_matches(
    matches: T,
    name: str = "matches",
    *,
    queries: tuple[int, int] | None = None,
    cells_of: str | None = None,
    key_shape: tuple[int, int] | None = None,
    key_name: str = "key",
) -> T:
    """A :class:`~densecontrast.matching.Matches` with ``B x N`` queries and the right key grid; returned unchanged.

    Args:
        matches: the value.
        name: argument name for the message.
        queries: the ``(B, N)`` its ``valid`` must have, or ``None``.
        cells_of: the argument whose cells are the queries, named in the message.
        key_shape: the ``(h_k, w_k)`` grid its ``key_shape`` (when set) must equal, or ``None``.
        key_name: the argument that holds the key grid, named in the message.

    Examples:
        >>> from densecontrast.matching import Matches
        >>> m = Matches(valid=torch.ones(2, 4, dtype=torch.bool), weight=torch.ones(2, 4),
        ...             key_index=torch.zeros(2, 4, dtype=torch.long), key_shape=(2, 2))
        >>> check_matches(m, queries=(2, 9), cells_of="query")
        Traceback (most recent call last):
        ...
        ValueError: matches must have B x N = 2 x 9 queries (one per cell of query), but matches.valid has shape (2, 4)
    """
    if not _is_instance(matches, "densecontrast.matching.matches", "Matches"):
        raise ValueError(f"{name} must be a densecontrast.matching.Matches, but got {type(matches).__name__}")
    valid = tuple(matches.valid.shape)  # type: ignore[attr-defined]
    if queries is not None and valid != tuple(queries):
        which = f" (one per cell of {cells_of})" if cells_of else ""
        raise ValueError(
            f"{name} must have B x N = {queries[0]} x {queries[1]} queries{which}, but {name}.valid has shape {valid}"
        )
    own = matches.key_shape  # type: ignore[attr-defined]
    if key_shape is not None and own is not None and tuple(own) != tuple(key_shape):
        raise ValueError(f"{name}.key_shape must equal the {key_name} grid {tuple(key_shape)}, but got {own}")
    return matches


# ------------------------------------------------------------------------------------ compute dtype
def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype to compute in: float64 if any tensor is float64, else float32 (``None`` entries are skipped).

    Half and bfloat16 inputs are upcast to float32, so reductions and logits never round to half
    precision; float64 inputs keep float64 so references and gradient checks stay exact.

    Examples:
        >>> [compute_dtype(torch.zeros(1, dtype=d)) for d in (torch.float16, torch.bfloat16, torch.float32)]
        [torch.float32, torch.float32, torch.float32]
        >>> compute_dtype(torch.zeros(1), None, torch.zeros(1, dtype=torch.float64))
        torch.float64
    """
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def to_compute(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` in ``dtype``, by default :func:`compute_dtype` of ``x`` (no copy when it already is).

    Examples:
        >>> to_compute(torch.ones(2, dtype=torch.bfloat16)).dtype, to_compute(torch.ones(2, dtype=torch.float64)).dtype
        (torch.float32, torch.float64)
    """
    return x.to(compute_dtype(x) if dtype is None else dtype)


# ------------------------------------------------------------------------------------ flags
def check_bool_tensor(
    x: object,
    name: str,
    dims: Sequence[Dim],
    *,
    sizes: MutableMapping[str, int] | None = None,
    of: str | None = None,
    note: str = "",
) -> Tensor:
    """Flags of shape ``dims``: a ``torch.bool`` tensor, or Python / NumPy bools; returned as a bool tensor.

    Only the bool dtype is accepted. Integers (``0`` and ``1`` too) and floats are refused, so a
    probability or a score passed by mistake (``0.7``) is an error instead of silently becoming ``True``.

    Args:
        x: a bool tensor, a NumPy bool array, a Python bool or a (nested) sequence of bools.
        name: argument name for the message.
        dims: the expected shape, as in :func:`check_shape`.
        sizes: named sizes shared between calls, as in :func:`check_shape`.
        of: the argument the bound sizes come from, as in :func:`check_shape`.
        note: text appended to the expected shape in the message.

    Returns:
        ``x`` as a bool tensor (``x`` itself when it already is one).

    Raises:
        ValueError: ``x`` does not hold bools, or has another shape.

    Examples:
        >>> check_bool_tensor([True, False], "flips", ("B",))
        tensor([ True, False])
        >>> check_bool_tensor(torch.tensor([0.7]), "flips", ("B",))
        Traceback (most recent call last):
        ...
        ValueError: flips must hold bools (a torch.bool tensor or Python bools), but got a tensor of dtype torch.float32
        >>> check_bool_tensor([1, 0], "flips", ("B",))
        Traceback (most recent call last):
        ...
        ValueError: flips must hold bools (a torch.bool tensor or Python bools), but got [1, 0] (dtype torch.int64)
    """
    expected = f"{name} must hold bools (a torch.bool tensor or Python bools){_suffix(note)}"
    if isinstance(x, Tensor):
        t = x
        got = f"a tensor of dtype {x.dtype}"
    else:
        shown = repr(x)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        try:
            t = torch.as_tensor(x)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{expected}, but got {shown}") from None
        got = f"{shown} (dtype {t.dtype})"
    if t.dtype != torch.bool:
        raise ValueError(f"{expected}, but got {got}")
    check_shape(t, name, dims, sizes=sizes, of=of, note=note)
    return t


_ALLOWED_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def check_weights_only(obj: Any, where: str) -> None:
    """Raise ``ValueError`` naming the first entry of ``obj`` that ``torch.load(weights_only=True)`` cannot read back.

    Examples:
        >>> check_weights_only({"step": 1, "w": torch.zeros(2), "names": ["a"]}, "state")
        >>> check_weights_only({"fn": print}, "state")
        Traceback (most recent call last):
        ...
        ValueError: state['fn'] is a builtins.builtin_function_or_method, which torch.load(weights_only=True) ...
    """
    if isinstance(obj, _ALLOWED_LEAVES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"state keys must be str or int, but {where} has a key of type {type(k).__name__}")
            check_weights_only(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_weights_only(v, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
        "cannot read back; store tensors, numbers, strings and dicts/lists of them (e.g. obj.state_dict())"
    )
