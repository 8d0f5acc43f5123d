"""`MeasureDuty`: which training steps feed the noise-scale estimate, so that measuring stays cheap.

An estimate needs a window of consecutive small batches, not every step: between windows a loop can train
unmeasured. Measuring (two norms and one add per step) costs 3-5 % of an 8 ms CPU step of a small ResNet and
10-75 % of 0.2-3 ms CPU steps (fastai tabular models, small MLPs), which a batch size that follows the noise
scale must win back before it gains anything. The duty times what measuring adds to a step as the loop runs
and keeps the total within `max_overhead` of the planned run's training time. It spends half of that budget
first, measuring every step (the first decision, which sets the course of the run, gets a full interval as
early as it can), and spreads the rest as whole windows over the steps left. Fewer windows make a wider
interval, and the decisions, planned at its low end, more cautious: where measuring is dear the run adapts
less rather than pays for it (a 0.1 s run may never gather the interval's ten windows, and keeps its batch
size).
"""
from __future__ import annotations

import math
import statistics
from collections import deque

__all__ = ["MeasureDuty", "MAX_OVERHEAD", "check_overhead"]

MAX_OVERHEAD = 0.02  # measuring may add this fraction to the planned run's training time
FRONT_SHARE = 0.5  # of that budget, spent measuring every step from the start
_KEPT = 64  # step durations of each kind the cost is read from (recent ones: the batch size moves)
_PLAIN_NEEDED = 8  # unmeasured steps timed before the cost is known (the first gap is this long)
_RECHECK_WINDOWS = 16  # while every step is measured, a gap of _PLAIN_NEEDED plain steps after this many windows


class MeasureDuty:
    """Whether the current training step is measured; `took` after each step moves on to the next.

    A measured phase lasts until the estimator's window is complete (`window_open` false); then, once measuring
    is found dear, a gap of unmeasured steps follows. The cost of measuring a step is the mean duration of
    measured steps minus that of plain ones, both timed by the loop, so it holds whatever the device (a GPU's
    queued work is counted where the loop waits for it). The budget is `max_overhead` × `planned_steps` plain
    steps: FRONT_SHARE of it is spent measuring every step, the rest is spread over the steps left.
    Measuring that costs at most `max_overhead` of a step is never spaced out; `max_overhead=1` measures every
    step.
    """

    def __init__(self, n_batch: int, planned_steps: float, max_overhead: float = MAX_OVERHEAD):
        check_overhead(max_overhead)
        self.n_batch, self.planned_steps, self.max_overhead = n_batch, planned_steps, max_overhead
        self.measuring = True
        self.steps = self.measured = 0
        self._spent_before = 0.0  # the cost of the measured steps at sizes left behind, in plain steps
        self._measured_here = 0  # measured steps at the current size, costed at its latest estimate (`spent`)
        self._last_cost = math.nan  # the latest known cost, for a size left before its own was timed
        self._windows_since_gap = 0
        self._gap_left = 0
        self._seconds: dict[bool, deque[float]] = {}
        self._size: int | None = None

    def took(self, seconds: float | None, window_open: bool, batch_size: int) -> None:
        """The current step, at `batch_size`, is done after `seconds` (None: not timed, e.g. an epoch's first);
        `window_open` is whether the estimator's window is still incomplete (a measured phase never ends inside a
        window). Durations are compared within one batch size: a new size's cost is timed afresh, from its second
        step on."""
        self.steps += 1
        if not self.measuring and batch_size == self._size:  # a step in a gap: most steps, kept short
            if seconds is not None and math.isfinite(seconds):
                self._seconds[False].append(seconds)
            self._gap_left -= 1
            self.measuring = self._gap_left <= 0
            return
        if batch_size != self._size:
            self._spent_before += self._measured_here * self._cost_here()
            self._size, self._seconds = batch_size, {True: deque(maxlen=_KEPT), False: deque(maxlen=_KEPT)}
            self._measured_here = 0
            seconds = None  # a size's first step warms up (the run's first batch: 2-3× a step), not a measuring cost
        if seconds is not None and math.isfinite(seconds):
            self._seconds[self.measuring].append(seconds)
        if self.measuring:
            self.measured += 1
            self._measured_here += 1
            if not window_open:
                self._windows_since_gap += 1
                self._gap_left = self.gap()
                self.measuring = self._gap_left == 0
                if not self.measuring:
                    self._windows_since_gap = 0
        else:
            self._gap_left -= 1
            self.measuring = self._gap_left <= 0

    @property
    def overhead(self) -> float:
        """What measuring adds to a step, as a fraction of a plain one (nan until known): the mean durations of
        the two kinds, each without its slowest tenth (a busy machine's stray slow steps)."""
        if not self._seconds:
            return math.nan
        timed, plain = self._seconds[True], self._seconds[False]
        if len(plain) < _PLAIN_NEEDED or len(timed) < self.n_batch:
            return math.nan
        base = _trimmed_mean(plain)
        return max(_trimmed_mean(timed) - base, 0.0) / base if base > 0 else math.nan

    def _cost_here(self) -> float:
        cost = self.overhead
        if not math.isnan(cost):
            self._last_cost = cost
        return 0.0 if math.isnan(self._last_cost) else self._last_cost

    @property
    def spent(self) -> float:
        """Measuring's cost so far, in plain steps: each size's measured steps at that size's latest estimate, so
        steps measured while a noisy early estimate called measuring cheap are charged what it turned out to cost."""
        return self._spent_before + self._measured_here * self._cost_here()

    @property
    def budget(self) -> float:
        "What measuring may cost over the planned run, in plain steps."
        return self.max_overhead * self.planned_steps

    def gap(self) -> int:
        """Plain steps before the next window: a first short gap to time plain steps; none while measuring is cheap
        or the front share of the budget lasts, but for a short one every _RECHECK_WINDOWS windows (plain steps are
        free, and without fresh ones a cost that an early noisy estimate called cheap would never be seen to be
        dear); then what spreads the budget left over the steps left."""
        if self.max_overhead >= 1:
            return 0
        cost = self.overhead
        if math.isnan(cost):
            return _PLAIN_NEEDED if len(self._seconds.get(False, ())) < _PLAIN_NEEDED else 0
        if cost <= self.max_overhead or self.spent < FRONT_SHARE * self.budget:
            return _PLAIN_NEEDED if self._windows_since_gap >= _RECHECK_WINDOWS else 0
        steps_left = max(self.planned_steps - self.steps, self.n_batch)
        share = (self.budget - self.spent) / (steps_left * cost)
        return math.ceil(steps_left) if share <= 0 else max(0, round(self.n_batch * (1 / min(share, 1.0) - 1)))

    def __repr__(self) -> str:
        return (f"MeasureDuty({self.measured}/{self.steps} steps measured, a measured step costs "
                f"{self.overhead:+.1%}, {self.spent:.3g} of a budget of {self.budget:.3g} plain steps spent)")


def _trimmed_mean(seconds: deque[float]) -> float:
    kept = sorted(seconds)[:max(1, math.ceil(0.9 * len(seconds)))]
    return statistics.fmean(kept)


def check_overhead(max_overhead: float) -> None:
    "A ValueError unless `max_overhead` is a number in (0, 1]."
    if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not 0 < max_overhead <= 1:
        raise ValueError(f"max_overhead must be a number in (0, 1] (the fraction of training time measuring may "
                         f"add; 1 measures every step), got {max_overhead!r}")
