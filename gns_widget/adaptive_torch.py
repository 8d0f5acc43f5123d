"""`AdaptiveLoader`: batches for a plain PyTorch loop whose batch size follows the noise scale."""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .adaptive import (
    TRIAL_STEPS,
    AdaptiveRecord,
    BatchSizePolicy,
    Decision,
    Progress,
    StepTimes,
    default_n_batch,
    look,
)
from .advice import detect_rule
from .duty import MAX_OVERHEAD, MeasureDuty, check_overhead
from .estimator import NoiseScaleEstimator
from .goodput import GAIN_NEEDED, MAX_EXAMPLES_FACTOR
from .lr_rules import check_rule
from .memory_plan import check_positive_int
from .recorder import RunRecorder
from .result import GNSResult
from .settings import TRAINING_BETA, Settings
from .throughput import Throughput

__all__ = ["AdaptiveLoader"]


class AdaptiveLoader:
    """The batches of `epochs` epochs at `batch_size`, at the batch size with the most progress per second.

    ```
    adapt = AdaptiveLoader(train_ds, 64, epochs=5, model=model, opt=opt, loss_func=loss_func)
    for xb, yb in adapt:                    # ends when the progress of 5 epochs at 64 is reached
        loss = loss_func(model(xb), yb)
        loss.backward()
        for g in opt.param_groups:          # any schedule, on the planned run's progress (0 → 1)
            g["lr"] = 1e-3 * (1 + math.cos(math.pi * adapt.pct)) / 2
        adapt.step(loss)                    # measures, steps the optimizer at the scaled lr, zeroes the gradients
    ```

    It measures the noise scale from the loop's own gradients and at each epoch's start (and every
    `decide_every` steps, if given) moves to the size with the most progress per second (`adaptive.py`). A
    bigger size is timed by training on it: it is tried for TRIAL_STEPS steps, then kept only if its steps make
    more progress per second than the last size's (a probe would time it on discarded steps). `pct` counts a
    step at a bigger size for more of the plan. `step` multiplies each parameter group's lr by the rule's factor
    for that step only, so a schedule that sets the lr each step, a constant lr and a torch scheduler all keep
    their meaning. With a `torch.amp.GradScaler`, pass
    `scaler=`: `step` unscales, measures, steps and updates it.

    `loader_kwargs` go to each epoch's `DataLoader` (num_workers, collate_fn, pin_memory, generator...); the
    batches are always shuffled, as `DataLoader(shuffle=True)` shuffles them (with `generator=` if given), so a
    run that never moves trains bit for bit as the plain loop. `self.record` holds the decisions and per-step
    batch size and lr; `self.result` the noise scale's `GNSResult`. Measuring costs two norms and an add per
    measured step: it is held to `max_overhead` of the planned run's training time, every step measured first
    and whole windows spaced out after (`MeasureDuty`; 1 measures every step). `self.duty` says how many steps
    were measured and what one cost.
    """

    def __init__(self, dataset: Dataset, batch_size: int, epochs: int, *, model: nn.Module,
                 opt: torch.optim.Optimizer, loss_func: Callable, n_batch: int | None = None,
                 beta: float = TRAINING_BETA, rule: str | None = None, gain_needed: float = GAIN_NEEDED,
                 max_bs: int | None = None, decide_every: int | None = None, throughput: Throughput | None = None,
                 max_overhead: float = MAX_OVERHEAD, scaler: Any = None,
                 on_decision: Callable[[Decision], Any] | None = None,
                 on_step: Callable[[AdaptiveRecord], Any] | None = None, **loader_kwargs):
        Settings(n_batch=20 if n_batch is None else n_batch, beta=beta).check()  # GNSCallback's limits and words
        check_positive_int("batch_size", batch_size)
        check_positive_int("epochs", epochs)
        if decide_every is not None:
            check_positive_int("decide_every", decide_every)
        if rule is not None:
            check_rule(rule)
        check_overhead(max_overhead)
        for key in ("shuffle", "sampler", "batch_sampler", "drop_last"):
            if key in loader_kwargs:
                raise ValueError(f"{key}= is AdaptiveLoader's to set: it draws shuffled batches of the size it "
                                 "decides; pass the other DataLoader arguments only")
        self.n_train = len(dataset)
        steps_per_epoch = math.ceil(self.n_train / batch_size)
        self.dataset, self.base_bs, self.epochs, self.loader_kwargs = dataset, batch_size, epochs, loader_kwargs
        self.model, self.opt, self.loss_func, self.scaler = model, opt, loss_func, scaler
        self.decide_every = decide_every
        self.on_decision, self.on_step = on_decision, on_step
        self.rule = rule or detect_rule(opt) or "momentum"
        self.gain_needed, self.max_bs = gain_needed, max_bs
        self.estimator = NoiseScaleEstimator(default_n_batch(steps_per_epoch) if n_batch is None else n_batch, beta,
                                             n_train=self.n_train)
        self.duty = MeasureDuty(self.estimator.n_batch, epochs * steps_per_epoch, max_overhead)
        self.progress = Progress(planned=epochs * steps_per_epoch)
        self.recorder = RunRecorder(self.estimator, total=epochs * steps_per_epoch)
        self.record = AdaptiveRecord(batch_size, self.progress.planned)
        self.batch_size, self.planned_at, self.epoch = batch_size, math.nan, 0
        self.max_epochs = math.ceil(epochs * MAX_EXAMPLES_FACTOR)  # a bigger batch needs at most ×2 the examples
        # sizes are timed when a decision needs them, once the noise scale says which could pay (`_decide`)
        self.policy = BatchSizePolicy(batch_size, throughput, n_train=self.n_train, rule=self.rule,
                                      gain_needed=gain_needed, max_bs=max_bs)
        self.step_seconds = math.nan  # the loop's median step since the last decision, measured as it trains
        self._times = StepTimes()
        self._last_step: float | None = None
        self._batch: tuple[int, int] | None = None  # the last yielded batch's examples and the size it was drawn at
        self._params: list[nn.Parameter] = []  # what trains, read once an epoch (not the module tree every step)
        self._look_at: int | None = None  # the step of the look that ends a trial

    @property
    def pct(self) -> float:
        "The planned run's progress, 0 → 1: what a schedule should follow."
        return self.progress.pct

    @property
    def result(self) -> GNSResult:
        "The noise scale measured along the run."
        return self.recorder.result(batch_size=self.base_bs, n_train=self.n_train, lr=self._lr(), method="training")

    def _lr(self) -> float:
        return float(self.opt.param_groups[-1]["lr"])

    @property
    def throughput(self) -> Throughput:
        "What is known of this device's step time by batch size (the sizes the decisions needed)."
        return self.policy.throughput

    def __iter__(self) -> Iterator[Any]:
        for epoch in range(self.epoch, self.max_epochs):
            self.epoch = epoch
            if self.progress.done:
                return
            if epoch > 0:
                self._decide()
            self._params = [p for p in self.model.parameters() if p.requires_grad]
            sizes: deque[tuple[int, int]] = deque()  # (examples, size drawn at) of each batch: workers draw ahead
            it = iter(DataLoader(self.dataset, batch_sampler=_Batches(self, sizes), **self.loader_kwargs))
            self._last_step = None  # the gap across an epoch's end holds the loop's evaluation: not a step
            try:
                for batch in it:
                    if self.progress.done:
                        return
                    self._batch = sizes.popleft()
                    yield batch
            finally:
                del it  # ends the epoch's worker processes
        self.epoch += 1  # past the last epoch: iterating again yields nothing

    def _decide(self) -> None:
        d, self.step_seconds = look(self.policy, self.batch_size, self.recorder.interval(), self.progress,
                                    planned_at=self.planned_at, epoch=self.epoch, durations=self._times.durations,
                                    step_seconds=self.step_seconds, time_sizes=None, duty=self.duty)
        self.record.decisions.append(d)
        self.planned_at, self.batch_size = d.planned_at, d.new_bs
        self._times, self._last_step = StepTimes(), None
        self._look_at = self.progress.steps_taken + TRIAL_STEPS if d.trial else None
        if self.on_decision is not None:
            self.on_decision(d)

    def step(self, loss: torch.Tensor) -> None:
        """After `loss.backward()`: measure the gradients, step the optimizer at the lr scaled for this batch size,
        zero the gradients and count the step's progress."""
        batch, self._batch = self._batch, None
        if batch is None:
            raise RuntimeError("step() comes after a batch from iterating the AdaptiveLoader and its backward")
        n, bs = batch  # an epoch's short last batch is a step at its epoch's size
        opt = self.opt
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        measured = self.duty.measuring
        if measured:
            self.recorder.step(loss, n, self._params, epoch=self.epoch)
        else:
            self.recorder.skip(n)
        factor = self.policy.lr_factor(bs, self.planned_at)
        groups = opt.param_groups
        lrs = None if factor == 1.0 else [g["lr"] for g in groups]  # the schedule's, restored after the step
        if lrs is not None:
            for g in groups:
                g["lr"] = g["lr"] * factor
        lr = float(groups[-1]["lr"])
        try:
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
        finally:
            if lrs is not None:
                for g, old in zip(groups, lrs):
                    g["lr"] = old
        opt.zero_grad()
        self.progress.advance(self.policy.step_gain(bs, self.planned_at), n)
        now = time.perf_counter()
        seconds = None if self._last_step is None else now - self._last_step  # one loop iteration
        if seconds is not None and bs == self.batch_size:
            self._times.add(seconds, measured)
        self.duty.took(seconds, self.estimator.window_open, bs)
        self._last_step = now
        self.record.log_step(self.epoch, bs, lr, self.progress.pct)
        if self.on_step is not None:
            self.on_step(self.record)
        taken = self.progress.steps_taken
        if taken == self._look_at or (self.decide_every and taken % self.decide_every == 0):
            self._decide()

    def __repr__(self) -> str:
        return f"AdaptiveLoader(batch_size={self.batch_size}, base {self.base_bs}, pct={self.pct:.2f})\n{self.record}"


class _Batches:
    """Index lists over one shuffled epoch, each of the loader's batch size when it is drawn (noted in `sizes`).

    The epoch's order is drawn by torch's own RandomSampler, from the `generator=` given or torch's global RNG, as
    `DataLoader(shuffle=True)` draws it (it also draws a spare permutation at each epoch's end): a run that never
    moves trains on the batches of the user's plain loop, bit for bit, and leaves the RNGs where it leaves them."""

    def __init__(self, owner: AdaptiveLoader, sizes: deque[tuple[int, int]]):
        self.owner, self.sizes = owner, sizes

    def __iter__(self) -> Iterator[list[int]]:
        order = list(RandomSampler(range(self.owner.n_train), generator=self.owner.loader_kwargs.get("generator")))
        start = 0
        while start < len(order):
            bs = self.owner.batch_size
            batch = order[start:start + bs]
            start += len(batch)
            self.sizes.append((len(batch), bs))
            yield batch
