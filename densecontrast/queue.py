"""``MomentumQueue``: the MoCo-style ring buffer of negative keys, DDP-aware and checkpointable.

The queue holds the ``size`` most recent keys (unit vectors) of the momentum encoder. A training
step reads the negatives **before** it enqueues the current batch's keys, so a query's own
positive key never reappears among its negatives::

    negatives = queue.negatives()          # (size, dim), detached clone
    loss = criterion(q, k, matches, queue=negatives)
    loss.backward(); optimizer.step()
    queue.enqueue(pooled_keys)             # (B, dim); all-gathered over ranks when distributed

Convention:
    Keys are rows: the buffer is ``(size, dim)`` (not MoCo's ``(dim, size)``). Writes go to rows
    ``ptr, ptr + 1, ...`` modulo ``size`` in the order of the (gathered) batch, i.e. exactly as if
    the keys were appended one by one to a ring buffer. Under DDP the gathered batch is the
    concatenation of the ranks' keys in rank order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast._checks import check_finite, check_floating, check_int, check_shape, compute_dtype
from densecontrast.distributed import all_gather, broadcast_, is_distributed

__all__ = ["MomentumQueue"]


class MomentumQueue(nn.Module):
    """FIFO ring buffer of ``size`` unit keys of dimension ``dim``, with a persistent pointer.

    Both the keys (``queue``, ``(size, dim)``) and the write pointer (``ptr``, long scalar) are
    persistent buffers: they are saved by ``state_dict()`` and restored by
    ``load_state_dict()``, so a resumed run continues with the same negatives and the same write
    position.

    Differences from the usual MoCo queue, on purpose:

    * ``size`` need not be a multiple of the (global) batch: writes wrap around and every key is
      stored. A batch with more than ``size`` keys leaves the ``size`` most recent ones (the tail
      of the batch), exactly what appending the keys one by one would leave.
    * Ranks may enqueue different numbers of keys (e.g. an uneven last batch): the gather
      exchanges sizes first and never hangs.
    * Without a process group (one GPU, CPU, notebooks) the queue works as is.

    Every rank ends each :meth:`enqueue` with an identical queue, provided the queues started
    identical: the default ``seed=0`` initialises the same random keys on every rank without
    communication. With ``seed=None`` (global RNG) call :meth:`broadcast_` once after
    construction, or keep the queue inside a DDP-wrapped module (DDP broadcasts buffers).

    Args:
        dim: key dimension ``D``.
        size: number of keys ``K`` kept (MoCo/DenseCL/PixCon: 65536).
        gather: all-gather the keys over ranks in :meth:`enqueue` when a process group is
            initialized (ignored without one). Set ``False`` for per-rank queues.
        normalize: L2-normalise keys in :meth:`enqueue` (the initial keys are always unit norm).
        seed: seed of the random normal initial keys (default 0: identical on every rank;
            ``None``: the global RNG).
        generator: a ``torch.Generator`` for the initial keys; takes precedence over ``seed``.
        dtype: dtype of the stored keys (keys are cast on enqueue; default float32).

    Examples:
        >>> import torch
        >>> q = MomentumQueue(dim=4, size=6)
        >>> neg = q.negatives()  # read BEFORE enqueueing the current keys
        >>> neg.shape, bool(torch.allclose(neg.norm(dim=1), torch.ones(6)))
        (torch.Size([6, 4]), True)
        >>> q.enqueue(torch.randn(4, 4)); int(q.ptr)
        4
        >>> q.enqueue(torch.randn(4, 4)); int(q.ptr)  # wraps around, all 4 keys written
        2
    """

    queue: Tensor
    ptr: Tensor

    def __init__(
        self,
        dim: int,
        size: int,
        gather: bool = True,
        *,
        normalize: bool = True,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.dim = check_int(dim, "dim", 1)
        self.size = check_int(size, "size", 1)
        check_floating(dtype, "dtype")
        self.gather = bool(gather)
        self.normalize = bool(normalize)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        init = torch.randn(size, dim, generator=generator, dtype=torch.float64)
        self.register_buffer("queue", F.normalize(init, dim=1).to(dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def negatives(self) -> Tensor:
        """The current keys as a ``(size, dim)`` detached clone, safe to use after :meth:`enqueue`.

        Read it before enqueueing the current batch so its keys are not among the negatives.

        Examples:
            >>> q = MomentumQueue(dim=3, size=5)
            >>> q.negatives().shape
            torch.Size([5, 3])
        """
        return self.queue.detach().clone()

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (gathered over ranks when distributed) at the pointer, wrapping around.

        Under a process group with ``gather=True`` this is a collective: every rank must call it
        (with any number of keys, possibly zero), and every rank ends with the same queue.

        Args:
            keys: ``(B, dim)`` float keys of this rank (detached internally; no gradient flows
                into the queue). ``B`` may differ between ranks and between calls, and may exceed
                ``size`` (then only the most recent ``size`` keys remain).

        Non-finite keys are refused, since a stored NaN or inf key would poison every later
        negative: the check reads the keys on the host (one synchronization per call), and the
        queue and pointer stay unchanged. Under a process group with ``gather=True`` the gathered
        keys are checked, so that every rank raises together (no rank is left waiting in a
        collective). Keys that become infinite in a lower-precision queue ``dtype`` (possible
        with ``normalize=False``) are refused too.

        Raises:
            ValueError: ``keys`` is not a ``(B, dim)`` floating-point tensor, or holds a NaN or
                inf (before or after the cast to the queue dtype, on any rank).

        Examples:
            >>> import torch
            >>> q = MomentumQueue(dim=2, size=3, normalize=False)
            >>> q.enqueue(torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]))
            >>> q.queue[:, 0].tolist(), int(q.ptr)  # 4 keys into 3 slots: the last 3 remain
            ([4.0, 2.0, 3.0], 1)
        """
        check_shape(keys, "keys", ("B", self.dim), floating=True)
        keys = keys.detach()
        gathered = self.gather and is_distributed()
        if not gathered:  # under a process group every rank checks the gathered keys instead
            check_finite(keys, "keys")
        # a finite key can only turn infinite in the cast to a narrower queue dtype (normalized keys are <= 1)
        overflow = not self.normalize and torch.finfo(self.queue.dtype).max < torch.finfo(keys.dtype).max
        if self.normalize:
            keys = F.normalize(keys.to(compute_dtype(keys)), dim=1)
        keys = keys.to(device=self.queue.device, dtype=self.queue.dtype)
        if gathered:
            keys = all_gather(keys, grad=False)
        if gathered or overflow:
            where = ", gathered over ranks" if gathered else ""
            check_finite(keys, "keys", note=f"(as stored in the {self.queue.dtype} queue{where})")
        n = keys.shape[0]
        if n == 0:
            return
        m = min(n, self.size)
        # Key i of the batch goes to row (ptr + i) % size; keys that would be overwritten within this
        # same batch (i < n - size) are skipped, so every row is written at most once.
        rows = (self.ptr + torch.arange(n - m, n, device=self.queue.device)) % self.size
        self.queue.index_copy_(0, rows, keys[n - m :])
        self.ptr.copy_((self.ptr + n) % self.size)

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> MomentumQueue:
        """Copy rank ``src``'s keys and pointer to every rank (collective; no-op without a process group).

        Examples:
            >>> MomentumQueue(dim=2, size=4, seed=None).broadcast_().queue.shape
            torch.Size([4, 2])
        """
        broadcast_(self.queue, src=src)
        broadcast_(self.ptr, src=src)
        return self

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, gather={self.gather}, normalize={self.normalize}"
