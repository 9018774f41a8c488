"""PixPro pre-training (Xie et al., pixel-to-propagation consistency; PixContrast) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/pixpro/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/pixpro/train.py                                   # CPU demo, PixPro loss
    python examples/pixpro/train.py --loss pixcontrast                # PixContrast (tau = 0.3)
    python examples/pixpro/train.py --instance-weight 1.0             # + the instance branch
    torchrun --nproc_per_node=8 examples/pixpro/train.py --preset paper --data /data/imagenet/train

Method (PixPro, Xie et al.): online backbone + dense projector (Conv-BN-ReLU-Conv) + pixel propagation
module (PPM: ``y_i = sum_j max(cos(x_i, x_j), 0)^gamma g(x_j)``, gamma = 2, ``g`` one 1x1 conv);
momentum target (backbone + dense projector [+ instance projector]) with momentum ascending
0.99 -> 1 (cosine), updated at the start of each step before the keys are computed. Positives:
per direction a -> b, every key cell of view b whose image-space center lies within 0.7 bin
diagonals of the query cell's center (coordinate matching, several positives per query).
Loss ``pixpro``: ``-2 x`` the mean cosine between the propagated online features of view a and the
target projections of view b over all positive pairs of each image, summed over both directions,
so it lies in ``[-4, 4]`` and **negative values are normal** (it settles around -2 to -3).
Loss ``pixcontrast``: multi-positive InfoNCE between the online dense projections of view a
(no PPM) and the target dense projections of view b, the other cells of view b being the
negatives (tau = 0.3), averaged over the two directions. Optional instance branch
(``--instance-weight > 0``; 0 in the released script, 1 in the paper): instance projector +
predictor per pixel, mean-pooled, BYOL-style ``-2 cos`` against the pooled target instance
projection, symmetric. Augmentation: BYOL's asymmetric views, random resized crop scale
(0.08, 1); crops that do not overlap contribute 0 to the loss (as in PixPro).
The paper preset uses LARS with base lr 1.0 per 256 images (``--lr-scaling linear``), wd 1e-5,
5 warm-up epochs, fp16 autocast and SyncBN.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
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
from densecontrast.eval.report import final_report, report_line
from densecontrast.heads import pixpro_heads
from densecontrast.losses.global_losses import negative_cosine
from densecontrast.losses.pixcontrast import PixContrastLoss
from densecontrast.losses.pixpro import PixProConsistencyLoss
from densecontrast.matching import coordinate_match
from densecontrast.optim import WarmupCosineScheduler, build_optimizer, scale_lr
from densecontrast.schedules import CosineMomentum
from densecontrast.transforms import byol_views

PAPER = dict(  # PixPro paper: ResNet-50, 8 x 128 images, 400 ImageNet epochs, LARS base lr 1.0 x B/256
    arch="resnet50", crop_size=224, batch_size=128, epochs=400, optimizer="lars", lr=1.0, lr_scaling="linear",
    weight_decay=1e-5, warmup_epochs=5.0, momentum_base=0.99, amp="fp16", proj_hidden=4096, proj_dim=256,
    gamma=2.0, transform_layers=1, threshold=0.7, sync_bn=True, workers=8, save_every=2000,
)  # --loss and --instance-weight are not part of the preset: combine them freely with it


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="PixPro pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(parser, lr=0.05, epochs=4, batch_size=32)
    g = parser.add_argument_group("pixpro")
    g.add_argument("--loss", choices=["pixpro", "pixcontrast"], default="pixpro",
                   help="pixpro: PPM consistency loss; pixcontrast: multi-positive InfoNCE")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo",
                   help="paper: the hyperparameters of the PixPro paper")
    g.add_argument("--threshold", type=float, default=0.7, help="positive radius in bin diagonals (T)")
    g.add_argument("--gamma", type=float, default=2.0, help="PPM sharpness exponent")
    g.add_argument("--transform-layers", type=int, choices=[0, 1, 2], default=1, help="depth of the PPM transform g")
    g.add_argument("--temperature", type=float, default=0.3, help="PixContrast temperature")
    g.add_argument("--instance-weight", type=float, default=0.0,
                   help="weight of the instance branch (0: off, the released script; paper: 1)")
    g.add_argument("--momentum-base", type=float, default=0.99, help="momentum ascending from this value to 1")
    g.add_argument("--proj-hidden", type=int, default=256)
    g.add_argument("--proj-dim", type=int, default=64)
    return parser


class PixProOnline(nn.Module):
    """Online network: ``encoder`` (backbone + projectors, copied by the target), PPM and instance predictor."""

    def __init__(self, args: argparse.Namespace, use_ppm: bool, instance: bool) -> None:
        super().__init__()
        backbone, channels = build_backbone(args.arch, **backbone_options(args))
        heads = pixpro_heads(in_dim=channels, hidden_dim=args.proj_hidden, out_dim=args.proj_dim, gamma=args.gamma,
                             transform_layers=args.transform_layers, instance=instance)
        encoder = {"backbone": backbone, "dense_projector": heads["dense_projector"]}
        if instance:
            encoder["instance_projector"] = heads["instance_projector"]
        self.encoder = nn.ModuleDict(encoder)
        # Only modules the loss uses are built: DDP requires every parameter to receive a gradient.
        self.ppm = heads["ppm"] if use_ppm else None
        self.instance_predictor = heads["instance_predictor"] if instance else None

    def forward(self, views: list[Tensor]) -> list[dict[str, Tensor]]:
        outs = []
        for v in views:
            enc = encode(self.encoder, v)
            if self.ppm is not None:
                enc["prop"] = self.ppm(enc["dense"])
            if self.instance_predictor is not None:  # predictor per pixel, then mean-pooled
                enc["instance_pred"] = self.instance_predictor(enc["instance"]).mean(dim=(2, 3))
            outs.append(enc)
        return outs


def encode(encoder: nn.ModuleDict, view: Tensor) -> dict[str, Tensor]:
    """Backbone features (B, C, h, w), dense projection (B, D, h, w) [and per-pixel instance projection]."""
    feats = encoder["backbone"](view)
    out = {"feats": feats, "dense": encoder["dense_projector"](feats)}
    if "instance_projector" in encoder:
        out["instance"] = encoder["instance_projector"](feats)
    return out


def main(args: argparse.Namespace) -> None:
    info = start_run(args, "pixpro")
    device, output_dir = info.device, Path(args.output_dir)

    # ---- data: BYOL views, scale (0.08, 1), no overlap constraint
    transform = byol_views(args.crop_size)
    loader = build_pretraining_loader(args, transform, info)
    total_steps = schedule_length(args, loader)
    global_batch = args.batch_size * info.world_size

    # ---- model: online network, momentum target (backbone + projectors); no queue
    instance = args.instance_weight > 0
    online = PixProOnline(args, use_ppm=args.loss == "pixpro", instance=instance)
    if args.sync_bn:
        online = convert_sync_batchnorm(online)
    online.to(device)
    target = EMA(online.encoder, CosineMomentum(total_steps, base=args.momentum_base), buffers="none").to(device)
    model = wrap_ddp(online, info, target)

    # ---- optimiser, LR schedule, AMP
    lr = scale_lr(args.lr, global_batch) if args.lr_scaling == "linear" else args.lr
    optimizer = build_optimizer(online, args.optimizer, lr, args.weight_decay)
    warmup = min(int(args.warmup_epochs * loader.sampler.batches_per_epoch), total_steps - 1)
    scheduler = WarmupCosineScheduler(optimizer, total_steps, warmup_steps=max(warmup, 0), warmup_start_ratio=1e-4)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume
    state = {"model": online, "target": target, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
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
    if args.loss == "pixpro":
        log.print("note: the PixPro loss lies in [-4, 4] (two directions of -2 x mean cosine); negative values "
                  "are normal, it usually settles around -2 to -3")

    pixpro_loss = PixProConsistencyLoss()
    pixcontrast_loss = PixContrastLoss(temperature=args.temperature)

    # ---- training loop
    online.train()
    with PreemptionHandler() as preempt:
        for epoch, (views, geoms) in step_batches(loader, step, stop_at):
            views = [v.to(device, non_blocking=True) for v in views]
            geoms = [g.to(device) for g in geoms]

            # PixPro: the momentum update runs at the start of the step, BEFORE the keys are computed
            # (PixCon updates after the optimiser step): step t's keys use m_t (m_0 = 0.99 is a no-op).
            momentum = target.update(step)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                online_out = model(views)
                with torch.no_grad():
                    target_out = [encode(target.target, v) for v in views]
                dense = torch.zeros((), device=device)
                metrics: dict[str, float] = {}
                for a, b in ((0, 1), (1, 0)):  # both directions: online view a against target view b
                    m = coordinate_match(geoms[a], geoms[b], tuple(online_out[a]["feats"].shape[-2:]),
                                         tuple(target_out[b]["feats"].shape[-2:]), threshold=args.threshold)
                    if args.loss == "pixpro":  # sum over the two directions, as released: range [-4, 4]
                        dense = dense + pixpro_loss(online_out[a]["prop"], target_out[b]["dense"], m)
                    else:  # PixContrast: mean over the two directions
                        dense = dense + 0.5 * pixcontrast_loss(online_out[a]["dense"], target_out[b]["dense"], m)
                    if a == 0:
                        assert m.key_mask is not None
                        n_valid = m.valid.sum()
                        metrics.update(valid_fraction=float(m.valid.float().mean()), mean_positives=float(
                            (m.key_mask & m.valid[..., None]).sum() / n_valid.clamp_min(1)))
                metrics[f"loss_{args.loss}"] = float(dense.detach())
                loss = dense
                if instance:  # BYOL-style -2 cos of the pooled instance prediction vs the pooled target projection
                    inst = sum(2.0 * negative_cosine(online_out[a]["instance_pred"],
                                                     target_out[b]["instance"].mean(dim=(2, 3)))
                               for a, b in ((0, 1), (1, 0)))
                    metrics["loss_instance"] = float(inst.detach())
                    loss = loss + args.instance_weight * inst
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
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
            # the match picture shows the nearest coordinate match (the default of final_report)
            report = final_report(
                backbone, output_dir=output_dir, steps=step, final_loss=log.last.get("loss", float("nan")),
                transform=transform, device=device,
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
