"""MomentumQueue (single process): ring-buffer semantics vs a naive list, state_dict, read-before-enqueue."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from densecontrast.queue import MomentumQueue


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids thread-pool contention on a busy machine (10x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class NaiveRing:
    """Reference: append keys one at a time into a Python list of rows."""

    def __init__(self, init: torch.Tensor) -> None:
        self.rows = [r.clone() for r in init]
        self.ptr = 0

    def push(self, keys: torch.Tensor) -> None:
        for k in keys:
            self.rows[self.ptr] = k.clone()
            self.ptr = (self.ptr + 1) % len(self.rows)

    def tensor(self) -> torch.Tensor:
        return torch.stack(self.rows)


@settings(max_examples=40)
@given(
    size=st.integers(1, 13),
    dim=st.integers(1, 5),
    batches=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_wraparound_matches_naive_ring(size: int, dim: int, batches: list[int], normalize: bool, seed: int) -> None:
    q = MomentumQueue(dim, size, normalize=normalize, seed=seed)
    ref = NaiveRing(q.queue)
    g = torch.Generator().manual_seed(seed)
    for b in batches:  # includes batches larger than the queue and sizes that do not divide it
        keys = torch.randn(b, dim, generator=g, dtype=torch.float64)
        q.enqueue(keys)
        ref.push(F.normalize(keys, dim=1) if normalize else keys)
        torch.testing.assert_close(q.queue, ref.tensor().float(), rtol=1e-6, atol=1e-6)
        assert int(q.ptr) == ref.ptr


def test_batch_larger_than_queue_keeps_most_recent() -> None:
    q = MomentumQueue(2, 4, normalize=False)
    q.enqueue(torch.zeros(1, 2))  # ptr = 1
    keys = torch.arange(20.0).reshape(10, 2)
    q.enqueue(keys)
    # rows hold exactly the last 4 keys, each at its ring position (1 + i) % 4
    assert int(q.ptr) == (1 + 10) % 4
    stored = {tuple(r.tolist()) for r in q.queue}
    assert stored == {tuple(r.tolist()) for r in keys[-4:]}
    for i in range(6, 10):
        assert torch.equal(q.queue[(1 + i) % 4], keys[i])


def test_initial_keys_unit_norm_and_seeded() -> None:
    a, b = MomentumQueue(8, 16, seed=3), MomentumQueue(8, 16, seed=3)
    assert torch.equal(a.queue, b.queue)
    assert not torch.equal(a.queue, MomentumQueue(8, 16, seed=4).queue)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(16))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(MomentumQueue(8, 16, generator=g1).queue, MomentumQueue(8, 16, generator=g2).queue)
    assert not torch.equal(MomentumQueue(8, 16, generator=torch.Generator().manual_seed(6)).queue, a.queue)
    torch.manual_seed(0)
    r1 = MomentumQueue(8, 16, seed=None).queue
    torch.manual_seed(0)
    assert torch.equal(MomentumQueue(8, 16, seed=None).queue, r1)
    assert not torch.equal(MomentumQueue(8, 16, seed=None).queue, r1)  # global RNG advanced
    assert int(a.ptr) == 0 and a.ptr.dtype == torch.long


def test_state_dict_round_trip_resumes_identically() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(int(n), 6, generator=g) for n in torch.randint(1, 9, (10,), generator=g)]
    full = MomentumQueue(6, 11)
    for k in batches:
        full.enqueue(k)

    first = MomentumQueue(6, 11)
    for k in batches[:4]:
        first.enqueue(k)
    sd = first.state_dict()
    assert set(sd) == {"queue", "ptr"}
    resumed = MomentumQueue(6, 11, seed=99)  # different init, overwritten by the checkpoint
    resumed.load_state_dict(sd)
    assert torch.equal(resumed.queue, first.queue) and int(resumed.ptr) == int(first.ptr) != 0
    for k in batches[4:]:
        resumed.enqueue(k)
    assert torch.equal(resumed.queue, full.queue) and int(resumed.ptr) == int(full.ptr)


def test_negatives_read_before_enqueue_exclude_current_keys() -> None:
    q = MomentumQueue(4, 5)
    keys = F.normalize(torch.randn(3, 4), dim=1)
    neg = q.negatives()
    before = q.queue.clone()
    q.enqueue(keys)
    assert torch.equal(neg, before)  # the clone is not modified by the enqueue
    # no current key appears among the negatives read before the enqueue ...
    assert (torch.cdist(keys, neg).min() > 1e-3).item()
    # ... but all of them are in the queue afterwards
    after = q.negatives()
    assert torch.cdist(keys, after).min(dim=1).values.max() < 1e-6
    assert not neg.requires_grad and neg.data_ptr() != q.queue.data_ptr()
    assert torch.equal(after, q.queue) and after.data_ptr() != q.queue.data_ptr()


def test_enqueue_detaches_and_casts() -> None:
    q = MomentumQueue(3, 4)
    keys = torch.randn(2, 3, requires_grad=True)
    q.enqueue(keys.half())
    assert not q.queue.requires_grad and q.queue.dtype == torch.float32
    torch.testing.assert_close(q.queue[:2], F.normalize(keys.detach().half().float(), dim=1), rtol=1e-3, atol=1e-3)
    q64 = MomentumQueue(3, 4, dtype=torch.float64, normalize=False)
    k64 = torch.randn(2, 3, dtype=torch.float64)
    q64.enqueue(k64)
    assert torch.equal(q64.queue[:2], k64)


def test_empty_batch_is_a_no_op() -> None:
    q = MomentumQueue(3, 4)
    before = q.queue.clone()
    q.enqueue(torch.zeros(0, 3))
    assert torch.equal(q.queue, before) and int(q.ptr) == 0


@pytest.mark.parametrize(
    "keys, match",
    [
        (torch.zeros(2, 5), r"keys must have shape \(B, 4\), but got \(2, 5\)"),
        (torch.zeros(4), r"keys must have shape \(B, 4\), but got \(4,\)"),
        (torch.zeros(2, 4, dtype=torch.long), "floating-point"),
        ([1.0, 2.0], r"keys must be a tensor of shape \(B, 4\), but got list"),
    ],
)
def test_enqueue_bad_keys(keys: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MomentumQueue(4, 8).enqueue(keys)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0, "size": 4}, "dim must be an int >= 1"),
        ({"dim": 4, "size": -1}, "size must be an int >= 1"),
        ({"dim": 4, "size": 2.5}, "size must be an int >= 1"),
        ({"dim": 4, "size": 4, "dtype": torch.long}, "floating-point"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MomentumQueue(**kwargs)


def test_broadcast_without_process_group_is_identity() -> None:
    q = MomentumQueue(3, 4)
    before = q.queue.clone()
    assert q.broadcast_() is q and torch.equal(q.queue, before)
    assert "size=4" in repr(q)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_enqueue_rejects_non_finite_keys_and_leaves_the_queue_unchanged(normalize: bool, bad: float) -> None:
    q = MomentumQueue(4, 6, normalize=normalize)
    q.enqueue(torch.randn(2, 4))
    before, ptr = q.queue.clone(), int(q.ptr)
    keys = torch.randn(3, 4)
    keys[1, 2] = bad
    with pytest.raises(ValueError, match=r"keys must be finite.*1 NaN or inf values \(first at index \[1, \d\]\)"):
        q.enqueue(keys)  # used to be stored and to poison every later negative
    assert torch.equal(q.queue, before) and int(q.ptr) == ptr
    q.enqueue(keys[[0, 2]])  # the queue still works afterwards
    assert int(q.ptr) == (ptr + 2) % 6 and bool(torch.isfinite(q.queue).all())


def test_enqueue_rejects_keys_that_overflow_the_queue_dtype() -> None:
    q = MomentumQueue(2, 4, normalize=False, dtype=torch.float16)
    before = q.queue.clone()
    with pytest.raises(ValueError, match=r"keys must be finite \(as stored in the torch.float16 queue"):
        q.enqueue(torch.tensor([[1e6, 0.0]]))  # finite in float32, inf in float16
    assert torch.equal(q.queue, before) and int(q.ptr) == 0
