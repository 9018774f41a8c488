"""PixPro pre-training (Xie et al., pixel-to-propagation consistency; PixContrast) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/pixpro/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/pixpro/train.py                                   # CPU demo, PixPro loss
    python examples/pixpro/train.py --loss pixcontrast                # PixContrast (tau = 0.3)
    python examples/pixpro/train.py --instance-weight 1.0             # + the instance branch
    torchrun --nproc_per_node=8 examples/pixpro/train.py --preset paper --data /data/imagenet/train

Method (spec: PixPro): online backbone + dense projector (Conv-BN-ReLU-Conv) + pixel propagation
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

import torch
from torch import Tensor, nn

from densecontrast.ema import MomentumEncoder
from densecontrast.engine import build_backbone, convert_sync_batchnorm
from densecontrast.engine.report import final_report
from densecontrast.engine.trainer import (
    StepOutput,
    Trainer,
    add_common_args,
    build_pretraining_loader,
    parse_with_presets,
    schedule_length,
    start_run,
)
from densecontrast.heads import pixpro_heads
from densecontrast.losses.global_losses import negative_cosine
from densecontrast.losses.pixcontrast import PixContrastLoss
from densecontrast.losses.pixpro import PixProConsistencyLoss
from densecontrast.matching import coordinate_match
from densecontrast.schedules import CosineMomentum
from densecontrast.transforms import byol_views

PAPER = dict(  # spec §3.6 / §9: ResNet-50, 8 x 128 images, 400 ImageNet epochs, LARS base lr 1.0 x B/256
    arch="resnet50", crop_size=224, batch_size=128, epochs=400, optimizer="lars", lr=1.0, lr_scaling="linear",
    weight_decay=1e-5, warmup_epochs=5.0, momentum_base=0.99, amp="fp16", proj_hidden=4096, proj_dim=256,
    gamma=2.0, transform_layers=1, threshold=0.7, sync_bn=True, workers=8, save_every=2000,
)  # --loss and --instance-weight are not part of the preset: combine them freely with it


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PixPro pre-training", add_help=True)
    add_common_args(parser, lr=0.05, epochs=4, batch_size=32)
    g = parser.add_argument_group("pixpro")
    g.add_argument("--loss", choices=["pixpro", "pixcontrast"], default="pixpro",
                   help="pixpro: PPM consistency loss; pixcontrast: multi-positive InfoNCE")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo", help="paper: hyperparameters of spec §9")
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
        backbone, channels = build_backbone(args.arch)
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
    dist_info = start_run(args, "pixpro")
    if args.loss == "pixpro":
        print("note: the PixPro loss lies in [-4, 4] (two directions of -2 x mean cosine); negative values are "
              "normal, it usually settles around -2 to -3")

    transform = byol_views(args.crop_size)  # PixPro: BYOL views, scale (0.08, 1), no overlap constraint
    loader, dataset, sampler = build_pretraining_loader(args, transform, dist_info)

    instance = args.instance_weight > 0
    online = PixProOnline(args, use_ppm=args.loss == "pixpro", instance=instance)
    if args.sync_bn:
        online = convert_sync_batchnorm(online)
    ascending = CosineMomentum(schedule_length(args, sampler), base=args.momentum_base)  # up to 1 at the end
    target = MomentumEncoder(online.encoder, ascending, buffers="none")
    trainer = Trainer(args, online, {"target": target}, dist_info, loader, dataset, sampler)
    trainer.maybe_resume()

    pixpro_loss = PixProConsistencyLoss()
    pixcontrast_loss = PixContrastLoss(temperature=args.temperature)

    def step_fn(batch, step: int) -> StepOutput:
        views, geoms = batch
        views = [v.to(trainer.device, non_blocking=True) for v in views]
        geoms = [g.to(trainer.device) for g in geoms]
        # PixPro: the momentum update runs at the start of the step, BEFORE the keys are computed
        # (PixCon updates after the optimiser step): step t's keys use m_t (m_0 = 0.99 is a no-op).
        momentum = target.update(step)
        online_out = trainer.ddp(views)
        with torch.no_grad():
            target_out = [encode(target.target, v) for v in views]
        dense = torch.zeros((), device=trainer.device)
        metrics: dict[str, float] = {"momentum": momentum}
        for a, b in ((0, 1), (1, 0)):
            m = coordinate_match(geoms[a], geoms[b], tuple(online_out[a]["feats"].shape[-2:]),
                                 tuple(target_out[b]["feats"].shape[-2:]), threshold=args.threshold)
            if args.loss == "pixpro":  # sum over the two directions, as released: range [-4, 4]
                dense = dense + pixpro_loss(online_out[a]["prop"], target_out[b]["dense"], m)
            else:  # PixContrast: mean over the two directions
                dense = dense + 0.5 * pixcontrast_loss(online_out[a]["dense"], target_out[b]["dense"], m)
            if a == 0:
                assert m.key_mask is not None
                n_valid = m.valid.sum()
                metrics["valid_fraction"] = float(m.valid.float().mean())
                metrics["mean_positives"] = float((m.key_mask & m.valid[..., None]).sum() / n_valid.clamp_min(1))
        metrics[f"loss_{args.loss}"] = float(dense.detach())
        total = dense
        if instance:  # BYOL-style -2 cos of the pooled instance prediction vs the pooled target projection
            inst = sum(2.0 * negative_cosine(online_out[a]["instance_pred"], target_out[b]["instance"].mean(dim=(2, 3)))
                       for a, b in ((0, 1), (1, 0)))
            metrics["loss_instance"] = float(inst.detach())
            total = total + args.instance_weight * inst
        return StepOutput(total, metrics)

    trainer.fit(step_fn)
    trainer.export(online.encoder["backbone"])  # backbone.pth, for fine-tuning
    if not trainer.stopped_by_signal and not args.no_eval:
        # the match picture shows the nearest coordinate match (default of final_report)
        final_report(trainer, online.encoder["backbone"], transform)
    trainer.close()


if __name__ == "__main__":
    main(parse_with_presets(get_args_parser(), {"paper": PAPER}))
