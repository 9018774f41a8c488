"""densecontrast._checks: the error each check raises (argument, expectation, what came) and the compute dtype."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from densecontrast import _checks
from densecontrast._checks import (
    check_choice,
    check_finite,
    check_floating,
    check_geometry_pair,
    check_grid_shape,
    check_int,
    check_interval,
    check_matches,
    check_number,
    check_positive,
    check_shape,
    check_size,
    check_type,
    compute_dtype,
    to_compute,
)
from densecontrast.geometry import ViewGeometry
from densecontrast.matching import Matches


def raises(message: str):
    """``pytest.raises(ValueError)`` matching the whole message literally."""
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


# ------------------------------------------------------------------------------------ compute dtype
@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bool, torch.float32),
        (torch.int64, torch.float32),
    ],
)
def test_compute_dtype_of_one_tensor(dtype: torch.dtype, expected: torch.dtype) -> None:
    x = torch.zeros(3, dtype=dtype)
    assert compute_dtype(x) == expected
    assert to_compute(x).dtype == expected


def test_compute_dtype_of_several_tensors() -> None:
    half, single, double = torch.zeros(1, dtype=torch.float16), torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    assert compute_dtype(half, single) == torch.float32
    assert compute_dtype(half, double) == torch.float64  # any float64 input keeps float64
    assert compute_dtype(None, half) == torch.float32 and compute_dtype() == torch.float32
    assert compute_dtype(None, double) == torch.float64


def test_to_compute_does_not_copy_and_accepts_an_explicit_dtype() -> None:
    x, d = torch.randn(4), torch.randn(4, dtype=torch.float64)
    assert to_compute(x) is x and to_compute(d) is d
    assert to_compute(torch.ones(2, dtype=torch.bfloat16), torch.float64).dtype == torch.float64
    assert torch.equal(to_compute(x.half()), x.half().float())


# ------------------------------------------------------------------------------------ shapes
def test_check_shape_returns_the_shape_and_binds_sizes() -> None:
    dims: dict[str, int] = {}
    assert check_shape(torch.zeros(2, 8, 3, 4), "query", ("B", "D", "h", "w"), sizes=dims) == (2, 8, 3, 4)
    assert dims == {"B": 2, "D": 8, "h": 3, "w": 4}
    assert check_shape(torch.zeros(2, 8, 5, 6), "key", ("B", "D", "h_k", "w_k"), sizes=dims, of="query") == (2, 8, 5, 6)
    assert dims["h_k"] == 5 and dims["w_k"] == 6
    assert check_shape(torch.zeros(7, 3), "x", (None, 3)) == (7, 3)


def test_check_shape_messages() -> None:
    with raises("query must have shape (B, N, D), but got (3, 4)"):
        check_shape(torch.zeros(3, 4), "query", ("B", "N", "D"))
    with raises("x must have shape (B, N, D), but got (2,)"):
        check_shape(torch.zeros(2), "x", ("B", "N", "D"))
    with raises("queue must have shape (K, 8), but got (5, 6)"):
        check_shape(torch.zeros(5, 6), "queue", ("K", 8))
    with raises("flips must have shape (B,), but got (2, 1)"):
        check_shape(torch.zeros(2, 1), "flips", ("B",))
    with raises("x must have shape (*, 3), but got (7, 2)"):
        check_shape(torch.zeros(7, 2), "x", (None, 3))
    with raises("query must be a tensor of shape (B, N, D), but got list"):
        check_shape([[1.0]], "query", ("B", "N", "D"))
    with raises("boxes must be a tensor of shape (B, 4) as x0, y0, x1, y1 pixels, but got list"):
        check_shape([0, 0, 1, 1], "boxes", ("B", 4), note="as x0, y0, x1, y1 pixels")
    with raises("query must be a floating-point tensor, but got dtype torch.int64"):
        check_shape(torch.zeros(2, 3, dtype=torch.long), "query", ("B", "D"), floating=True)


def test_check_shape_messages_with_bound_sizes() -> None:
    dims = {"B": 2, "D": 8}
    # some sizes bound: they are named with the argument they come from
    with raises("key must have shape (B, D, h_k, w_k) with (B, D) = (2, 8) as query, but got (2, 6, 4, 5)"):
        check_shape(torch.zeros(2, 6, 4, 5), "key", ("B", "D", "h_k", "w_k"), sizes=dims, of="query")
    with raises("points must have shape (B, N, 2) with B = 2, but got (3, 5, 2)"):
        check_shape(torch.zeros(3, 5, 2), "points", ("B", "N", 2), sizes={"B": 2})
    # every size known: the concrete shape is spelled out
    with raises("z1 must have the shape (B, D) = (2, 8) of p1, but got (2, 5)"):
        check_shape(torch.zeros(2, 5), "z1", ("B", "D"), sizes=dims, of="p1")
    with raises("image_size must have the shape (B, 2) = (2, 2) as (W, H) pixels, but got (3, 2)"):
        check_shape(torch.zeros(3, 2), "image_size", ("B", 2), sizes={"B": 2}, note="as (W, H) pixels")
    with raises("weight must have the shape (3, 5) of loss, but got (5,)"):
        check_shape(torch.zeros(5), "weight", (3, 5), of="loss")
    assert dims == {"B": 2, "D": 8}  # a failed check binds nothing


def test_check_shape_repeated_name_must_agree() -> None:
    assert check_shape(torch.zeros(3, 3), "gram", ("N", "N")) == (3, 3)
    with raises("gram must have shape (N, N), but got (3, 4)"):
        check_shape(torch.zeros(3, 4), "gram", ("N", "N"))


def test_check_floating_and_finite() -> None:
    assert check_floating(torch.float16, "dtype") is torch.float16
    x = torch.zeros(2)
    assert check_floating(x, "x") is x
    with raises("dtype must be a floating-point dtype, but got torch.int64"):
        check_floating(torch.int64, "dtype")
    with raises("keys must be a floating-point tensor, but got dtype torch.bool"):
        check_floating(torch.zeros(2, dtype=torch.bool), "keys")
    with raises("keys must be a floating-point tensor, but got list"):
        check_floating([1.0], "keys")
    assert check_finite(torch.tensor([1, 2]), "ints") is not None  # integer tensors are always finite
    with raises(
        "boxes must be finite, but it contains 2 NaN or inf values (first at index [1, 0]) in a tensor of shape (2, 2)"
    ):
        check_finite(torch.tensor([[0.0, 1.0], [math.inf, math.nan]]), "boxes")


def test_check_type() -> None:
    assert check_type(3, "n", int) == 3
    with raises("boxes must be a Tensor, but got list"):
        check_type([0.0], "boxes", torch.Tensor)
    with raises("model must be an nn.Module, but got str"):
        check_type("net", "model", torch.nn.Module, what="an nn.Module")
    with raises("x must be a int or float, but got str"):
        check_type("1", "x", (int, float))


# ------------------------------------------------------------------------------------ numbers and options
def test_check_number_intervals_and_messages() -> None:
    assert check_number(1, "lr", 0) == 1.0 and isinstance(check_number(1, "lr", 0), float)
    assert check_number(np.float32(0.5), "p", 0, 1) == 0.5
    assert check_number(torch.tensor(0.25), "p", 0, 1) == 0.25
    assert check_number(math.inf, "oversample", 1, finite=False) == math.inf
    with raises("lr must be a finite number >= 0, but got -1"):
        check_number(-1, "lr", 0)
    with raises("lr must be a finite number >= 0, but got inf"):
        check_number(math.inf, "lr", 0)
    with raises("base must be in [0, 1], but got 1.2"):
        check_number(1.2, "base", 0, 1)
    with raises("momentum must be in [0, 1), but got 1.0"):
        check_number(1.0, "momentum", 0, 1, open_high=True)
    with raises("min_overlap must be in (0, 1] or None, but got 0.0"):
        check_number(0.0, "min_overlap", 0, 1, open_low=True, note="or None")
    with raises("p must be a number in [0, 1], but got nan"):
        check_number(math.nan, "p", 0, 1)
    for bad in (True, "0.5", None, [0.5], torch.zeros(2)):
        with pytest.raises(ValueError, match=r"^p must be a number in \[0, 1\], but got "):
            check_number(bad, "p", 0, 1)


def test_check_positive() -> None:
    assert check_positive(0.2, "temperature") == 0.2
    for bad in (0.0, -0.1, math.inf, math.nan, "x"):
        with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0, but got "):
            check_positive(bad, "temperature")
    with raises("threshold must be a finite number > 0 (bin diagonals), but got 0"):
        check_positive(0, "threshold", note="(bin diagonals)")


def test_check_int() -> None:
    assert check_int(3, "n", 1) == 3 and check_int(None, "topk", 1, allow_none=True) is None
    assert check_int(np.int64(4), "n", 1) == 4  # NumPy integers are integers
    with raises("num_points must be an int >= 1, but got 0"):
        check_int(0, "num_points", 1)
    with raises("size must be an int >= 1, but got 2.5"):
        check_int(2.5, "size", 1)
    with raises("n must be an int >= 1, but got True"):
        check_int(True, "n", 1)
    with raises("n must be an int, but got '3'"):
        check_int("3", "n")
    with raises("topk must be None or an int >= 1, but got 0"):
        check_int(0, "topk", 1, allow_none=True)
    with raises("chunk_size must be an int >= 1 (query rows held at once), but got None"):
        check_int(None, "chunk_size", 1, note="(query rows held at once)")


def test_check_choice() -> None:
    assert check_choice("mean", "reduction", ("mean", "sum", "none")) == "mean"
    with raises("reduction must be one of ('mean', 'sum', 'none'), but got 'avg'"):
        check_choice("avg", "reduction", ("mean", "sum", "none"))
    with raises("transform_layers must be one of (0, 1, 2), but got True"):
        check_choice(True, "transform_layers", (0, 1, 2))  # True == 1, but it is not a layer count
    with raises("output_stride must be one of (8, 16, 32) for resnet50, but got 4"):
        check_choice(4, "output_stride", (8, 16, 32), note="for resnet50")


def test_check_size_grid_shape_and_interval() -> None:
    assert check_size(32) == (32, 32) and check_size([24, 32]) == (24, 32)
    for bad in (0, True, (24,), (24, 0), (24, 2.0), "ab"):
        with raises(f"size must be a positive int or a pair (height, width) of positive ints, but got {bad!r}"):
            check_size(bad)
    assert check_grid_shape((7, 7.0), "query_shape") == (7, 7)
    for bad in ((7,), (0, 7), (7, 2.5), None, "77"):
        with raises(f"key_shape must be a feature-map size (h, w) of two positive ints, but got {bad!r}"):
            check_grid_shape(bad, "key_shape")
    assert check_interval((0.08, 1), "scale", 0, 1) == (0.08, 1.0)
    with raises("scale must be a pair (min, max) with 0 < min <= max <= 1, but got (0.5, 0.2)"):
        check_interval((0.5, 0.2), "scale", 0, 1)
    with raises("ratio must be a pair (min, max) with 0 < min <= max, but got (0.0, 1.0)"):
        check_interval((0.0, 1.0), "ratio", 0, math.inf)
    with raises("scale must be a pair (min, max) with 0 < min <= max <= 1, but got 0.5"):
        check_interval(0.5, "scale", 0, 1)


# ------------------------------------------------------------------------------------ library types
def _geometry(n: int = 1, dtype: torch.dtype = torch.float32) -> ViewGeometry:
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * n, dtype=dtype)
    return ViewGeometry.from_crops(boxes, None, torch.tensor([8.0, 8.0]))


def test_check_geometry_pair() -> None:
    q, k = check_geometry_pair(_geometry(2), _geometry(2, torch.float64))
    assert q.dtype == k.dtype == torch.float64 and len(q) == len(k) == 2
    g = _geometry(2)
    q, k = check_geometry_pair(g, g, batch=2)
    assert q is g and k is g  # nothing to promote: the same objects
    with raises("query_geometry must be a ViewGeometry, but got Tensor"):
        check_geometry_pair(torch.zeros(1, 4), g)
    with raises("key_geometry must be a ViewGeometry, but got NoneType"):
        check_geometry_pair(g, None)
    with raises("key_geometry must hold as many views as query_geometry (B = 2), but got 1"):
        check_geometry_pair(g, _geometry(1))
    with raises("query_geometry must hold B = 3 views like the features, but got 2"):
        check_geometry_pair(g, g, batch=3)


def test_check_matches() -> None:
    m = Matches(valid=torch.ones(2, 4, dtype=torch.bool), weight=torch.ones(2, 4),
                key_index=torch.zeros(2, 4, dtype=torch.long), key_shape=(2, 2))
    assert check_matches(m, queries=(2, 4), key_shape=(2, 2)) is m
    with raises("matches must be a densecontrast.matching.Matches, but got dict"):
        check_matches({"valid": None})
    with raises("matches must have B x N = 2 x 9 queries (one per cell of query), but matches.valid has shape (2, 4)"):
        check_matches(m, queries=(2, 9), cells_of="query")
    with raises("matches.key_shape must equal the target grid (3, 3), but got (2, 2)"):
        check_matches(m, key_shape=(3, 3), key_name="target")


def test_checks_import_nothing_from_densecontrast_at_run_time() -> None:
    """The bottom layer: only type hints under TYPE_CHECKING may come from the package."""
    tree = ast.parse(Path(_checks.__file__).read_text(encoding="utf-8"))
    guarded = {
        id(node)
        for block in tree.body
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for node in ast.walk(block)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("densecontrast"):
            assert id(node) in guarded, f"line {node.lineno}: {node.module}"
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("densecontrast") for a in node.names), f"line {node.lineno}"
