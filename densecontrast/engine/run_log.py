"""Logging of a training run: console lines, a progress bar, JSON lines and TensorBoard, on rank 0 only.

TensorBoard and tqdm are optional; a missing TensorBoard is reported in one line naming the extra.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

__all__ = ["RunLog"]


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.numel() != 1:
            raise ValueError(f"logged values must be scalars, but got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


class RunLog:
    """Console lines, a progress bar, ``metrics.jsonl`` and TensorBoard events for one training run.

    Call :meth:`step` after every optimiser step; every ``print_freq`` steps (and at
    ``stop_step``) it appends ``{"step": s, "epoch": e, ..., "img_per_s": x}`` to
    ``metrics.jsonl`` (flushed; ``nan`` / ``inf`` as strings; a resumed run appends), writes
    TensorBoard scalars under ``train/`` and prints the line.

    ``enabled=info.is_main`` makes only rank 0 write; ``start_step`` / ``stop_step`` (default
    ``total_steps``) place the progress bar; TensorBoard events go to ``output_dir/tb`` when
    tensorboard is installed and ``tensorboard=True``.

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with RunLog(d, total_steps=2, print_freq=1, tensorboard=False, progress=False) as log:
        ...     log.step(1, {"loss": torch.tensor(0.5)}, epoch=0, images=8)
        ...     log.step(2, {"loss": 0.25}, epoch=0, images=8)
        step 1/2  {"loss": 0.5, "epoch": 0, "img_per_s": ...}
        step 2/2  {"loss": 0.25, "epoch": 0, "img_per_s": ...}
        >>> [json.loads(line)["loss"] for line in open(os.path.join(d, "metrics.jsonl"))]
        [0.5, 0.25]
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        total_steps: int,
        *,
        start_step: int = 0,
        stop_step: int | None = None,
        print_freq: int = 20,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        if print_freq < 1:
            raise ValueError(f"print_freq must be >= 1, but got {print_freq}")
        self.output_dir = Path(output_dir)
        self.total_steps = int(total_steps)
        self.stop_step = self.total_steps if stop_step is None else int(stop_step)
        self.print_freq = int(print_freq)
        self.enabled = bool(enabled)
        self.last: dict[str, float] = {}
        self._images = 0
        self._t = time.perf_counter()
        self._jsonl: Any = None
        self._tb: Any = None
        self._bar: Any = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.print("TensorBoard events skipped: install tensorboard (pip install 'densecontrast[examples]')")
            else:
                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"))
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass  # the periodic step lines are the progress report
            else:
                self._bar = tqdm(total=self.stop_step, initial=int(start_step), desc="train", dynamic_ncols=True)

    def print(self, *parts: Any) -> None:
        """Print a line on the main process (above the progress bar when there is one)."""
        if not self.enabled:
            return
        line = " ".join(str(p) for p in parts)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def step(self, step: int, values: Mapping[str, Any], *, epoch: int | None = None, images: int = 0) -> None:
        """Record the scalars of optimiser step ``step`` (1-based count of steps done).

        Args:
            step: steps done so far.
            values: scalars (numbers or one-element tensors) to log.
            epoch: the epoch of the step, logged as ``epoch``.
            images: images processed by the step over all processes (for ``img_per_s``).
        """
        self._images += int(images)
        if self._bar is not None:
            self._bar.update(1)
            if step >= self.stop_step:  # later lines (the report) print below the finished bar
                self._bar.close()
                self._bar = None
        record = {k: _number(v) for k, v in values.items()}
        if epoch is not None:
            record["epoch"] = epoch
        self.last = {"step": step, **record}
        if step % self.print_freq != 0 and step != self.stop_step:
            return
        now = time.perf_counter()
        record["img_per_s"] = self._images / max(now - self._t, 1e-9)
        self._t, self._images = now, 0
        self.last = {"step": step, **record}
        if not self.enabled:
            return
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in self.last.items()}
        self._jsonl.write(json.dumps(clean, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                self._tb.add_scalar(f"train/{k}", v, global_step=step)
        self.print(f"step {step}/{self.total_steps}  " + json.dumps({k: round(v, 5) for k, v in record.items()}))

    def close(self) -> None:
        """Close the progress bar and the files (further calls write nothing)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.enabled = False

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
