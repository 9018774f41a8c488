"""Momentum and learning-rate schedules vs their formulas."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from densecontrast.schedules import CosineMomentum, constant_momentum, cosine_momentum, warmup_cosine_lr


@given(
    total=st.integers(1, 10_000),
    frac=st.floats(0.0, 1.5),
    base=st.floats(0.0, 1.0),
    final=st.floats(0.0, 1.0),
)
def test_cosine_momentum_formula(total: int, frac: float, base: float, final: float) -> None:
    t = int(frac * total)
    # written independently: half-cosine interpolation from base (t = 0) to final (t = T)
    alpha = 0.5 * (1 - math.cos(math.pi * min(t, total) / total))  # 0 -> 1
    expected = base + (final - base) * alpha
    got = cosine_momentum(t, total, base, final)
    assert got == pytest.approx(expected, abs=1e-12)
    assert CosineMomentum(total, base, final)(t) == got
    assert min(base, final) - 1e-12 <= got <= max(base, final) + 1e-12


def test_cosine_momentum_endpoints_and_monotone() -> None:
    T = 50
    vals = [cosine_momentum(t, T, 0.996) for t in range(T + 5)]
    assert vals[0] == 0.996 and vals[T] == 1.0 and vals[-1] == 1.0
    assert vals[T // 2] == pytest.approx(0.998)
    assert all(a <= b for a, b in pairwise(vals))
    # the PixCon form 1 - (1 - m0) (cos(pi t / T) + 1) / 2
    for t in (0, 7, 31, 49):
        assert vals[t] == pytest.approx(1 - (1 - 0.996) * (math.cos(math.pi * t / T) + 1) / 2, abs=1e-15)


def test_constant_momentum() -> None:
    s = constant_momentum(0.999)
    assert [s(t) for t in (0, 1, 10**9)] == [0.999] * 3


@given(
    total=st.integers(2, 5000),
    warm_frac=st.floats(0.0, 0.99),
    frac=st.floats(0.0, 1.3),
    base=st.floats(0.0, 10.0),
    final_frac=st.floats(0.0, 1.0),
    ratio=st.floats(0.0, 1.0),
)
def test_warmup_cosine_lr_formula(
    total: int, warm_frac: float, frac: float, base: float, final_frac: float, ratio: float
) -> None:
    warm = min(int(warm_frac * total), total - 1)
    t = int(frac * total)
    final = base * final_frac
    got = warmup_cosine_lr(t, total, warm, base, final, warmup_start_ratio=ratio)
    if t >= total:
        expected = final
    elif t < warm:
        expected = base * ratio + (base - base * ratio) * t / warm
    else:
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_warmup_cosine_lr_shape() -> None:
    T, W = 100, 10
    lrs = [warmup_cosine_lr(t, T, W, 0.4, warmup_start_ratio=1e-4) for t in range(T + 1)]
    assert lrs[0] == pytest.approx(0.4e-4)
    assert lrs[W] == pytest.approx(0.4) and max(lrs) == lrs[W]
    assert all(a < b for a, b in pairwise(lrs[: W + 1]))  # increasing warm-up
    assert all(a >= b for a, b in pairwise(lrs[W:]))  # decreasing cosine
    assert lrs[T] == 0.0 and lrs[T - 1] > 0.0
    assert warmup_cosine_lr(5, 10, 0, 2.0) == pytest.approx(1.0)  # no warm-up: half-way through the cosine


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: cosine_momentum(-1, 10), "step must be an int >= 0"),
        (lambda: cosine_momentum(0, 0), "total_steps must be an int >= 1"),
        (lambda: cosine_momentum(0, 10, base=1.2), r"base must be in \[0, 1\]"),
        (lambda: cosine_momentum(0, 10, final="x"), "final must be a number"),
        (lambda: cosine_momentum(1.5, 10), "step must be an int"),
        (lambda: CosineMomentum(0), "total_steps must be an int >= 1"),
        (lambda: constant_momentum(-0.1), r"m must be in \[0, 1\]"),
        (lambda: warmup_cosine_lr(0, 10, 10, 1.0), "warmup_steps must be < total_steps=10"),
        (lambda: warmup_cosine_lr(0, 10, -1, 1.0), "warmup_steps must be an int >= 0"),
        (lambda: warmup_cosine_lr(0, 10, 2, -1.0), "base_lr must be a finite number >= 0"),
        (lambda: warmup_cosine_lr(0, 10, 2, 1.0, final_lr=float("nan")), "final_lr must be a finite number"),
        (lambda: warmup_cosine_lr(0, 10, 2, 1.0, warmup_start_ratio=2.0), r"warmup_start_ratio must be in \[0, 1\]"),
    ],
)
def test_validation(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_repr() -> None:
    assert repr(CosineMomentum(10, 0.99)) == "CosineMomentum(total_steps=10, base=0.99, final=1.0)"
