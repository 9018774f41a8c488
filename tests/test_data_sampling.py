"""Resumable data order (sharded sampler, seeded views, step_batches) and the scripts' presets."""

from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from densecontrast.data.sampling import SeededViews, ShardedSampler, step_batches
from densecontrast.engine.cli import add_common_args, parse_with_presets


@given(
    length=st.integers(4, 200), batch=st.integers(1, 8), world=st.integers(1, 4), seed=st.integers(0, 99),
    epoch=st.integers(0, 5),
)
def test_sharded_sampler_partitions_and_resumes(length: int, batch: int, world: int, seed: int, epoch: int) -> None:
    if length < batch * world:
        with pytest.raises(ValueError, match="at least one global batch"):
            ShardedSampler(length, batch, 0, world, seed)
        return
    samplers = [ShardedSampler(length, batch, r, world, seed) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    nb = length // (batch * world)
    assert all(len(p) == nb * batch for p in per_rank)
    flat = [i for p in per_rank for i in p]
    assert len(set(flat)) == len(flat) and all(0 <= i < length for i in flat)  # disjoint, in range
    # batch k of rank r is the k-th block of the epoch's permutation, as a naive reference computes it
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    for r in range(world):
        for k in range(nb):
            start = (k * world + r) * batch
            assert per_rank[r][k * batch : (k + 1) * batch] == perm[start : start + batch]
    # resuming at batch k yields exactly the rest of the epoch
    k = nb // 2
    samplers[0].set_epoch(epoch, start_batch=k)
    assert list(samplers[0]) == per_rank[0][k * batch :]
    assert len(samplers[0]) == (nb - k) * batch


def test_seeded_views_depend_on_seed_epoch_and_index_only() -> None:
    class Noise:
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.rand(3)

    ds = SeededViews(Noise(), seed=3)
    a = [ds[i] for i in range(5)]
    torch.rand(10)  # global RNG use in between does not matter
    assert all(torch.equal(x, ds[i]) for i, x in enumerate(a))
    assert not torch.equal(a[0], a[1])
    ds.set_epoch(1)
    assert not torch.equal(a[0], ds[0])
    before = torch.get_rng_state()
    ds[2]
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left untouched


def test_presets_are_defaults_that_flags_override() -> None:
    parser = add_common_args(argparse.ArgumentParser())
    parser.add_argument("--preset", choices=["demo", "paper"], default="demo")
    presets = {"paper": {"arch": "resnet50", "lr": 0.4, "amp": "fp16"}}
    a = parse_with_presets(parser, presets, ["--preset", "paper", "--amp", "bf16"])
    assert (a.arch, a.lr, a.amp) == ("resnet50", 0.4, "bf16")
    parser = add_common_args(argparse.ArgumentParser())
    parser.add_argument("--preset", choices=["demo", "paper"], default="demo")
    b = parse_with_presets(parser, presets, [])
    assert (b.arch, b.amp) == ("tiny", "none")


@given(length=st.integers(4, 60), batch=st.integers(1, 4), start=st.integers(0, 40), n=st.integers(0, 30))
def test_step_batches_resume_anywhere(length: int, batch: int, start: int, n: int) -> None:
    """Batches of steps [start, start + n) equal the same steps of one uninterrupted pass."""
    if length < batch:
        return
    def loader() -> DataLoader:
        return DataLoader(SeededViews(list(range(length)), seed=1), batch_size=batch,
                          sampler=ShardedSampler(length, batch, 0, 1, seed=1))
    full = [(e, b.tolist()) for e, b in step_batches(loader(), 0, start + n)]
    part = [(e, b.tolist()) for e, b in step_batches(loader(), start, start + n)]
    assert len(full) == start + n and part == full[start:]
    per_epoch = length // batch
    assert [e for e, _ in full] == [s // per_epoch for s in range(start + n)]
    with pytest.raises(ValueError, match="start_step"):
        next(step_batches(loader(), 3, 2))
