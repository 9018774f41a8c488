"""DenseCL pre-training (Wang et al., dense contrastive learning) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/densecl/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/densecl/train.py                                  # CPU demo
    python examples/densecl/train.py --dense-warmup-steps 1000        # lambda = 0 for the first steps
    torchrun --nproc_per_node=8 examples/densecl/train.py --preset paper --data /data/coco/train2017

Method (spec: DenseCL): online backbone + global / dense projectors **without BatchNorm**, a
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
    start_run,
)
from densecontrast.heads import densecl_heads
from densecontrast.losses.dense_infonce import DenseInfoNCE
from densecontrast.losses.global_losses import InfoNCE
from densecontrast.matching import Matches, similarity_match
from densecontrast.queue import MomentumQueue
from densecontrast.schedules import constant_momentum
from densecontrast.transforms import mocov2_views

PAPER = dict(  # spec §2 / §9: ResNet-50, 8 x 32 images, 800 COCO epochs, SGD 0.3, no warm-up, fp32
    arch="resnet50", crop_size=224, batch_size=32, epochs=800, optimizer="sgd", lr=0.3, lr_scaling="none",
    weight_decay=1e-4, warmup_epochs=0.0, queue_size=65536, temperature=0.2, momentum=0.999, amp="none",
    proj_hidden=2048, proj_dim=128, dense_weight=0.5, sync_bn=True, workers=8, save_every=2000,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DenseCL pre-training", add_help=True)
    add_common_args(parser, lr=0.05, epochs=4, batch_size=32)
    g = parser.add_argument_group("densecl")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo", help="paper: hyperparameters of spec §9")
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

    def __init__(self, arch: str, hidden: int, dim: int) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch)
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



def main(args: argparse.Namespace) -> None:
    dist_info = start_run(args, "densecl")

    transform = mocov2_views(args.crop_size)  # DenseCL: MoCo v2 views, scale (0.2, 1), no overlap constraint
    loader, dataset, sampler = build_pretraining_loader(args, transform, dist_info)

    online = DenseCLOnline(args.arch, args.proj_hidden, args.proj_dim)
    if args.sync_bn:  # replaces ShuffleBN (not implemented), see the module docstring
        online = convert_sync_batchnorm(online)
    # The key encoder keeps its own BN statistics (buffers="none"), as MoCo's.
    target = MomentumEncoder(online.encoder, constant_momentum(args.momentum), buffers="none")
    global_queue = MomentumQueue(args.proj_dim, args.queue_size, seed=args.seed)
    dense_queue = MomentumQueue(args.proj_dim, args.queue_size, seed=args.seed + 1)
    trainer = Trainer(
        args, online, {"target": target, "global_queue": global_queue, "dense_queue": dense_queue},
        dist_info, loader, dataset, sampler,
    )
    trainer.maybe_resume()

    dense_loss = DenseInfoNCE(temperature=args.temperature)
    image_loss = InfoNCE(temperature=args.temperature)
    pending: dict[str, Tensor] = {}

    def match(q_feats: Tensor, k_feats: Tensor, gq, gk) -> Matches:
        # argmax cosine of the backbone features, view 1 cells -> view 2 cells (index only, no gradient)
        return similarity_match(q_feats.detach(), k_feats.detach(), query_geometry=gq, key_geometry=gk,
                                query_shape=tuple(q_feats.shape[-2:]), key_shape=tuple(k_feats.shape[-2:]))

    def step_fn(batch, step: int) -> StepOutput:
        views, geoms = batch
        q_view = views[0].to(trainer.device, non_blocking=True)
        k_view = views[1].to(trainer.device, non_blocking=True)
        gq, gk = geoms[0].to(trainer.device), geoms[1].to(trainer.device)
        # DenseCL: the momentum update runs at the start of the step, BEFORE the keys are computed
        # (PixCon updates after the optimiser step, in after_step). The online weights are the same
        # at both places, so with a fixed momentum the keys are identical; the update at step 0 is a
        # no-op (the key encoder starts as a copy), and no update follows the last step.
        momentum = target.update(step)
        q = trainer.ddp(q_view)  # queries: view 1 through the online encoder only
        with torch.no_grad():
            k = encode(target.target, k_view)  # keys: view 2 through the key encoder only
        neg_global, neg_dense = global_queue.negatives(), dense_queue.negatives()
        m = match(q["feats"], k["feats"], gq, gk)
        l_dense = dense_loss(q["dense"], k["dense"], m, neg_dense)
        l_global = image_loss(q["proj"], k["proj"], neg_global)
        lam = 0.0 if step < args.dense_warmup_steps else args.dense_weight
        total = (1 - lam) * l_global + lam * l_dense  # lam = 0 keeps the dense graph (DDP sees every parameter)
        shape_q, shape_k = tuple(q["feats"].shape[-2:]), tuple(k["feats"].shape[-2:])
        metrics = {
            "loss_dense": float(l_dense.detach()),
            "loss_global": float(l_global.detach()),
            "dense_weight": lam,
            "momentum": momentum,
            "valid_fraction": float(m.valid.float().mean()),
            "mean_weight": float(m.effective_weight.sum() / m.valid.sum().clamp_min(1)),
            "in_box_fraction": float(m.in_box.float().mean()) if m.in_box is not None else float("nan"),
            "match_within_one": true_cell_agreement(m, gq, gk, shape_q, shape_k),
        }
        # DenseCL enqueues the key view's keys after the loss: global k and the pooled dense keys.
        pending["global"] = F.normalize(k["proj"].float(), dim=1)
        pending["dense"] = F.normalize(k["dense"].float().mean(dim=(2, 3)), dim=1)
        return StepOutput(total, metrics)

    def after_step(step: int) -> dict[str, float]:
        global_queue.enqueue(pending.pop("global"))
        dense_queue.enqueue(pending.pop("dense"))
        return {}

    trainer.fit(step_fn, after_step)
    trainer.export(online.encoder["backbone"])  # backbone.pth, for fine-tuning
    if not trainer.stopped_by_signal and not args.no_eval:
        final_report(trainer, online.encoder["backbone"], transform, match)
    trainer.close()


if __name__ == "__main__":
    main(parse_with_presets(get_args_parser(), {"paper": PAPER}))
