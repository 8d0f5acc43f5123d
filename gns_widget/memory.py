"""Will the suggested batch size fit on the device, and if not, how to reach it with gradient accumulation.

The noise scale says which batch size is worth its cost, not whether it fits in memory.
`max_batch_size` finds the largest batch for which one real training step (forward,
backward, optimizer step) runs without running out of memory, searching like PyTorch
Lightning's batch-size finder: double until it fails, then bisect. `plan_batch` turns
"suggested" and "fits" into a per-step batch size and a number of accumulation steps.
"""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .guard import claim
from .memory_plan import MemoryPlan, check_positive_int, plan_batch
from .precision import resolve_amp
from .state import UserState
from .targets import Target, as_target
from .targets.base import batch_size_of, to_device

__all__ = ["max_batch_size", "fitting_batch_size", "MemoryPlan", "plan_batch", "is_oom_error", "ExamplePool",
           "free_memory"]

log = logging.getLogger(__name__)

PROBE_LR = 1e-10  # the probe steps the real optimizer (its state costs memory); the weights are restored anyway

# Allocation failures that do not come as torch.OutOfMemoryError (MPS, cuDNN/cuBLAS, the CPU allocator, old torch).
_OOM_MESSAGES = ("out of memory", "cudnn_status_alloc_failed", "cublas_status_alloc_failed",
                 "can't allocate memory")
_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t})


def is_oom_error(exc: BaseException) -> bool:
    "Whether `exc` says the device ran out of memory (and so a smaller batch may still fit)."
    if isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def max_batch_size(target: Any, train_dl: Any = None, loss_func: Callable | None = None, *, limit: int,
                   opt: Any = None, device: Any = None, batch_fn: Callable | None = None,
                   start: int | None = None, amp: torch.dtype | None = None) -> int:
    """The largest batch size ≤ `limit` for which one full training step fits on the device.

    `target`, `train_dl`, `loss_func`, `opt`, `device` and `batch_fn` are as for `bs_find`.
    Each probe trains one step on a batch of real examples (loader batches concatenated,
    repeated if the loader has too few) with the run's optimizer, so activations, gradients
    and optimizer state all count. Sizes double from `start` (default: the loader's batch
    size, or 1) until a step runs out of memory or `limit` is reached, then the gap is
    bisected; if `start` does not fit, sizes halve first. The search never goes above
    `limit`: on CPU an oversized batch usually gets the process killed rather than an
    error, so pass the batch size you want to check. Model, optimizer, loader and RNG
    states are restored exactly, and the model is back on its device, whatever happens.
    `amp` is as for `bs_find` (autocast dtype; None follows a Learner's `MixedPrecision`).
    Raises RuntimeError if not even a batch of one fits.
    """
    check_positive_int("limit", limit)
    if start is not None:
        check_positive_int("start", start)
    tgt = as_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn, measuring=False)
    return fitting_batch_size(tgt, limit=limit, amp=resolve_amp(target, amp), start=start)


def fitting_batch_size(tgt: Target, *, limit: int, amp: torch.dtype | None, start: int | None = None) -> int:
    "`max_batch_size` for a resolved target and autocast dtype (None: full precision), as `bs_find` has them."
    first = min(start if start is not None else (tgt.batch_size or 1), limit)
    with claim(tgt.model, "max_batch_size"):
        state = UserState(tgt.model, tgt.user_opt, tgt.train_dl, tgt.loss_func)
        pool = ExamplePool(tgt)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                prober = _Prober(tgt, pool, amp)
                found = _search(prober, first, limit)
            log.debug("largest batch that fits: %d (≤ %d), after %d probes", found, limit, prober.probes)
        finally:
            pool.close()
            state.restore()
            free_memory(tgt.device)
    if found == 0:
        raise RuntimeError(f"not even a batch of 1 fits in memory on {tgt.device} for one training step (forward, "
                           "backward, optimizer step): use a smaller model, mixed precision, or a bigger device")
    return found


def _search(fits: Callable[[int], bool], first: int, limit: int) -> int:
    """Double from `first` until a failure or `limit`, halve instead if `first` fails, then bisect (lo fits, hi fails).

    Returns 0 when not even 1 fits. Assumes memory grows with the batch size, so each size is probed at most once.
    """
    if fits(first):
        lo = first
        while lo < limit:
            n = min(2 * lo, limit)
            if not fits(n):
                hi = n
                break
            lo = n
        else:
            return lo
    else:
        hi, lo = first, first // 2
        while lo >= 1 and not fits(lo):
            hi, lo = lo, lo // 2
        if lo < 1:
            return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


class _Prober:
    "Calling it with `n` trains one step on `n` examples and says whether it fitted; it counts its probes."

    def __init__(self, tgt: Target, pool: ExamplePool, amp: torch.dtype | None):
        self.tgt, self.pool, self.amp, self.probes = tgt, pool, amp, 0
        try:
            tgt.to_run_device()
        except Exception as e:
            if is_oom_error(e):
                raise RuntimeError(f"the model itself does not fit in memory on {tgt.device}, before any batch: "
                                   "use a smaller model, lower precision, or a bigger device") from e
            raise
        tgt.model.train()
        free_memory(tgt.device)  # start from what the model itself needs
        self.opt = tgt.make_opt(PROBE_LR)  # built once: its state stays allocated across steps, as in training

    def __call__(self, n: int) -> bool:
        self.probes += 1
        try:
            self._step(n)
            ok = True
        except Exception as e:
            if not is_oom_error(e):
                raise
            ok = False
        # Outside the except block, so the traceback (and the activations its frames hold) is already gone.
        self.tgt.model.zero_grad(set_to_none=True)
        if not ok:
            free_memory(self.tgt.device)
        log.debug("batch size %d: %s", n, "fits" if ok else "out of memory")
        return ok

    def _step(self, n: int) -> None:
        tgt = self.tgt
        inputs, targets = tgt.inputs_and_targets(to_device(self.pool.batch(n), tgt.device))
        loss = tgt.fresh_loss(inputs, targets, self.amp)
        loss.backward()  # unscaled even for float16: the memory is the same, an overflow is harmless here
        self.opt.step()


class ExamplePool:
    """Real examples from the loader, kept on the host, served as batches of any size.

    Batches are drawn lazily, only as many as the biggest probe needs; a loader with fewer
    examples than that is repeated. Drawing stops at the first batch whose shapes differ
    from the first batch's (per-batch padding), so what is concatenated always matches.
    `timed`: the loader's time per example is measured on the draws after the first (which
    also starts the iterator and its workers), and at least `TIMED_BATCHES` of them are drawn.
    """

    TIMED_BATCHES = 4

    def __init__(self, tgt: Target, timed: bool = False):
        self.tgt = tgt
        self.timed = timed
        self.load_seconds, self.load_examples = 0.0, 0  # the draws after the first
        self.draws = 0
        self.batches: list[Any] = []
        self.joined: Any = None  # the batches concatenated, rebuilt only after a draw
        self.n = 0  # examples drawn
        self.shapes: Any = None
        self.it: Iterator | None = None
        self.done = False

    def batch(self, n: int) -> Any:
        while (self.n < n or (self.timed and self.draws <= self.TIMED_BATCHES)) and not self.done:
            self._draw()
        if not self.batches:
            raise ValueError("train_dl yielded no batches: give it a non-empty dataset")
        if self.joined is None:
            self.joined = _concat(self.batches)
            self.batches = [self.joined]
        idx = torch.arange(n) % self.n  # repeat the pool when it is smaller than n
        return _index(self.joined, idx)

    def _draw(self) -> None:
        if self.it is None:
            self.it = iter(self.tgt.train_dl)
        t0 = time.perf_counter()
        try:
            b = _map_tensors(next(self.it), lambda t: t.detach().to("cpu"))  # blocking copy: safe to read at once
        except StopIteration:
            self.done = True
            return
        seconds = time.perf_counter() - t0
        shapes = _shapes(b)
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            self.done = True
            return
        inputs, targets = self.tgt.inputs_and_targets(b)
        n = batch_size_of(targets, inputs)
        if self.draws:
            self.load_seconds += seconds
            self.load_examples += n
        self.draws += 1
        self.batches.append(b)
        self.joined = None
        self.n += n

    def seconds_per_example(self) -> float:
        "The loader's time per example over the draws after the first (0 when there were none)."
        return self.load_seconds / self.load_examples if self.load_examples else 0.0

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close is not None:
            close()
        self.it, self.batches, self.joined = None, [], None


# Batches are nested tuples, lists and dicts of tensors (dim 0 = examples). A list of plain values (strings, numbers:
# what default_collate makes of them) is per-example too. Anything else is carried over from the first batch.

def _is_value_list(obj: Any) -> bool:
    return isinstance(obj, list) and not any(isinstance(o, (torch.Tensor, tuple, list, dict)) for o in obj)


def _rebuild(like: tuple | list, items: Any) -> Any:
    items = list(items)
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)  # namedtuples take positionals


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return _rebuild(obj, (_map_tensors(o, fn) for o in obj))
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _shapes(obj: Any) -> Any:
    "A batch's structure with the per-example shape (all but dim 0) of each tensor: equal ones can be concatenated."
    if isinstance(obj, torch.Tensor):
        return tuple(obj.shape[1:]) if obj.ndim else "0-d"
    if _is_value_list(obj):
        return "values"
    if isinstance(obj, (tuple, list)):
        return type(obj).__name__, tuple(_shapes(o) for o in obj)
    if isinstance(obj, dict):
        return tuple((k, _shapes(v)) for k, v in obj.items())
    return type(obj).__name__


def _concat(batches: list[Any]) -> Any:
    "Batches of the same structure joined along dim 0."
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches) if first.ndim else first
    if _is_value_list(first):
        return [v for b in batches for v in b]
    if isinstance(first, (tuple, list)):
        return _rebuild(first, (_concat([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, dict):
        return {k: _concat([b[k] for b in batches]) for k in first}
    return first


def _index(obj: Any, idx: torch.Tensor) -> Any:
    "The examples `idx` of a batch, wrapping around (so a small pool is repeated)."
    if isinstance(obj, torch.Tensor):
        return obj[idx % obj.shape[0]] if obj.ndim else obj
    if _is_value_list(obj):
        return [obj[i % len(obj)] for i in idx.tolist()] if obj else obj
    if isinstance(obj, (tuple, list)):
        return _rebuild(obj, (_index(o, idx) for o in obj))
    if isinstance(obj, dict):
        return {k: _index(v, idx) for k, v in obj.items()}
    return obj


def free_memory(device: torch.device | str) -> None:
    """Give a failed step's memory back to the device.

    On CPU, reference counting has already returned the tensors once the traceback is gone, and a full
    collection costs ~0.2 s with big libraries loaded, so only accelerators (whose caching allocators hold
    on to freed blocks, and whose tensors reference cycles may keep alive) are collected and emptied.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        gc.collect()
        torch.mps.empty_cache()
    elif device.type != "cpu":
        gc.collect()
