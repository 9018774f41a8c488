"""Training metrics: smoothed meters, a console logger with ETA and throughput, JSON-lines and TensorBoard writers.

The module is named ``metrics`` (not ``logging``) so that ``from densecontrast.engine import metrics``
never shadows the standard library's :mod:`logging` in a user's script.

Typical use inside one epoch::

    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.2e}"))
    for views, geoms in logger.log_every(loader, print_freq=20, header=f"Epoch [{epoch}]"):
        loss = ...
        logger.update(loss=loss, lr=optimizer.param_groups[0]["lr"])
    logger.synchronize_between_processes()
    jsonl.write({"epoch": epoch, **logger.global_averages()})

Only rank 0 writes files (:class:`JsonlWriter`, :class:`TensorBoardWriter`) and shows progress
bars (:func:`progress_bar`); console output goes through ``print``, which
:func:`densecontrast.engine.setup_for_distributed` silences on the other ranks.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from densecontrast.distributed import is_distributed
from densecontrast.distributed import rank as _rank

__all__ = [
    "JsonlWriter",
    "MetricLogger",
    "SmoothedValue",
    "TensorBoardWriter",
    "progress_bar",
]

T = TypeVar("T")


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar or a one-element tensor, but got shape {tuple(value.shape)}")
        value = value.detach().item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a one-element tensor, but got {type(value).__name__}") from None


class SmoothedValue:
    """A scalar series with a sliding-window median / mean and a global (all-time) average.

    Args:
        window_size: number of recent values the windowed statistics use (>= 1).
        fmt: format string for ``str()``; may use ``{median}``, ``{avg}``, ``{global_avg}``,
            ``{max}``, ``{value}``. Default ``"{median:.4f} ({global_avg:.4f})"``.

    Attributes:
        total: weighted sum of all values (``sum(value * n)``).
        count: total weight (``sum(n)``), e.g. the number of samples seen.

    The window holds the *values* (unweighted); :attr:`global_avg` is weighted by ``n``.
    :attr:`median` is the true median of the window (mean of the two middle values for an even
    count).

    Examples:
        >>> v = SmoothedValue(window_size=3)
        >>> for x in [1.0, 2.0, 3.0, 10.0]:
        ...     v.update(x)
        >>> v.median, v.avg, v.global_avg, v.max, v.value
        (3.0, 5.0, 4.0, 10.0, 10.0)
    """

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, but got {window_size}")
        self.window: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0.0
        self.fmt = fmt if fmt is not None else "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float | torch.Tensor, n: float = 1) -> None:
        """Add ``value`` observed ``n`` times (e.g. a batch mean over ``n`` samples).

        Args:
            value: a number or one-element tensor (moved to the CPU; this syncs a GPU stream).
            n: its weight in :attr:`global_avg` (> 0).
        """
        if n <= 0:
            raise ValueError(f"n must be > 0, but got {n}")
        x = _to_float(value, "value")
        self.window.append(x)
        self.count += n
        self.total += x * n

    def synchronize_between_processes(self) -> None:
        """Sum :attr:`count` and :attr:`total` over all ranks (a collective; call on every rank).

        Only the global average becomes global; the window stays per-process. No-op without a
        process group.
        """
        if not is_distributed():
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        self.count, self.total = float(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        """Median of the window (``nan`` when empty)."""
        if not self.window:
            return math.nan
        s = sorted(self.window)
        k = len(s) // 2
        return s[k] if len(s) % 2 else 0.5 * (s[k - 1] + s[k])

    @property
    def avg(self) -> float:
        """Mean of the window (``nan`` when empty)."""
        return sum(self.window) / len(self.window) if self.window else math.nan

    @property
    def global_avg(self) -> float:
        """Weighted mean of everything seen, ``total / count`` (``nan`` before the first update)."""
        return self.total / self.count if self.count > 0 else math.nan

    @property
    def max(self) -> float:
        """Largest value in the window (``nan`` when empty)."""
        return max(self.window) if self.window else math.nan

    @property
    def value(self) -> float:
        """The most recent value (``nan`` when empty)."""
        return self.window[-1] if self.window else math.nan

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


def _infer_batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor found depth-first in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _infer_batch_size(v)
            if n is not None:
                return n
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            n = _infer_batch_size(v)
            if n is not None:
                return n
    return None


class MetricLogger:
    """A named collection of :class:`SmoothedValue` meters plus a logging iteration wrapper.

    Args:
        delimiter: separator between meters in the printed line.
        window_size: window of meters created on first :meth:`update`.
        print_fn: where lines go; default the (possibly rank-silenced) builtin ``print``.

    Meters are created on the fly by :meth:`update` and read as attributes
    (``logger.loss.global_avg``) or by ``logger.meters["loss"]``.

    Examples:
        >>> logger = MetricLogger(window_size=2)
        >>> logger.update(loss=torch.tensor(1.0), acc=0.5)
        >>> logger.update(loss=3.0, acc=0.7)
        >>> logger.loss.avg, round(logger.acc.global_avg, 6)
        (2.0, 0.6)
        >>> str(logger)
        'loss: 2.0000 (2.0000)  acc: 0.6000 (0.6000)'
    """

    def __init__(
        self, delimiter: str = "  ", window_size: int = 20, print_fn: Callable[[str], Any] | None = None
    ) -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))
        self.delimiter = delimiter
        self._print_fn = print_fn

    def _print(self, msg: str) -> None:
        (self._print_fn or print)(msg)

    def update(self, n: float = 1, **values: float | torch.Tensor) -> None:
        """Record one value per named meter, each with weight ``n``.

        Args:
            n: weight of these values in the global averages (e.g. the batch size).
            **values: numbers or one-element tensors.
        """
        for k, v in values.items():
            self.meters[k].update(v, n=n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """Register a meter with custom window / format (e.g. ``lr`` with ``window_size=1``)."""
        self.meters[name] = meter

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get("meters")
        if meters is not None and attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def global_averages(self) -> dict[str, float]:
        """``{name: global_avg}`` of every meter: the per-epoch summary to log."""
        return {k: m.global_avg for k, m in self.meters.items()}

    def synchronize_between_processes(self) -> None:
        """Synchronise every meter's global average across ranks (collective)."""
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(
        self,
        iterable: Iterable[T],
        print_freq: int,
        header: str = "",
        batch_size: int | Callable[[Any], int | None] | None = None,
    ) -> Iterator[T]:
        """Yield the items of ``iterable`` and print progress every ``print_freq`` items.

        Each line shows: ``header [i/N]``, ETA (when ``len(iterable)`` is known), all meters,
        the data-loading and total time per iteration (smoothed), the throughput of *this
        process* in images per second and, on CUDA, the peak allocated memory. A final line
        gives the total time. The meters ``iter_time`` and ``data_time`` are kept separately
        (not in :attr:`meters`) in :attr:`iter_time` / :attr:`data_time`.

        Args:
            iterable: typically a ``DataLoader``.
            print_freq: print every this many iterations (>= 1), and at the last one.
            header: prefix of each line, e.g. ``"Epoch [3]"``.
            batch_size: images per item for the throughput: an int, a function of the item, or
                ``None`` to use the leading dimension of the first tensor found in the item.

        Yields:
            The items of ``iterable``, unchanged.

        Examples:
            >>> lines = []
            >>> logger = MetricLogger(print_fn=lines.append)
            >>> for x in logger.log_every([torch.zeros(4, 3)] * 5, print_freq=2, header="Epoch [0]"):
            ...     logger.update(loss=x.sum())
            >>> len(lines), lines[0].startswith("Epoch [0] [0/5]"), "img/s" in lines[0]
            (4, True, True)
        """
        if print_freq < 1:
            raise ValueError(f"print_freq must be >= 1, but got {print_freq}")
        try:
            total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        width = len(str(total)) if total is not None else 1
        self.iter_time = SmoothedValue(fmt="{avg:.4f}")
        self.data_time = SmoothedValue(fmt="{avg:.4f}")
        images = SmoothedValue(fmt="{avg:.1f}")
        use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        start = end = time.perf_counter()
        i = -1
        for i, item in enumerate(iterable):
            self.data_time.update(time.perf_counter() - end)
            yield item
            now = time.perf_counter()
            dt = now - end
            self.iter_time.update(dt)
            bs = batch_size(item) if callable(batch_size) else batch_size
            if bs is None:
                bs = _infer_batch_size(item)
            if bs is not None and dt > 0:
                images.update(bs / dt)
            if i % print_freq == 0 or (total is not None and i == total - 1):
                parts = [f"{header} [{i:>{width}}/{total if total is not None else '?'}]".lstrip()]
                if total is not None:
                    eta = self.iter_time.global_avg * (total - i - 1)
                    parts.append(f"eta: {datetime.timedelta(seconds=round(eta))}")
                if self.meters:
                    parts.append(str(self))
                parts.append(f"time: {self.iter_time}")
                parts.append(f"data: {self.data_time}")
                if images.count:
                    parts.append(f"img/s: {images}")
                if use_cuda:
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
                self._print(self.delimiter.join(parts))
            end = time.perf_counter()
        elapsed = time.perf_counter() - start
        per_it = elapsed / (i + 1) if i >= 0 else 0.0
        self._print(f"{header} Total time: {datetime.timedelta(seconds=round(elapsed))} ({per_it:.4f} s / it)".lstrip())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().item() if obj.numel() == 1 else obj.detach().cpu().tolist()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no nan / inf; keep the line parseable
    return obj


class JsonlWriter:
    """Append one JSON object per line to a file, on rank 0 only.

    Tensors become numbers or lists, ``nan`` / ``inf`` become the strings ``"nan"`` / ``"inf"``
    so every line stays valid JSON. Each line is flushed right away, so a killed job keeps its
    log. The parent directory is created.

    Args:
        path: the ``.jsonl`` file (appended to when it exists, so resumed runs continue it).
        enabled: write or not; default: only on rank 0.

    Examples:
        >>> import json, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> with JsonlWriter(os.path.join(d, "log.jsonl")) as w:
        ...     w.write({"epoch": 0, "loss": torch.tensor(0.5)})
        >>> [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
        [{'epoch': 0, 'loss': 0.5}]
    """

    def __init__(self, path: str | os.PathLike[str], enabled: bool | None = None) -> None:
        self.path = Path(path)
        self.enabled = _rank() == 0 if enabled is None else bool(enabled)
        self._fh: Any = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line (no-op when disabled)."""
        if not isinstance(record, Mapping):
            raise ValueError(f"record must be a mapping (dict), but got {type(record).__name__}")
        if self._fh is None:
            return
        self._fh.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file (further writes are ignored)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TensorBoardWriter:
    """A thin ``SummaryWriter`` wrapper: rank 0 only, and a silent no-op without tensorboard.

    Args:
        log_dir: the event-file directory.
        enabled: write or not; default: only on rank 0.

    Attributes:
        available: ``True`` when events are actually being written.

    Examples:
        >>> import tempfile
        >>> with TensorBoardWriter(tempfile.mkdtemp()) as tb:
        ...     tb.add_scalars({"loss": 1.0, "lr": torch.tensor(0.1)}, step=0, prefix="train/")
    """

    def __init__(self, log_dir: str | os.PathLike[str], enabled: bool | None = None) -> None:
        self.log_dir = str(log_dir)
        self._writer: Any = None
        if _rank() == 0 if enabled is None else enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(log_dir=self.log_dir)

    @property
    def available(self) -> bool:
        """Whether a real writer is behind this object."""
        return self._writer is not None

    def add_scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        """Log one scalar at ``step``."""
        if self._writer is not None:
            self._writer.add_scalar(tag, _to_float(value, "value"), global_step=step)

    def add_scalars(self, values: Mapping[str, float | torch.Tensor], step: int, prefix: str = "") -> None:
        """Log each ``name: value`` as its own scalar ``prefix + name``."""
        for k, v in values.items():
            self.add_scalar(prefix + k, v, step)

    def flush(self) -> None:
        """Flush pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def progress_bar(iterable: Iterable[T], enabled: bool | None = None, **tqdm_kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a ``tqdm`` bar on rank 0; plain iteration elsewhere or without tqdm.

    Args:
        iterable: what to iterate.
        enabled: show the bar; default: only on rank 0.
        **tqdm_kwargs: forwarded to ``tqdm`` (``desc``, ``total``, ``leave``, ...).

    Returns:
        A tqdm object or ``iterable`` itself.

    Examples:
        >>> sum(progress_bar(range(4), enabled=False))
        6
    """
    if not (_rank() == 0 if enabled is None else enabled):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **tqdm_kwargs)
