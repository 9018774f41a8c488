"""PixCon (Pang et al.) as a ``LightningModule``, built from densecontrast's pieces.

The method is the one of ``examples/pixcon/train.py``; only the loop moves into Lightning's hooks:

=========================  ===================================================================
hook                       PixCon
=========================  ===================================================================
``__init__``               online network (backbone + projectors + predictors), momentum target
                           ``EMA(encoder)``, two ``MomentumQueue`` s (global keys, pooled dense
                           keys): all submodules, so their weights and buffers (``queue``,
                           ``ptr``, ``step_count``) are in Lightning's checkpoint
``training_step``          online and target forward, similarity matching + semantic
                           reweighting, dense InfoNCE + image InfoNCE against the queues' current
                           negatives; returns the loss and keeps the keys to enqueue
``optimizer_step``         Lightning's closure (``training_step``, ``backward``), then
                           ``optimizer.step()``; then enqueue one target view's keys and the
                           momentum update: both after the optimiser step, as PixCon's hook does
(Lightning)                ``lr_scheduler.step()``, callbacks (``ModelCheckpoint``)
=========================  ===================================================================

Why not ``on_train_batch_end``: Lightning runs the callbacks' ``on_train_batch_end`` (where
``ModelCheckpoint(every_n_train_steps=...)`` saves) before the LightningModule's, so a checkpoint
would hold the weights after the step but the queues and the momentum target before it.

The queues read their negatives *before* the current keys are enqueued, so a query's own key is
never among its negatives. Under ``strategy="ddp"`` ``MomentumQueue.enqueue`` all-gathers the keys
of every rank (one collective per queue and step, the same on every rank), and the randomly chosen
view is drawn from a generator seeded by the step, so every rank picks the same one.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast.backbones import build_backbone
from densecontrast.ema import EMA
from densecontrast.geometry import ViewGeometry
from densecontrast.heads import pixcon_heads
from densecontrast.losses import DenseInfoNCE, InfoNCE
from densecontrast.matching import Matches, nearest_coordinate_match, similarity_match
from densecontrast.optim import WarmupCosineScheduler, build_optimizer
from densecontrast.queue import MomentumQueue
from densecontrast.schedules import CosineMomentum
from densecontrast.weighting import SemanticReweighting

Batch = tuple[list[Tensor], list[ViewGeometry]]


def encode(encoder: nn.ModuleDict, view: Tensor) -> dict[str, Tensor]:
    """Backbone features (B, C, h, w), global projection (B, D) and dense projection (B, D, h, w)."""
    feats = encoder["backbone"](view)
    proj = encoder["projector"](feats.mean(dim=(2, 3)))
    return {"feats": feats, "proj": proj, "dense": encoder["dense_projector"](feats)}


class PixConModule(L.LightningModule):
    """PixCon-Coord / -Sim / -SR pre-training.

    Args:
        total_steps: length of the LR and momentum schedules (optimiser steps); see
            ``MultiViewDataModule.schedule_length``.
        arch: backbone name for :func:`densecontrast.backbones.build_backbone` (``"tiny"``,
            ``"resnet50"``, ``"timm:<name>"``).
        variant: ``"coord"``, ``"sim"`` or ``"sr"`` (matching / reweighting).
        proj_hidden, proj_dim: widths of the heads (paper: 2048, 128).
        queue_size: entries of each queue (paper: 65536).
        temperature: InfoNCE temperature (0.2).
        dense_weight: lambda, the dense loss weight; the image loss has ``1 - lambda``.
        gamma: SR sharpening exponent (2).
        momentum_base: momentum ascending from this value to 1 (cosine).
        optimizer, lr, weight_decay, warmup_steps: SGD 0.4 / 1e-4 in the paper (4 x 128 images).
        seed: seed of the queues' initial keys and of the enqueued-view choice.
    """

    def __init__(
        self,
        total_steps: int,
        arch: str = "tiny",
        variant: Literal["coord", "sim", "sr"] = "sr",
        proj_hidden: int = 256,
        proj_dim: int = 64,
        queue_size: int = 4096,
        temperature: float = 0.2,
        dense_weight: float = 0.5,
        gamma: float = 2.0,
        momentum_base: float = 0.99,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 1e-4,
        warmup_steps: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        backbone, channels = build_backbone(arch)
        heads = pixcon_heads(in_dim=channels, hidden_dim=proj_hidden, out_dim=proj_dim)
        # encoder: what the momentum target copies (backbone + projectors); the predictors stay online only
        self.encoder = nn.ModuleDict(
            {"backbone": backbone, "projector": heads["projector"], "dense_projector": heads["dense_projector"]}
        )
        self.predictor = heads["predictor"]
        self.dense_predictor = heads["dense_predictor"]
        # Submodules, so Lightning's checkpoint holds target.target.* / target.step_count and the
        # queues' queue / ptr buffers, and .to(device) moves them.
        self.target = EMA(self.encoder, CosineMomentum(total_steps, base=momentum_base), buffers="none")
        self.global_queue = MomentumQueue(proj_dim, queue_size, seed=seed)
        self.dense_queue = MomentumQueue(proj_dim, queue_size, seed=seed + 1)
        self.dense_loss = DenseInfoNCE(temperature=temperature)
        self.image_loss = InfoNCE(temperature=temperature)
        self.reweight = SemanticReweighting(gamma=gamma)

    @property
    def backbone(self) -> nn.Module:
        """The online backbone (what ``export_backbone`` writes at the end)."""
        return self.encoder["backbone"]

    def match(self, a: Tensor, b: Tensor, ga: ViewGeometry, gb: ViewGeometry) -> Matches:
        """PixCon's positives from backbone features ``a`` (queries, view a) to ``b`` (keys, view b)."""
        shape_a, shape_b = tuple(a.shape[-2:]), tuple(b.shape[-2:])
        if self.hparams.variant == "coord":
            return nearest_coordinate_match(ga, gb, shape_a, shape_b)
        m = similarity_match(a.detach(), b, query_geometry=ga, key_geometry=gb, query_shape=shape_a,
                             key_shape=shape_b)
        return self.reweight(m) if self.hparams.variant == "sr" else m

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        views, geoms = batch
        online = []
        for v in views:
            enc = encode(self.encoder, v)
            enc["pred"] = self.predictor(enc["proj"])
            enc["dense_pred"] = self.dense_predictor(enc["dense"])
            online.append(enc)
        with torch.no_grad():
            target = [encode(self.target.target, v) for v in views]
        neg_global, neg_dense = self.global_queue.negatives(), self.dense_queue.negatives()  # before enqueueing
        lam = self.hparams.dense_weight
        loss = torch.zeros((), device=self.device)
        for a, b in ((0, 1), (1, 0)):  # both directions: online view a against target view b
            m = self.match(online[a]["feats"], target[b]["feats"], geoms[a], geoms[b])
            l_dense = self.dense_loss(online[a]["dense_pred"], target[b]["dense"], m, neg_dense)
            l_image = self.image_loss(online[a]["pred"], target[b]["proj"], neg_global)
            loss = loss + lam * l_dense + (1 - lam) * l_image
            if a == 0:
                self.log_dict({"loss_dense": l_dense.detach(), "loss_image": l_image.detach(),
                               "valid_fraction": m.valid.float().mean()})
        self.log("loss", loss.detach(), prog_bar=True)
        # One randomly chosen target view (the same on every rank) is enqueued after the optimiser step.
        pick = int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(
            self.hparams.seed * 100003 + self.global_step)))
        self._keys = (F.normalize(target[pick]["proj"].float(), dim=1),
                      F.normalize(target[pick]["dense"].float().mean(dim=(2, 3)), dim=1))
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # The closure runs training_step and backward, then the optimiser steps. PixCon's order after the
        # step: enqueue, then the momentum update. Here rather than in on_train_batch_end: Lightning calls
        # the callbacks' on_train_batch_end (ModelCheckpoint's save) *before* the LightningModule's, so a
        # checkpoint saved every N steps would miss the step's enqueue and momentum update.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        global_keys, dense_keys = self._keys
        self.global_queue.enqueue(global_keys)
        self.dense_queue.enqueue(dense_keys)
        self.log("momentum", self.target.update(self.global_step))  # step t = global_step (not yet counted)

    def on_fit_start(self) -> None:
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError("the momentum update and the enqueue run once per batch: use accumulate_grad_batches=1")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        online = nn.ModuleList([self.encoder, self.predictor, self.dense_predictor])  # not the frozen target
        optimizer = build_optimizer(online, hp.optimizer, hp.lr, hp.weight_decay)
        warmup = min(hp.warmup_steps, hp.total_steps - 1)
        scheduler = WarmupCosineScheduler(optimizer, hp.total_steps, warmup_steps=max(warmup, 0),
                                          warmup_start_ratio=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
