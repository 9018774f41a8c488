"""LC-loss pre-training (BYOL + local contrastive loss, Islam et al.) with densecontrast.

Runs with no arguments as a CPU demo on the built-in synthetic scenes (a few minutes on 2 cores)
and writes ``runs/lcloss/``: ``checkpoint.pth``, ``metrics.jsonl``, TensorBoard events (when
installed), ``loss.png``, ``matches.png``, ``backbone.pth`` and ``report.json``.

    python examples/lcloss/train.py                                   # CPU demo
    python examples/lcloss/train.py --lc-temperature 0.2 --alpha 0.3  # other local-loss settings
    torchrun --nproc_per_node=16 examples/lcloss/train.py --preset paper --data /data/imagenet/train

Method (spec: LC-loss, Islam et al.; no official code): two views of each image, ``I_c`` (view 0:
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

import torch
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
from densecontrast.heads import lc_heads
from densecontrast.losses.global_losses import BYOLLoss
from densecontrast.losses.local_contrastive import LocalContrastiveLoss
from densecontrast.matching import correspondence_match, similarity_match
from densecontrast.schedules import CosineMomentum
from densecontrast.transforms import lc_views

PAPER = dict(  # spec §4 / §9: ResNet-50, 16 x 256 images, 400 ImageNet epochs, LARS 0.3 x B/256, fp16
    arch="resnet50", crop_size=224, batch_size=256, epochs=400, optimizer="lars", lr=0.3, lr_scaling="linear",
    weight_decay=1e-6, warmup_epochs=10, momentum_base=0.996, amp="fp16", alpha=0.1,
    proj_hidden=4096, proj_dim=256, dense_hidden=2048, dense_dim=256,
    sync_bn=True, workers=8, save_every=2000,  # sync_bn: BYOL's cross-replica BN [I]
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LC-loss pre-training", add_help=True)
    add_common_args(parser, lr=0.05, epochs=4, batch_size=32)
    g = parser.add_argument_group("lcloss")
    g.add_argument("--preset", choices=["demo", "paper"], default="demo", help="paper: hyperparameters of spec §9")
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

    def __init__(self, arch: str, hidden: int, dim: int, dense_hidden: int, dense_dim: int) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch)
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


def main(args: argparse.Namespace) -> None:
    dist_info = start_run(args, "lcloss")

    transform = lc_views(args.crop_size, scale=(args.scale_min, 1.0))  # view 0 = I_c, view 1 = I_sc
    loader, dataset, sampler = build_pretraining_loader(args, transform, dist_info)

    online = LCOnline(args.arch, args.proj_hidden, args.proj_dim, args.dense_hidden, args.dense_dim)
    if args.sync_bn:
        online = convert_sync_batchnorm(online)
    ascending = CosineMomentum(schedule_length(args, sampler), base=args.momentum_base)  # up to 1 at the end
    target = MomentumEncoder(online.encoder, ascending, buffers="none")
    trainer = Trainer(args, online, {"target": target}, dist_info, loader, dataset, sampler)
    trainer.maybe_resume()

    global_loss = BYOLLoss()
    local_loss = LocalContrastiveLoss(temperature=args.lc_temperature)
    alpha = args.alpha

    def step_fn(batch, step: int) -> StepOutput:
        views, geoms = batch
        views = [v.to(trainer.device, non_blocking=True) for v in views]
        g_c, g_sc = (g.to(trainer.device) for g in geoms)
        online_out = trainer.ddp(views)
        with torch.no_grad():  # target local features only for I_c (the queries)
            target_out = [encode(target.target, v, dense=i == 0) for i, v in enumerate(views)]
        l_global = 0.5 * (global_loss(online_out[0]["pred"], target_out[1]["proj"])
                          + global_loss(online_out[1]["pred"], target_out[0]["proj"]))
        query, key = target_out[0]["dense"], online_out[1]["dense"]  # target I_c (no grad), online I_sc
        shape_c, shape_sc = tuple(query.shape[-2:]), tuple(key.shape[-2:])
        m = correspondence_match(g_c, g_sc, shape_c, shape_sc)
        l_local = local_loss(query, key, m)
        total = (1 - alpha) * l_global + alpha * l_local
        with torch.no_grad():
            sim = similarity_match(query, key.detach(), query_geometry=g_c, key_geometry=g_sc)
        metrics = {
            "loss_global": float(l_global.detach()),
            "loss_local": float(l_local.detach()),
            "valid_fraction": float(m.valid.float().mean()),
            "match_within_one": true_cell_agreement(sim, g_c, g_sc, shape_c, shape_sc),
        }
        return StepOutput(total, metrics)

    def after_step(step: int) -> dict[str, float]:
        m = target.update(step)  # BYOL: momentum update after the optimiser step
        return {"momentum": m}

    trainer.fit(step_fn, after_step)
    trainer.export(online.encoder["backbone"])  # backbone.pth, for fine-tuning
    if not trainer.stopped_by_signal and not args.no_eval:
        final_report(trainer, online.encoder["backbone"], transform, lambda a, b, ga, gb: correspondence_match(
            ga, gb, tuple(a.shape[-2:]), tuple(b.shape[-2:])))
    trainer.close()


if __name__ == "__main__":
    main(parse_with_presets(get_args_parser(), {"paper": PAPER}))
