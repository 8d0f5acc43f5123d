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

import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch

from .advice import MIN_STEPS_PER_EPOCH, detect_rule
from .ddp import allreduce_norms, is_distributed
from .estimator import NoiseScaleEstimator, gradients_of
from .goodput import sizes_worth_timing
from .guard import OtherSteps, WeightWatch, claim
from .interval import AutoStop
from .loaders import population_size
from .memory import fitting_batch_size, plan_batch
from .norms import squared_norm
from .per_example import PerExampleNorms
from .precision import LossScale, resolve_amp
from .recorder import RunRecorder
from .result import GNSRecord, GNSResult
from .settings import Settings
from .state import UserState
from .targets import Target, as_target
from .throughput import probe_throughput

__all__ = ["bs_find"]


def bs_find(target: Any, train_dl: Any = None, loss_func: Callable | None = None, *, lr: float = 1e-3,
            num_it: int | str | AutoStop | None = None, n_batch: int = 20, beta: float | None = None, opt: Any = None,
            device: Any = None, method: str = "fixed", batch_fn: Callable | None = None,
            on_update: Callable[[GNSRecord], None] | None = None,
            stop_event: threading.Event | None = None, probe_memory: bool | None = None,
            amp: torch.dtype | None = None, measure_speed: bool = True) -> GNSResult:
    """Measure the gradient noise scale of `target` and suggest a batch size.

    `target` is a fastai `Learner` (its `dls.train` and `loss_func` are used) or an
    `nn.Module` with `train_dl` and `loss_func`. `opt` is an optimizer, a factory
    `params -> optimizer`, or None (SGD; a Learner's own `opt_func`). `num_it` small batches
    are used (None: one epoch; more than an epoch cycles the loader). `lr=0` measures at
    the current weights. `num_it="auto"` runs until the noise scale's 90% interval is within ±10%,
    at most 20,000 small batches; `num_it=AutoStop(rel_halfwidth, max_it)` chooses both
    (`interval.AutoStop`). `on_update(record)` receives every new estimate, in order (n_batch
    at a time where one is made per step at lr=0, read from the device at once); setting
    `stop_event` ends the run at the next step with a partial result. Whatever happens,
    the model, optimizer, loader and RNG states are restored exactly.

    What is measured is the noise scale of the trainable parameters (`requires_grad=True`):
    frozen layers are left out, as they do not train.

    `n_batch` small batches make one estimate and `beta` is the EMA decay per estimate. Methods
    that estimate every step ("per_example", DDP) decay by beta**(1/n_batch) per step instead, so
    every method averages over the same number of small batches, about n_batch / (1 - beta).
    `beta=None` picks `settings.resolve_beta(lr)`: 0.99 while training, where the noise scale drifts with the
    weights, and 1 at lr=0, where nothing drifts and every estimate is averaged equally (forgetting
    would only throw measurements away: on a noisy problem that is the difference between ±60%
    and ±20% after the same run).

    `method` is "fixed", "sequential" or "per_example" (see the module docstring). Under
    torch.distributed (a `DistributedDataParallel` model in an initialized process group)
    "fixed" makes one estimate per step from the ranks: each rank's batch is a small batch
    and the all-reduced one the big batch; call it on every rank.

    `probe_memory` checks that the suggested batch fits for one training step on the device
    (`memory.max_batch_size`, capped at the suggestion) and, when it does not, plans gradient
    accumulation to reach it (`result.memory_plan`). None probes on CUDA only, where running
    out of memory is an error that can be caught; on the CPU it usually kills the process.

    `measure_speed` times a few training steps at each batch size the advice could move to (the user's, and
    the powers-of-two multiples or fractions of it that the noise scale's interval leaves worth it), so that
    `result.advice()` predicts wall time on this device (`result.throughput`; `throughput.py`). It runs after
    the measurement (a stopped run's too: its partial result is still advice), only when the measurement can
    carry a decision, and costs a few seconds at most.

    `amp` runs forward passes under `torch.autocast` with this dtype (float16 with a dynamic
    loss scale whose overflowed batches are skipped, as GradScaler does); None follows a
    Learner's `MixedPrecision` callback, `torch.float32` forces full precision.

    Only one finder run may use a model at a time: a second one raises `FinderBusyError`.

    `lr`, `num_it`, `n_batch`, `beta` and `method` are checked by `settings.Settings`, as the panel's and
    `GNSCallback`'s are: a ValueError names the argument and its accepted range.
    """
    if not isinstance(measure_speed, bool):
        raise ValueError(f"measure_speed must be True or False, got {measure_speed!r}")
    settings = Settings(lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, method=method).check()
    tgt = as_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn)
    amp = resolve_amp(target, amp)
    distributed = is_distributed(tgt.model)
    settings = replace(settings, distributed=distributed).check()  # the method's check that needs the model
    tgt.check_dataset_size()
    lr, n_batch, beta, per_step = settings.lr, settings.n_batch, settings.beta, settings.per_step
    total = settings.iterations(tgt.train_dl)
    # beta is the decay per n_batch small batches for every method, so all average over as many batches
    step_beta = beta ** (1 / n_batch) if per_step else beta
    auto = settings.auto
    if auto is not None:  # at fixed weights windows may widen (never for one estimate per step)
        auto.start(step_beta, widen=lr == 0 and not per_step)
    # sequential steps after every small batch, so it must know at once that one was not finite (a host sync per step)
    estimator = NoiseScaleEstimator(n_batch, step_beta, n_train=population_size(tgt.train_dl),
                                    check_each=method == "sequential")
    with claim(tgt.model, "bs_find", stop_event) as held, tgt.during_run():
        stop_event = held.stop_event  # one the user passed, or the guard's: a new panel can stop this run
        state = UserState(tgt.model, tgt.user_opt, tgt.train_dl, tgt.loss_func)
        others = OtherSteps(tgt.model, held)
        run = _Run(lr, method, amp, LossScale(amp == torch.float16), on_update, stop_event, n_batch, others, auto)
        throughput = None
        try:
            with torch.inference_mode(False), torch.enable_grad(), others:  # called under no_grad, it still trains
                recorder = (_run_paired if per_step else _run_windows)(tgt, estimator, total, run)
                stopped = stop_event.is_set()
                # what was measured decides what else is worth measuring; the result is built once all of it is in
                measured = recorder.result(batch_size=tgt.batch_size, n_train=tgt.n_train, lr=lr, beta=beta,
                                           method=method, stopped=stopped)
                if measure_speed and measured.decidable and tgt.batch_size and not distributed:  # a stopped run's too
                    sizes = sizes_worth_timing(tgt.batch_size, measured.interval, tgt.n_train, MIN_STEPS_PER_EPOCH)
                    with others.own():  # its steps are the run's; other threads stay refused while it trains
                        throughput = probe_throughput(tgt, sizes, amp, saturate_above=tgt.batch_size)
        finally:
            state.restore()
            others.release()  # other threads' forward and zero_grad stay refused until the model is restored
        plan = None
        probe = tgt.device.type == "cuda" if probe_memory is None else probe_memory
        if probe and measured.reliable and not distributed:
            fits = fitting_batch_size(tgt, limit=measured.suggested_bs, amp=amp)
            plan = plan_batch(measured.suggested_bs, fits)
    return recorder.result(batch_size=tgt.batch_size, n_train=tgt.n_train, lr=lr, beta=beta, method=method,
                           stopped=stopped, throughput=throughput, rule=_rule_of(target, tgt, opt), memory_plan=plan)


def _rule_of(target: Any, tgt: Target, opt: Any) -> str | None:
    """The lr rule of the optimizer the user trains with: the one given, a Learner's opt_func, else None (unknown:
    bs_find's own SGD says nothing of the user's). A factory is called once to see what it builds."""
    opt = getattr(target, "opt_func", None) if opt is None else opt
    if opt is None:
        return None
    if tgt.user_opt is not None:
        return detect_rule(tgt.user_opt)
    return detect_rule(opt) or detect_rule(tgt.make_opt(1.0))


@dataclass
class _Run:
    "How one run trains and reports (the target says what it trains)."
    lr: float
    method: str
    amp: torch.dtype | None
    loss_scale: LossScale
    on_update: Callable[[GNSRecord], None] | None
    stop_event: threading.Event
    n_batch: int
    others: OtherSteps  # refuses other optimizers' steps on the model while the run trains it
    auto: AutoStop | None = None  # num_it="auto": ends the run once the interval is narrow enough
    bad_streak: int = 0  # consecutive small batches whose gradients were not finite

    def check_finite(self, finite: tuple[bool, ...], iteration: int) -> None:
        """Count the latest small batches' verdicts (the last ends at `iteration`): too many non-finite ones in a
        row is divergence, not a stray batch. They come per batch when checked at once, else at each window's end."""
        # float16's loss scale may need ~16 halvings before its first good step
        limit = self.n_batch + (32 if self.loss_scale.enabled else 0)
        for it, ok in enumerate(finite, start=iteration - len(finite) + 1):
            self.bad_streak = 0 if ok else self.bad_streak + 1
            if self.bad_streak >= limit:
                raise RuntimeError(f"the gradients were not finite for {self.bad_streak} batches in a row (iterations "
                                   f"{it - self.bad_streak + 1}–{it}): training diverged at lr={self.lr:g}, or the "
                                   "data holds NaN/inf; lower lr, or use lr=0 to measure at the current weights")


def _run_windows(tgt: Target, estimator: NoiseScaleEstimator, total: int, run: _Run) -> RunRecorder:
    """fixed and sequential: windows of n_batch small batches, the big batch built from them.

    No host sync per small batch with method="fixed" in full precision or bfloat16: a non-finite batch is found
    at its window's end, which is dropped. float16 (its loss scale) and "sequential" (a step per batch) check
    every batch as it comes: one sync per step, as `GradScaler` makes.
    """
    opt = _prepare(tgt, run.lr)
    step_every_batch = opt is not None and run.method == "sequential"
    loss_scale = run.loss_scale
    recorder = RunRecorder(estimator, total)
    watch = WeightWatch(tgt.model, run.others)
    for inputs, targets, bs, epoch in tgt.batches(total, run.stop_event):
        watch.check()
        loss = _forward_backward(tgt, inputs, targets, run)
        watch.rebase()
        carried = loss_scale.grad_scale
        record = recorder.step(loss, bs, tgt.model, grad_scale=carried, epoch=epoch)
        finite = estimator.last_finite  # this batch's verdict when checked at once, else the window's at its end
        run.check_finite(finite, recorder.iteration)
        loss_scale.update(overflowed=False in finite)  # float16 checks every batch
        if step_every_batch and finite[0]:  # sequential checks every batch
            _unscale(tgt.model, carried)
            watch.step(opt)
        if record is None:
            continue
        if opt is not None and run.method == "fixed":
            for p, g in estimator.big_batch_grads().items():  # unscaled already
                if p.grad is None:  # this parameter's last batch did not use it
                    p.grad = g
                else:
                    p.grad.copy_(g)
            watch.step(opt)
        if run.on_update is not None:
            run.on_update(record)
        if run.auto is not None:
            if run.auto.update(record):
                break
            estimator.set_window(run.auto.n_batch_for(record, estimator.n_batch))
    return recorder


def _run_paired(tgt: Target, estimator: NoiseScaleEstimator, total: int, run: _Run) -> RunRecorder:
    """per_example and distributed: every step measures a small and a big batch at the same weights.

    Each step's norms and loss stay on the device; `_read_every` steps are read in one host read and then fed to
    the estimator in order, exactly as if each had been read at once (records and `on_update` come in bursts).
    """
    opt = _prepare(tgt, run.lr)
    recorder = RunRecorder(estimator, total)
    model, loss_scale = tgt.model, run.loss_scale
    watch = WeightWatch(model, run.others)
    every, pending = _read_every(opt, loss_scale, run.n_batch), []

    def fold(steps: list[tuple]) -> bool:
        "Feed the read steps to the estimator in order; True when the run ends at one of them."
        # a stop set while these steps ran (a Stop button): a step-by-step run would have kept them all too
        noticed = run.stop_event.is_set()
        for loss, bs, small_sq, big_sq, b_small, b_big, carried, at in steps:
            record = recorder.step_norms(loss, bs, small_sq, big_sq, b_small, b_big, grad_scale=carried, at=at)
            run.check_finite((record is not None,), recorder.iteration)
            loss_scale.update(overflowed=record is None)
            if record is None:  # not finite: skipped, as GradScaler skips the step
                continue
            _unscale(model, carried)  # a scaled or stepping run reads each step at once: these are its gradients
            if opt is not None:
                watch.step(opt)
            if run.on_update is not None:
                run.on_update(record)
            if run.auto is not None and run.auto.update(record):
                return True
            if not noticed and run.stop_event.is_set():  # set by on_update: end here, not at the burst's end
                return True
        return False

    with (nullcontext() if is_distributed(model) else PerExampleNorms(model)) as norms:
        for inputs, targets, bs, _ in tgt.batches(total, run.stop_event):
            watch.check()
            if norms is None:  # DDP: the local gradient first, then the same all-reduce DDP would do
                with model.no_sync():
                    loss = _forward_backward(tgt, inputs, targets, run)
                measured = allreduce_norms(model, bs)
            else:
                if bs < 2:
                    raise ValueError(f"method='per_example' needs batches of at least 2 examples, got {bs}: use a "
                                     "loader with batch_size >= 2, or method='fixed'")
                loss = _forward_backward(tgt, inputs, targets, run, norms)
                measured = norms.pop().mean(), squared_norm(gradients_of(model)), 1, bs
            watch.rebase()
            pending.append((loss.detach().reshape(()), bs, *measured, loss_scale.grad_scale, time.perf_counter()))
            if len(pending) == every:
                steps, pending = _read(pending), []
                if fold(steps):
                    break
        if pending:  # the steps of a run that ended between reads
            fold(_read(pending))
    return recorder


def _read_every(opt: Any, loss_scale: LossScale, n_batch: int) -> int:
    """How many steps of `_run_paired` to read from the device at once.

    A step that trains must know before the optimizer steps whether its gradients were finite (they are
    skipped otherwise), and float16's loss scale changes after every step: those read each step at once, one
    host read per step as GradScaler makes. Measuring at lr=0 in full precision or bfloat16 reads n_batch at a
    time: a non-finite step is still left out, and divergence found, when its burst is read.
    """
    return 1 if opt is not None or loss_scale.enabled else n_batch


def _read(steps: list[tuple]) -> list[tuple]:
    "The steps with their device scalars as floats, all read in one host read."
    tensors = [v for step in steps for v in step if isinstance(v, torch.Tensor)]
    values = iter(torch.stack(tensors).tolist())  # promoted to the widest dtype: every value read exactly
    return [tuple(next(values) if isinstance(v, torch.Tensor) else v for v in step) for step in steps]


def _unscale(model: torch.nn.Module, grad_scale: float | None) -> None:
    "Divide out the loss scale the gradients carry (the one of their backward pass, not an updated one)."
    if grad_scale is not None:
        torch._foreach_div_(gradients_of(model), grad_scale)


def _prepare(tgt: Target, lr: float) -> Any:
    "Put the model (and its optimizer state) on the run's device in train mode; the run's optimizer, or None."
    tgt.to_run_device()
    tgt.model.train()
    return tgt.make_opt(lr) if lr > 0 else None


def _forward_backward(tgt: Target, inputs: Any, targets: Any, run: _Run,
                      norms: PerExampleNorms | None = None) -> torch.Tensor:
    "The loss, after its (scaled, under float16) backward pass; `norms` follow the loss too (parameters it uses)."
    loss = tgt.fresh_loss(inputs, targets, run.amp, around_loss=norms.in_loss if norms is not None else nullcontext)
    (loss * run.loss_scale.value if run.loss_scale.enabled else loss).backward()
    return loss
