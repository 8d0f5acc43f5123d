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
        self.spent = 0.0  # measuring's cost so far, in plain steps
        self._gap_left = 0
        self._seconds: dict[bool, deque[float]] = {}
        self._size: int | None = None

    def took(self, seconds: float | None, window_open: bool, batch_size: int) -> None:
        """The current step, at `batch_size`, is done after `seconds` (None: not timed, e.g. an epoch's first);
        `window_open` is whether the estimator's window is still incomplete (a measured phase never ends inside a
        window). Durations are compared within one batch size: a new size's cost is timed afresh."""
        self.steps += 1
        if batch_size != self._size:
            self._size, self._seconds = batch_size, {True: deque(maxlen=_KEPT), False: deque(maxlen=_KEPT)}
        if seconds is not None and math.isfinite(seconds):
            self._seconds[self.measuring].append(seconds)
        if self.measuring:
            self.measured += 1
            cost = self.overhead
            self.spent += 0.0 if math.isnan(cost) else cost
            if not window_open:
                self._gap_left = self.gap()
                self.measuring = self._gap_left == 0
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

    @property
    def budget(self) -> float:
        "What measuring may cost over the planned run, in plain steps."
        return self.max_overhead * self.planned_steps

    def gap(self) -> int:
        """Plain steps before the next window: a first short gap to time plain steps; none while measuring is cheap
        or the front share of the budget lasts; then what spreads the budget left over the steps left."""
        if self.max_overhead >= 1:
            return 0
        cost = self.overhead
        if math.isnan(cost):
            return _PLAIN_NEEDED if len(self._seconds.get(False, ())) < _PLAIN_NEEDED else 0
        if cost <= self.max_overhead or self.spent < FRONT_SHARE * self.budget:
            return 0
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
