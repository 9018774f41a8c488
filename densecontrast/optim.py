"""Optimisers and schedules of the dense SSL recipes: LARS, weight-decay groups, LR scaling, warm-up + cosine.

Recipes (see ``docs/training.md``): DenseCL / PixCon use SGD (momentum 0.9, wd 1e-4) with a
cosine schedule; PixPro and LC-loss use LARS with ``lr = base_lr * global_batch / 256`` and a
linear warm-up followed by a cosine decay to 0, stepped **per iteration**.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from densecontrast._checks import check_choice, check_int, check_number, check_positive, compute_dtype
from densecontrast.schedules import warmup_cosine_lr

__all__ = [
    "LARS",
    "OPTIMIZERS",
    "WarmupCosineScheduler",
    "build_optimizer",
    "param_groups_weight_decay",
    "scale_lr",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "lars", "adamw")
"""Names accepted by :func:`build_optimizer`."""


class LARS(Optimizer):
    r"""SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as in BYOL / PixPro / LC-loss.

    For each parameter tensor :math:`w` with gradient :math:`g` (one "layer"), per step:

    .. math::

        g' = g + \lambda w, \qquad
        \eta = \begin{cases} c\,\|w\| / \|g'\| & \|w\| > 0 \text{ and } \|g'\| > 0 \\
                             1 & \text{otherwise} \end{cases}, \qquad
        v \leftarrow \mu v + \eta g', \qquad w \leftarrow w - \text{lr}\, v

    with weight decay :math:`\lambda`, trust coefficient :math:`c` and momentum :math:`\mu`.
    *Excluded* parameters skip both the weight decay and the trust ratio (:math:`g' = g`,
    :math:`\eta = 1`), i.e. they get plain SGD with momentum. With
    ``exclude_bias_and_norm=True`` a parameter is excluded when it has ``ndim <= 1``: biases
    and the weights of BatchNorm / LayerNorm / GroupNorm. A parameter group may force the
    choice with the key ``"lars_exclude": True / False`` (set by
    :func:`param_groups_weight_decay`).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (>= 0), usually from :func:`scale_lr`.
        momentum: momentum :math:`\mu` in ``[0, 1)``.
        weight_decay: :math:`\lambda` (>= 0); PixPro 1e-5, LC-loss 1e-6.
        trust_coefficient: :math:`c` (> 0), conventionally 0.001.
        exclude_bias_and_norm: exclude ``ndim <= 1`` parameters from adaptation and decay.

    Raises:
        ValueError: for out-of-range hyperparameters.

    Examples:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> w0 = model.weight.detach().clone(); opt.step()
        >>> bool((model.weight - w0).norm() <= 0.1 * 0.001 * w0.norm() * 1.0001)  # step = lr * c * ||w||
        True
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        check_number(lr, "lr", 0)
        check_number(momentum, "momentum", 0, 1, open_high=True)
        check_number(weight_decay, "weight_decay", 0)
        check_positive(trust_coefficient, "trust_coefficient")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "exclude_bias_and_norm": exclude_bias_and_norm,
            "lars_exclude": None,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one update.

        Args:
            closure: optional function re-evaluating the loss (as for other optimisers).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            wd, c = group["weight_decay"], group["trust_coefficient"]
            forced = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad
                excluded = forced if forced is not None else (group["exclude_bias_and_norm"] and p.ndim <= 1)
                if not excluded:
                    if wd != 0:
                        g = g.add(p, alpha=wd)
                    acc = compute_dtype(p)  # fp16/bf16 norms in fp32, fp64 stays fp64
                    w_norm = torch.linalg.vector_norm(p, dtype=acc)
                    g_norm = torch.linalg.vector_norm(g, dtype=acc)
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0), c * w_norm / g_norm.clamp_min(1e-30), torch.ones_like(w_norm)
                    )
                    g = g * ratio.to(g.dtype)
                state = self.state[p]
                if mu != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        buf.mul_(mu).add_(g)
                    g = buf
                p.add_(g, alpha=-lr)
        return loss


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float,
    skip: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decayed group and a no-decay group.

    No decay (and, under :class:`LARS`, no trust ratio: ``"lars_exclude": True``) for biases,
    every parameter with ``ndim <= 1`` (norm-layer weights, scalars) and names listed in
    ``skip`` (exact names or suffixes, e.g. ``"pos_embed"``). Frozen parameters
    (``requires_grad=False``, e.g. an EMA target) are left out. Works with any optimiser;
    extra group keys are ignored by SGD / AdamW.

    Args:
        model: the online network.
        weight_decay: decay of the first group (>= 0).
        skip: additional parameter names (or name suffixes) without decay.

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]`` (empty groups dropped).

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> groups = param_groups_weight_decay(net, 1e-4)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 0.0001), (3, 0.0)]
    """
    check_number(weight_decay, "weight_decay", 0)
    skip = tuple(skip)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name == "bias" or any(name.endswith(s) for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def scale_lr(base_lr: float, global_batch: int, base_batch: int = 256) -> float:
    """Linear LR scaling: ``base_lr * global_batch / base_batch`` (Goyal et al., 2017).

    Args:
        base_lr: the recipe's learning rate for ``base_batch`` images (>= 0).
        global_batch: images per optimiser step over all processes (batch per GPU x world
            size x gradient-accumulation steps), >= 1.
        base_batch: the reference batch, 256 in BYOL / PixPro / LC-loss / SimSiam.

    Examples:
        >>> scale_lr(1.0, 1024)  # PixPro: base lr 1.0 at 8 x 128 images
        4.0
    """
    check_number(base_lr, "base_lr", 0)
    check_number(global_batch, "global_batch", 1)
    check_number(base_batch, "base_batch", 1)
    return base_lr * global_batch / base_batch


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9) -> Optimizer:
    """The optimiser of a recipe over :func:`param_groups_weight_decay` groups (no decay on biases and norms).

    Args:
        model: the online network (frozen parameters are left out).
        name: ``"sgd"`` (momentum, DenseCL / PixCon / DenseSiam), ``"lars"`` (PixPro / LC-loss) or
            ``"adamw"``.
        lr: the learning rate, already scaled to the global batch (see :func:`scale_lr`).
        weight_decay: decay of the decayed group.
        momentum: SGD / LARS momentum.

    Examples:
        >>> opt = build_optimizer(torch.nn.Linear(4, 2), "lars", lr=0.1, weight_decay=1e-6)
        >>> type(opt).__name__, [g["weight_decay"] for g in opt.param_groups]
        ('LARS', [1e-06, 0.0])
    """
    check_choice(name, "name", OPTIMIZERS)
    check_number(lr, "lr", 0)
    groups = param_groups_weight_decay(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


class WarmupCosineScheduler(LRScheduler):
    """Per-iteration LR schedule: linear warm-up from ``warmup_start_ratio * lr``, cosine decay to ``final_ratio * lr``.

    Every parameter group follows its own initial ``lr`` times the factor
    :func:`densecontrast.schedules.warmup_cosine_lr` ``(step, total_steps, warmup_steps, 1.0,
    final_ratio, warmup_start_ratio)``: linear from ``warmup_start_ratio`` to 1 over
    ``warmup_steps``, then half a cosine down to ``final_ratio`` at ``total_steps``, constant
    after. Call
    :meth:`step` once per **optimiser step** (not per epoch), after ``optimizer.step()``.
    ``state_dict()`` holds only numbers, so it is safe for ``torch.load(weights_only=True)``.

    Args:
        optimizer: the optimiser.
        total_steps: length of the schedule in steps (``epochs * iters_per_epoch``), >= 1.
        warmup_steps: linear warm-up length in steps, in ``[0, total_steps)``.
        warmup_start_ratio: LR multiplier at step 0, in ``[0, 1]`` (1e-4 as in PixCon / DenseCL).
        final_ratio: LR multiplier reached at ``total_steps``, in ``[0, 1]``.
        last_epoch: index of the last step when resuming without ``load_state_dict``.

    Examples:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
        >>> sched = WarmupCosineScheduler(opt, total_steps=100, warmup_steps=10, warmup_start_ratio=0.0)
        >>> lrs = []
        >>> for _ in range(100):
        ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
        >>> round(lrs[0], 6), round(lrs[5], 6), round(lrs[10], 6), round(lrs[55], 6)
        (0.0, 0.2, 0.4, 0.2)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_start_ratio: float = 1e-4,
        final_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        check_int(total_steps, "total_steps", 1)
        check_int(warmup_steps, "warmup_steps", 0)
        if warmup_steps >= total_steps:
            raise ValueError(f"warmup_steps must be < total_steps={total_steps}, but got {warmup_steps}")
        check_number(warmup_start_ratio, "warmup_start_ratio", 0, 1)
        check_number(final_ratio, "final_ratio", 0, 1)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_ratio = float(warmup_start_ratio)
        self.final_ratio = float(final_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The LR multiplier at ``step`` (0-based optimiser step)."""
        return warmup_cosine_lr(
            max(step, 0), self.total_steps, self.warmup_steps, 1.0, self.final_ratio, self.warmup_start_ratio
        )

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Learning rates of all groups at the current step."""
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]
