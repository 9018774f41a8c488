"""Peak live tensor memory on any device, for the CPU benchmarks (shared by the benchmark scripts)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages created by operators inside the mode while they are alive.

    Every storage an ATen operator returns is counted once (views share it) until its last tensor
    dies (a weak-reference finalizer subtracts it); ``peak`` is the maximum of the running total.
    Storages of ``inputs`` (which exist before the call) are not counted. It sees the tensors kept
    for backward too, which allocator statistics on the CPU do not expose.
    """

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self._external = {t.untyped_storage().data_ptr() for t in inputs}
        self.current = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage data_ptr -> number of live tensors using it
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.current -= self._sizes.pop(key)
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._external:
                continue
            if key not in self._refs:
                self._refs[key] = 0
                self._sizes[key] = nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            self._refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out
