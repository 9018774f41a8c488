"""The training loop the reference scripts share: arguments, data, steps, checkpoints, resume, preemption.

A reference script (``examples/<method>/train.py``) defines only what is specific to its method:
the online model, the stateful pieces (momentum encoder, queues) and one function computing the
loss of a batch. Everything else lives here, once, and is tested once:

* :func:`add_common_args`: the command-line arguments every script accepts (data, backbone,
  optimiser, schedule, AMP, checkpoints, logging); ``--batch-size`` is **per process**.
* :func:`build_pretraining_loader`: synthetic scenes (default) or an image folder, wrapped in a
  multi-view transform whose randomness is seeded per ``(seed, epoch, index)``, so a resumed run
  sees exactly the augmentations an uninterrupted one would.
* :class:`Trainer`: DDP wrapping, AMP (bf16 / fp16 with ``GradScaler``), the LR schedule, the
  step loop, periodic JSON-lines / TensorBoard logs, atomic checkpoints every ``--save-every``
  steps and at the end, ``--resume PATH|auto``, and SIGTERM / SIGUSR1 preemption (save and exit).

Convention:
    A "step" is one optimiser step on one batch per process. The schedule length is
    ``total_steps = min(epochs * iters_per_epoch, max_steps)``; ``--stop-after K`` ends the run
    after ``K`` steps *without* changing the schedule (it simulates an interruption: resuming
    from its checkpoint continues the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from densecontrast.distributed import broadcast_, unwrap_model
from densecontrast.engine.checkpoint import (
    export_backbone,
    gather_rng_states,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    set_rng_state,
)
from densecontrast.engine.launch import (
    DistInfo,
    PreemptionHandler,
    init_distributed,
    seed_everything,
    setup_for_distributed,
)
from densecontrast.engine.metrics import JsonlWriter, TensorBoardWriter, progress_bar
from densecontrast.engine.optim import LARS, WarmupCosineScheduler, param_groups_weight_decay, scale_lr

__all__ = [
    "SeededViews",
    "ShardedSampler",
    "StepOutput",
    "Trainer",
    "add_common_args",
    "build_pretraining_loader",
    "checkpointable_args",
    "parse_with_presets",
    "schedule_length",
    "start_run",
]


def add_common_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Add the arguments every reference script shares; ``defaults`` override the defaults per method.

    Examples:
        >>> p = add_common_args(argparse.ArgumentParser(), lr=0.1)
        >>> a = p.parse_args(["--max-steps", "5"])
        >>> a.lr, a.max_steps, a.batch_size
        (0.1, 5, 32)
    """
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="folder of images (searched recursively); default: synthetic scenes")
    g.add_argument("--num-images", type=int, default=2048, help="synthetic scenes: dataset size")
    g.add_argument("--image-size", type=int, default=96, help="synthetic scenes: image side in pixels")
    g.add_argument("--num-classes", type=int, default=8, help="synthetic scenes: object classes")
    g.add_argument("--crop-size", type=int, default=64, help="side of each augmented view in pixels")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="tiny", help="backbone: tiny, resnet18, resnet50, ...")
    g.add_argument("--sync-bn", action="store_true", help="convert BatchNorm to SyncBatchNorm when distributed")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--max-steps", type=int, default=None, help="cap on the schedule length in steps")
    g.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    g.add_argument("--batch-size", type=int, default=32, help="images per process (per GPU); global = x world size")
    g.add_argument("--optimizer", choices=["sgd", "lars", "adamw"], default="sgd")
    g.add_argument("--lr", type=float, default=0.05, help="learning rate for the global batch (after scaling)")
    g.add_argument("--lr-scaling", choices=["none", "linear"], default="none",
                   help="linear: lr is per 256 images and multiplied by global_batch / 256")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype")
    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="default: runs/<method>")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the latest in --output-dir")
    g.add_argument("--print-freq", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    g.add_argument("--no-eval", action="store_true", help="skip the final correspondence evaluation and plots")
    g.add_argument("--save-rank-states", action="store_true",
                   help="also write rank<r>.pth (model + state) on every rank at the end, to check DDP consistency")
    parser.set_defaults(**defaults)
    return parser


def parse_with_presets(
    parser: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, Any]], argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv``; the values of ``--preset NAME`` become defaults, so explicit flags still win.

    Examples:
        >>> p = add_common_args(argparse.ArgumentParser())
        >>> _ = p.add_argument("--preset", default="demo")
        >>> a = parse_with_presets(p, {"paper": {"lr": 0.4, "amp": "fp16"}}, ["--preset", "paper", "--amp", "bf16"])
        >>> a.lr, a.amp
        (0.4, 'bf16')
    """
    known, _ = parser.parse_known_args(argv)
    name = getattr(known, "preset", None)
    if name in presets:
        parser.set_defaults(**presets[name])
    return parser.parse_args(argv)


def checkpointable_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as a dict of primitives (loadable with ``torch.load(weights_only=True)``)."""
    out: dict[str, Any] = {}
    for k, v in vars(args).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x for x in v if isinstance(x, (str, int, float, bool))]
    return out


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


def build_pretraining_loader(
    args: argparse.Namespace, transform: Callable[[Any], Any], dist_info: DistInfo
) -> tuple[DataLoader, SeededViews, ShardedSampler]:
    """Pre-training data: synthetic scenes (default) or ``--data`` images, as multi-view batches.

    Returns:
        ``(loader, dataset, sampler)``; each batch is ``(views, geometries)`` from
        :func:`densecontrast.data.collate.collate_views`.
    """
    from densecontrast.data.collate import collate_views
    from densecontrast.data.multiview import MultiViewDataset

    if args.data:
        from densecontrast.data.image_folder import ImageDataset

        base: Any = ImageDataset(args.data)
    else:
        from densecontrast.data.synthetic import SyntheticScenes

        base = SyntheticScenes(
            num_images=args.num_images, image_size=args.image_size, num_classes=args.num_classes,
            seed=args.seed, return_mask=False,
        )
    dataset = SeededViews(MultiViewDataset(base, transform, keep_targets=False), seed=args.seed)
    sampler = ShardedSampler(len(dataset), args.batch_size, dist_info.rank, dist_info.world_size, args.seed)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=collate_views, drop_last=True, pin_memory=dist_info.device.type == "cuda",
        persistent_workers=False,
    )
    return loader, dataset, sampler


def start_run(args: argparse.Namespace, method: str) -> DistInfo:
    """Start a reference script's run: default ``--output-dir runs/<method>``, process group, seeds.

    Initialises ``torch.distributed`` from the launcher's environment (one process without it),
    seeds every generator with ``seed + rank`` and, with ``--deterministic``, switches torch to
    deterministic algorithms.
    """
    args.output_dir = args.output_dir or f"runs/{method}"
    dist_info = init_distributed(device=args.device)
    seed_everything(args.seed, dist_info.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    return dist_info


def schedule_length(args: argparse.Namespace, sampler: ShardedSampler) -> int:
    """``total_steps = min(epochs * iters_per_epoch, max_steps)``: the length of every schedule.

    Known before the :class:`Trainer` exists, so momentum schedules can be built with it.

    Example:
        >>> a = argparse.Namespace(epochs=3, max_steps=None)
        >>> schedule_length(a, ShardedSampler(100, 10, 0, 1, seed=0))
        30
    """
    total = args.epochs * sampler.batches_per_epoch
    return min(total, args.max_steps) if args.max_steps else total


@dataclass
class StepOutput:
    """What a method's step function returns: the loss to minimise and scalars to log."""

    loss: Tensor
    metrics: Mapping[str, float | Tensor]


def _build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups_weight_decay(model, args.weight_decay)
    if args.optimizer == "lars":
        return LARS(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


class Trainer:
    """Run the step loop of a reference script with checkpoints, resume, AMP, DDP and preemption.

    Args:
        args: parsed :func:`add_common_args` arguments (``args.output_dir`` must be set).
        model: the online (trainable) model; wrapped in DDP here when distributed.
        state: the other stateful modules saved in checkpoints, by name (momentum encoder,
            queues, ...). They are not trained by the optimiser.
        dist_info: from :func:`densecontrast.engine.launch.init_distributed`.
        loader: the loader of :func:`build_pretraining_loader` (with its dataset and sampler).
        dataset: the :class:`SeededViews` dataset.
        sampler: the :class:`ShardedSampler`.

    Checkpoint contents (``torch.load(weights_only=True)``-safe): ``model`` (unwrapped online
    weights), one entry per ``state`` module, ``optimizer``, ``scheduler``, ``scaler``, ``step``,
    ``epoch``, ``rng`` (this process's RNG states) and ``args``.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        model: nn.Module,
        state: Mapping[str, nn.Module],
        dist_info: DistInfo,
        loader: DataLoader,
        dataset: SeededViews,
        sampler: ShardedSampler,
    ) -> None:
        self.args, self.dist, self.state = args, dist_info, dict(state)
        setup_for_distributed(dist_info.is_main)  # print only on rank 0 (print(..., force=True) escapes)
        self.loader, self.dataset, self.sampler = loader, dataset, sampler
        self.device = dist_info.device
        self.output_dir = Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model = model.to(self.device)
        for m in self.state.values():
            m.to(self.device)
        if dist_info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp: nn.Module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            # DDP copied rank 0's weights to every rank; the state modules (momentum target, queues)
            # were built before from per-rank seeds, so they start from rank 0's copy too.
            for module in self.state.values():
                for t in [*module.parameters(), *module.buffers()]:
                    broadcast_(t.data, src=0)
        else:
            self.ddp = self.model
        self.global_batch = args.batch_size * dist_info.world_size
        self.iters_per_epoch = sampler.batches_per_epoch
        self.total_steps = schedule_length(args, sampler)
        if args.lr_scaling == "linear":  # --lr is per 256 images: scale once, then record the result
            args.base_lr, args.lr, args.lr_scaling = args.lr, scale_lr(args.lr, self.global_batch), "none"
        self.optimizer = _build_optimizer(args, self.model)
        warmup = min(int(args.warmup_epochs * self.iters_per_epoch), self.total_steps - 1)
        self.scheduler = WarmupCosineScheduler(
            self.optimizer, total_steps=self.total_steps, warmup_steps=max(warmup, 0), warmup_start_ratio=1e-4
        )
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.step = 0
        self.metrics_file = JsonlWriter(self.output_dir / "metrics.jsonl") if dist_info.is_main else None
        self.tb = TensorBoardWriter(str(self.output_dir / "tb")) if dist_info.is_main else None
        self.last_loss = float("nan")
        self.stopped_by_signal = False

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_file(self) -> Path:
        """``<output_dir>/checkpoint.pth``: the latest checkpoint (overwritten atomically)."""
        return self.output_dir / "checkpoint.pth"

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        out: dict[str, Any] = {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.iters_per_epoch,
            "rng": gather_rng_states(),  # a collective: every rank's generators, restored per rank
            "args": checkpointable_args(self.args),
        }
        for name, module in self.state.items():
            out[name] = module.state_dict()
        return out

    def save(self) -> None:
        """Write :attr:`checkpoint_file` atomically (rank 0); a collective when distributed.

        BatchNorm running statistics are per process unless SyncBatchNorm is used (GPU only):
        before saving they are broadcast from rank 0 — what DDP also does at every forward
        (``broadcast_buffers``) — so every rank holds the checkpointed statistics.
        """
        if self.dist.distributed:
            self.broadcast_batchnorm_stats()
        save_checkpoint(self.state_dict(), self.checkpoint_file)

    def broadcast_batchnorm_stats(self) -> None:
        """Copy rank 0's BatchNorm running statistics (online model and state modules) to every rank."""
        for root in [self.model, *self.state.values()]:
            for m in root.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for buf in m.buffers(recurse=False):
                        broadcast_(buf, src=0)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`save`."""
        ckpt = load_checkpoint(path, map_location=self.device)
        unwrap_model(self.model).load_state_dict(ckpt["model"])
        for name, module in self.state.items():
            module.load_state_dict(ckpt[name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        if "rng" in ckpt:
            try:
                set_rng_state(ckpt["rng"])
            except ValueError as err:  # resumed on a different number of processes
                print(f"not restoring RNG states ({err}); re-seeding instead")
                seed_everything(self.args.seed + self.step, self.dist.rank)

    def maybe_resume(self) -> Path | None:
        """Apply ``--resume`` (a path or ``auto``); returns the checkpoint used, if any."""
        path = resolve_resume(self.args.resume, self.output_dir)
        if path is not None:
            self.load(path)
            print(f"resumed from {path} at step {self.step}")
        return path

    # ------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[tuple[int, Any]]:
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.iters_per_epoch)
            self.dataset.set_epoch(epoch)
            self.sampler.set_epoch(epoch, start_batch=offset)
            for batch in self.loader:
                yield epoch, batch
                if self.step >= self.total_steps:
                    return

    def fit(
        self,
        step_fn: Callable[[Any, int], StepOutput],
        after_step: Callable[[int], Mapping[str, float] | None] | None = None,
    ) -> dict[str, float]:
        """Train until ``total_steps`` (or ``--stop-after``, or a preemption signal).

        Args:
            step_fn: ``(batch, step) -> StepOutput``, run under autocast with the DDP-wrapped model
                reachable as :attr:`ddp`; it must not call ``backward``.
            after_step: called with the step index after the optimiser step (momentum update,
                queue enqueue); may return extra scalars to log.

        Returns:
            The last logged metrics.
        """
        args = self.args
        stop_at = self.total_steps if args.stop_after is None else min(self.total_steps, self.step + args.stop_after)
        last: dict[str, float] = {}
        t_last, n_last = time.perf_counter(), 0
        print(
            f"training {self.total_steps} steps ({self.iters_per_epoch} per epoch), per-process batch "
            f"{args.batch_size}, global batch {self.global_batch}, world size {self.dist.world_size}, "
            f"device {self.device}, amp {args.amp}"
        )
        bar = progress_bar(range(self.step, stop_at), enabled=self.dist.is_main, desc="train")
        bar_iter = iter(bar)
        next(bar_iter, None)  # the bar counts a step when the next one is requested: prime it
        self.model.train()
        with PreemptionHandler() as preempt:
            for epoch, batch in self._batches():
                if self.step >= stop_at:
                    break
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = step_fn(batch, self.step)
                loss = out.loss
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"loss is {loss.item()} at step {self.step}")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                extra = after_step(self.step) if after_step is not None else None
                self.step += 1
                n_last += self.global_batch
                next(bar_iter, None)
                values = {k: float(v) for k, v in out.metrics.items()}
                values["loss"] = float(loss.detach())
                values["lr"] = self.optimizer.param_groups[0]["lr"]
                skipped = self._skipped_images()
                if skipped is not None:
                    values["skipped_images"] = skipped
                if extra:
                    values.update({k: float(v) for k, v in extra.items()})
                self.last_loss = values["loss"]
                if self.step % args.print_freq == 0 or self.step == stop_at:
                    dt = time.perf_counter() - t_last
                    values["img_per_s"] = n_last / max(dt, 1e-9)
                    t_last, n_last = time.perf_counter(), 0
                    values["epoch"] = epoch
                    last = {"step": self.step, **values}
                    if self.metrics_file is not None:
                        self.metrics_file.write(last)
                    if self.tb is not None:
                        self.tb.add_scalars(values, self.step, prefix="train/")
                    print(f"step {self.step}/{self.total_steps}  " + json.dumps(
                        {k: round(v, 5) for k, v in values.items()}))
                if args.save_every and self.step % args.save_every == 0:
                    self.save()
                if preempt.synchronize(self.device):
                    print(f"preemption signal received: saving at step {self.step} and exiting")
                    self.stopped_by_signal = True
                    break
        self.save()
        if args.save_rank_states:
            state = self.state_dict()
            torch.save({k: v for k, v in state.items() if k not in ("rng", "args")},
                       self.output_dir / f"rank{self.dist.rank}.pth")
        if self.tb is not None:
            self.tb.flush()
        return last

    def _skipped_images(self) -> int | None:
        """Unreadable images skipped so far by this process's image folder (None for synthetic data).

        With DataLoader workers each worker counts its own skips in its copy of the dataset; the
        main process only sees its own (``--workers 0`` counts them all). Each skip also warns once.
        """
        base = getattr(getattr(self.dataset, "dataset", None), "dataset", None)
        n = getattr(base, "num_skipped", None)
        return int(n) if n is not None else None

    def export(self, backbone: nn.Module) -> Path:
        """Write ``<output_dir>/backbone.pth`` (torchvision key layout, rank 0) for fine-tuning.

        See :func:`densecontrast.engine.checkpoint.export_backbone` for the format.
        """
        path = self.output_dir / "backbone.pth"
        export_backbone(backbone, path, arch=self.args.arch, verify=self.args.arch != "tiny")
        return path

    def close(self) -> None:
        """Close the log writers."""
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tb is not None:
            self.tb.close()
