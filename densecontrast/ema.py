"""Exponential moving averages of a model: the momentum (target / key) encoder of contrastive methods.

``target <- m * target + (1 - m) * online`` for every parameter, with ``m`` constant (MoCo,
DenseCL: 0.999) or scheduled (BYOL/PixPro/PixCon "momentum ascending", see
:mod:`densecontrast.schedules`). :class:`EMA` owns a frozen deep copy of the online model, keeps a
step counter, and stores both in its ``state_dict`` so a resumed run is exact.

When to call :meth:`EMA.update` (both are supported; it is only a question of where the call sits
in the loop, and matters only for exact parity with a reference implementation):

* **update-before-keys** (PixPro, SlotCon): at the start of the step, before the target encodes
  the keys. The first update then happens before any optimizer step.
* **update-after-step** (PixCon's mmselfsup hook, MoCo/DenseCL in effect): after
  ``optimizer.step()``, so the next step's keys see the freshly updated target.

In both cases the ``t``-th call (0-based) uses ``m_t = schedule(t)`` unless a ``step`` is passed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from densecontrast._checks import check_choice, check_int, check_number, check_type
from densecontrast.distributed import unwrap_model

__all__ = ["EMA", "BufferMode", "ema_update_"]

BufferMode = Literal["copy", "average", "none"]
_BUFFER_MODES = ("copy", "average", "none")


def _pairs(
    kind: str, target: list[tuple[str, Tensor]], online: list[tuple[str, Tensor]]
) -> tuple[list[Tensor], list[Tensor]]:
    t_names = [n for n, _ in target]
    o = dict(online)
    if set(t_names) != set(o):
        missing = sorted(set(t_names) - set(o))[:5]
        extra = sorted(set(o) - set(t_names))[:5]
        raise ValueError(
            f"online model and EMA target must have the same {kind}, but the online model lacks {missing} "
            f"and has extra {extra}"
        )
    tgt = [t for _, t in target]
    src = []
    for name, t in target:
        s = o[name].detach()
        if s.shape != t.shape:
            raise ValueError(
                f"{kind[:-1]} {name!r} has shape {tuple(s.shape)} online but {tuple(t.shape)} in the EMA target"
            )
        if s.device != t.device or s.dtype != t.dtype:
            s = s.to(device=t.device, dtype=t.dtype)
        src.append(s)
    return tgt, src


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float, buffers: BufferMode = "copy") -> None:
    """In place: ``target_p <- m * target_p + (1 - m) * online_p`` for every parameter ``p`` (matched by name).

    Args:
        target: the averaged module (updated in place).
        online: the trained module with the same parameter and buffer names (DDP / compile
            wrappers are stripped, see :func:`densecontrast.distributed.unwrap_model`).
        momentum: ``m`` in ``[0, 1]``: 1 keeps the target, 0 copies the online model.
        buffers: ``"copy"`` — every buffer (BN running statistics, counters) is copied from the
            online model; ``"average"`` — floating-point buffers are averaged like parameters and
            integer buffers (``num_batches_tracked``) copied; ``"none"`` — buffers are left alone,
            so they evolve only through the target's own forward passes (what MoCo, DenseCL,
            PixCon and PixPro do: their momentum update loops over ``parameters()`` only).

    Raises:
        ValueError: ``momentum`` outside ``[0, 1]``, unknown ``buffers``, or mismatched names/shapes.

    Examples:
        >>> import torch
        >>> online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> ema_update_(target, online, momentum=0.0)  # m = 0 copies
        >>> bool(torch.equal(target.weight, online.weight))
        True
    """
    m = check_number(momentum, "momentum", 0, 1)
    check_choice(buffers, "buffers", _BUFFER_MODES)
    online = unwrap_model(online)
    tgt, src = _pairs("parameters", list(target.named_parameters()), list(online.named_parameters()))
    if tgt:
        if m == 0.0:
            torch._foreach_copy_(tgt, src)
        elif m != 1.0:
            torch._foreach_lerp_(tgt, src, 1.0 - m)
    if buffers == "none":
        return
    tgt_b, src_b = _pairs("buffers", list(target.named_buffers()), list(online.named_buffers()))
    avg_t, avg_s, cp_t, cp_s = [], [], [], []
    for t, s in zip(tgt_b, src_b):
        if buffers == "average" and t.is_floating_point() and 0.0 < m:
            avg_t.append(t)
            avg_s.append(s)
        else:
            cp_t.append(t)
            cp_s.append(s)
    if avg_t and m != 1.0:
        torch._foreach_lerp_(avg_t, avg_s, 1.0 - m)
    if cp_t:
        torch._foreach_copy_(cp_t, cp_s)


class EMA(nn.Module):
    """A frozen, exponentially averaged copy of a model (timm-style EMA / contrastive target encoder).

    The constructor deep-copies ``model`` (after stripping DDP / ``DataParallel`` / ``torch.compile``
    wrappers) into ``self.target`` and freezes it (``requires_grad=False``). The online model is
    remembered by reference, not registered as a submodule: it is not part of this module's
    ``state_dict``, ``.to()`` or ``.train()``. The target's train/eval mode is whatever the user
    sets (``ema.train()`` / ``ema.eval()`` or the parent module's mode); :meth:`update` never
    changes it.

    State (``state_dict``): the target's parameters and buffers (``target.*``) and the step
    counter ``step_count``. Save it with the model; after ``load_state_dict`` a resumed run
    continues exactly as an uninterrupted one.

    It is the momentum (key / target) encoder of DenseCL, PixCon, PixPro and LC-loss::

        target = EMA(online_encoder, CosineMomentum(total_steps, base=0.99), buffers="none")
        for step, batch in enumerate(loader):
            target.update(step)            # update-before-keys (PixPro) ...
            keys = target(view_2)          # no_grad forward of the target
            loss = ...; loss.backward(); optimizer.step()
            # ... or call target.update(step) here instead (update-after-step, PixCon)

    Args:
        model: the online model (possibly DDP-wrapped or compiled).
        momentum: ``m`` in ``[0, 1]`` or a schedule ``step -> m`` such as
            :class:`densecontrast.schedules.CosineMomentum`.
        buffers: how buffers follow the online model, see :func:`ema_update_` (default
            ``"copy"``: BN running statistics are copied from the online model; use ``"none"``
            to reproduce MoCo/DenseCL/PixCon/PixPro, whose target keeps its own statistics).
        update_after_step: for steps ``t < update_after_step`` the update copies the online
            model (``m = 0``); the schedule is evaluated at the global ``t`` afterwards.

    Attributes:
        target: the averaged copy (frozen; put it in eval/train mode as you need).
        schedule: the ``momentum`` argument (a float or a callable); it may be reassigned, e.g.
            once the total number of steps is known.
        step_count: long scalar buffer, the ``t`` of the next update (see :attr:`step`).

    Examples:
        >>> import torch
        >>> from densecontrast.schedules import CosineMomentum
        >>> net = torch.nn.Linear(4, 2)
        >>> ema = EMA(net, momentum=CosineMomentum(total_steps=100, base=0.99))
        >>> ema.momentum, ema.step
        (0.99, 0)
        >>> ema.update()  # after optimizer.step(), or before computing keys; returns the m used
        0.99
        >>> ema.step
        1
        >>> ema(torch.randn(3, 4)).requires_grad  # runs the target under no_grad
        False
    """

    step_count: Tensor

    def __init__(
        self,
        model: nn.Module,
        momentum: float | Callable[[int], float] = 0.99,
        *,
        buffers: BufferMode = "copy",
        update_after_step: int = 0,
    ) -> None:
        super().__init__()
        check_type(model, "model", nn.Module, what="an nn.Module")
        if not callable(momentum):
            check_number(momentum, "momentum", 0, 1, note="or a callable schedule")
        check_choice(buffers, "buffers", _BUFFER_MODES)
        check_int(update_after_step, "update_after_step", 0)
        online = unwrap_model(model)
        # Not a submodule: keeps the online weights out of this module's state_dict / .to() / .train().
        object.__setattr__(self, "_online", online)
        self.target = copy.deepcopy(online)
        for p in self.target.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.schedule = momentum
        self.buffers_mode: BufferMode = buffers
        self.update_after_step = update_after_step
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))

    @property
    def online(self) -> nn.Module:
        """The (unwrapped) online model this EMA follows."""
        return self._online

    @property
    def step(self) -> int:
        """Number of the next update (0-based): the ``t`` that :meth:`update` uses when called without ``step``."""
        return int(self.step_count)

    def momentum_at(self, step: int) -> float:
        """The momentum ``m`` an update at 0-based ``step`` uses (0 before ``update_after_step``).

        Examples:
            >>> import torch
            >>> EMA(torch.nn.Linear(1, 1), 0.9, update_after_step=2).momentum_at(1)
            0.0
        """
        if step < self.update_after_step:
            return 0.0
        m = float(self.schedule(step)) if callable(self.schedule) else float(self.schedule)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"the momentum schedule must return values in [0, 1], but returned {m} at step {step}")
        return m

    @property
    def momentum(self) -> float:
        """The momentum the next :meth:`update` (without ``step``) will use."""
        return self.momentum_at(self.step)

    @torch.no_grad()
    def update(self, step: int | None = None, model: nn.Module | None = None) -> float:
        """Average the online model into the target: ``target <- m_t * target + (1 - m_t) * online``.

        Args:
            step: 0-based global step ``t`` for the schedule (default: the internal counter).
                After the call the counter is ``t + 1``.
            model: average this model instead of the one given at construction (same names).

        Returns:
            The momentum ``m_t`` used.

        Examples:
            >>> import torch
            >>> net = torch.nn.Linear(2, 2)
            >>> ema = EMA(net, momentum=0.5)
            >>> with torch.no_grad():
            ...     _ = net.weight.add_(1.0)
            >>> ema.update()
            0.5
            >>> bool(torch.allclose(ema.target.weight, net.weight - 0.5))
            True
        """
        t = self.step if step is None else int(step)
        if t < 0:
            raise ValueError(f"step must be >= 0, but got {step!r}")
        m = self.momentum_at(t)
        ema_update_(self.target, self._online if model is None else model, m, self.buffers_mode)
        self.step_count.fill_(t + 1)
        return m

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the target model under ``torch.no_grad()`` (in its current train/eval mode)."""
        with torch.no_grad():
            return self.target(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"momentum={self.schedule!r}, buffers={self.buffers_mode!r}, update_after_step={self.update_after_step}"
