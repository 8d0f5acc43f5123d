"""`AdaptiveBatchSize`: a fastai callback whose batch size follows the noise scale during `learn.fit`."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastai.callback.core import CancelFitException, CancelTrainException
from fastai.callback.training import GradientAccumulation

from .adaptive import (
    AdaptiveRecord,
    BatchSizePolicy,
    Decision,
    Progress,
    StepTimes,
    default_n_batch,
    look,
)
from .advice import detect_rule
from .callback import GNSCallback
from .duty import MAX_OVERHEAD, MeasureDuty, check_overhead
from .goodput import GAIN_NEEDED, MAX_EXAMPLES_FACTOR
from .loaders import current_batch_size, dataset_len, loader_at
from .lr_rules import check_rule
from .precision import resolve_amp
from .settings import TRAINING_BETA
from .targets import as_target
from .targets.base import batch_size_of
from .throughput import Throughput, probe_throughput

__all__ = ["AdaptiveBatchSize"]


class AdaptiveBatchSize(GNSCallback):
    """Grow the batch size with the noise scale during `learn.fit`, keeping the lr schedule's shape.

    `learn.fit_one_cycle(5, 3e-3, cbs=AdaptiveBatchSize())` measures the noise scale as `GNSCallback`
    does, times training steps at the candidate sizes on this device before the first epoch, and at each
    epoch's start trains on a copy of `dls.train` at the size with the most progress per second (`adaptive.py`). A
    step at a bigger size counts for more of the planned run, so fastai's schedules (one-cycle, cosine,
    flat) run on that progress and the fit ends when the progress of `n_epoch` epochs at the user's batch
    size is reached: usually in fewer epochs' worth of steps, at most ×2 the examples (the progress bar
    shows that bound). The lr is the schedule's times the optimizer's rule factor.

    `learn.dls.train` itself is never changed (even when the fit fails), and `self.record` holds the decisions and the
    per-step batch size and lr (`self.record.plot(self.result.history)`); `self.result` is the noise scale's
    `GNSResult` as for `GNSCallback`. Decisions come at epoch boundaries: fastai builds an epoch's batches
    when it starts. `on_decision(decision)` and `on_step(record)` are called as they happen (a live view).

    Measuring costs two norms and an add per measured step: it is held to `max_overhead` of the planned run's
    training time, every step measured first and whole windows spaced out after (`MeasureDuty`; 1 measures
    every step). `self.duty` says how many steps were measured and what one cost.

    Works with `MixedPrecision` (the gradients are read unscaled; the timing uses the same autocast);
    `GradientAccumulation` and distributed training are refused (their step is not the loader's batch), and
    a bigger batch is never made by accumulating micro-batches: on one device k micro-batches cost k steps' time
    for less progress than k steps (r(kB) < k·r(B)), so sizes that do not fit in memory are left out.
    """

    order = GNSCallback.order  # reads gradients after MixedPrecision unscales them, before GradientClip

    def __init__(self, n_batch: int | None = None, beta: float = TRAINING_BETA, *, rule: str | None = None,
                 gain_needed: float = GAIN_NEEDED, max_bs: int | None = None, throughput: Throughput | None = None,
                 max_overhead: float = MAX_OVERHEAD, on_decision: Callable[[Decision], Any] | None = None,
                 on_step: Callable[[Any], Any] | None = None):
        super().__init__(20 if n_batch is None else n_batch, beta)
        if rule is not None:
            check_rule(rule)
        if not (isinstance(gain_needed, (int, float)) and gain_needed >= 1):
            raise ValueError(f"gain_needed must be a number >= 1 (the predicted speedup a move must clear), "
                             f"got {gain_needed!r}")
        if max_bs is not None and not (isinstance(max_bs, int) and max_bs >= 1):
            raise ValueError(f"max_bs must be a positive integer or None, got {max_bs!r}")
        check_overhead(max_overhead)
        self.max_overhead = max_overhead
        self.auto_n_batch, self.rule, self.gain_needed, self.max_bs = n_batch is None, rule, gain_needed, max_bs
        self.given_throughput, self.on_decision, self.on_step = throughput, on_decision, on_step
        self.record: AdaptiveRecord | None = None

    # ------------------------------------------------------------------ fit
    def before_fit(self):
        self._refuse_unsupported()
        self.base_bs = current_batch_size(self.dls.train)
        steps_per_epoch = len(self.dls.train)
        if self.auto_n_batch:
            self.n_batch = default_n_batch(steps_per_epoch)
        super().before_fit()
        self.duty = MeasureDuty(self.estimator.n_batch, self.n_epoch * steps_per_epoch, self.max_overhead)
        self.n_train = dataset_len(self.dls.train)
        rule = self.rule or detect_rule(self.learn.opt_func) or "momentum"
        # sizes are timed when a decision needs them, once the noise scale says which could pay (`_decide`)
        self.policy = BatchSizePolicy(self.base_bs, self.given_throughput, n_train=self.n_train, rule=rule,
                                      gain_needed=self.gain_needed, max_bs=self.max_bs)
        self.planned_epochs = self.n_epoch
        # not `progress`: fastai warns that it shadows the Learner's (ProgressCallback's) attribute
        self.run_progress = Progress(planned=self.n_epoch * steps_per_epoch)
        self.record = AdaptiveRecord(self.base_bs, self.run_progress.planned)
        self.bs, self.planned_at = self.base_bs, math.nan
        self.step_seconds = math.nan  # the median training step of the last epoch, measured as it trains
        self._times, self._under_way = StepTimes(), _StepState()  # the steps since the last look; the one under way
        self._copies: dict[int, Any] = {}  # the training loader at each size used, made when first needed
        if loader_at(self.dls.train, 2 * self.base_bs) is None:
            raise ValueError("AdaptiveBatchSize needs a training loader it can copy at another batch size (fastai's "
                             "DataLoader, or a torch DataLoader without a custom batch_sampler)")
        # fastai's epoch loop reads n_epoch once, after before_fit: room for the examples a bigger batch needs
        self.learn.n_epoch = math.ceil(self.n_epoch * MAX_EXAMPLES_FACTOR)

    def _refuse_unsupported(self) -> None:
        if any(isinstance(cb, GradientAccumulation) for cb in self.learn.cbs):
            raise ValueError("AdaptiveBatchSize moves the loader's batch size, which is not the optimizer's step "
                             "under GradientAccumulation: remove GradientAccumulation (a bigger batch does its job)")
        if any(type(cb).__name__ == "DistributedTrainer" for cb in self.learn.cbs):
            raise ValueError("AdaptiveBatchSize does not support distributed training (distrib_ctx): each rank's "
                             "loader would need the same decision. Measure with GNSCallback there instead")

    @property
    def throughput(self) -> Throughput:
        "What is known of this device's step time by batch size (the sizes the decisions needed)."
        return self.policy.throughput

    def _time_sizes(self, sizes: list[int]) -> Throughput:
        "Step time at `sizes` on this device, the Learner's state restored (`probe_throughput`)."
        tgt = as_target(self.learn, measuring=False)
        return probe_throughput(tgt, sizes, resolve_amp(self.learn, None), saturate_above=self.bs)

    def before_epoch(self):
        if self.run_progress.done:
            raise CancelFitException()
        if self.epoch > 0:
            self._decide()

    def _decide(self) -> None:
        d, self.step_seconds = look(self.policy, self.bs, self.recorder_.interval(), self.run_progress,
                                    planned_at=self.planned_at, epoch=self.epoch, durations=self._times.durations,
                                    step_seconds=self.step_seconds, time_sizes=self._time_sizes, duty=self.duty)
        self.record.decisions.append(d)
        self.planned_at = d.planned_at
        if d.changed:
            self.bs = d.new_bs
        if self.on_decision is not None:
            self.on_decision(d)

    def before_train(self):
        super().before_train()
        self._follow_progress()
        self._times, self._under_way.last_batch = StepTimes(), None
        if self.bs != self.base_bs:  # the epoch's batches come from a copy: the user's loader is never changed
            if self.bs not in self._copies:
                self._copies[self.bs] = loader_at(self.dls.train, self.bs)
            self.learn.dl = self._copies[self.bs]
        plan = self.run_progress
        steps = (plan.planned - plan.steps_done) / self.policy.step_gain(self.bs, self.planned_at)
        if steps < len(self.dl):  # the plan ends in this epoch: its first batches, then validation as usual
            self.learn.dl = _FirstBatches(self.dl, math.ceil(steps - 1e-9))

    def before_batch(self):
        if not self.learn.training:
            return
        if self.run_progress.done:  # only if a step's gain changed under the epoch's count
            raise CancelTrainException()
        now, step = time.perf_counter(), self._under_way
        if step.last_batch is not None:  # from one batch to the next: loading, forward, backward, step
            self._times.add(now - step.last_batch, step.measured)
        step.last_batch = now

    def _follow_progress(self) -> None:
        "fastai counts the schedule's progress in epochs (TrainEvalCallback): here it is the planned run's."
        self.learn.pct_train = self.run_progress.pct

    def before_step(self):
        learn, step = self.learn, self._under_way
        step.measured = self.duty.measuring
        if step.measured:
            super().before_step()
        else:
            self.recorder_.skip(batch_size_of(learn.yb, learn.xb))
        factor, hypers = self.policy.lr_factor(self.bs, self.planned_at), learn.opt.hypers
        if factor != 1.0:  # the schedule's lrs are put back after the step
            step.lrs = [h["lr"] for h in hypers]
            for h in hypers:
                h["lr"] = h["lr"] * factor
        step.lr = hypers[-1]["lr"]

    def after_step(self):
        step = self._under_way
        if step.lrs is not None:  # the schedule sets the next lr; a constant lr must not compound
            for h, lr in zip(self.learn.opt.hypers, step.lrs):
                h["lr"] = lr
            step.lrs = None

    def after_batch(self):
        learn, step = self.learn, self._under_way
        if not learn.training:
            return
        self.duty.took(time.perf_counter() - step.last_batch, self.estimator.window_open, self.bs)  # loading aside
        self.run_progress.advance(self.policy.step_gain(self.bs, self.planned_at), batch_size_of(learn.yb, learn.xb))
        self._follow_progress()
        self.record.log_step(learn.epoch, self.bs, step.lr, self.run_progress.pct)
        if self.on_step is not None:
            self.on_step(self.record)

    def after_fit(self):
        super().after_fit()
        if self.record is not None:
            self.learn.n_epoch = self.planned_epochs
        self._copies = {}


@dataclass(slots=True)
class _StepState:
    """The training step under way. One object, changed in place: fastai checks every attribute set on a callback
    against the Learner (to warn of shadowing), a lookup that costs more than the step's own bookkeeping."""
    last_batch: float | None = None  # when the previous batch started (perf_counter)
    measured: bool = False  # whether the previous step was measured
    lrs: list[float] | None = None  # the schedule's lrs, while the step trains at the rule's factor
    lr: float = math.nan  # the last lr of the step's param groups: what the record logs


class _FirstBatches:
    """The first `n` batches of a fastai DataLoader's epoch (shuffled over the whole dataset as usual), for the epoch
    in which the planned progress is reached; every other attribute is the loader's."""

    def __init__(self, dl: Any, n: int):
        self.dl, self.n = dl, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        it = iter(self.dl)
        try:
            for _ in range(self.n):
                try:
                    yield next(it)
                except StopIteration:
                    return
        finally:
            it.close()  # ends the loader's epoch (its worker processes too)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dl, name)
