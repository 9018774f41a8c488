"""PixCon pre-training (PixCon-Coord, PixCon-Sim, PixCon-SR) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/pixcon/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/pixcon/train.py                                   # CPU demo, PixCon-Coord
    python examples/pixcon/train.py --variant sr                      # PixCon-SR
    torchrun --nproc_per_node=8 examples/pixcon/train.py --preset paper --data /data/coco/train2017

Method (PixCon, Pang et al.): online backbone + global / dense projectors + predictors,
momentum target (backbone + projectors) with momentum ascending 0.99 -> 1 updated after the
optimiser step; per direction a -> b: dense InfoNCE between the online dense predictions of view a
and the target dense projections of view b at the matched cells, against a queue of pooled dense
keys, plus the MoCo v2 image loss; summed over both directions with weights lambda / 1 - lambda.
Matching: ``coord`` = nearest cell at the same image location, in-box queries only; ``sim`` = argmax
cosine of backbone features; ``sr`` = ``sim`` + semantic reweighting (Eq. 7, gamma = 2).
One randomly chosen target view per step is enqueued (global keys and pooled dense keys).
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
from densecontrast.heads import pixcon_heads
from densecontrast.losses.dense_infonce import DenseInfoNCE
from densecontrast.losses.global_losses import InfoNCE
from densecontrast.matching import Matches, nearest_coordinate_match, similarity_match
from densecontrast.optim import WarmupCosineScheduler, build_optimizer, scale_lr
from densecontrast.queue import MomentumQueue
from densecontrast.schedules import CosineMomentum
from densecontrast.transforms import byol_views
from densecontrast.weighting import SemanticReweighting

PAPER = dict(  # PixCon paper (PixCon-SR): ResNet-50, 4 x 128 images, 800 COCO epochs, SGD 0.4, warm-up 4 epochs
    arch="resnet50", crop_size=224, batch_size=128, epochs=800, optimizer="sgd", lr=0.4, lr_scaling="none",
    weight_decay=1e-4, warmup_epochs=4, queue_size=65536, temperature=0.2, momentum_base=0.99, amp="fp16",
    proj_hidden=2048, proj_dim=128, sync_bn=True, workers=8, save_every=2000, variant="sr",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="PixCon pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(parser, lr=0.2, epochs=4, batch_size=32)
    g = parser.add_argument_group("pixcon")
    g.add_argument("--variant", choices=["coord", "sim", "sr"], default="coord",
                   help="matching / reweighting variant (coord: the demo's, see docs/results.md; sr: the paper's)")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo",
                   help="paper: the hyperparameters of the PixCon paper")
    g.add_argument("--temperature", type=float, default=0.2)
    g.add_argument("--queue-size", type=int, default=4096, help="entries of each queue (paper: 65536)")
    g.add_argument("--dense-weight", type=float, default=0.5, help="lambda: dense vs image loss weight")
    g.add_argument("--gamma", type=float, default=2.0, help="SR sharpening exponent")
    g.add_argument("--momentum-base", type=float, default=0.99, help="momentum ascending from this value to 1")
    g.add_argument("--proj-hidden", type=int, default=256)
    g.add_argument("--proj-dim", type=int, default=64)
    return parser


class PixConOnline(nn.Module):
    """Online network: ``encoder`` (backbone + projectors, copied by the target) and predictors."""

    def __init__(self, arch: str, hidden: int, dim: int, **backbone_kwargs: Any) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch, **backbone_kwargs)
        heads = pixcon_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim)
        self.encoder = nn.ModuleDict(
            {"backbone": backbone, "projector": heads["projector"], "dense_projector": heads["dense_projector"]}
        )
        self.predictor = heads["predictor"]
        self.dense_predictor = heads["dense_predictor"]

    def forward(self, views: list[Tensor]) -> list[dict[str, Tensor]]:
        outs = []
        for v in views:
            enc = encode(self.encoder, v)
            enc["pred"] = self.predictor(enc["proj"])
            enc["dense_pred"] = self.dense_predictor(enc["dense"])
            outs.append(enc)
        return outs


def encode(encoder: nn.ModuleDict, view: Tensor) -> dict[str, Tensor]:
    """Backbone features (B, C, h, w), global projection (B, D) and dense projection (B, D, h, w)."""
    feats = encoder["backbone"](view)
    return {
        "feats": feats,
        "proj": encoder["projector"](feats.mean(dim=(2, 3))),
        "dense": encoder["dense_projector"](feats),
    }


def match(args: argparse.Namespace, reweight: SemanticReweighting, a: Tensor, b: Tensor, ga, gb) -> Matches:
    """PixCon's positives from backbone features ``a`` (queries, view a) to ``b`` (keys, view b)."""
    shape_a, shape_b = tuple(a.shape[-2:]), tuple(b.shape[-2:])
    if args.variant == "coord":  # nearest cell at the same image location, in-box queries only
        return nearest_coordinate_match(ga, gb, shape_a, shape_b)
    m = similarity_match(a.detach(), b, query_geometry=ga, key_geometry=gb, query_shape=shape_a, key_shape=shape_b)
    return reweight(m) if args.variant == "sr" else m


def main(args: argparse.Namespace) -> None:
    info = start_run(args, "pixcon")
    device, output_dir = info.device, Path(args.output_dir)

    # ---- data: BYOL views; PixCon re-samples until >= 1% of crop 2 overlaps crop 1
    transform = byol_views(args.crop_size, min_overlap=0.01)
    loader = build_pretraining_loader(args, transform, info)
    total_steps = schedule_length(args, loader)
    global_batch = args.batch_size * info.world_size

    # ---- model: online network, momentum target (backbone + projectors), two queues
    online = PixConOnline(args.arch, args.proj_hidden, args.proj_dim, **backbone_options(args))
    if args.sync_bn:
        online = convert_sync_batchnorm(online)
    online.to(device)
    target = EMA(online.encoder, CosineMomentum(total_steps, base=args.momentum_base), buffers="none").to(device)
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
    reweight = SemanticReweighting(gamma=args.gamma)
    lam = args.dense_weight

    # ---- training loop
    online.train()
    with PreemptionHandler() as preempt:
        for epoch, (views, geoms) in step_batches(loader, step, stop_at):
            views = [v.to(device, non_blocking=True) for v in views]
            geoms = [g.to(device) for g in geoms]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                online_out = model(views)
                with torch.no_grad():
                    target_out = [encode(target.target, v) for v in views]
                neg_global, neg_dense = global_queue.negatives(), dense_queue.negatives()
                loss = torch.zeros((), device=device)
                metrics: dict[str, float] = {}
                for a, b in ((0, 1), (1, 0)):  # both directions: online view a against target view b
                    m = match(args, reweight, online_out[a]["feats"], target_out[b]["feats"], geoms[a], geoms[b])
                    l_dense = dense_loss(online_out[a]["dense_pred"], target_out[b]["dense"], m, neg_dense)
                    l_image = image_loss(online_out[a]["pred"], target_out[b]["proj"], neg_global)
                    loss = loss + lam * l_dense + (1 - lam) * l_image
                    if a == 0:
                        metrics.update(loss_dense=float(l_dense.detach()), loss_image=float(l_image.detach()),
                                       valid_fraction=float(m.valid.float().mean()),
                                       mean_weight=float(m.effective_weight.sum() / m.valid.sum().clamp_min(1)))
                        if args.variant != "coord":
                            metrics["match_within_one"] = true_cell_agreement(
                                m, geoms[a], geoms[b], tuple(online_out[a]["feats"].shape[-2:]),
                                tuple(target_out[b]["feats"].shape[-2:]))
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            # PixCon, after the optimiser step: enqueue ONE randomly chosen target view (global keys and
            # pooled dense keys; the same choice on every rank), then the momentum update.
            pick = int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(args.seed * 100003 + step)))
            global_queue.enqueue(F.normalize(target_out[pick]["proj"].float(), dim=1))
            dense_queue.enqueue(F.normalize(target_out[pick]["dense"].float().mean(dim=(2, 3)), dim=1))
            momentum = target.update(step)
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
                transform=transform, device=device, match_fn=lambda a, b, ga, gb: match(args, reweight, a, b, ga, gb),
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
