"""DenseCL pre-training (Wang et al., dense contrastive learning) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/densecl/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/densecl/train.py                                  # CPU demo
    python examples/densecl/train.py --dense-warmup-steps 1000        # lambda = 0 for the first steps
    torchrun --nproc_per_node=8 examples/densecl/train.py --preset paper --data /data/coco/train2017

Method (DenseCL, Wang et al.): online backbone + global / dense projectors **without BatchNorm**, a
momentum key encoder (backbone + projectors) with the FIXED momentum 0.999, updated at the start of
each step before the keys are computed. One direction only: view 1 gives the queries, view 2 the
keys. Dense matching: every query cell's positive is the key cell with the highest cosine between
the backbone features (argmax, no gradient through the choice). Dense loss: InfoNCE between the
online dense projections of view 1 and the matched key dense projections of view 2, against a
queue of pooled dense keys (one mean-pooled dense key per image); global loss: MoCo v2 InfoNCE
with its own queue; ``L = (1 - lambda) L_global + lambda L_dense`` with lambda = 0.5 (optionally
0 for the first ``--dense-warmup-steps`` steps, the upstream warm-up hook, off by default and in
the released configurations). After the loss the key view's global keys and pooled dense keys are
enqueued. Augmentation: MoCo v2 (random resized crop scale (0.2, 1)).

Differences from the original: ShuffleBN (shuffling the key batch across GPUs so that the key
encoder's BatchNorm statistics cannot leak the positive pair) is not implemented; use SyncBN under
DDP instead (``--sync-bn``, on in ``--preset paper``): the PixCon supplementary material found the
choice neutral. The queues hold any number of keys (no ``K % global_batch == 0`` requirement).

Expected behaviour: the loss often rises during the first steps and falls afterwards (the queues
start as random unit vectors). The dense top-1 accuracy saturates quickly and is not logged;
``match_within_one`` (how often the feature argmax lies within one cell of the true geometric
correspondence) is the more useful health signal.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast.backbones import build_backbone, convert_sync_batchnorm
from densecontrast.data.sampling import step_batches
from densecontrast.ema import EMA
from densecontrast.engine import (
    AMP_DTYPES,
    CHECKPOINT_NAME,
    PreemptionHandler,
    RunError,
    RunLog,
    add_common_args,
    backbone_options,
    build_pretraining_loader,
    checkpointable_args,
    cleanup,
    export_backbone,
    load_training_state,
    parse_with_presets,
    resolve_resume,
    save_training_state,
    schedule_length,
    skipped_images,
    start_run,
    wrap_ddp,
)
from densecontrast.eval.report import final_report, report_line, true_cell_agreement
from densecontrast.heads import densecl_heads
from densecontrast.losses.dense_infonce import DenseInfoNCE
from densecontrast.losses.global_losses import InfoNCE
from densecontrast.matching import Matches, similarity_match
from densecontrast.optim import WarmupCosineScheduler, build_optimizer, scale_lr
from densecontrast.queue import MomentumQueue
from densecontrast.schedules import constant_momentum
from densecontrast.transforms import mocov2_views

PAPER = dict(  # DenseCL paper: ResNet-50, 8 x 32 images, 800 COCO epochs, SGD 0.3, no warm-up, fp32
    arch="resnet50", crop_size=224, batch_size=32, epochs=800, optimizer="sgd", lr=0.3, lr_scaling="none",
    weight_decay=1e-4, warmup_epochs=0.0, queue_size=65536, temperature=0.2, momentum=0.999, amp="none",
    proj_hidden=2048, proj_dim=128, dense_weight=0.5, sync_bn=True, workers=8, save_every=2000,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DenseCL pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(parser, lr=0.05, epochs=4, batch_size=32)
    g = parser.add_argument_group("densecl")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo",
                   help="paper: the hyperparameters of the DenseCL paper")
    g.add_argument("--temperature", type=float, default=0.2)
    g.add_argument("--queue-size", type=int, default=4096, help="entries of each queue (paper: 65536)")
    g.add_argument("--dense-weight", type=float, default=0.5, help="lambda: weight of the dense loss")
    g.add_argument("--dense-warmup-steps", type=int, default=0,
                   help="lambda = 0 for this many first steps (upstream hook; off in the released configs)")
    g.add_argument("--momentum", type=float, default=0.999, help="fixed momentum of the key encoder")
    g.add_argument("--proj-hidden", type=int, default=256)
    g.add_argument("--proj-dim", type=int, default=64)
    return parser


class DenseCLOnline(nn.Module):
    """Online network: ``encoder`` (backbone + global / dense projectors, no BN), all copied by the key encoder."""

    def __init__(self, arch: str, hidden: int, dim: int, **backbone_kwargs: Any) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch, **backbone_kwargs)
        heads = densecl_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim)
        self.encoder = nn.ModuleDict(
            {"backbone": backbone, "projector": heads["projector"], "dense_projector": heads["dense_projector"]}
        )

    def forward(self, view: Tensor) -> dict[str, Tensor]:
        return encode(self.encoder, view)


def encode(encoder: nn.ModuleDict, view: Tensor) -> dict[str, Tensor]:
    """Backbone features (B, C, h, w), global projection (B, D) and dense projection (B, D, h, w)."""
    feats = encoder["backbone"](view)
    return {
        "feats": feats,
        "proj": encoder["projector"](feats.mean(dim=(2, 3))),
        "dense": encoder["dense_projector"](feats),
    }


def match(q_feats: Tensor, k_feats: Tensor, gq, gk) -> Matches:
    """DenseCL's positives: argmax cosine of the backbone features, view 1 cells -> view 2 cells (index only)."""
    return similarity_match(q_feats.detach(), k_feats.detach(), query_geometry=gq, key_geometry=gk,
                            query_shape=tuple(q_feats.shape[-2:]), key_shape=tuple(k_feats.shape[-2:]))


def main(args: argparse.Namespace) -> None:
    info = start_run(args, "densecl")
    device, output_dir = info.device, Path(args.output_dir)

    # ---- data: MoCo v2 views, scale (0.2, 1), no overlap constraint
    transform = mocov2_views(args.crop_size)
    loader = build_pretraining_loader(args, transform, info)
    total_steps = schedule_length(args, loader)
    global_batch = args.batch_size * info.world_size

    # ---- model: online network, key encoder (backbone + projectors, fixed momentum), two queues
    online = DenseCLOnline(args.arch, args.proj_hidden, args.proj_dim, **backbone_options(args))
    if args.sync_bn:  # replaces ShuffleBN (not implemented), see the module docstring
        online = convert_sync_batchnorm(online)
    online.to(device)
    # The key encoder keeps its own BN statistics (buffers="none"), as MoCo's.
    target = EMA(online.encoder, constant_momentum(args.momentum), buffers="none").to(device)
    global_queue = MomentumQueue(args.proj_dim, args.queue_size, seed=args.seed).to(device)
    dense_queue = MomentumQueue(args.proj_dim, args.queue_size, seed=args.seed + 1).to(device)
    model = wrap_ddp(online, info, target, global_queue, dense_queue)

    # ---- optimiser, LR schedule, AMP
    lr = scale_lr(args.lr, global_batch) if args.lr_scaling == "linear" else args.lr
    optimizer = build_optimizer(online, args.optimizer, lr, args.weight_decay)
    warmup = min(int(args.warmup_epochs * loader.sampler.batches_per_epoch), total_steps - 1)
    scheduler = WarmupCosineScheduler(optimizer, total_steps, warmup_steps=max(warmup, 0), warmup_start_ratio=1e-4)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume
    state = {"model": online, "target": target, "global_queue": global_queue, "dense_queue": dense_queue,
             "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    step = 0
    resume = resolve_resume(args.resume, output_dir)
    if resume is not None:
        step = load_training_state(resume, state, map_location=device, args=args)
    stop_at = total_steps if args.stop_after is None else min(total_steps, step + args.stop_after)
    log = RunLog(output_dir, total_steps, start_step=step, stop_step=stop_at, print_freq=args.print_freq,
                 enabled=info.is_main)
    if resume is not None:
        log.print(f"resumed from {resume} at step {step}")
    log.print(f"training {total_steps} steps ({loader.sampler.batches_per_epoch} per epoch), per-process batch "
              f"{args.batch_size}, global batch {global_batch}, world size {info.world_size}, device {device}, "
              f"amp {args.amp}")

    dense_loss = DenseInfoNCE(temperature=args.temperature)
    image_loss = InfoNCE(temperature=args.temperature)

    # ---- training loop
    online.train()
    with PreemptionHandler() as preempt:
        for epoch, (views, geoms) in step_batches(loader, step, stop_at):
            q_view = views[0].to(device, non_blocking=True)
            k_view = views[1].to(device, non_blocking=True)
            gq, gk = geoms[0].to(device), geoms[1].to(device)

            # DenseCL: the momentum update runs at the start of the step, BEFORE the keys are computed
            # (PixCon updates after the optimiser step). The online weights are the same at both places,
            # so with a fixed momentum the keys are identical; the update at step 0 is a no-op (the key
            # encoder starts as a copy), and no update follows the last step.
            momentum = target.update(step)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                q = model(q_view)  # queries: view 1 through the online encoder only
                with torch.no_grad():
                    k = encode(target.target, k_view)  # keys: view 2 through the key encoder only
                neg_global, neg_dense = global_queue.negatives(), dense_queue.negatives()
                m = match(q["feats"], k["feats"], gq, gk)
                l_dense = dense_loss(q["dense"], k["dense"], m, neg_dense)
                l_global = image_loss(q["proj"], k["proj"], neg_global)
                lam = 0.0 if step < args.dense_warmup_steps else args.dense_weight
                loss = (1 - lam) * l_global + lam * l_dense  # lam = 0 keeps the dense graph (DDP sees every parameter)
                shape_q, shape_k = tuple(q["feats"].shape[-2:]), tuple(k["feats"].shape[-2:])
                metrics = {
                    "loss_dense": float(l_dense.detach()),
                    "loss_global": float(l_global.detach()),
                    "dense_weight": lam,
                    "valid_fraction": float(m.valid.float().mean()),
                    "mean_weight": float(m.effective_weight.sum() / m.valid.sum().clamp_min(1)),
                    "in_box_fraction": float(m.in_box.float().mean()) if m.in_box is not None else float("nan"),
                    "match_within_one": true_cell_agreement(m, gq, gk, shape_q, shape_k),
                }
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            # DenseCL enqueues the key view's keys after the loss: global keys and pooled dense keys.
            global_queue.enqueue(F.normalize(k["proj"].float(), dim=1))
            dense_queue.enqueue(F.normalize(k["dense"].float().mean(dim=(2, 3)), dim=1))
            step += 1

            skipped = skipped_images(loader)
            log.step(step, {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "momentum": momentum, **metrics,
                            **({} if skipped is None else {"skipped_images": skipped})},
                     epoch=epoch, images=global_batch)
            if args.save_every and step % args.save_every == 0:
                save_training_state(output_dir / CHECKPOINT_NAME, state, step=step, args=checkpointable_args(args),
                                    rank_copy=args.save_rank_states)
            if preempt.synchronize(device):
                log.print(f"preemption signal received: saving at step {step} and exiting")
                break
    save_training_state(output_dir / CHECKPOINT_NAME, state, step=step, args=checkpointable_args(args),
                        rank_copy=args.save_rank_states)

    # ---- export and report, once the schedule is complete
    backbone = online.encoder["backbone"]
    if step >= total_steps:
        export_backbone(backbone, output_dir / "backbone.pth", arch=args.arch, verify=args.arch != "tiny")
        if info.is_main and not args.no_eval:
            report = final_report(
                backbone, output_dir=output_dir, steps=step, final_loss=log.last.get("loss", float("nan")),
                transform=transform, device=device, match_fn=match,
            )
            log.print(report_line(report))
    log.close()
    cleanup()


if __name__ == "__main__":
    parser = get_args_parser()
    try:
        main(parse_with_presets(parser, {"paper": PAPER}))
    except RunError as err:  # a mistake in the arguments or the data: one line, exit status 2
        parser.exit(2, f"{parser.prog}: error: {err}\n")
