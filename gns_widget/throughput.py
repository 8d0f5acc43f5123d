"""How fast this device trains at each batch size: the hardware half of the advice.

The noise scale says how many more examples a bigger batch needs to reach the same loss
(McCandlish et al.: ×(1 + B/B_noise)); whether that is faster depends on how many examples per
second the device gets through at each size. On a GPU a small model's step costs nearly the same
at 32 and 256 examples, so a bigger batch is almost free; on a CPU a conv net's time is nearly
per example, so it never is. Neither can be assumed, so it is measured: real training steps
(forward, backward, optimizer step) at each candidate batch size, after a warm-up, on real
examples from the user's loader, plus the loader's own time per example. The model, optimizer,
loader and RNG states are restored exactly afterwards, as after a finder run.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .guard import claim
from .loaders import loader_at
from .memory import PROBE_LR, ExamplePool, free_memory, is_oom_error
from .memory_plan import check_positive_int
from .precision import resolve_amp
from .state import UserState
from .targets import Target, as_target
from .targets.base import to_device

__all__ = ["Throughput", "measure_throughput", "probe_throughput", "MAX_STEP_SECONDS"]

MAX_STEP_SECONDS = 2.0  # no bigger batch is timed once a step takes this long (on a CPU, memory runs out next)
MIN_TIMED_SECONDS = 0.05  # each size is timed over at least this long per round (and at least MIN_REPEATS steps)
MIN_REPEATS, MAX_REPEATS = 3, 15
ROUNDS = 3  # passes over the sizes, interleaved
SATURATED = 1.05  # a doubling that adds less than 5% examples per second: the device is saturated, stop growing


@dataclass(frozen=True)
class Throughput:
    """Measured seconds per optimizer step at each batch size on one device, the loader included.

    `step_seconds[b]` is the median time of a training step (forward, backward, optimizer step, the
    batch's copy to the device) at batch size b; `load_seconds[b]` the loader's own time for one batch of
    b, in one process. It adds to a step when the loader runs in the training process (`workers` 0); with
    worker processes they share it and work beside the training steps, which then wait only when the
    workers fall behind. `max_fit` is set when a size ran out of device memory. `spread[b]` is how much
    the rounds of size b disagreed (the second fastest round's median over the fastest's, minus 1): the timing
    noise, which a predicted gain must clear before the advice acts on it.
    """
    step_seconds: dict[int, float]
    load_seconds: dict[int, float] = field(default_factory=dict)
    workers: int = 0
    device: str = "cpu"
    max_fit: int | None = None
    spread: dict[int, float] = field(default_factory=dict)

    def noise(self, *sizes: int) -> float:
        "The timing noise of a comparison between `sizes`: the largest spread among them (0 when not measured)."
        return max((self.spread.get(b, 0.0) for b in sizes), default=0.0)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.step_seconds)

    def seconds_per_step(self, bs: int) -> float:
        "Wall time of one optimizer step at `bs`: compute and loading, added or overlapped."
        compute, load = self.step_seconds[bs], self.load_seconds.get(bs, 0.0)
        return max(compute, load / self.workers) if self.workers else compute + load

    def examples_per_second(self, bs: int) -> float:
        return bs / self.seconds_per_step(bs)

    def __str__(self) -> str:
        rows = ", ".join(f"{b}: {self.examples_per_second(b):,.0f}/s" for b in self.batch_sizes)
        return f"examples per second on {self.device} by batch size: {rows}"


def measure_throughput(target: Any, train_dl: Any = None, loss_func: Callable | None = None, *,
                       batch_sizes: Iterable[int], opt: Any = None, device: Any = None,
                       batch_fn: Callable | None = None, amp: torch.dtype | None = None) -> Throughput:
    """Time training steps of `target` at each of `batch_sizes` on its device (arguments as for `bs_find`).

    For results that `bs_find` did not measure (a `GNSCallback`'s): `res.advice(throughput=...)`.
    Sizes are timed in ascending order and a size whose step takes over MAX_STEP_SECONDS ends the
    search; everything the steps touch is restored.
    """
    sizes = sorted(set(batch_sizes))
    if not sizes:
        raise ValueError("batch_sizes must name at least one batch size")
    for b in sizes:
        check_positive_int("batch_sizes", b)
    tgt = as_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn, measuring=False)
    return probe_throughput(tgt, sizes, resolve_amp(target, amp))


def probe_throughput(tgt: Target, batch_sizes: list[int], amp: torch.dtype | None, *,
                     saturate_above: int | None = None) -> Throughput:
    """`measure_throughput` for a resolved target: sizes ascending, stopping at the first that does not fit,
    that takes over MAX_STEP_SECONDS, or, above `saturate_above` (the user's batch size, for the advice), that
    gains less than ×SATURATED examples per second over the size before: past that point a bigger batch only
    costs more examples."""
    sizes = sorted(set(batch_sizes))
    with claim(tgt.model, "measure_throughput"):
        state = UserState(tgt.model, tgt.user_opt, tgt.train_dl, tgt.loss_func)
        pool = ExamplePool(tgt, timed=True)
        try:
            pool.batch(sizes[-1])  # draws the examples the biggest size needs, timing the loader on the way
            with torch.inference_mode(False), torch.enable_grad():
                timed, spread, max_fit = _time_sizes(tgt, pool, sizes, amp, saturate_above)
            load = _load_seconds(tgt.train_dl, list(timed), pool.seconds_per_example())
        finally:
            pool.close()
            state.restore()
            free_memory(tgt.device)
    if not timed:
        raise RuntimeError(f"no batch size of {sizes} fits in memory on {tgt.device} for one training step")
    return Throughput(timed, load, _workers(tgt.train_dl), str(tgt.device), max_fit, spread)


def _time_sizes(tgt: Target, pool: ExamplePool, sizes: list[int], amp: torch.dtype | None,
                saturate_above: int | None) -> tuple[dict[int, float], dict[int, float], int | None]:
    """Step time per size: the median step of its fastest round. A first pass in ascending order finds the sizes
    worth timing (see `probe_throughput`); then ROUNDS − 1 more passes over them interleave the sizes, so a burst
    of load from another process on a shared machine lands in one round of every size, not in all of one size's."""
    tgt.to_run_device()
    tgt.model.train()
    opt = _timing_optimizer(tgt)
    times: dict[int, list[list[float]]] = {}  # per size, the step times of each round
    max_fit = None
    for i, b in enumerate(sizes):
        try:
            times[b] = [_time_steps(tgt, opt, pool.batch(b), amp, warmup=3 if i == 0 else 1)]
        except Exception as e:
            if not is_oom_error(e):
                raise
            max_fit = sizes[i - 1] if i else None
            break
        finally:
            tgt.model.zero_grad(set_to_none=True)
        seconds, prev = statistics.median(times[b][0]), sizes[i - 1] if i else None
        if seconds > MAX_STEP_SECONDS:
            break
        if saturate_above is not None and b > saturate_above and prev in times \
                and b / seconds < SATURATED * prev / statistics.median(times[prev][0]):
            break
    for _ in range(ROUNDS - 1):
        for b in times:
            if statistics.median(times[b][0]) < MAX_STEP_SECONDS:
                times[b].append(_time_steps(tgt, opt, pool.batch(b), amp, warmup=1))
                tgt.model.zero_grad(set_to_none=True)
    # the best round's median: a round that other processes slowed down says nothing of this device; the noise is
    # how far the second best is from it, so one such round (a burst on a shared machine) does not freeze decisions
    medians = {b: sorted(statistics.median(r) for r in rounds) for b, rounds in times.items()}
    return {b: m[0] for b, m in medians.items()}, {b: m[min(1, len(m) - 1)] / m[0] - 1 for b, m in medians.items()}, \
        max_fit


def _timing_optimizer(tgt: Target) -> Any:
    """The run's kind of optimizer, whose step and state are part of a step's cost. A user's torch optimizer is
    rebuilt with the same parameter groups, so that its hooks do not see the timing's steps (they would count
    steps the user never took); one that cannot be rebuilt so is used itself (its state is restored after)."""
    user = tgt.user_opt
    if isinstance(user, torch.optim.Optimizer):
        try:
            return type(user)([{**g, "lr": PROBE_LR} for g in user.param_groups])
        except (TypeError, ValueError):
            pass
    return tgt.make_opt(PROBE_LR)


def _time_steps(tgt: Target, opt: Any, batch: Any, amp: torch.dtype | None, warmup: int) -> list[float]:
    "Wall times of training steps on `batch` after `warmup` untimed ones: MIN_REPEATS, more up to MIN_TIMED_SECONDS."
    sync = torch.cuda.synchronize if tgt.device.type == "cuda" else (lambda: None)

    def step() -> None:
        inputs, targets = tgt.inputs_and_targets(to_device(batch, tgt.device))
        tgt.fresh_loss(inputs, targets, amp).backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_REPEATS or (time.perf_counter() - start < MIN_TIMED_SECONDS and len(times) < MAX_REPEATS):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if times[-1] > MAX_STEP_SECONDS:
            break
    return times


LOADER_BATCHES = 3  # batches timed per size on a copy of the loader, after the one that starts it


def _load_seconds(dl: Any, sizes: list[int], per_example: float) -> dict[int, float]:
    """Seconds the loader takes per batch at each size, in one process: timed on a copy of it at that size without
    workers (a per-batch cost, pandas indexing in a fastai tabular loader, makes a bigger batch cheaper per example);
    where no copy can be made, the user's loader's time per example (drawn by the example pool) times the size."""
    try:
        return {b: _time_loader(loader_at(dl, b, in_process=True)) for b in sizes}
    except _NoCopy:
        return {b: per_example * b for b in sizes}


class _NoCopy(Exception):
    "The loader cannot be copied at another batch size, or the copy yields too few batches to time."


def _time_loader(dl: Any) -> float:
    if dl is None:
        raise _NoCopy
    it = iter(dl)
    try:
        next(it)  # starts the iterator: not a per-batch cost
        times = []
        for _ in range(LOADER_BATCHES):
            t0 = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - t0)
    except StopIteration:
        raise _NoCopy from None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return statistics.median(times)


def _workers(dl: Any) -> int:
    "The worker processes that prepare the loader's batches beside the training steps (0: in the training process)."
    workers = getattr(dl, "num_workers", 0)
    return workers if isinstance(workers, int) and workers > 0 else 0
