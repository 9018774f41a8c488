"""DenseSiam pre-training (PixSim + RegionSim, Zhang et al.) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/densesiam/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/densesiam/train.py                                # CPU demo, 7 x 7 grid points
    python examples/densesiam/train.py --sampling hard                # PointRend-style hard points
    torchrun --nproc_per_node=8 examples/densesiam/train.py --preset paper --data /data/imagenet/train

Method (DenseSiam, Zhang et al.; the pre-training code is not released): SimSiam style, one
network and NO momentum encoder; stop-gradient on the projections instead. Backbone + global
projector / predictor + dense projector / predictor + region heads. Two MoCo-v2-like views
(random resized crop, scale (0.2, 1), flip, colour).

* Image level: SimSiam ``0.5 D(p1, sg(z2)) + 0.5 D(p2, sg(z1))`` with ``D = -cos``.
* PixSim: ``N = 49`` image points in the overlap of the two views (a regular 7 x 7 grid, the
  paper's best; ``--sampling random|hard`` for the other strategies), mapped into both views' cell
  grids (flip-aware) and bilinearly sampled from the dense predictions ``p`` and projections
  ``z``; the same symmetric ``-cos`` per point, averaged over images whose views overlap.
* RegionSim: ``K`` soft masks (softmax over K of the region logits) pool the backbone features
  into ``K`` region embeddings per view, then a region projector and predictor; an InfoNCE among
  the K regions of the same image (positives: the same region index in the other view, tau 0.1),
  weighted by ``--region-weight`` and switched on only for the last ``1 - --region-start`` of
  training (the released code turns it on in the last 20%; it contributes weight 0 before, so every
  parameter still gets a gradient and DDP needs no unused-parameter search).

Total: ``L_image + dense_weight * L_pix + region_weight(t) * L_region`` (the relative weights of the
pre-training objective are not published; 1 / 1 / 0.1 here).

Warning: never pair this loss with a feature-similarity (argmax) matcher. Without
negatives the pair "most similar cells" is trivially satisfied and the features collapse (DenseSiam
supplementary Table A1); the positives must come from the geometry, as here.

Logged diagnostics: ``valid_fraction`` (images whose views overlap), ``mask_entropy`` (mean entropy
of the soft region masks / log K: 1 = uniform masks, 0 = hard assignments), ``regions_used`` (mean
number of regions that win at least one cell of an image), and the collapse monitors ``proj_std`` /
``dense_std`` (per-dimension std of the L2-normalised global / sampled dense projections times
sqrt(D): about 1 for spread-out outputs, 0 when collapsed; SimSiam's diagnostic).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast.backbones import build_backbone, convert_sync_batchnorm
from densecontrast.data.sampling import step_batches
from densecontrast.engine import (
    AMP_DTYPES,
    CHECKPOINT_NAME,
    DistInfo,
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
from densecontrast.eval.report import final_report, report_line
from densecontrast.heads import densesiam_heads
from densecontrast.losses.dense_simsiam import DenseSimSiamLoss, RegionSimLoss, region_embeddings
from densecontrast.losses.global_losses import NegativeCosine
from densecontrast.matching import Matches, location_match, sample_points
from densecontrast.optim import WarmupCosineScheduler, build_optimizer, scale_lr
from densecontrast.transforms import mocov2_views

PAPER = dict(  # DenseSiam paper (SimSiam recipe, reconstructed): ResNet-50, 8 x 32 = 256 images, 200 ImageNet epochs
    arch="resnet50", crop_size=224, batch_size=32, epochs=200, optimizer="sgd", lr=0.05, lr_scaling="linear",
    weight_decay=1e-4, warmup_epochs=0, proj_hidden=2048, proj_dim=2048, pred_hidden=512, region_dim=256,
    sync_bn=True, workers=8, save_every=2000,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DenseSiam pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(parser, lr=0.05, epochs=4, batch_size=32)
    g = parser.add_argument_group("densesiam")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo",
                   help="paper: the hyperparameters of the DenseSiam paper (SimSiam recipe)")
    g.add_argument("--sampling", choices=["grid", "random", "hard"], default="grid", help="PixSim point sampling")
    g.add_argument("--num-points", type=int, default=49, help="PixSim points per image (a square for grid)")
    g.add_argument("--oversample", type=float, default=3.0, help="hard sampling: candidates per point (k)")
    g.add_argument("--hard-fraction", type=float, default=0.75, help="hard sampling: fraction of hard points")
    g.add_argument("--dense-weight", type=float, default=1.0, help="weight of the PixSim loss")
    g.add_argument("--num-regions", type=int, default=8,
                   help="K soft regions (the pre-training value is not published; the segmentation variant uses 27)")
    g.add_argument("--region-weight", type=float, default=0.1, help="weight of RegionSim once switched on")
    g.add_argument("--region-start", type=float, default=0.8,
                   help="RegionSim is on from this fraction of the schedule (1: never)")
    g.add_argument("--region-temperature", type=float, default=0.1)
    g.add_argument("--proj-hidden", type=int, default=256, help="projector hidden width")
    g.add_argument("--proj-dim", type=int, default=64, help="projection dim (global and dense)")
    g.add_argument("--pred-hidden", type=int, default=32, help="predictor bottleneck width")
    g.add_argument("--region-dim", type=int, default=64, help="region projection dim")
    return parser


class DenseSiamOnline(nn.Module):
    """The only network (no momentum target): backbone, projectors, region heads and predictors."""

    def __init__(
        self, arch: str, hidden: int, dim: int, pred_hidden: int, num_regions: int, region_dim: int,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        self.backbone, channels = build_backbone(arch, **backbone_kwargs)
        heads = densesiam_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim, pred_hidden_dim=pred_hidden,
                                num_regions=num_regions, region_dim=region_dim)
        self.projector = heads["projector"]
        self.dense_projector = heads["dense_projector"]
        self.region_logits = heads["region_logits"]
        self.region_projector = heads["region_projector"]
        self.predictor = heads["predictor"]
        self.dense_predictor = heads["dense_predictor"]
        self.region_predictor = heads["region_predictor"]

    def forward(self, views: list[Tensor]) -> list[dict[str, Tensor]]:
        outs = []
        for v in views:
            feats = self.backbone(v)
            z = self.projector(feats.mean(dim=(2, 3)))
            dense_z = self.dense_projector(feats)
            logits = self.region_logits(feats)
            regions = region_embeddings(logits, feats)  # (B, K, C), float32
            b, k, c = regions.shape
            region_z = self.region_projector(regions.reshape(b * k, c))
            region_p = self.region_predictor(region_z)
            outs.append({
                "feats": feats, "z": z, "p": self.predictor(z), "dense_z": dense_z,
                "dense_p": self.dense_predictor(dense_z), "region_logits": logits,
                "region_z": region_z.reshape(b, k, -1), "region_p": region_p.reshape(b, k, -1),
            })
        return outs


def match(args: argparse.Namespace, info: DistInfo, g1, g2, shape1: tuple[int, int], shape2: tuple[int, int],
          step: int, emb1: Tensor | None = None, emb2: Tensor | None = None) -> Matches:
    """PixSim's points: ``--num-points`` image points in the overlap of views 1 and 2, in both cell grids."""
    gen = None
    if args.sampling != "grid":  # a pure function of (seed, rank, step): identical after a resume
        gen = torch.Generator(device=info.device)
        gen.manual_seed((args.seed * 1_000_003 + info.rank) * 1_000_003 + step)
    return location_match(g1, g2, args.num_points, args.sampling, shape1, shape2, oversample=args.oversample,
                          hard_fraction=args.hard_fraction, query_embeddings=emb1, key_embeddings=emb2,
                          generator=gen)


@torch.no_grad()
def spread(x: Tensor) -> float:
    """SimSiam collapse monitor: per-dimension std of L2-normalised rows ``(n, D)`` times ``sqrt(D)``."""
    x = F.normalize(x.detach().float().reshape(-1, x.shape[-1]), dim=1)
    return float(x.std(dim=0).mean() * math.sqrt(x.shape[1])) if x.shape[0] > 1 else 0.0


@torch.no_grad()
def mask_statistics(logits: Tensor) -> tuple[float, float]:
    """Mean entropy / log K of the soft masks and mean number of regions winning a cell, per image."""
    k = logits.shape[1]
    masks = torch.softmax(logits.detach().float(), dim=1)
    entropy = -(masks * masks.clamp_min(1e-12).log()).sum(dim=1).mean() / math.log(k) if k > 1 else masks.new_zeros(())
    winners = F.one_hot(masks.argmax(dim=1), k).amax(dim=(1, 2))  # (B, K): region wins some cell
    return float(entropy), float(winners.sum(dim=1).float().mean())


def main(args: argparse.Namespace) -> None:
    info = start_run(args, "densesiam")
    device, output_dir = info.device, Path(args.output_dir)

    # ---- data: MoCo v2 views, random resized crop scale (0.2, 1), flip, MoCo v2 colour
    transform = mocov2_views(args.crop_size)
    loader = build_pretraining_loader(args, transform, info)
    total_steps = schedule_length(args, loader)
    global_batch = args.batch_size * info.world_size

    # ---- model: one network; no momentum target, no queue (stop-gradient on the projections instead)
    online = DenseSiamOnline(args.arch, args.proj_hidden, args.proj_dim, args.pred_hidden, args.num_regions,
                             args.region_dim, **backbone_options(args))
    if args.sync_bn:
        online = convert_sync_batchnorm(online)
    online.to(device)
    model = wrap_ddp(online, info)

    # ---- optimiser, LR schedule, AMP
    lr = scale_lr(args.lr, global_batch) if args.lr_scaling == "linear" else args.lr
    optimizer = build_optimizer(online, args.optimizer, lr, args.weight_decay)
    warmup = min(int(args.warmup_epochs * loader.sampler.batches_per_epoch), total_steps - 1)
    scheduler = WarmupCosineScheduler(optimizer, total_steps, warmup_steps=max(warmup, 0), warmup_start_ratio=1e-4)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume
    state = {"model": online, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
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

    image_loss = NegativeCosine()
    pix_loss = DenseSimSiamLoss()
    region_loss = RegionSimLoss(temperature=args.region_temperature)
    region_from = math.ceil(args.region_start * total_steps)  # RegionSim is switched on from this step

    # ---- training loop
    online.train()
    with PreemptionHandler() as preempt:
        for epoch, (views, geoms) in step_batches(loader, step, stop_at):
            views = [v.to(device, non_blocking=True) for v in views]
            g1, g2 = (g.to(device) for g in geoms)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                o1, o2 = model(views)
                hard = args.sampling == "hard"  # hard points are chosen on the (detached) dense projections
                m = match(args, info, g1, g2, tuple(o1["dense_z"].shape[-2:]), tuple(o2["dense_z"].shape[-2:]), step,
                          o1["dense_z"].detach() if hard else None, o2["dense_z"].detach() if hard else None)
                p1, z1 = sample_points(o1["dense_p"], m.query_points), sample_points(o1["dense_z"], m.query_points)
                p2, z2 = sample_points(o2["dense_p"], m.key_points), sample_points(o2["dense_z"], m.key_points)
                l_pix = pix_loss(p1, z2, p2, z1, m.valid)  # stop-gradient on z inside
                l_image = 0.5 * (image_loss(o1["p"], o2["z"]) + image_loss(o2["p"], o1["z"]))
                l_region = region_loss(o1["region_p"], o2["region_z"], o2["region_p"], o1["region_z"])
                w_region = args.region_weight if step >= region_from else 0.0  # weight 0 keeps DDP's graph complete
                loss = l_image + args.dense_weight * l_pix + w_region * l_region
                entropy, used = mask_statistics(o1["region_logits"])
                metrics = {
                    "loss_image": float(l_image.detach()),
                    "loss_pix": float(l_pix.detach()),
                    "loss_region": float(l_region.detach()),
                    "region_weight": w_region,
                    "valid_fraction": float(m.valid[:, 0].float().mean()),
                    "mask_entropy": entropy,
                    "regions_used": used,
                    "proj_std": spread(o1["z"]),
                    "dense_std": spread(z1[m.valid]),
                }
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1

            skipped = skipped_images(loader)
            log.step(step, {"loss": loss, "lr": optimizer.param_groups[0]["lr"], **metrics,
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
    backbone = online.backbone
    if step >= total_steps:
        export_backbone(backbone, output_dir / "backbone.pth", arch=args.arch, verify=args.arch != "tiny")
        if info.is_main and not args.no_eval:
            # the match picture shows the regular PixSim grid (the largest square number <= --num-points)
            report = final_report(
                backbone, output_dir=output_dir, steps=step, final_loss=log.last.get("loss", float("nan")),
                transform=transform, device=device,
                match_fn=lambda a, b, ga, gb: location_match(
                    ga, gb, math.isqrt(args.num_points) ** 2, "grid", tuple(a.shape[-2:]), tuple(b.shape[-2:])),
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
