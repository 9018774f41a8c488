"""PixPro (Xie et al., pixel-to-propagation consistency) as a ``LightningModule``: a momentum target and no queue.

The method is the one of ``examples/pixpro/train.py`` (without the optional instance branch):

=========================  ===================================================================
hook                       PixPro
=========================  ===================================================================
``__init__``               online network (backbone + dense projector + pixel propagation
                           module), momentum target ``EMA(encoder)``: a submodule, so its
                           weights and ``step_count`` are in Lightning's checkpoint
``on_train_batch_start``   the momentum update, **before** the keys are computed (PixPro updates
                           at the start of the step; step ``t`` uses ``m_t``)
``training_step``          online and target forward, coordinate matching (threshold 0.7 bin
                           diagonals), the PixPro consistency loss summed over both directions
(Lightning)                ``backward``, ``optimizer.step()``, ``lr_scheduler.step()``
=========================  ===================================================================

The loss lies in ``[-4, 4]``; negative values are normal.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from densecontrast.backbones import build_backbone
from densecontrast.ema import EMA
from densecontrast.geometry import ViewGeometry
from densecontrast.heads import pixpro_heads
from densecontrast.losses import PixProConsistencyLoss
from densecontrast.matching import coordinate_match
from densecontrast.optim import WarmupCosineScheduler, build_optimizer
from densecontrast.schedules import CosineMomentum

Batch = tuple[list[Tensor], list[ViewGeometry]]


class PixProModule(L.LightningModule):
    """PixPro pre-training.

    Args:
        total_steps: length of the LR and momentum schedules (optimiser steps).
        arch: backbone name for :func:`densecontrast.backbones.build_backbone`.
        proj_hidden, proj_dim: widths of the dense projector (paper: 4096, 256).
        gamma: PPM sharpness exponent (2).
        threshold: positive radius in bin diagonals (0.7).
        momentum_base: momentum ascending from this value to 1 (cosine).
        optimizer, lr, weight_decay, warmup_steps: the paper uses LARS, base lr 1.0 per 256 images,
            wd 1e-5, 5 warm-up epochs.
        seed: unused by the method; kept so both modules take the same arguments.
    """

    def __init__(
        self,
        total_steps: int,
        arch: str = "tiny",
        proj_hidden: int = 256,
        proj_dim: int = 64,
        gamma: float = 2.0,
        threshold: float = 0.7,
        momentum_base: float = 0.99,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 1e-5,
        warmup_steps: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        backbone, channels = build_backbone(arch)
        heads = pixpro_heads(in_dim=channels, hidden_dim=proj_hidden, out_dim=proj_dim, gamma=gamma)
        self.encoder = nn.ModuleDict({"backbone": backbone, "dense_projector": heads["dense_projector"]})
        self.ppm = heads["ppm"]
        self.target = EMA(self.encoder, CosineMomentum(total_steps, base=momentum_base), buffers="none")
        self.criterion = PixProConsistencyLoss()

    @property
    def backbone(self) -> nn.Module:
        """The online backbone."""
        return self.encoder["backbone"]

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # PixPro: the momentum update runs at the start of the step, before the target encodes the keys
        # (global_step = t, the steps done so far; m_0 = 0.99 averages two equal models: a no-op).
        self.log("momentum", self.target.update(self.global_step))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        views, geoms = batch
        online, target = [], []
        for v in views:
            feats = self.encoder["backbone"](v)
            online.append({"feats": feats, "prop": self.ppm(self.encoder["dense_projector"](feats))})
        with torch.no_grad():
            for v in views:
                target.append(self.target.target["dense_projector"](self.target.target["backbone"](v)))
        loss = torch.zeros((), device=self.device)
        for a, b in ((0, 1), (1, 0)):  # summed over both directions, as released: range [-4, 4]
            m = coordinate_match(geoms[a], geoms[b], tuple(online[a]["feats"].shape[-2:]),
                                 tuple(target[b].shape[-2:]), threshold=self.hparams.threshold)
            loss = loss + self.criterion(online[a]["prop"], target[b], m)
            if a == 0:
                self.log("valid_fraction", m.valid.float().mean())
        self.log("loss", loss.detach(), prog_bar=True)
        return loss

    def on_fit_start(self) -> None:
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError("the momentum update runs once per batch: use accumulate_grad_batches=1")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        online = nn.ModuleList([self.encoder, self.ppm])  # not the frozen target
        optimizer = build_optimizer(online, hp.optimizer, hp.lr, hp.weight_decay)
        warmup = min(hp.warmup_steps, hp.total_steps - 1)
        scheduler = WarmupCosineScheduler(optimizer, hp.total_steps, warmup_steps=max(warmup, 0),
                                          warmup_start_ratio=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
