"""Shared hypothesis strategies for the matcher tests (random view pairs), and checks of them; ``Matches``
and ``sample_points``, the pieces every matcher and loss shares."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import densecontrast.matching.matches as matches_module
from densecontrast.geometry import ViewGeometry
from densecontrast.matching import Matches, sample_points, similarity_match

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


# ---------------------------------------------------------------------------------------------- Matches
def _matches(key_index: torch.Tensor, key_shape: tuple[int, int] | None = (2, 2), **kw: object) -> Matches:
    b, n = key_index.shape[:2]
    return Matches(valid=torch.ones(b, n, dtype=torch.bool), weight=torch.ones(b, n), key_index=key_index,
                   key_shape=key_shape, **kw)


def test_matches_rejects_out_of_range_key_index() -> None:
    with pytest.raises(ValueError, match=r"key_index must hold indices in \[0, 4\).*key_shape \(2, 2\).*first 4"):
        _matches(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match=r"key_index must hold indices in \[0, 4\).*first -1 at index \[0, 1\]"):
        _matches(torch.tensor([[0, -1]]))
    # the multi-positive form: also the slots that key_mask switches off must address a key cell
    with pytest.raises(ValueError, match="key_index"):
        _matches(torch.tensor([[[0, 7]]]), key_mask=torch.tensor([[[True, False]]]))
    # in range: accepted, and gather reads exactly the addressed keys
    m = _matches(torch.tensor([[3, 0], [1, 2]]))
    keys = torch.randn(2, 4, 5)
    torch.testing.assert_close(m.gather(keys), torch.stack([keys[0, [3, 0]], keys[1, [1, 2]]]))


def test_matches_without_key_shape_checks_the_sign_at_construction_and_the_size_at_gather() -> None:
    with pytest.raises(ValueError, match=r"key_index must hold indices >= 0"):
        _matches(torch.tensor([[-3, 0]]), key_shape=None)
    m = _matches(torch.tensor([[0, 5]]), key_shape=None)  # M is not known yet
    assert m.gather(torch.randn(1, 6, 3)).shape == (1, 2, 3)
    with pytest.raises(ValueError, match=r"matches.key_index must hold indices in \[0, 5\)"):
        m.gather(torch.randn(1, 5, 3))  # used to clamp 5 -> 4: the loss of another key
    with pytest.raises(ValueError, match=r"key_index must hold indices in \[0, 5\)"):
        m.to_dense(5)


def test_matches_gather_rejects_a_key_map_of_another_grid() -> None:
    m = _matches(torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match=r"key_shape \(2, 2\)"):
        m.gather(torch.randn(1, 3, 3, 3))  # (B, D, 3, 3): index 3 would be cell (1, 0) of a 3 x 3 grid
    with pytest.raises(ValueError, match=r"num_keys must equal h_k \* w_k = 4"):
        m.to_dense(9)


def test_matches_gather_ignores_garbage_points_of_invalid_queries() -> None:
    pts = torch.tensor([[[0.0, 1.0], [math.nan, math.nan], [1.0, 0.0]]])
    valid = torch.tensor([[True, False, True]])
    fmap = torch.arange(8.0).reshape(1, 2, 2, 2)
    m = Matches(valid=valid, weight=torch.ones(1, 3), key_points=pts, key_shape=(2, 2))
    out = m.gather(fmap)
    assert bool(torch.isfinite(out).all())  # an invalid query's NaN point gives some real key
    torch.testing.assert_close(out[0, [0, 2]], torch.tensor([[2.0, 6.0], [1.0, 5.0]]))
    m = m.replace(valid=torch.ones(1, 3, dtype=torch.bool))
    assert bool(m.gather(fmap)[0, 1].isnan().all())  # a valid query without a location: NaN, not a real vector


def test_matches_replace_keeps_the_range_check() -> None:
    m = _matches(torch.tensor([[0, 3]]))
    assert m.with_weight(torch.full((1, 2), 0.5)).weight.tolist() == [[0.5, 0.5]]
    with pytest.raises(ValueError, match="key_index"):
        m.replace(key_index=torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="key_index"):
        m.replace(key_shape=(1, 3))  # index 3 is outside a 1 x 3 grid
    with pytest.raises(ValueError, match="key_shape"):
        m.replace(key_shape=(2, 0))


def test_library_matchers_skip_the_range_check_but_user_matches_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = matches_module.check_index

    def counting(index: torch.Tensor, name: str, size: int | None, **kw: object) -> torch.Tensor:
        calls.append(name)
        return original(index, name, size, **kw)

    monkeypatch.setattr(matches_module, "check_index", counting)
    f = torch.randn(2, 8, 3, 3)
    m = similarity_match(f, torch.randn(2, 8, 2, 2))
    m = m.with_weight(torch.rand(2, 9)).replace(valid=m.valid.clone())
    m.gather(torch.randn(2, 8, 2, 2))
    assert calls == []  # indices in range by construction: no check (no device work, no sync on CUDA)
    _matches(torch.tensor([[0, 3]]))
    assert calls == ["key_index"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matches_range_check_on_cuda_is_asynchronous() -> None:
    dev = torch.device("cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host synchronization raises
    try:
        ki = torch.tensor([[0, 3], [2, 1]], device=dev)
        m = Matches(valid=torch.ones(2, 2, dtype=torch.bool, device=dev), weight=torch.ones(2, 2, device=dev),
                    key_index=ki, key_shape=(2, 2))
        m.gather(torch.randn(2, 4, 3, device=dev))
        similarity_match(torch.randn(2, 8, 3, 3, device=dev), torch.randn(2, 8, 2, 2, device=dev)).gather(
            torch.randn(2, 8, 2, 2, device=dev))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # an out-of-range index stops the program at the next synchronization (device-side assert)
    code = textwrap.dedent("""
        import torch
        from densecontrast.matching import Matches
        ki = torch.tensor([[0, 4]], device="cuda")
        Matches(valid=torch.ones(1, 2, dtype=torch.bool, device="cuda"), weight=torch.ones(1, 2, device="cuda"),
                key_index=ki, key_shape=(2, 2))
        torch.cuda.synchronize()
        print("NOT RAISED")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_LAUNCH_BLOCKING": "0"})
    assert out.returncode != 0 and "NOT RAISED" not in out.stdout
    assert "device-side assert" in out.stderr or "Assertion" in out.stderr


# ---------------------------------------------------------------------------------------------- sample_points
def test_sample_points_non_finite_points_give_nan_features() -> None:
    fmap = torch.arange(8.0).reshape(1, 2, 2, 2).requires_grad_()
    pts = torch.tensor([[[0.5, 0.0], [math.nan, 0.0], [0.0, math.inf], [1.0, 1.0]]])
    out = sample_points(fmap, pts)
    assert out.shape == (1, 4, 2)
    assert bool(out[0, 1:3].isnan().all())  # no location: no feature (grid_sample returned a border value)
    torch.testing.assert_close(out[0, [0, 3]], torch.tensor([[0.5, 4.5], [3.0, 7.0]]))
    # the finite points keep their gradient; the non-finite ones contribute none
    out[0, [0, 3]].sum().backward()
    assert fmap.grad is not None and bool(torch.isfinite(fmap.grad).all())
    torch.testing.assert_close(fmap.grad[0, 0], torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
