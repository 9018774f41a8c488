"""Resumable data order: views seeded per ``(seed, epoch, index)``, a sharded sampler, step-indexed batches.

Together they make the data a pure function of the step: a run resumed at step ``s`` (on the same
number of processes, with the same per-process batch size) sees exactly the batches and
augmentations an uninterrupted run would, whatever the number of DataLoader workers.

Convention:
    A step is one batch per process. Step ``s`` belongs to epoch ``s // batches_per_epoch`` and is
    batch ``s % batches_per_epoch`` of that epoch's permutation (``seed + epoch``), shard ``rank``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["SeededViews", "ShardedSampler", "step_batches"]


class SeededViews(Dataset):
    """Wrap a dataset so item ``i`` of epoch ``e`` is produced under ``torch.manual_seed(f(seed, e, i))``.

    The multi-view transforms draw from torch's global RNG; seeding per item makes the views a pure
    function of ``(seed, epoch, index)``, independent of workers, batch composition and resumption.
    Call :meth:`set_epoch` before creating each epoch's iterator.

    Examples:
        >>> ds = SeededViews([0, 1, 2], seed=1)
        >>> ds[0] == ds[0], len(ds)
        (True, 3)
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the next iterator produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        key = f"{self.seed}:{self.epoch}:{index}".encode()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(key))
            return self.dataset[index]


class ShardedSampler(Sampler[int]):
    """Epoch-seeded shuffle, sharded over ranks with ``drop_last``, that can start mid-epoch.

    Like ``DistributedSampler(drop_last=True)`` but batch-aligned and resumable: ``start_batch``
    skips the batches this rank already consumed in the epoch (no data is loaded for them).

    Args:
        length: dataset length.
        batch_size: per-process batch size.
        rank: this process's rank.
        world_size: number of processes.
        seed: shuffle seed (the permutation of epoch ``e`` uses ``seed + e``).

    Examples:
        >>> s = ShardedSampler(10, batch_size=2, rank=1, world_size=2, seed=0)
        >>> len(s), len(list(iter(s)))
        (4, 4)
    """

    def __init__(self, length: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.length, self.batch_size = length, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = length // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the dataset ({length} images) must hold at least one global batch of "
                f"{batch_size} x {world_size} processes = {batch_size * world_size} images"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and the first batch to yield."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.length, generator=g)
        n = self.batches_per_epoch * self.batch_size * self.world_size
        mine = perm[:n].view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]
        return iter(mine[self.start_batch :].reshape(-1).tolist())


def step_batches(loader: DataLoader, start_step: int, stop_step: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(epoch, batch)`` for steps ``start_step, ..., stop_step - 1`` of a resumable loader.

    ``loader.sampler`` must be a :class:`ShardedSampler`; when ``loader.dataset`` is a
    :class:`SeededViews` its epoch is set too. Epochs are entered mid-way when ``start_step`` is
    not a multiple of the epoch length, without loading the skipped batches.

    Examples:
        >>> from densecontrast.data.collate import collate_views
        >>> ds = SeededViews(list(range(10)), seed=0)
        >>> dl = DataLoader(ds, batch_size=2, sampler=ShardedSampler(10, 2, 0, 1, seed=0))
        >>> [epoch for epoch, _ in step_batches(dl, start_step=3, stop_step=8)]
        [0, 0, 1, 1, 1]
    """
    sampler = loader.sampler
    if not isinstance(sampler, ShardedSampler):
        raise ValueError(f"loader.sampler must be a ShardedSampler, but got {type(sampler).__name__}")
    if not 0 <= start_step <= stop_step:
        raise ValueError(f"steps must satisfy 0 <= start_step <= stop_step, but got {start_step} and {stop_step}")
    step = start_step
    while step < stop_step:
        epoch, offset = divmod(step, sampler.batches_per_epoch)
        if isinstance(loader.dataset, SeededViews):
            loader.dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start_batch=offset)
        for batch in loader:
            yield epoch, batch
            step += 1
            if step >= stop_step:
                return
