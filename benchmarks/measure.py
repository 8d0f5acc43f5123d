"""Timing and memory on any device, for the benchmarks: synchronised wall time, peak memory, batches on the device."""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import TensorDataset


class PeakBytes(TorchDispatchMode):
    "Peak bytes of the tensor storages created by torch ops inside the block, checked for release after every op."

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                st = t.untyped_storage()
                self.live.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(b for _, b in self.live.values()))
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    "Wall time of `fn` with the device's queue drained before and after (kernels are asynchronous)."
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def free_memory(device: torch.device) -> None:
    "Give cached CUDA memory back, so peaks measured next start clean (a no-op elsewhere: gc is slow and not needed)."
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak bytes during the block.

    CUDA: `max_memory_allocated`, everything alive (parameters and optimizer state included).
    Elsewhere: the storages torch ops create inside the block (`PeakBytes`), so only
    differences between methods compare across devices.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        free_memory(self.device)
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = PeakBytes().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._mode.__exit__(*exc)
            self.peak = self._mode.peak


class GPUBatches:
    """Shuffled (x, y) batches sliced from tensors already on the device: no loader work per step.

    Re-iterable with a length, a `dataset` and its own `generator` (which bs_find restores).
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int = 0):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.dataset = TensorDataset(x, y)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
        for s in range(0, len(idx), self.batch_size):
            i = idx[s:s + self.batch_size]
            yield self.x[i], self.y[i]


def cycled(batches: GPUBatches, n: int) -> Iterator[tuple[Tensor, Tensor]]:
    "`n` batches, epoch after epoch."
    while n > 0:
        for b in batches:
            yield b
            n -= 1
            if n == 0:
                return


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
