"""PixCon pre-training (PixCon-Coord, PixCon-Sim, PixCon-SR) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/pixcon/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/pixcon/train.py                                   # CPU demo, PixCon-SR
    python examples/pixcon/train.py --variant coord                   # PixCon-Coord
    torchrun --nproc_per_node=8 examples/pixcon/train.py --preset paper --data /data/coco/train2017

Method (spec: PixCon, Pang et al.): online backbone + global / dense projectors + predictors,
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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast.ema import MomentumEncoder
from densecontrast.engine import build_backbone, convert_sync_batchnorm
from densecontrast.engine.report import final_report, true_cell_agreement
from densecontrast.engine.trainer import (
    StepOutput,
    Trainer,
    add_common_args,
    build_pretraining_loader,
    parse_with_presets,
    schedule_length,
    start_run,
)
from densecontrast.heads import pixcon_heads
from densecontrast.losses.dense_infonce import DenseInfoNCE
from densecontrast.losses.global_losses import InfoNCE
from densecontrast.matching import Matches, nearest_coordinate_match, similarity_match
from densecontrast.queue import MomentumQueue
from densecontrast.schedules import CosineMomentum
from densecontrast.transforms import byol_views
from densecontrast.weighting import SemanticReweighting

PAPER = dict(  # spec §1.6 / §9: ResNet-50, 4 x 128 images, 800 COCO epochs, SGD 0.4, warm-up 4 epochs
    arch="resnet50", crop_size=224, batch_size=128, epochs=800, optimizer="sgd", lr=0.4, lr_scaling="none",
    weight_decay=1e-4, warmup_epochs=4, queue_size=65536, temperature=0.2, momentum_base=0.99, amp="fp16",
    proj_hidden=2048, proj_dim=128, sync_bn=True, workers=8, save_every=2000,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PixCon pre-training", add_help=True)
    add_common_args(parser, lr=0.05, epochs=4, batch_size=32)
    g = parser.add_argument_group("pixcon")
    g.add_argument("--variant", choices=["coord", "sim", "sr"], default="sr", help="matching / reweighting variant")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo", help="paper: hyperparameters of spec §9")
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

    def __init__(self, arch: str, hidden: int, dim: int) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch)
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


def main(args: argparse.Namespace) -> None:
    dist_info = start_run(args, "pixcon")

    transform = byol_views(args.crop_size, min_overlap=0.01)  # PixCon: >= 1% of crop 2 overlaps crop 1
    loader, dataset, sampler = build_pretraining_loader(args, transform, dist_info)

    online = PixConOnline(args.arch, args.proj_hidden, args.proj_dim)
    if args.sync_bn:
        online = convert_sync_batchnorm(online)
    ascending = CosineMomentum(schedule_length(args, sampler), base=args.momentum_base)  # up to 1 at the end
    target = MomentumEncoder(online.encoder, ascending, buffers="none")
    global_queue = MomentumQueue(args.proj_dim, args.queue_size, seed=args.seed)
    dense_queue = MomentumQueue(args.proj_dim, args.queue_size, seed=args.seed + 1)
    trainer = Trainer(
        args, online, {"target": target, "global_queue": global_queue, "dense_queue": dense_queue},
        dist_info, loader, dataset, sampler,
    )
    trainer.maybe_resume()

    dense_loss = DenseInfoNCE(temperature=args.temperature)
    image_loss = InfoNCE(temperature=args.temperature)
    reweight = SemanticReweighting(gamma=args.gamma)
    lam = args.dense_weight
    pending: dict[str, Tensor] = {}

    def match(a: dict[str, Tensor], b: dict[str, Tensor], ga, gb) -> Matches:
        shape = tuple(a["feats"].shape[-2:])
        if args.variant == "coord":
            return nearest_coordinate_match(ga, gb, shape, tuple(b["feats"].shape[-2:]))
        m = similarity_match(a["feats"].detach(), b["feats"], query_geometry=ga, key_geometry=gb,
                             query_shape=shape, key_shape=tuple(b["feats"].shape[-2:]))
        return reweight(m) if args.variant == "sr" else m

    def step_fn(batch, step: int) -> StepOutput:
        views, geoms = batch
        views = [v.to(trainer.device, non_blocking=True) for v in views]
        geoms = [g.to(trainer.device) for g in geoms]
        online_out = trainer.ddp(views)
        with torch.no_grad():
            target_out = [encode(target.target, v) for v in views]
        neg_global, neg_dense = global_queue.negatives(), dense_queue.negatives()
        total = torch.zeros((), device=trainer.device)
        metrics: dict[str, float] = {}
        for a, b in ((0, 1), (1, 0)):
            m = match(online_out[a], target_out[b], geoms[a], geoms[b])
            l_dense = dense_loss(online_out[a]["dense_pred"], target_out[b]["dense"], m, neg_dense)
            l_image = image_loss(online_out[a]["pred"], target_out[b]["proj"], neg_global)
            total = total + lam * l_dense + (1 - lam) * l_image
            if a == 0:
                metrics["loss_dense"] = float(l_dense.detach())
                metrics["loss_image"] = float(l_image.detach())
                metrics["valid_fraction"] = float(m.valid.float().mean())
                metrics["mean_weight"] = float(m.effective_weight.sum() / m.valid.sum().clamp_min(1))
                if args.variant != "coord":
                    metrics["match_within_one"] = true_cell_agreement(m, geoms[a], geoms[b],
                                                                      tuple(online_out[a]["feats"].shape[-2:]),
                                                                      tuple(target_out[b]["feats"].shape[-2:]))
        # PixCon enqueues one randomly chosen target view per step (same choice on every rank).
        pick = int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(args.seed * 100003 + step)))
        pending["global"] = F.normalize(target_out[pick]["proj"].float(), dim=1)
        pending["dense"] = F.normalize(target_out[pick]["dense"].float().mean(dim=(2, 3)), dim=1)
        return StepOutput(total, metrics)

    def after_step(step: int) -> dict[str, float]:
        global_queue.enqueue(pending.pop("global"))
        dense_queue.enqueue(pending.pop("dense"))
        m = target.update(step)  # PixCon: momentum update after the optimiser step
        return {"momentum": m}

    trainer.fit(step_fn, after_step)
    trainer.export(online.encoder["backbone"])  # backbone.pth, for fine-tuning
    if not trainer.stopped_by_signal and not args.no_eval:
        final_report(trainer, online.encoder["backbone"], transform, lambda a, b, ga, gb: match(
            {"feats": a}, {"feats": b}, ga, gb))
    trainer.close()


if __name__ == "__main__":
    main(parse_with_presets(get_args_parser(), {"paper": PAPER}))
