"""Step-based schedules: EMA momentum (constant, cosine "momentum ascending") and warm-up + cosine learning rate.

All schedules are plain functions of the **0-based global step** (optimizer iterations, not
epochs) and return Python floats, so they are cheap, stateless and resume-safe: on resume, pass
the step restored from the checkpoint.

Convention:
    ``t`` is the 0-based step, ``T = total_steps``. Past the end (``t >= T``) every schedule stays
    at its final value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from densecontrast._checks import check_int, check_number

__all__ = ["CosineMomentum", "constant_momentum", "cosine_momentum", "warmup_cosine_lr"]


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """Cosine "momentum ascending" (BYOL, PixPro, PixCon): ``base`` at step 0 rising to ``final`` at ``T``.

    ``m_t = final - (final - base) * (cos(pi * t / T) + 1) / 2`` for ``0 <= t < T``, and ``final``
    for ``t >= T``. With ``final = 1`` this is ``1 - (1 - base) * (cos(pi t / T) + 1) / 2``.

    Args:
        step: 0-based global step ``t`` (``>= 0``).
        total_steps: ``T`` (``>= 1``), usually epochs * iterations per epoch.
        base: momentum at step 0, in ``[0, 1]`` (PixCon/PixPro/SlotCon 0.99; BYOL/LC-loss 0.996).
        final: momentum reached at ``T``, in ``[0, 1]``.

    Returns:
        The momentum ``m_t`` (float).

    Examples:
        >>> cosine_momentum(0, 100), cosine_momentum(50, 100), cosine_momentum(100, 100)
        (0.99, 0.995, 1.0)
    """
    check_int(step, "step", 0)
    check_int(total_steps, "total_steps", 1)
    base, final = check_number(base, "base", 0, 1), check_number(final, "final", 0, 1)
    if step >= total_steps:
        return final
    return final - (final - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


class CosineMomentum:
    """Callable form of :func:`cosine_momentum`: ``schedule(step) -> m`` with fixed ``base, final, total_steps``.

    Pass it as the ``momentum`` of :class:`densecontrast.ema.EMA`.

    Args:
        total_steps: ``T`` (``>= 1``).
        base: momentum at step 0.
        final: momentum from step ``T`` on.

    Examples:
        >>> sched = CosineMomentum(total_steps=10, base=0.99)
        >>> sched(0), sched(10)
        (0.99, 1.0)
    """

    def __init__(self, total_steps: int, base: float = 0.99, final: float = 1.0) -> None:
        self.total_steps = check_int(total_steps, "total_steps", 1)
        self.base = check_number(base, "base", 0, 1)
        self.final = check_number(final, "final", 0, 1)

    def __call__(self, step: int) -> float:
        return cosine_momentum(step, self.total_steps, self.base, self.final)

    def __repr__(self) -> str:
        return f"CosineMomentum(total_steps={self.total_steps}, base={self.base}, final={self.final})"


def constant_momentum(m: float) -> Callable[[int], float]:
    """A schedule returning ``m`` at every step (MoCo/DenseCL: 0.999).

    Examples:
        >>> constant_momentum(0.999)(12345)
        0.999
    """
    m = check_number(m, "m", 0, 1)

    def schedule(step: int) -> float:
        return m

    return schedule


def warmup_cosine_lr(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    final_lr: float = 0.0,
    warmup_start_ratio: float = 1e-4,
) -> float:
    """Linear warm-up then cosine decay of the learning rate, per step.

    * ``t < W`` (warm-up): ``lr = base_lr * (r + (1 - r) * t / W)`` with ``r = warmup_start_ratio``;
    * ``W <= t < T``: ``lr = final_lr + (base_lr - final_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2``;
    * ``t >= T``: ``final_lr``.

    The cosine runs over the steps after the warm-up (torchvision/timm style). PixCon's
    config uses a 4-epoch warm-up with ratio ``1e-4`` and a cosine to 0, but its mmcv scheduler
    runs the cosine over the whole run (warm-up included) and multiplies the ramp onto it; the
    two curves differ by a shift of at most ``W`` steps, negligible when ``W << T``.

    Args:
        step: 0-based global step ``t``.
        total_steps: ``T`` (``>= 1``).
        warmup_steps: ``W`` (``0 <= W < T``; 0 disables the warm-up).
        base_lr: peak learning rate reached at the end of the warm-up (``>= 0``).
        final_lr: learning rate at ``T`` (``>= 0``).
        warmup_start_ratio: ``lr(0) / base_lr`` when warming up, in ``[0, 1]``.

    Returns:
        The learning rate (float). For ``torch.optim.lr_scheduler.LambdaLR`` pass ``base_lr=1``
        and ``final_lr=final / base`` to get the multiplicative factor.

    Examples:
        >>> tuple(round(warmup_cosine_lr(t, 10, 2, 1.0, warmup_start_ratio=0.0), 3) for t in (0, 1, 2, 6, 10))
        (0.0, 0.5, 1.0, 0.5, 0.0)
    """
    check_int(step, "step", 0)
    check_int(total_steps, "total_steps", 1)
    check_int(warmup_steps, "warmup_steps", 0)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps must be < total_steps={total_steps}, but got {warmup_steps}")
    check_number(base_lr, "base_lr", 0)
    check_number(final_lr, "final_lr", 0)
    r = check_number(warmup_start_ratio, "warmup_start_ratio", 0, 1)
    if step >= total_steps:
        return float(final_lr)
    if step < warmup_steps:
        return base_lr * (r + (1.0 - r) * step / warmup_steps)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
