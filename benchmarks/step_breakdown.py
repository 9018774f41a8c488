"""The library's share of one training step, per method: view geometry, matching, reweighting, losses, queue, EMA.

Each method's step is written out as in its ``examples/<method>/train.py`` (same heads builders,
same matchers, losses, queues, momentum target and order of operations), with random views of the
right shape and real :class:`~densecontrast.geometry.ViewGeometry` from random-resized crops with
flips (the crop scales of the method's augmentation; PixCon re-samples until the second crop
overlaps at least 1 % of the first, LC-loss's first view is the whole image). Parts, timed with
``time.perf_counter`` (after ``torch.cuda.synchronize()`` on CUDA):

* library: ``geometry`` (moving the ViewGeometry to the device), ``matching``, ``reweighting``
  (PixCon-SR), ``loss fwd`` and ``loss bwd`` (the losses, their backward down to the network
  outputs, and the point sampling of DenseSiam), ``queue`` (``negatives()`` + ``enqueue``, with
  the key pooling / normalisation the scripts do), ``ema`` (``EMA.update``);
* network: ``input`` (views to the device), ``online fwd``, ``target fwd``, ``net bwd``,
  ``optimizer`` (zero_grad, GradScaler step / update, LR scheduler).

The backward is split at the network outputs: the losses are computed on detached copies of
the online outputs (``requires_grad``), ``loss.backward()`` (``loss bwd``) stops there, then
``torch.autograd.backward(outputs, grads)`` (``net bwd``) runs the network's part. The
arithmetic is that of one fused backward; ``--also-fused`` times the plain fused step too.
The scripts' logged diagnostics (``match_within_one``, the collapse monitors ...) are not part
of the step here. ``step`` is the wall time of the whole step; ``library %`` is the median
library time over the median step time.

Configurations: ``demo`` = the scripts' defaults (``tiny`` backbone, 64-px views of 96-px
synthetic images, batch 32, their demo head sizes and 4096-entry queues, SGD); ``r50`` =
ResNet-50 at 224 px of 640 x 480 images, batch 32, with each script's ``--preset paper`` head
sizes, queue (65,536), temperature and optimiser. Peak memory is the peak of one extra step:
``torch.cuda.max_memory_allocated`` on CUDA, on the CPU the live tensor bytes counted by
:class:`live_memory.LiveTensorBytes` (parameters, optimiser state, target and queues excluded).

Usage::

    python benchmarks/step_breakdown.py                                   # demo config, all methods
    python benchmarks/step_breakdown.py --config r50 --steps 3 --warmup 1 --batch-size 8
    python benchmarks/step_breakdown.py --device cuda --config r50 --amp bf16 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from live_memory import LiveTensorBytes
from losses import floor_fwd_bwd
from torch import Tensor, nn

from densecontrast.backbones import build_backbone
from densecontrast.ema import EMA
from densecontrast.geometry import ViewGeometry
from densecontrast.heads import densecl_heads, densesiam_heads, lc_heads, pixcon_heads, pixpro_heads
from densecontrast.losses import (
    BYOLLoss,
    DenseInfoNCE,
    DenseSimSiamLoss,
    InfoNCE,
    LocalContrastiveLoss,
    NegativeCosine,
    PixProConsistencyLoss,
    RegionSimLoss,
    region_embeddings,
)
from densecontrast.losses.dense_infonce import default_chunk_size
from densecontrast.matching import (
    coordinate_match,
    correspondence_match,
    location_match,
    nearest_coordinate_match,
    sample_points,
    similarity_match,
)
from densecontrast.optim import WarmupCosineScheduler, build_optimizer, scale_lr
from densecontrast.queue import MomentumQueue
from densecontrast.schedules import CosineMomentum, constant_momentum
from densecontrast.weighting import SemanticReweighting

LIBRARY_PARTS = ("geometry", "matching", "reweighting", "loss_fwd", "loss_bwd", "queue", "ema")
NETWORK_PARTS = ("input", "online_fwd", "target_fwd", "net_bwd", "optimizer")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GOAL = 0.05  # the library's share of a step should stay at or below 5 %
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

#: Data / model size of each configuration (the scripts' defaults, and ResNet-50 at 224 px).
CONFIGS: dict[str, dict[str, Any]] = {
    "demo": dict(arch="tiny", crop_size=64, batch_size=32, image_size=(128, 128)),
    "r50": dict(arch="resnet50", crop_size=224, batch_size=32, image_size=(640, 480)),
}

#: Per method and configuration: the scripts' demo defaults and their ``--preset paper`` values.
HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "pixcon": {
        "demo": dict(proj_hidden=256, proj_dim=64, queue_size=4096, optimizer="sgd", lr=0.2, weight_decay=1e-4),
        "r50": dict(proj_hidden=2048, proj_dim=128, queue_size=65536, optimizer="sgd", lr=0.4, weight_decay=1e-4),
        "all": dict(temperature=0.2, dense_weight=0.5, gamma=2.0, momentum_base=0.99, lr_scaling="none"),
    },
    "densecl": {
        "demo": dict(proj_hidden=256, proj_dim=64, queue_size=4096, optimizer="sgd", lr=0.05, weight_decay=1e-4),
        "r50": dict(proj_hidden=2048, proj_dim=128, queue_size=65536, optimizer="sgd", lr=0.3, weight_decay=1e-4),
        "all": dict(temperature=0.2, dense_weight=0.5, momentum=0.999, lr_scaling="none"),
    },
    "pixpro": {
        "demo": dict(proj_hidden=256, proj_dim=64, optimizer="sgd", lr=0.05, weight_decay=1e-4, lr_scaling="none"),
        "r50": dict(proj_hidden=4096, proj_dim=256, optimizer="lars", lr=1.0, weight_decay=1e-5, lr_scaling="linear"),
        "all": dict(gamma=2.0, transform_layers=1, threshold=0.7, momentum_base=0.99),
    },
    "lcloss": {
        "demo": dict(proj_hidden=256, proj_dim=64, dense_hidden=256, dense_dim=64, optimizer="sgd", lr=0.05,
                     weight_decay=1e-4, lr_scaling="none"),
        "r50": dict(proj_hidden=4096, proj_dim=256, dense_hidden=2048, dense_dim=256, optimizer="lars", lr=0.3,
                    weight_decay=1e-6, lr_scaling="linear"),
        "all": dict(alpha=0.1, lc_temperature=0.1, momentum_base=0.996, scale_min=0.08),
    },
    "densesiam": {
        "demo": dict(proj_hidden=256, proj_dim=64, pred_hidden=32, region_dim=64, optimizer="sgd", lr=0.05,
                     weight_decay=1e-4, lr_scaling="none"),
        "r50": dict(proj_hidden=2048, proj_dim=2048, pred_hidden=512, region_dim=256, optimizer="sgd", lr=0.05,
                    weight_decay=1e-4, lr_scaling="linear"),
        "all": dict(num_points=49, num_regions=8, dense_weight=1.0, region_weight=0.1, region_temperature=0.1),
    },
}


# ------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimer:
    """Accumulates milliseconds per named part of one step (``with timer("matching"): ...``)."""

    def __init__(self, device: torch.device, enabled: bool = True, clock: str = "wall") -> None:
        self.device = device
        self.enabled = enabled
        self.clock = CLOCKS[clock]
        self.ms: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        sync(self.device)
        t0 = self.clock()
        try:
            yield
        finally:
            sync(self.device)
            self.ms[name] += 1e3 * (self.clock() - t0)


class Boundary:
    """Cut the graph at the network outputs, so that the losses' backward is timed apart from the network's."""

    def __init__(self, split: bool) -> None:
        self.split = split
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def cut(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.split:
            return out
        cut = {}
        for name, t in out.items():
            if isinstance(t, Tensor) and t.requires_grad:
                leaf = t.detach().requires_grad_()
                self.pairs.append((t, leaf))
                t = leaf
            cut[name] = t
        return cut

    def backward_network(self) -> None:
        pairs = [(t, leaf.grad) for t, leaf in self.pairs if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self.pairs.clear()


# ------------------------------------------------------------------------------------------- inputs
def random_crops(
    b: int, image_size: tuple[int, int], gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
) -> Tensor:
    """``(B, 5)`` random-resized-crop boxes ``x0, y0, x1, y1`` (pixels) and flips (0 / 1) in the last column."""
    width, height = image_size
    area = width * height
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(b, generator=gen, dtype=torch.float64)
    u = torch.rand(b, generator=gen, dtype=torch.float64)
    r = torch.exp(math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * u)
    w = torch.sqrt(area * s * r).clamp(max=width)
    h = torch.sqrt(area * s / r).clamp(max=height)
    x0 = torch.rand(b, generator=gen, dtype=torch.float64) * (width - w)
    y0 = torch.rand(b, generator=gen, dtype=torch.float64) * (height - h)
    flips = (torch.rand(b, generator=gen) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)
    return torch.cat([torch.stack([x0, y0, x0 + w, y0 + h], -1), flips[:, None].double()], dim=1)


def _overlap_fraction(a: Tensor, b: Tensor) -> Tensor:
    """Fraction of box ``b``'s area inside box ``a`` (rows ``x0, y0, x1, y1``)."""
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    return iw * ih / ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))


def random_geometries(method: str, b: int, image_size: tuple[int, int], gen: torch.Generator) -> list[ViewGeometry]:
    """The two views' geometries of a batch, with the crop rules of the method's augmentation."""
    size = torch.tensor([float(image_size[0]), float(image_size[1])])
    if method == "lcloss":  # I_c: the whole image, no flip; I_sc: random resized crop + flip
        full = torch.tensor([[0.0, 0.0, size[0], size[1], 0.0]], dtype=torch.float64).expand(b, 5)
        crops = [full, random_crops(b, image_size, gen, (0.08, 1.0))]
    else:
        scale = (0.2, 1.0) if method in ("densecl", "densesiam") else (0.08, 1.0)  # MoCo v2 / BYOL views
        first = random_crops(b, image_size, gen, scale)
        second = random_crops(b, image_size, gen, scale)
        if method.startswith("pixcon"):  # min_overlap=0.01: re-sample the second crop (at most 10 tries)
            for _ in range(9):
                low = _overlap_fraction(first[:, :4], second[:, :4]) < 0.01
                if not low.any():
                    break
                second[low] = random_crops(int(low.sum()), image_size, gen, scale)
        crops = [first, second]
    return [ViewGeometry.from_crops(c[:, :4].float(), c[:, 4] > 0.5, size) for c in crops]


def random_batch(method: str, cfg: dict[str, Any], gen: torch.Generator) -> tuple[list[Tensor], list[ViewGeometry]]:
    """Random normalised views ``(B, 3, S, S)`` (CPU, as a loader delivers them) and their geometries."""
    b, s = cfg["batch_size"], cfg["crop_size"]
    views = [torch.randn(b, 3, s, s, generator=gen) for _ in range(2)]
    return views, random_geometries(method, b, cfg["image_size"], gen)


# ------------------------------------------------------------------------------------------- methods
def _encode(encoder: nn.ModuleDict, view: Tensor, dense: bool = True, proj: bool = True) -> dict[str, Tensor]:
    feats = encoder["backbone"](view)
    out = {"feats": feats}
    if proj and "projector" in encoder:
        out["proj"] = encoder["projector"](feats.mean(dim=(2, 3)))
    if dense:
        out["dense"] = encoder["dense_projector"](feats)
    return out


@dataclass
class Method:
    """One method's models, losses and step; ``step(batch, step, timer, boundary) -> loss``."""

    name: str
    label: str
    hp: dict[str, Any]
    device: torch.device
    amp: torch.dtype | None
    online: nn.Module
    target: EMA | None = None
    queues: dict[str, MomentumQueue] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: Any = None
    step_fn: Callable[..., Tensor] | None = None
    total_steps: int = 1000

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def finish(self, loss: Tensor, timer: PartTimer, boundary: Boundary) -> None:
        """isfinite check, backward (losses, then network), optimiser step, as in the scripts."""
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{self.label}: loss is {loss.item()}")
        assert self.optimizer is not None and self.scaler is not None
        with timer("optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
        with timer("loss_bwd" if boundary.split else "net_bwd"):
            self.scaler.scale(loss).backward()
        if boundary.split:
            with timer("net_bwd"):
                boundary.backward_network()
        with timer("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()

    def state_tensors(self) -> list[Tensor]:
        """Tensors that exist across steps (excluded from the peak-memory count)."""
        ts = [*self.online.parameters(), *self.online.buffers()]
        if self.target is not None:
            ts += [*self.target.parameters(), *self.target.buffers()]
        for q in self.queues.values():
            ts += list(q.buffers())
        if self.optimizer is not None:
            for st in self.optimizer.state.values():
                ts += [v for v in st.values() if isinstance(v, Tensor)]
        return ts


class PixConOnline(nn.Module):
    def __init__(self, arch: str, hidden: int, dim: int) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch)
        heads = pixcon_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim)
        self.encoder = nn.ModuleDict(
            {"backbone": backbone, "projector": heads["projector"], "dense_projector": heads["dense_projector"]})
        self.predictor = heads["predictor"]
        self.dense_predictor = heads["dense_predictor"]

    def forward(self, views: list[Tensor]) -> list[dict[str, Tensor]]:
        outs = []
        for v in views:
            enc = _encode(self.encoder, v)
            enc["pred"] = self.predictor(enc["proj"])
            enc["dense_pred"] = self.dense_predictor(enc["dense"])
            outs.append(enc)
        return outs


class DenseCLOnline(nn.Module):
    def __init__(self, arch: str, hidden: int, dim: int) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch)
        heads = densecl_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim)
        self.encoder = nn.ModuleDict(
            {"backbone": backbone, "projector": heads["projector"], "dense_projector": heads["dense_projector"]})

    def forward(self, view: Tensor) -> dict[str, Tensor]:
        return _encode(self.encoder, view)


class PixProOnline(nn.Module):
    def __init__(self, arch: str, hidden: int, dim: int, gamma: float, transform_layers: int) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch)
        heads = pixpro_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim, gamma=gamma,
                             transform_layers=transform_layers)
        self.encoder = nn.ModuleDict({"backbone": backbone, "dense_projector": heads["dense_projector"]})
        self.ppm = heads["ppm"]

    def forward(self, views: list[Tensor]) -> list[dict[str, Tensor]]:
        outs = []
        for v in views:
            enc = _encode(self.encoder, v)
            enc["prop"] = self.ppm(enc["dense"])
            outs.append(enc)
        return outs


class LCOnline(nn.Module):
    def __init__(self, arch: str, hidden: int, dim: int, dense_hidden: int, dense_dim: int) -> None:
        super().__init__()
        backbone, channels = build_backbone(arch)
        heads = lc_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim, dense_hidden_dim=dense_hidden,
                         dense_out_dim=dense_dim)
        self.encoder = nn.ModuleDict(
            {"backbone": backbone, "projector": heads["projector"], "dense_projector": heads["dense_projector"]})
        self.predictor = heads["predictor"]

    def forward(self, views: list[Tensor]) -> list[dict[str, Tensor]]:
        outs = []
        for i, v in enumerate(views):  # online local features only for I_sc (view 1)
            enc = _encode(self.encoder, v, dense=i == 1)
            enc["pred"] = self.predictor(enc["proj"])
            outs.append(enc)
        return outs


class DenseSiamOnline(nn.Module):
    def __init__(self, arch: str, hidden: int, dim: int, pred_hidden: int, num_regions: int, region_dim: int) -> None:
        super().__init__()
        self.backbone, channels = build_backbone(arch)
        heads = densesiam_heads(in_dim=channels, hidden_dim=hidden, out_dim=dim, pred_hidden_dim=pred_hidden,
                                num_regions=num_regions, region_dim=region_dim)
        for name in ("projector", "dense_projector", "region_logits", "region_projector", "predictor",
                     "dense_predictor", "region_predictor"):
            setattr(self, name, heads[name])

    def forward(self, views: list[Tensor]) -> list[dict[str, Tensor]]:
        outs = []
        for v in views:
            feats = self.backbone(v)
            z = self.projector(feats.mean(dim=(2, 3)))
            dense_z = self.dense_projector(feats)
            logits = self.region_logits(feats)
            regions = region_embeddings(logits, feats)  # (B, K, C): soft-mask pooling, part of the network here
            b, k, c = regions.shape
            region_z = self.region_projector(regions.reshape(b * k, c))
            region_p = self.region_predictor(region_z)
            outs.append({"z": z, "p": self.predictor(z), "dense_z": dense_z, "dense_p": self.dense_predictor(dense_z),
                         "region_z": region_z.reshape(b, k, -1), "region_p": region_p.reshape(b, k, -1)})
        return outs


def _to_device(views: list[Tensor], geoms: list[ViewGeometry], device: torch.device,
               timer: PartTimer) -> tuple[list[Tensor], list[ViewGeometry]]:
    with timer("input"):
        views = [v.to(device, non_blocking=True) for v in views]
    with timer("geometry"):
        geoms = [g.to(device) for g in geoms]
    return views, geoms


def _pixcon_step(m: Method, variant: str) -> Callable[..., Tensor]:
    hp = m.hp
    dense_loss, image_loss = DenseInfoNCE(temperature=hp["temperature"]), InfoNCE(temperature=hp["temperature"])
    reweight = SemanticReweighting(gamma=hp["gamma"])
    lam = hp["dense_weight"]
    assert m.target is not None
    target, gq, dq = m.target, m.queues["global"], m.queues["dense"]

    def step(batch: Any, t: int, timer: PartTimer, cut: Boundary) -> Tensor:
        views, geoms = _to_device(*batch, m.device, timer)
        with m.autocast():
            with timer("online_fwd"):
                online_out = m.online(views)
            with timer("target_fwd"), torch.no_grad():
                target_out = [_encode(target.target, v) for v in views]
            with timer("queue"):
                neg_global, neg_dense = gq.negatives(), dq.negatives()
            with timer("loss_fwd"):
                cut_out = [cut.cut(o) for o in online_out]
                loss = torch.zeros((), device=m.device)
            for a, b in ((0, 1), (1, 0)):
                fa, fb = online_out[a]["feats"], target_out[b]["feats"]
                sa, sb = tuple(fa.shape[-2:]), tuple(fb.shape[-2:])
                with timer("matching"):
                    if variant == "coord":
                        match = nearest_coordinate_match(geoms[a], geoms[b], sa, sb)
                    else:
                        match = similarity_match(fa.detach(), fb, query_geometry=geoms[a], key_geometry=geoms[b],
                                                 query_shape=sa, key_shape=sb)
                if variant == "sr":
                    with timer("reweighting"):
                        match = reweight(match)
                with timer("loss_fwd"):
                    l_dense = dense_loss(cut_out[a]["dense_pred"], target_out[b]["dense"], match, neg_dense)
                    l_image = image_loss(cut_out[a]["pred"], target_out[b]["proj"], neg_global)
                    loss = loss + lam * l_dense + (1 - lam) * l_image
        m.finish(loss, timer, cut)
        with timer("queue"):  # after the optimiser step: enqueue one target view (global + pooled dense keys)
            pick = int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(100003 + t)))
            gq.enqueue(F.normalize(target_out[pick]["proj"].float(), dim=1))
            dq.enqueue(F.normalize(target_out[pick]["dense"].float().mean(dim=(2, 3)), dim=1))
        with timer("ema"):
            target.update(t)
        return loss

    return step


def _densecl_step(m: Method) -> Callable[..., Tensor]:
    hp = m.hp
    dense_loss, image_loss = DenseInfoNCE(temperature=hp["temperature"]), InfoNCE(temperature=hp["temperature"])
    lam = hp["dense_weight"]
    assert m.target is not None
    target, gq, dq = m.target, m.queues["global"], m.queues["dense"]

    def step(batch: Any, t: int, timer: PartTimer, cut: Boundary) -> Tensor:
        views, geoms = _to_device(*batch, m.device, timer)
        with timer("ema"):  # DenseCL: the key encoder is updated at the start of the step
            target.update(t)
        with m.autocast():
            with timer("online_fwd"):
                q = m.online(views[0])
            with timer("target_fwd"), torch.no_grad():
                k = _encode(target.target, views[1])
            with timer("queue"):
                neg_global, neg_dense = gq.negatives(), dq.negatives()
            with timer("matching"):
                match = similarity_match(q["feats"].detach(), k["feats"].detach(), query_geometry=geoms[0],
                                         key_geometry=geoms[1], query_shape=tuple(q["feats"].shape[-2:]),
                                         key_shape=tuple(k["feats"].shape[-2:]))
            with timer("loss_fwd"):
                qc = cut.cut(q)
                l_dense = dense_loss(qc["dense"], k["dense"], match, neg_dense)
                l_global = image_loss(qc["proj"], k["proj"], neg_global)
                loss = (1 - lam) * l_global + lam * l_dense
        m.finish(loss, timer, cut)
        with timer("queue"):
            gq.enqueue(F.normalize(k["proj"].float(), dim=1))
            dq.enqueue(F.normalize(k["dense"].float().mean(dim=(2, 3)), dim=1))
        return loss

    return step


def _pixpro_step(m: Method) -> Callable[..., Tensor]:
    hp = m.hp
    pixpro_loss = PixProConsistencyLoss()
    assert m.target is not None
    target = m.target

    def step(batch: Any, t: int, timer: PartTimer, cut: Boundary) -> Tensor:
        views, geoms = _to_device(*batch, m.device, timer)
        with timer("ema"):  # PixPro: the momentum update before the keys are computed
            target.update(t)
        with m.autocast():
            with timer("online_fwd"):
                online_out = m.online(views)
            with timer("target_fwd"), torch.no_grad():
                target_out = [_encode(target.target, v) for v in views]
            with timer("loss_fwd"):
                cut_out = [cut.cut(o) for o in online_out]
                loss = torch.zeros((), device=m.device)
            for a, b in ((0, 1), (1, 0)):
                with timer("matching"):
                    match = coordinate_match(geoms[a], geoms[b], tuple(online_out[a]["feats"].shape[-2:]),
                                             tuple(target_out[b]["feats"].shape[-2:]), threshold=hp["threshold"])
                with timer("loss_fwd"):
                    loss = loss + pixpro_loss(cut_out[a]["prop"], target_out[b]["dense"], match)
        m.finish(loss, timer, cut)
        return loss

    return step


def _lcloss_step(m: Method) -> Callable[..., Tensor]:
    hp = m.hp
    global_loss, local_loss = BYOLLoss(), LocalContrastiveLoss(temperature=hp["lc_temperature"])
    alpha = hp["alpha"]
    assert m.target is not None
    target = m.target

    def step(batch: Any, t: int, timer: PartTimer, cut: Boundary) -> Tensor:
        views, (g_c, g_sc) = _to_device(*batch, m.device, timer)
        with m.autocast():
            with timer("online_fwd"):
                online_out = m.online(views)
            with timer("target_fwd"), torch.no_grad():
                target_out = [_encode(target.target, v, dense=i == 0) for i, v in enumerate(views)]
            with timer("loss_fwd"):
                o = [cut.cut(x) for x in online_out]
                l_global = 0.5 * (global_loss(o[0]["pred"], target_out[1]["proj"])
                                  + global_loss(o[1]["pred"], target_out[0]["proj"]))
                query, key = target_out[0]["dense"], o[1]["dense"]
            with timer("matching"):
                match = correspondence_match(g_c, g_sc, tuple(query.shape[-2:]), tuple(key.shape[-2:]))
            with timer("loss_fwd"):
                l_local = local_loss(query, key, match)
                loss = (1 - alpha) * l_global + alpha * l_local
        m.finish(loss, timer, cut)
        with timer("ema"):  # BYOL / LC-loss: after the optimiser step
            target.update(t)
        return loss

    return step


def _densesiam_step(m: Method) -> Callable[..., Tensor]:
    hp = m.hp
    image_loss, pix_loss = NegativeCosine(), DenseSimSiamLoss()
    region_loss = RegionSimLoss(temperature=hp["region_temperature"])
    region_from = math.ceil(0.8 * m.total_steps)

    def step(batch: Any, t: int, timer: PartTimer, cut: Boundary) -> Tensor:
        views, (g1, g2) = _to_device(*batch, m.device, timer)
        with m.autocast():
            with timer("online_fwd"):
                o1, o2 = m.online(views)
            with timer("matching"):
                match = location_match(g1, g2, hp["num_points"], "grid", tuple(o1["dense_z"].shape[-2:]),
                                       tuple(o2["dense_z"].shape[-2:]))
            with timer("loss_fwd"):
                o1, o2 = cut.cut(o1), cut.cut(o2)
                qp, kp = match.query_points, match.key_points
                p1, z1 = sample_points(o1["dense_p"], qp), sample_points(o1["dense_z"], qp)
                p2, z2 = sample_points(o2["dense_p"], kp), sample_points(o2["dense_z"], kp)
                l_pix = pix_loss(p1, z2, p2, z1, match.valid)
                l_image = 0.5 * (image_loss(o1["p"], o2["z"]) + image_loss(o2["p"], o1["z"]))
                l_region = region_loss(o1["region_p"], o2["region_z"], o2["region_p"], o1["region_z"])
                w_region = hp["region_weight"] if t >= region_from else 0.0
                loss = l_image + hp["dense_weight"] * l_pix + w_region * l_region
        m.finish(loss, timer, cut)
        return loss

    return step


#: Method key -> (label, script, builder key, variant).
METHODS: dict[str, tuple[str, str, str | None]] = {
    "pixcon-sr": ("PixCon-SR", "pixcon", "sr"),
    "pixcon-coord": ("PixCon-Coord", "pixcon", "coord"),
    "densecl": ("DenseCL", "densecl", None),
    "pixpro": ("PixPro", "pixpro", None),
    "lcloss": ("LC-loss", "lcloss", None),
    "densesiam": ("DenseSiam", "densesiam", None),
}


def hyperparameters(method: str, config: str, **overrides: Any) -> dict[str, Any]:
    script = METHODS[method][1]
    hp = {**CONFIGS[config], **HPARAMS[script]["all"], **HPARAMS[script][config]}
    hp.update({k: v for k, v in overrides.items() if v is not None})
    return hp


def build_method(method: str, config: str, device: torch.device, amp: str = "none", total_steps: int = 1000,
                 seed: int = 0, **overrides: Any) -> Method:
    """Models, target, queues, optimiser, scheduler and GradScaler of ``method`` as its script builds them."""
    label, script, variant = METHODS[method]
    hp = hyperparameters(method, config, **overrides)
    torch.manual_seed(seed)
    arch = hp["arch"]
    if script == "pixcon":
        online: nn.Module = PixConOnline(arch, hp["proj_hidden"], hp["proj_dim"])
    elif script == "densecl":
        online = DenseCLOnline(arch, hp["proj_hidden"], hp["proj_dim"])
    elif script == "pixpro":
        online = PixProOnline(arch, hp["proj_hidden"], hp["proj_dim"], hp["gamma"], hp["transform_layers"])
    elif script == "lcloss":
        online = LCOnline(arch, hp["proj_hidden"], hp["proj_dim"], hp["dense_hidden"], hp["dense_dim"])
    else:
        online = DenseSiamOnline(arch, hp["proj_hidden"], hp["proj_dim"], hp["pred_hidden"], hp["num_regions"],
                                 hp["region_dim"])
    online.to(device).train()
    m = Method(method, label, hp, device, AMP[amp], online, total_steps=total_steps)
    if script in ("pixcon", "pixpro", "lcloss"):
        m.target = EMA(online.encoder, CosineMomentum(total_steps, base=hp["momentum_base"]), buffers="none").to(device)
    elif script == "densecl":
        m.target = EMA(online.encoder, constant_momentum(hp["momentum"]), buffers="none").to(device)
    if script in ("pixcon", "densecl"):
        m.queues = {"global": MomentumQueue(hp["proj_dim"], hp["queue_size"], seed=seed).to(device),
                    "dense": MomentumQueue(hp["proj_dim"], hp["queue_size"], seed=seed + 1).to(device)}
    lr = scale_lr(hp["lr"], hp["batch_size"]) if hp["lr_scaling"] == "linear" else hp["lr"]
    m.optimizer = build_optimizer(online, hp["optimizer"], lr, hp["weight_decay"])
    m.scheduler = WarmupCosineScheduler(m.optimizer, total_steps, warmup_steps=0, warmup_start_ratio=1e-4)
    m.scaler = torch.amp.GradScaler(device.type, enabled=m.amp == torch.float16)
    if script == "pixcon":
        m.step_fn = _pixcon_step(m, variant or "sr")
    elif script == "densecl":
        m.step_fn = _densecl_step(m)
    elif script == "pixpro":
        m.step_fn = _pixpro_step(m)
    elif script == "lcloss":
        m.step_fn = _lcloss_step(m)
    else:
        m.step_fn = _densesiam_step(m)
    return m


# ------------------------------------------------------------------------------------------- measuring
def run_step(m: Method, batch: Any, t: int, split: bool = True, timed: bool = True,
             clock: str = "wall") -> tuple[float, dict[str, float]]:
    """One step of ``m``; returns (step ms, per-part ms) on ``clock`` (``wall`` or process ``cpu`` time)."""
    assert m.step_fn is not None
    timer = PartTimer(m.device, enabled=timed, clock=clock)
    now = CLOCKS[clock]
    sync(m.device)
    t0 = now()
    loss = m.step_fn(batch, t, timer, Boundary(split))
    sync(m.device)
    total = 1e3 * (now() - t0)
    del loss
    return total, dict(timer.ms)


def peak_step_memory(m: Method, batch: Any, t: int) -> int:
    """Peak bytes of one step (CUDA allocator peak above the state, or the CPU live tensor bytes)."""
    gc.collect()
    if m.device.type == "cuda":
        sync(m.device)
        base = torch.cuda.memory_allocated(m.device)
        torch.cuda.reset_peak_memory_stats(m.device)
        run_step(m, batch, t, timed=False)
        sync(m.device)
        return torch.cuda.max_memory_allocated(m.device) - base
    with LiveTensorBytes(*m.state_tensors(), *batch[0]) as mode:
        run_step(m, batch, t, timed=False)
    gc.collect()
    return mode.peak


def infonce_floor_ms(m: Method, grid: int, clock: str, repeats: int = 3) -> float | None:
    """The bare dense-queue work of one step (PixCon: 2 directions, DenseCL: 1): ``q @ Q^T``, ``logsumexp``,
    ``exp(L - lse) @ Q`` in query chunks (``benchmarks/losses.py``'s floor), median of ``repeats`` runs."""
    if "dense" not in m.queues:
        return None
    directions = 2 if m.name.startswith("pixcon") else 1
    queue = m.queues["dense"].queue
    q = F.normalize(torch.randn(m.hp["batch_size"] * grid * grid, queue.shape[1], device=m.device), dim=1)
    chunk = default_chunk_size(queue.shape[0])
    now, times = CLOCKS[clock], []
    for _ in range(repeats):
        sync(m.device)
        t0 = now()
        for _ in range(directions):
            floor_fwd_bwd(q, queue, chunk)
        sync(m.device)
        times.append(1e3 * (now() - t0))
    return median(times)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure(method: str, config: str, device: torch.device, amp: str = "none", steps: int = 5, warmup: int = 2,
            memory: bool = True, also_fused: bool = False, seed: int = 0, clock: str = "wall",
            **overrides: Any) -> dict[str, Any]:
    """Median step and per-part times of ``method`` over ``steps`` steps after ``warmup`` steps."""
    total = warmup + steps + (steps if also_fused else 0) + 1
    m = build_method(method, config, device, amp, total_steps=max(total, 10), seed=seed, **overrides)
    gen = torch.Generator().manual_seed(seed)
    hp = m.hp
    step_ms, lib_ms, parts = [], [], defaultdict(list)
    t = 0
    for i in range(warmup + steps):
        batch = random_batch(method, hp, gen)
        ms, p = run_step(m, batch, t, clock=clock)
        t += 1
        if i < warmup:
            continue
        step_ms.append(ms)
        lib_ms.append(sum(p.get(k, 0.0) for k in LIBRARY_PARTS))
        for k in (*LIBRARY_PARTS, *NETWORK_PARTS):
            parts[k].append(p.get(k, 0.0))
        parts["other"].append(ms - sum(p.values()))
    fused = []
    if also_fused:
        for _ in range(steps):
            ms, _ = run_step(m, random_batch(method, hp, gen), t, split=False, timed=False, clock=clock)
            fused.append(ms)
            t += 1
    peak = peak_step_memory(m, random_batch(method, hp, gen), t) if memory else None
    med_step, med_lib = median(step_ms), median(lib_ms)
    stride = (m.online.backbone if hasattr(m.online, "backbone") else m.online.encoder["backbone"]).stride
    side = math.ceil(hp["crop_size"] / stride)
    floor = infonce_floor_ms(m, side, clock)
    return {
        "method": method, "label": m.label, "config": config, "device": device_name(device), "amp": amp,
        "arch": hp["arch"], "batch_size": hp["batch_size"], "crop_size": hp["crop_size"], "grid": f"{side}x{side}",
        "queue_size": hp.get("queue_size"), "proj_hidden": hp["proj_hidden"], "proj_dim": hp["proj_dim"],
        "optimizer": hp["optimizer"], "steps": steps, "warmup": warmup, "clock": clock,
        "step_ms": med_step, "library_ms": med_lib, "library_fraction": med_lib / med_step,
        "meets_goal": med_lib / med_step <= GOAL,
        "parts_ms": {k: median(v) for k, v in parts.items()},
        "step_ms_all": step_ms, "library_ms_all": lib_ms,
        "fused_step_ms": median(fused) if fused else None,
        "dense_queue_floor_ms": floor,
        "images_per_s": hp["batch_size"] / (med_step / 1e3),
        "peak_bytes": peak,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return device


# ------------------------------------------------------------------------------------------- output
SHORT = {"geometry": "geom", "matching": "match", "reweighting": "rewt", "loss_fwd": "loss fwd",
         "loss_bwd": "loss bwd", "queue": "queue", "ema": "EMA", "input": "input", "online_fwd": "online fwd",
         "target_fwd": "target fwd", "net_bwd": "net bwd", "optimizer": "optim", "other": "other"}


def table(results: list[dict[str, Any]]) -> str:
    cols = [*LIBRARY_PARTS, *NETWORK_PARTS, "other"]
    head = ["method", "config", "amp", "grid", "step ms", "library ms", "library %", "<= 5 %",
            *[SHORT[c] + " ms" for c in cols], "img/s", "peak MiB"]
    fused = any(r.get("fused_step_ms") for r in results)
    floor = any(r.get("dense_queue_floor_ms") for r in results)
    if floor:
        head.append("dense-queue floor ms")
    if fused:
        head.insert(5, "fused step ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["label"], r["config"], r["amp"], r["grid"], f"{r['step_ms']:,.1f}", f"{r['library_ms']:,.1f}",
               f"{100 * r['library_fraction']:.1f}", "yes" if r["meets_goal"] else "**no**",
               *[f"{r['parts_ms'].get(c, 0.0):,.1f}" for c in cols], f"{r['images_per_s']:,.1f}",
               "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}"]
        if floor:
            row.append(f"{r['dense_queue_floor_ms']:,.1f}" if r.get("dense_queue_floor_ms") else "-")
        if fused:
            row.insert(5, f"{r['fused_step_ms']:,.1f}" if r.get("fused_step_ms") else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    return {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "cuda": torch.version.cuda if device.type == "cuda" else None}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), default="demo")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--amp", choices=list(AMP), default="none", help="autocast dtype (fp16 adds a GradScaler)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=None, help="override the configuration's batch (32)")
    p.add_argument("--crop-size", type=int, default=None, help="override the view size")
    p.add_argument("--queue-size", type=int, default=None, help="override the queue size of PixCon / DenseCL")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: time.perf_counter; cpu: process CPU time (robust on a shared, loaded machine; "
                        "CPU only)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--also-fused", action="store_true",
                   help="also time steps with one fused backward (checks that the split costs nothing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures CPU work only: use the wall clock on CUDA")
    env = environment(device)
    print(f"device: {env['device']}, torch {env['torch']}, config {args.config}, amp {args.amp}, "
          f"{args.clock} clock, median of {args.steps} steps after {args.warmup} warm-up steps", flush=True)
    results = []
    for method in args.methods:
        t0 = time.perf_counter()
        r = measure(method, args.config, device, args.amp, args.steps, args.warmup, memory=not args.no_memory,
                    also_fused=args.also_fused, seed=args.seed, clock=args.clock, batch_size=args.batch_size,
                    crop_size=args.crop_size, queue_size=args.queue_size)
        results.append(r)
        print(f"  {r['label']}: step {r['step_ms']:,.1f} ms, library {r['library_ms']:,.1f} ms "
              f"({100 * r['library_fraction']:.1f} %) [{time.perf_counter() - t0:.0f} s]", flush=True)
    print()
    print(table(results))
    print()
    for r in results:
        parts = {k: v for k, v in r["parts_ms"].items() if k in LIBRARY_PARTS and v > 0}
        top = max(parts, key=parts.get) if parts else "-"  # type: ignore[arg-type]
        verdict = "meets" if r["meets_goal"] else "MISSES"
        print(f"{r['label']} ({r['config']}): {verdict} the 5 % goal ({100 * r['library_fraction']:.1f} %); "
              f"largest library part: {SHORT.get(top, top)} ({parts.get(top, 0.0):,.1f} ms)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "argv": list(sys.argv if argv is None else argv),
                                         "results": results}, indent=1))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
