"""LC-loss pre-training (BYOL + local contrastive loss, Islam et al.) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/lcloss/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/lcloss/train.py                                   # CPU demo
    python examples/lcloss/train.py --lc-temperature 0.2 --alpha 0.3  # other local-loss settings
    torchrun --nproc_per_node=16 examples/lcloss/train.py --preset paper --data /data/imagenet/train

Method (LC-loss, Islam et al.; no official code): two views of each image, ``I_c`` (view 0:
the whole image resized, colour transforms only) and ``I_sc`` (view 1: random resized crop + flip +
colour). Online backbone + BYOL projector / predictor + local (dense) projector; momentum target
(backbone + projector + local projector) with momentum ascending 0.996 -> 1, updated after the
optimiser step. Global loss: BYOL ``2 - 2 cos`` of the online prediction of each view against the
target projection of the other, averaged over the two directions (BYOL's symmetrisation; averaged
so that ``L_G`` keeps the scale of the paper's one-direction Eq. 1). Local loss: every cell of
``I_c``'s grid is a query (TARGET local features, no gradient); its analytic correspondence in
``I_sc`` is a continuous point of ``I_sc``'s cell grid; the loss is the NLL of a softmax over all
cells of ``I_sc`` (ONLINE local features, cosine / tau), bilinearly interpolated at that point
(``correspondence_match`` + ``LocalContrastiveLoss``). Total ``(1 - alpha) L_G + alpha L_LC``,
alpha = 0.1. The paper gives no value for tau: ``--lc-temperature`` defaults to 0.1 (a guess).

Logged diagnostics: ``valid_fraction`` (I_c cells that fall inside I_sc) and ``match_within_one``
(the argmax of the target-I_c / online-I_sc local similarity lands within one cell of the true
correspondence: how well the local features already localise).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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
from densecontrast.eval.report import final_report, report_line, true_cell_agreement
from densecontrast.heads import lc_heads
from densecontrast.losses.global_losses import BYOLLoss
from densecontrast.losses.local_contrastive import LocalContrastiveLoss
from densecontrast.matching import Matches, correspondence_match, similarity_match
from densecontrast.optim import WarmupCosineScheduler, build_optimizer, scale_lr
from densecontrast.schedules import CosineMomentum
from densecontrast.transforms import lc_views

PAPER = dict(  # LC-loss paper: ResNet-50, 16 x 256 images, 400 ImageNet epochs, LARS 0.3 x B/256, fp16
    arch="resnet50", crop_size=224, batch_size=256, epochs=400, optimizer="lars", lr=0.3, lr_scaling="linear",
    weight_decay=1e-6, warmup_epochs=10, momentum_base=0.996, amp="fp16", alpha=0.1,
    proj_hidden=4096, proj_dim=256, dense_hidden=2048, dense_dim=256,
    sync_bn=True, workers=8, save_every=2000,  # sync_bn: BYOL's cross-replica BatchNorm
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LC-loss pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(parser, lr=0.05, epochs=4, batch_size=32)
    g = parser.add_argument_group("lcloss")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo",
                   help="paper: the hyperparameters of the LC-loss paper")
    g.add_argument("--alpha", type=float, default=0.1, help="weight of the local loss: (1 - a) L_G + a L_LC")
    g.add_argument("--lc-temperature", type=float, default=0.1,
                   help="tau of the local softmax (not given in the paper; 0.1 to 0.2 are reasonable)")
    g.add_argument("--scale-min", type=float, default=0.08, help="smallest crop area of I_sc (BYOL: 0.08)")
    g.add_argument("--momentum-base", type=float, default=0.996, help="momentum ascending from this value to 1")
    g.add_argument("--proj-hidden", type=int, default=256, help="BYOL projector / predictor hidden width")
    g.add_argument("--proj-dim", type=int, default=64, help="BYOL projection dim")
    g.add_argument("--dense-hidden", type=int, default=256, help="local head hidden channels")
    g.add_argument("--dense-dim", type=int, default=64, help="local head output channels")
    return parser


class LCOnline(nn.Module):
    """Online network: ``encoder`` (backbone + projector + local projector, copied by the target) and predictor."""

    def __init__(
        self, arch: str, hidden: int, dim: int, dense_hidden: int, dense_dim: int, **backbone_kwargs: Any
    ) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch, **backbone_kwargs)
        heads = lc_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim, dense_hidden_dim=dense_hidden,
                         dense_out_dim=dense_dim)
        self.encoder = nn.ModuleDict(
            {"backbone": backbone, "projector": heads["projector"], "dense_projector": heads["dense_projector"]}
        )
        self.predictor = heads["predictor"]

    def forward(self, views: list[Tensor]) -> list[dict[str, Tensor]]:
        # The online local features are only used on I_sc (view 1); I_c's would be dead weight.
        outs = []
        for i, v in enumerate(views):
            enc = encode(self.encoder, v, dense=i == 1)
            enc["pred"] = self.predictor(enc["proj"])
            outs.append(enc)
        return outs


def encode(encoder: nn.ModuleDict, view: Tensor, dense: bool) -> dict[str, Tensor]:
    """Backbone features (B, C, h, w), projection (B, D) and, if ``dense``, local features (B, D', h, w)."""
    feats = encoder["backbone"](view)
    out = {"feats": feats, "proj": encoder["projector"](feats.mean(dim=(2, 3)))}
    if dense:
        out["dense"] = encoder["dense_projector"](feats)
    return out


def match(a: Tensor, b: Tensor, ga, gb) -> Matches:
    """LC-loss's positives: the analytic correspondence of each cell of ``a`` (I_c) in ``b``'s (I_sc) cell grid."""
    return correspondence_match(ga, gb, tuple(a.shape[-2:]), tuple(b.shape[-2:]))


def main(args: argparse.Namespace) -> None:
    info = start_run(args, "lcloss")
    device, output_dir = info.device, Path(args.output_dir)

    # ---- data: view 0 = I_c (whole image, colour only), view 1 = I_sc (random resized crop + flip + colour)
    transform = lc_views(args.crop_size, scale=(args.scale_min, 1.0))
    loader = build_pretraining_loader(args, transform, info)
    total_steps = schedule_length(args, loader)
    global_batch = args.batch_size * info.world_size

    # ---- model: online network, momentum target (backbone + projector + local projector); no queue
    online = LCOnline(args.arch, args.proj_hidden, args.proj_dim, args.dense_hidden, args.dense_dim,
                      **backbone_options(args))
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

    global_loss = BYOLLoss()
    local_loss = LocalContrastiveLoss(temperature=args.lc_temperature)
    alpha = args.alpha

    # ---- training loop
    online.train()
    with PreemptionHandler() as preempt:
        for epoch, (views, geoms) in step_batches(loader, step, stop_at):
            views = [v.to(device, non_blocking=True) for v in views]
            g_c, g_sc = (g.to(device) for g in geoms)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                online_out = model(views)
                with torch.no_grad():  # target local features only for I_c (the queries)
                    target_out = [encode(target.target, v, dense=i == 0) for i, v in enumerate(views)]
                # BYOL, symmetrised and averaged: each view's online prediction vs the other's target projection
                l_global = 0.5 * (global_loss(online_out[0]["pred"], target_out[1]["proj"])
                                  + global_loss(online_out[1]["pred"], target_out[0]["proj"]))
                query, key = target_out[0]["dense"], online_out[1]["dense"]  # target I_c (no grad), online I_sc
                shape_c, shape_sc = tuple(query.shape[-2:]), tuple(key.shape[-2:])
                m = match(query, key, g_c, g_sc)
                l_local = local_loss(query, key, m)
                loss = (1 - alpha) * l_global + alpha * l_local
                with torch.no_grad():
                    sim = similarity_match(query, key.detach(), query_geometry=g_c, key_geometry=g_sc)
                metrics = {
                    "loss_global": float(l_global.detach()),
                    "loss_local": float(l_local.detach()),
                    "valid_fraction": float(m.valid.float().mean()),
                    "match_within_one": true_cell_agreement(sim, g_c, g_sc, shape_c, shape_sc),
                }
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            # BYOL / LC-loss: the momentum update after the optimiser step.
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
