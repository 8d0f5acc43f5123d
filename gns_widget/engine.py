"""One finder run: snapshot → train `num_it` small batches feeding the estimator → restore.

Three ways to measure while training:
- ``method="fixed"`` (default): the `n_batch` small-batch gradients of a window are all taken
  at the same weights, then one optimizer step is taken with their average (the big-batch
  gradient). This is the estimator as the paper defines it: small and big batch estimate
  the same gradient.
- ``method="sequential"``: an optimizer step after every small batch, as in the 2019 fastai
  write-up. The window's gradients then come from different weights, which biases the
  estimate; it is kept to compare with that method.
- ``method="per_example"``: every step is an estimate, its examples the small batches (size 1)
  and the batch the big one, from per-example gradient norms (`per_example.py`).
With ``lr=0`` nothing is stepped and every method measures at the current weights.

The engine knows nothing of widgets: it reports through `on_update` and stops when
`stop_event` is set.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .ddp import allreduce_measured, is_distributed
from .estimator import NoiseScaleEstimator, gradients_of, squared_norm
from .guard import claim
from .interval import AutoStop
from .loaders import population_size
from .memory import max_batch_size, plan_batch
from .per_example import PerExampleNorms
from .precision import LossScale, resolve_amp
from .result import GNSRecord, GNSResult, RunRecorder
from .state import UserState
from .targets import Target, as_target
from .targets.base import batch_size_of, loader_len, to_device

__all__ = ["bs_find", "METHODS"]

METHODS = ("fixed", "sequential", "per_example")


def bs_find(target: Any, train_dl: Any = None, loss_func: Callable | None = None, *, lr: float = 1e-3,
            num_it: int | str | AutoStop | None = None, n_batch: int = 20, beta: float = 0.99, opt: Any = None,
            device: Any = None, method: str = "fixed", batch_fn: Callable | None = None,
            on_update: Callable[[GNSRecord], None] | None = None,
            stop_event: threading.Event | None = None, probe_memory: bool | None = None,
            amp: torch.dtype | None = None) -> GNSResult:
    """Measure the gradient noise scale of `target` and suggest a batch size.

    `target` is a fastai `Learner` (its `dls.train` and `loss_func` are used) or an
    `nn.Module` with `train_dl` and `loss_func`. `opt` is an optimizer, a factory
    `params -> optimizer`, or None (SGD; a Learner's own `opt_func`). `num_it` small batches
    are used (None: one epoch; more than an epoch cycles the loader). `lr=0` measures at
    the current weights. `num_it="auto"` runs until the noise scale's 90% interval is within ±10%,
    at most 20,000 small batches; `num_it=AutoStop(rel_halfwidth, max_it)` chooses both
    (`interval.AutoStop`). `on_update(record)` receives every new estimate; setting
    `stop_event` ends the run at the next step with a partial result. Whatever happens,
    the model, optimizer, loader and RNG states are restored exactly.

    `n_batch` small batches make one estimate and `beta` is the EMA decay per estimate. Methods
    that estimate every step ("per_example", DDP) decay by beta**(1/n_batch) per step instead, so
    every method averages over the same number of small batches, about n_batch / (1 - beta).

    `method` is "fixed", "sequential" or "per_example" (see the module docstring). Under
    torch.distributed (a `DistributedDataParallel` model in an initialized process group)
    "fixed" makes one estimate per step from the ranks: each rank's batch is a small batch
    and the all-reduced one the big batch; call it on every rank.

    `probe_memory` checks that the suggested batch fits for one training step on the device
    (`memory.max_batch_size`, capped at the suggestion) and, when it does not, plans gradient
    accumulation to reach it (`result.memory_plan`). None probes on CUDA only, where running
    out of memory is an error that can be caught; on the CPU it usually kills the process.

    `amp` runs forward passes under `torch.autocast` with this dtype (float16 with a dynamic
    loss scale whose overflowed batches are skipped, as GradScaler does); None follows a
    Learner's `MixedPrecision` callback, `torch.float32` forces full precision.
    """
    NoiseScaleEstimator.check_args(n_batch, beta)
    _check_args(lr=lr, num_it=num_it, n_batch=n_batch, method=method)
    tgt = as_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn)
    amp = resolve_amp(target, amp)
    distributed = is_distributed(tgt.model)
    if distributed and method != "fixed":
        raise ValueError(f"method={method!r} is not available under DistributedDataParallel: use method='fixed' "
                         "(each rank's batch is a small batch, the all-reduced batch the big one)")
    per_step = distributed or method == "per_example"  # one estimate per step instead of per window
    auto = AutoStop.of(num_it)
    total = auto.max_it if auto is not None else _total_iterations(tgt.train_dl, num_it, 1 if per_step else n_batch)
    # beta is the decay per n_batch small batches for every method, so all average over as many batches
    step_beta = beta ** (1 / n_batch) if per_step else beta
    if auto is not None:
        auto.start(step_beta)
    estimator = NoiseScaleEstimator(n_batch, step_beta, n_train=population_size(tgt.train_dl))
    with claim(tgt.model, "bs_find", stop_event) as held:
        stop_event = held.stop_event  # one the user passed, or the guard's: a new panel can stop this run
        state = UserState(tgt.model, tgt.user_opt, tgt.train_dl)
        run = _Run(lr, method, amp, LossScale(amp == torch.float16), on_update, stop_event, auto)
        try:
            recorder = (_run_paired if per_step else _run_windows)(tgt, estimator, total, run)
        finally:
            state.restore()
    stopped = stop_event.is_set()
    result = recorder.result(batch_size=tgt.batch_size, n_train=tgt.n_train, lr=lr, beta=beta, method=method,
                             stopped=stopped)
    probe = tgt.device.type == "cuda" if probe_memory is None else probe_memory
    if probe and result.reliable and not distributed:
        fits = max_batch_size(target, train_dl, loss_func, limit=result.suggested_bs, opt=opt, device=device,
                              batch_fn=batch_fn, amp=amp or torch.float32)  # resolved above
        result.memory_plan = plan_batch(result.suggested_bs, fits)
    return result


@dataclass
class _Run:
    "How one run trains and reports (the target says what it trains)."
    lr: float
    method: str
    amp: torch.dtype | None
    loss_scale: LossScale
    on_update: Callable[[GNSRecord], None] | None
    stop_event: threading.Event | None
    auto: AutoStop | None = None  # num_it="auto": ends the run once the interval is narrow enough


def _run_windows(tgt: Target, estimator: NoiseScaleEstimator, total: int, run: _Run) -> RunRecorder:
    "fixed and sequential: windows of n_batch small batches, the big batch built from them."
    opt = _prepare(tgt, run.lr)
    step_every_batch = opt is not None and run.method == "sequential"
    scale = run.loss_scale
    recorder = RunRecorder(estimator, total)
    for inputs, targets, bs in _batches(tgt, total, run.stop_event):
        loss = _forward_backward(tgt, inputs, targets, run)
        carried, skipped = scale.grad_scale, estimator.n_skipped
        record = recorder.step(loss, bs, tgt.model, grad_scale=carried)
        overflowed = estimator.n_skipped != skipped
        scale.update(overflowed)
        if step_every_batch and not overflowed:
            _unscale(tgt.model, carried)
            opt.step()
        if record is None:
            continue
        _check_finite(recorder, record, run.lr)
        if opt is not None and run.method == "fixed":
            torch._foreach_copy_(gradients_of(tgt.model), estimator.big_batch_grads())  # unscaled already
            opt.step()
        if run.on_update is not None:
            run.on_update(record)
        if run.auto is not None and run.auto.update(record):
            break
    return recorder


def _run_paired(tgt: Target, estimator: NoiseScaleEstimator, total: int, run: _Run) -> RunRecorder:
    "per_example and distributed: every step measures a small and a big batch at the same weights."
    opt = _prepare(tgt, run.lr)
    recorder = RunRecorder(estimator, total)
    model, scale = tgt.model, run.loss_scale
    with (nullcontext() if is_distributed(model) else PerExampleNorms(model)) as norms:
        for inputs, targets, bs in _batches(tgt, total, run.stop_event):
            if norms is None:  # DDP: the local gradient first, then the same all-reduce DDP would do
                with model.no_sync():
                    loss = _forward_backward(tgt, inputs, targets, run)
                small_sq, big_sq, b_small, b_big = allreduce_measured(model, bs)
            else:
                if bs < 2:
                    raise ValueError("method='per_example' needs batches of at least 2 examples")
                loss = _forward_backward(tgt, inputs, targets, run)
                small_sq, big_sq, b_small, b_big = norms.pop().mean(), squared_norm(gradients_of(model)), 1, bs
            carried = scale.grad_scale
            record = recorder.step_norms(loss, bs, small_sq, big_sq, b_small, b_big, grad_scale=carried)
            scale.update(overflowed=record is None)
            if record is None:  # float16 overflow: skipped, as GradScaler skips the step
                continue
            _unscale(model, carried)
            _check_finite(recorder, record, run.lr)
            if opt is not None:
                opt.step()
            if run.on_update is not None:
                run.on_update(record)
            if run.auto is not None and run.auto.update(record):
                break
    return recorder


def _unscale(model: torch.nn.Module, grad_scale: float | None) -> None:
    "Divide out the loss scale the gradients carry (the one of their backward pass, not an updated one)."
    if grad_scale is not None:
        torch._foreach_div_(gradients_of(model), grad_scale)


def _prepare(tgt: Target, lr: float) -> Any:
    "Put the model on the run's device in train mode; the run's optimizer, or None to measure without steps."
    tgt.model.to(tgt.device)
    tgt.model.train()
    return tgt.make_opt(lr) if lr > 0 else None


def _batches(tgt: Target, total: int, stop_event: threading.Event | None) -> Iterator[tuple[Any, Any, int]]:
    "(inputs, targets, batch size) on the run's device, `total` of them, until `stop_event` is set."
    batches = _cycle(tgt.train_dl)
    for _ in range(total):
        if stop_event is not None and stop_event.is_set():
            return
        inputs, targets = tgt.split_batch(to_device(next(batches), tgt.device))
        bs = batch_size_of(targets, inputs)
        if tgt.batch_size is None:
            tgt.batch_size = bs
        yield inputs, targets, bs


def _forward_backward(tgt: Target, inputs: Any, targets: Any, run: _Run) -> torch.Tensor:
    "The loss, after its (scaled, under float16) backward pass."
    loss = tgt.fresh_loss(inputs, targets, run.amp)
    (loss * run.loss_scale.value if run.loss_scale.enabled else loss).backward()
    return loss


def _cycle(dl: Any) -> Iterator:
    "Batches from `dl`, epoch after epoch (a fresh iterator each epoch, as a training loop does)."
    while True:
        empty = True
        for b in dl:
            empty = False
            yield b
        if empty:
            raise ValueError("train_dl yielded no batches: give it a non-empty dataset (and drop_last=False "
                             "if the dataset is smaller than one batch)")


def _check_finite(recorder: RunRecorder, record: GNSRecord, lr: float) -> None:
    losses = recorder.last_window_losses
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        it = record.iteration - len(losses) + 1 + int(bad[0])
        raise RuntimeError(f"the loss became {losses[int(bad[0])].item()} at iteration {it}: training diverged "
                           f"at lr={lr:g}; lower lr, or use lr=0 to measure at the current weights")
    if not (math.isfinite(record.noise_raw) and math.isfinite(record.scale_raw)):
        raise RuntimeError(f"the gradients were not finite in iterations {record.iteration - len(losses) + 1}"
                           f"–{record.iteration}: lower lr, or use lr=0 to measure at the current weights")


def _total_iterations(dl: Any, num_it: int | None, n_batch: int) -> int:
    n = loader_len(dl)
    if n == 0:
        raise ValueError("train_dl is empty: give it a non-empty dataset (and drop_last=False if the dataset is "
                         "smaller than one batch)")
    if num_it is None:
        if n is None:
            raise ValueError("train_dl has no length, so 'one epoch' is unknown: pass num_it")
        if n < n_batch:
            raise ValueError(f"one epoch is only {n} batches, fewer than n_batch={n_batch}: pass num_it >= "
                             f"{5 * n_batch} (the loader is cycled) or lower n_batch")
        return n
    return num_it


def _check_args(*, lr: float, num_it: int | None, n_batch: int, method: str) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0 (0 measures without training), got {lr!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    least, what = (1, "1") if method == "per_example" else (n_batch, f"n_batch ({n_batch})")
    if AutoStop.of(num_it) is not None:
        return
    if num_it is not None and (isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < least):
        raise ValueError(f"num_it must be an integer >= {what} so at least one estimate is made, "
                         f"None for one epoch, or 'auto'; got {num_it!r}")
