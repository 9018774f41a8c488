"""Dense pre-training with PyTorch Lightning: PixCon (queues + momentum target) or PixPro (momentum target only).

Runs with no arguments as a CPU demo on the built-in synthetic scenes and writes
``runs/lightning_<method>/``: ``checkpoints/last.ckpt`` (Lightning's checkpoint: weights, momentum
target, queues, optimiser, LR schedule, loop counters), CSV logs under ``logs/`` and, once the
schedule is complete, ``backbone.pth`` (``densecontrast.engine.export_backbone``).

    python examples/lightning/train_lightning.py                                 # CPU demo, PixCon-SR
    python examples/lightning/train_lightning.py --method pixpro
    python examples/lightning/train_lightning.py --ckpt-path last                # resume the demo
    python examples/lightning/train_lightning.py --accelerator gpu --devices 8 --arch resnet50 \\
        --data /data/coco/train2017 --batch-size 128 --precision 16-mixed --sync-batchnorm  # DDP, 8 GPUs

With more than one device (or node) the Trainer uses ``strategy="ddp"``: Lightning starts one
process per device; the sampler shards the data over them (``use_distributed_sampler=False``) and
the queues all-gather their keys. See ``docs/lightning.md``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules next to this script

from datamodule import MultiViewDataModule
from pixcon_module import PixConModule
from pixpro_module import PixProModule

from densecontrast.engine import export_backbone
from densecontrast.transforms import byol_views


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Dense pre-training with PyTorch Lightning",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=["pixcon", "pixpro"], default="pixcon")
    p.add_argument("--variant", choices=["coord", "sim", "sr"], default="sr", help="PixCon matching variant")
    p.add_argument("--arch", default="tiny", help="backbone: tiny, resnet18, resnet50, timm:<name>, ...")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="folder of images (searched recursively); default: synthetic scenes")
    g.add_argument("--num-images", type=int, default=2048, help="synthetic scenes: dataset size")
    g.add_argument("--image-size", type=int, default=96, help="synthetic scenes: image side in pixels")
    g.add_argument("--crop-size", type=int, default=64, help="side of each augmented view in pixels")
    g.add_argument("--batch-size", type=int, default=32, help="images per process (per device)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--max-steps", type=int, default=None, help="cap on the schedule length in steps")
    g.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    g.add_argument("--optimizer", choices=["sgd", "lars", "adamw"], default="sgd")
    g.add_argument("--lr", type=float, default=0.05, help="learning rate for the global batch")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--queue-size", type=int, default=4096, help="PixCon: entries of each queue (paper: 65536)")
    g.add_argument("--proj-hidden", type=int, default=256)
    g.add_argument("--proj-dim", type=int, default=64)
    g = p.add_argument_group("Lightning")
    g.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto, ...")
    g.add_argument("--devices", type=int, default=1, help="devices per node; > 1 uses strategy='ddp'")
    g.add_argument("--num-nodes", type=int, default=1)
    g.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed, ...")
    g.add_argument("--sync-batchnorm", action="store_true", help="SyncBatchNorm under DDP (GPUs)")
    g.add_argument("--output-dir", default=None, help="default: runs/lightning_<method>")
    g.add_argument("--ckpt-path", default=None,
                   help="resume: a .ckpt file, or 'last' for <output-dir>/checkpoints/last.ckpt (fresh start if none)")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    g.add_argument("--log-every", type=int, default=10, help="log every N steps")
    g.add_argument("--seed", type=int, default=0)
    return p


class StopAfter(Callback):
    """End ``fit`` after ``steps`` more optimiser steps, schedule unchanged (the scripts' ``--stop-after``)."""

    def __init__(self, steps: int) -> None:
        self.steps, self.stop_at = steps, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop_at = trainer.global_step + self.steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def build(args: argparse.Namespace) -> tuple[L.Trainer, L.LightningModule, MultiViewDataModule, Path]:
    """The Trainer, the LightningModule and the data module of a run (no training yet)."""
    output_dir = Path(args.output_dir or f"runs/lightning_{args.method}")
    L.seed_everything(args.seed)  # model init; the views are seeded per (seed, epoch, index)
    world_size = args.devices * args.num_nodes
    transform = byol_views(args.crop_size, min_overlap=0.01 if args.method == "pixcon" else None)
    data = MultiViewDataModule(transform, args.data, num_images=args.num_images, image_size=args.image_size,
                               batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    total_steps = data.schedule_length(world_size, args.epochs, args.max_steps)
    common = dict(total_steps=total_steps, arch=args.arch, proj_hidden=args.proj_hidden, proj_dim=args.proj_dim,
                  optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                  warmup_steps=args.warmup_steps, seed=args.seed)
    if args.method == "pixcon":
        module: L.LightningModule = PixConModule(variant=args.variant, queue_size=args.queue_size, **common)
    else:
        module = PixProModule(**common)
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="step{step}",
                                 auto_insert_metric_name=False, every_n_train_steps=args.save_every, save_last=True,
                                 save_top_k=1)
    callbacks: list[Callback] = [checkpoint]
    if args.stop_after is not None:
        callbacks.append(StopAfter(args.stop_after))
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
        # DDP: gradients all-reduced; buffers are not re-broadcast at every step (the queues and the
        # momentum target stay identical on all ranks by construction, BatchNorm statistics per rank)
        strategy=DDPStrategy(broadcast_buffers=False) if world_size > 1 else "auto",
        use_distributed_sampler=False,        # StepSampler shards over ranks and resumes mid-epoch
        sync_batchnorm=args.sync_batchnorm, precision=args.precision,
        max_steps=total_steps, max_epochs=-1, callbacks=callbacks,
        logger=CSVLogger(output_dir, name="logs"), log_every_n_steps=args.log_every,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=output_dir,
    )
    return trainer, module, data, output_dir


def main(args: argparse.Namespace) -> None:
    trainer, module, data, output_dir = build(args)
    ckpt_path = args.ckpt_path
    if ckpt_path == "last" and not (output_dir / "checkpoints" / "last.ckpt").exists():
        ckpt_path = None  # nothing to resume: start fresh (a job script can always pass --ckpt-path last)
    elif ckpt_path == "last":
        ckpt_path = str(output_dir / "checkpoints" / "last.ckpt")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    # the final state, also after --stop-after or a step count that is not a multiple of --save-every
    trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if trainer.global_step >= module.hparams.total_steps and trainer.is_global_zero:
        export_backbone(module.backbone, output_dir / "backbone.pth", arch=args.arch, verify=args.arch != "tiny")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # the demo's --workers 0/2
    main(get_args_parser().parse_args())
