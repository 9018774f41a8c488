"""The hot paths compile with ``torch.compile(fullgraph=True)`` on the CPU (no graph break) and give eager's values.

Each test compiles one piece once (inductor, small shapes) and compares values and gradients with
the eager call. Pieces with data-dependent shapes use their documented static option:
``DenseInfoNCE(static_shapes=True)`` with a queue, ``coordinate_match(max_positives=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from densecontrast.geometry import ViewGeometry
from densecontrast.losses import DenseInfoNCE, LocalContrastiveLoss, PixProConsistencyLoss
from densecontrast.matching import (
    CoordinateMatcher,
    Matches,
    NearestCoordinateMatcher,
    correspondence_match,
    similarity_match,
)
from densecontrast.weighting import SemanticReweighting

pytestmark = pytest.mark.slow  # inductor compiles C++: seconds per piece


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def views() -> tuple[ViewGeometry, ViewGeometry]:
    size = torch.tensor([100.0, 80.0])
    q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 60.0, 60.0], [10.0, 5.0, 90.0, 75.0]]), None, size)
    k = ViewGeometry.from_crops(torch.tensor([[20.0, 10.0, 100.0, 80.0], [0.0, 0.0, 50.0, 40.0]]),
                                torch.tensor([True, False]), size)
    return q, k


def features(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_same_matches(eager: Matches, compiled: Matches) -> None:
    for name in ("valid", "weight", "key_index", "key_mask", "key_points", "in_box", "similarity"):
        a, b = getattr(eager, name), getattr(compiled, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)
    assert compiled.key_shape == eager.key_shape


def assert_same_loss_and_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    """Value and input gradient of the compiled loss equal eager's."""
    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaf = x.detach().clone().requires_grad_()
        loss = fn(leaf)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (loss_e, grad_e), (loss_c, grad_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-6)


def test_compile_coordinate_matcher_with_max_positives():
    q, k = views()
    matcher = CoordinateMatcher(max_positives=12)
    eager = matcher(q, k, (4, 5), (3, 4))
    assert_same_matches(eager, torch.compile(matcher, fullgraph=True)(q, k, (4, 5), (3, 4)))


def test_compile_nearest_and_correspondence_matchers():
    q, k = views()
    nearest = NearestCoordinateMatcher(topk=5)
    assert_same_matches(nearest(q, k, (4, 4), (3, 5)), torch.compile(nearest, fullgraph=True)(q, k, (4, 4), (3, 5)))
    compiled = torch.compile(correspondence_match, fullgraph=True)
    assert_same_matches(correspondence_match(q, k, (4, 4), (3, 5)), compiled(q, k, (4, 4), (3, 5)))


def test_compile_similarity_matcher_and_semantic_reweighting():
    q, k = views()
    fq, fk = features(2, 8, 4, 4), features(2, 8, 3, 5, seed=1)
    fq[0, 1, 2, 3] = float("nan")  # a non-finite query: invalid, in both
    kwargs = {"query_geometry": q, "key_geometry": k, "chunk_size": 5}
    m = similarity_match(fq, fk, **kwargs)
    assert_same_matches(m, torch.compile(similarity_match, fullgraph=True)(fq, fk, **kwargs))
    sr = SemanticReweighting()
    assert_same_matches(sr(m, q, k, (4, 4)), torch.compile(sr, fullgraph=True)(m, q, k, (4, 4)))


@pytest.mark.parametrize("with_queue", [True, False])
def test_compile_dense_infonce(with_queue):
    q, k = views()
    query, key = features(2, 8, 4, 4), features(2, 8, 4, 4, seed=1)
    m = SemanticReweighting()(similarity_match(query, key, query_geometry=q, key_geometry=k), q, k, (4, 4))
    m = m.replace(valid=m.valid & (torch.arange(16) % 3 != 0))  # some invalid queries
    queue = F.normalize(features(32, 8, seed=2), dim=1) if with_queue else None
    loss = DenseInfoNCE(static_shapes=True)
    assert_same_loss_and_grad(lambda x: loss(x, key, m, queue), query)
    default = DenseInfoNCE()(query, key, m, queue)  # the static option gives the default's value
    torch.testing.assert_close(loss(query, key, m, queue), default, rtol=1e-6, atol=1e-6)


def test_compile_pixpro_loss():
    q, k = views()
    m = CoordinateMatcher(max_positives=12)(q, k, (4, 4), (4, 4))
    target = features(2, 8, 4, 4, seed=1)
    assert_same_loss_and_grad(lambda x: PixProConsistencyLoss()(x, target, m), features(2, 8, 4, 4))


def test_compile_local_contrastive_loss():
    q, k = views()
    m = correspondence_match(q, k, (4, 4), (3, 5))
    query = features(2, 8, 4, 4, seed=1)
    assert_same_loss_and_grad(lambda x: LocalContrastiveLoss(0.2)(query, x, m), features(2, 8, 3, 5))
