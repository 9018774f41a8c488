"""The command line the reference scripts share and what it builds: run start, data, schedule length, resume checks.

Convention:
    ``--batch-size`` is **per process**; the global batch is ``batch_size * world_size``. A step
    is one optimiser step on one batch per process. The schedule length is
    ``total_steps = min(epochs * batches_per_epoch, max_steps)``; ``--stop-after K`` ends the run
    after ``K`` steps *without* changing the schedule (resuming continues the same run).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from densecontrast.data.collate import collate_views
from densecontrast.data.dead_leaves import DeadLeavesScenes
from densecontrast.data.multiview import MultiViewDataset
from densecontrast.data.sampling import SeededViews, ShardedSampler
from densecontrast.data.synthetic import SyntheticScenes
from densecontrast.engine.launch import DistInfo, ignore_preemption_signals, init_distributed
from densecontrast.optim import OPTIMIZERS
from densecontrast.random_state import seed_everything

__all__ = [
    "AMP_DTYPES",
    "RunError",
    "add_common_args",
    "backbone_options",
    "build_pretraining_loader",
    "check_resume_args",
    "checkpointable_args",
    "parse_with_presets",
    "schedule_length",
    "skipped_images",
    "start_run",
]

class RunError(Exception):
    """A mistake in a run's command line or the data it names; the scripts print it in one line and exit with 2."""


MAY_CHANGE_ON_RESUME: frozenset[str] = frozenset({
    "resume", "force_resume", "output_dir", "stop_after", "print_freq", "save_every", "workers", "device",
    "no_eval", "save_rank_states", "deterministic",
})
"""Arguments a resumed run may change; every other stored argument (data order, model, schedule) must match."""

SYNTHETIC: dict[str, type] = {"dead-leaves": DeadLeavesScenes, "shapes": SyntheticScenes}
"""``--synthetic`` choices: the built-in pre-training data used without ``--data``."""

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--amp`` choices and the autocast dtype each selects (``None``: full precision)."""


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
    g.add_argument("--synthetic", choices=list(SYNTHETIC), default="dead-leaves",
                   help="built-in data without --data: dead-leaves (natural image statistics) or shapes")
    g.add_argument("--num-images", type=int, default=2048, help="synthetic scenes: dataset size")
    g.add_argument("--image-size", type=int, default=128, help="synthetic scenes: image side in pixels")
    g.add_argument("--num-classes", type=int, default=8, help="synthetic scenes: object classes")
    g.add_argument("--crop-size", type=int, default=64, help="side of each augmented view in pixels")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="tiny",
                   help="backbone: tiny, resnet18, resnet50, ..., or timm:<name> (e.g. timm:vit_small_patch16_224)")
    g.add_argument("--output-stride", type=int, default=None,
                   help="backbone output stride (default: the architecture's, 16 for tiny, 32 for ResNets)")
    g.add_argument("--no-standardize", action="store_true",
                   help="tiny only: feed images as they are instead of standardising each one per channel")
    g.add_argument("--sync-bn", action="store_true", help="convert BatchNorm to SyncBatchNorm when distributed")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--max-steps", type=int, default=None, help="cap on the schedule length in steps")
    g.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    g.add_argument("--batch-size", type=int, default=32, help="images per process (per GPU); global = x world size")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    g.add_argument("--lr", type=float, default=0.05, help="learning rate for the global batch (see --lr-scaling)")
    g.add_argument("--lr-scaling", choices=["none", "linear"], default="none",
                   help="linear: --lr is per 256 images and multiplied by global_batch / 256")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype")
    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="default: runs/<method>")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the one in --output-dir")
    g.add_argument("--force-resume", action="store_true",
                   help="resume even when the checkpoint's arguments differ from these (data order, model, schedule)")
    g.add_argument("--print-freq", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    g.add_argument("--no-eval", action="store_true", help="skip the final correspondence evaluation and plots")
    g.add_argument("--save-rank-states", action="store_true",
                   help="also write rank<r>.pth (model + state) on every rank at each save, to check DDP consistency")
    parser.set_defaults(**defaults)
    return parser


def backbone_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`~densecontrast.backbones.build_backbone` from the command line.

    ``--output-stride`` gives ``output_stride``, ``--no-standardize`` gives ``standardize=False``.

    Raises:
        RunError: ``--no-standardize`` with an architecture other than ``tiny``.

    Examples:
        >>> p = add_common_args(argparse.ArgumentParser())
        >>> backbone_options(p.parse_args([]))
        {}
        >>> backbone_options(p.parse_args(["--output-stride", "8", "--no-standardize"]))
        {'output_stride': 8, 'standardize': False}
    """
    options: dict[str, Any] = {}
    if args.output_stride is not None:
        options["output_stride"] = args.output_stride
    if args.no_standardize:
        if args.arch != "tiny":
            raise RunError(f"--no-standardize applies to --arch tiny only, but got --arch {args.arch}")
        options["standardize"] = False
    return options


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
    """The arguments as a dict of primitives (loadable with ``torch.load(weights_only=True)``).

    Examples:
        >>> checkpointable_args(argparse.Namespace(lr=0.1, data=None, sizes=(1, 2)))
        {'lr': 0.1, 'data': None, 'sizes': [1, 2]}
    """
    out: dict[str, Any] = {}
    for k, v in vars(args).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x for x in v if isinstance(x, (str, int, float, bool))]
    return out


def start_run(args: argparse.Namespace, method: str) -> DistInfo:
    """Start a script's run: ``args.method``, default ``--output-dir runs/<method>``, process group, seeds.

    Also removes temporary files of an interrupted save, seeds every generator with
    ``seed + rank`` and, with ``--deterministic``, switches torch to deterministic algorithms.

    Examples:
        >>> a = argparse.Namespace(output_dir=None, device="cpu", seed=0, deterministic=False)
        >>> info = start_run(a, "demo")
        >>> a.output_dir, info.world_size
        ('runs/demo', 1)
    """
    args.method = method
    args.output_dir = args.output_dir or f"runs/{method}"
    info = init_distributed(device=args.device)
    if info.is_main:  # leftovers of a save interrupted by a kill: never valid checkpoints
        for tmp in Path(args.output_dir).glob(".*.pth.*.tmp"):
            tmp.unlink(missing_ok=True)
    seed_everything(args.seed, info.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    return info


def build_pretraining_loader(
    args: argparse.Namespace, transform: Callable[[Any], Any], info: DistInfo
) -> DataLoader:
    """Built-in scenes (``--synthetic``) or ``--data`` images as resumable ``(views, geometries)`` batches.

    Dataset :class:`~densecontrast.data.sampling.SeededViews`, sampler
    :class:`~densecontrast.data.sampling.ShardedSampler` (so ``step_batches`` starts at any step).
    Workers ignore SIGTERM / SIGUSR1: a signal to the whole process group (SLURM, ``timeout``)
    must not kill them before the main process has saved. A ``--data`` folder that is missing,
    empty or unreadable raises ``RunError``.
    """
    if args.data:
        from densecontrast.data.image_folder import ImageDataset

        try:
            base: Any = ImageDataset(args.data)
            base[0]  # decodes the first readable image; raises when none is
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise RunError(f"--data: {err}") from None
    else:
        base = SYNTHETIC[args.synthetic](
            num_images=args.num_images, image_size=args.image_size, num_classes=args.num_classes,
            seed=args.seed, return_mask=False,
        )
    dataset = SeededViews(MultiViewDataset(base, transform, keep_targets=False), seed=args.seed)
    sampler = ShardedSampler(len(dataset), args.batch_size, info.rank, info.world_size, args.seed)
    return DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=collate_views, drop_last=True, pin_memory=info.device.type == "cuda",
        worker_init_fn=ignore_preemption_signals,
    )


def schedule_length(args: argparse.Namespace, loader: DataLoader) -> int:
    """``total_steps = min(epochs * batches_per_epoch, max_steps)``: the length of every schedule.

    Examples:
        >>> a = argparse.Namespace(epochs=3, max_steps=None)
        >>> schedule_length(a, DataLoader(range(100), sampler=ShardedSampler(100, 10, 0, 1, seed=0)))
        30
    """
    total = args.epochs * loader.sampler.batches_per_epoch
    return min(total, args.max_steps) if args.max_steps else total


def skipped_images(loader: DataLoader) -> int | None:
    """Distinct unreadable images skipped so far behind ``loader`` (exact with workers; ``None`` for built-in data)."""
    dataset: Any = loader.dataset
    while not hasattr(dataset, "num_skipped") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    n = getattr(dataset, "num_skipped", None)
    return int(n) if n is not None else None


def check_resume_args(stored: Mapping[str, Any], args: argparse.Namespace) -> None:
    """Raise ``RunError`` when a checkpoint's method or data-order / model / schedule arguments differ from ``args``.

    The message names the method that wrote the checkpoint, or lists each differing argument
    (``--force-resume`` skips the argument comparison, never the method check).

    Examples:
        >>> now = argparse.Namespace(method="pixcon", batch_size=4, resume="auto", force_resume=False)
        >>> check_resume_args({"method": "pixcon", "batch_size": 4, "resume": None}, now)
        >>> check_resume_args({"method": "pixcon", "batch_size": 8}, now)
        Traceback (most recent call last):
        ...
        densecontrast.engine.cli.RunError: the checkpoint was written with other arguments: --batch-size 8 (now 4); ...
    """
    method = getattr(args, "method", None)
    if stored.get("method", method) != method:
        raise RunError(f"the checkpoint was written by the {stored['method']} script, not by {method}")
    if getattr(args, "force_resume", False):
        return
    now = checkpointable_args(args)
    diffs = [f"--{k.replace('_', '-')} {stored[k]!r} (now {now[k]!r})" for k in sorted(stored)
             if k in now and k not in MAY_CHANGE_ON_RESUME and stored[k] != now[k]]
    if diffs:
        raise RunError("the checkpoint was written with other arguments: " + "; ".join(diffs).replace("'", "")
                       + "; start a new --output-dir, or pass --force-resume to continue anyway")
