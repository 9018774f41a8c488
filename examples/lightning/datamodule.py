"""Pre-training data for Lightning: the scripts' resumable multi-view batches as a ``LightningDataModule``.

The pieces are the ones :func:`densecontrast.engine.build_pretraining_loader` uses:
``SyntheticScenes`` (default) or an ``ImageDataset`` folder, ``MultiViewDataset`` with a
multi-view transform, ``SeededViews`` (augmentations a function of ``(seed, epoch, index)``), a
``ShardedSampler`` over Lightning's ranks and ``collate_views``.

The data position is a function of the optimiser step, as in the scripts: :class:`StepLoader`
enters the data epoch of ``trainer.global_step`` at the right batch. Lightning restores
``global_step`` from ``ckpt_path`` *before* it calls ``train_dataloader()``, so a resumed run sees
the batches and augmentations an uninterrupted one would. Two consequences:

* create the ``Trainer`` with ``use_distributed_sampler=False`` (the sampler already shards over
  ranks; Lightning must not replace it with a ``DistributedSampler``);
* do not call ``trainer.estimated_stepping_batches`` in ``configure_optimizers``: it builds the
  loader before the checkpoint is restored. The schedule length comes from
  :meth:`MultiViewDataModule.schedule_length` instead (the scripts' ``schedule_length``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from densecontrast.data import MultiViewDataset, SeededViews, ShardedSampler, SyntheticScenes, collate_views


class StepSampler(ShardedSampler):
    """A :class:`ShardedSampler` that only :class:`StepLoader` positions; Lightning's ``set_epoch(epoch)`` is ignored.

    Lightning counts epochs its own way (a run stopped mid-epoch and resumed starts a new Lightning
    epoch), so the data epoch is derived from the step instead. ``len`` is the whole epoch:
    after a mid-epoch resume Lightning counts the batches done before the checkpoint as seen.
    """

    def set_epoch(self, epoch: int, start_batch: int | None = None) -> None:
        if start_batch is not None:  # from StepLoader; Lightning calls set_epoch(epoch) alone
            super().set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size


class StepLoader(DataLoader):
    """A ``DataLoader`` whose next batch is a function of the optimiser step, like the scripts' ``step_batches``.

    Each iteration enters the data epoch of the current step at the right batch (no data is loaded
    for the skipped batches), sets the :class:`SeededViews` epoch before the workers start, and
    ends at the end of that data epoch. The loader counts the batches it hands out; a new loader
    starts from ``start_step`` (``trainer.global_step``, restored from ``ckpt_path`` before
    Lightning calls ``train_dataloader()``).

    ``state_dict`` / ``load_state_dict`` make the loader resumable in Lightning's sense. The state
    only records what the step -> batch mapping depends on; a resume with another mapping (world
    size, batch size, dataset length or seed) warns that the data order changes.

    Args:
        dataset: a :class:`SeededViews` dataset.
        batch_size: per-process batch size.
        rank: this process's global rank.
        world_size: number of processes.
        seed: shuffle seed.
        start_step: optimiser steps already done.
        **kwargs: forwarded to ``DataLoader`` (``num_workers``, ``collate_fn``, ``pin_memory``, ...).
    """

    sampler: StepSampler
    dataset: SeededViews

    def __init__(self, dataset: SeededViews, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0, **kwargs: Any) -> None:
        sampler = StepSampler(len(dataset), batch_size, rank, world_size, seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.position = int(start_step)

    def __iter__(self) -> Iterator[Any]:
        epoch, batch = divmod(self.position, self.sampler.batches_per_epoch)
        self.sampler.set_epoch(epoch, batch)
        self.dataset.set_epoch(epoch)
        for out in super().__iter__():
            self.position += 1
            yield out

    def state_dict(self) -> dict[str, int]:
        s = self.sampler
        return {"batches_per_epoch": s.batches_per_epoch, "batch_size": s.batch_size, "world_size": s.world_size,
                "length": s.length, "seed": s.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        now = self.state_dict()
        if state != now:
            warnings.warn(f"the data order changes on resume: the checkpoint was made with {state}, this run has {now}",
                          stacklevel=2)


class MultiViewDataModule(L.LightningDataModule):
    """Synthetic scenes, an image folder or any map-style dataset, as multi-view batches ``(views, geometries)``.

    Args:
        transform: a multi-view transform, e.g. ``densecontrast.transforms.byol_views(96)``.
        data: a folder of images (every image below it, recursively); ``None``: synthetic scenes.
        dataset: any map-style dataset of images, ``(image, *targets)`` tuples or dict rows (a
            Hugging Face ``datasets.Dataset``) instead of ``data`` / synthetic scenes.
        image_key: the image column of dict rows.
        num_images, image_size, num_classes: the synthetic scenes.
        batch_size: per-process batch size.
        workers: DataLoader workers per process.
        seed: shuffle and augmentation seed.
    """

    def __init__(
        self,
        transform: Callable[[Any], Any],
        data: str | None = None,
        *,
        dataset: Any = None,
        image_key: str = "image",
        num_images: int = 1000,
        image_size: int = 128,
        num_classes: int = 8,
        batch_size: int = 32,
        workers: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        if dataset is None and data:
            from densecontrast.data import ImageDataset

            dataset = ImageDataset(data)
        elif dataset is None:
            dataset = SyntheticScenes(num_images=num_images, image_size=image_size, num_classes=num_classes,
                                      seed=seed, return_mask=False)
        views = MultiViewDataset(dataset, transform, image_key=image_key, keep_targets=False)
        self.views = SeededViews(views, seed=seed)

    def batches_per_epoch(self, world_size: int) -> int:
        """Optimiser steps per epoch with ``world_size`` processes (``drop_last``)."""
        return len(self.views) // (self.batch_size * world_size)

    def schedule_length(self, world_size: int, epochs: int, max_steps: int | None = None) -> int:
        """``min(epochs * batches_per_epoch, max_steps)``: the length of the LR and momentum schedules."""
        total = epochs * self.batches_per_epoch(world_size)
        return min(total, max_steps) if max_steps else total

    def train_dataloader(self) -> StepLoader:
        trainer = self.trainer
        assert trainer is not None, "train_dataloader() is called by the Trainer"
        return StepLoader(self.views, self.batch_size, trainer.global_rank, trainer.world_size, self.seed,
                          start_step=trainer.global_step, num_workers=self.workers, collate_fn=collate_views,
                          pin_memory=trainer.strategy.root_device.type == "cuda")
