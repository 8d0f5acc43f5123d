"""`MeasureDuty`: which training steps feed the noise-scale estimate, so that measuring stays cheap.

An estimate needs a window of consecutive small batches, not every step: between windows a loop can train
unmeasured. On a GPU the measurement (two norms and one add per step) is a few percent of a step; on a CPU
with 0.2-1 ms steps it is 10-25 %, which a batch size that follows the noise scale must win back before it
gains anything. The duty measures what measuring adds to a step as the loop runs and spaces the windows so
that this cost stays within `max_overhead` of the training time. Fewer windows make a wider interval, and the
decisions, planned at its low end, more cautious: where measuring is dear, the run adapts less rather than
pays for it (a 0.1 s run may never gather the interval's ten windows, and keeps its batch size).
"""
from __future__ import annotations

import math
import statistics
from collections import deque

__all__ = ["MeasureDuty", "MAX_OVERHEAD", "check_overhead"]

MAX_OVERHEAD = 0.02  # measuring may add this fraction to the training time (when min_share allows)
_KEPT = 64  # step durations of each kind the cost is read from (recent ones: the batch size moves)
_PLAIN_NEEDED = 8  # unmeasured steps timed before the cost is known (the first gap is this long)


class MeasureDuty:
    """Whether the current training step is measured; `took` after each step moves on to the next.

    A measured phase lasts until the estimator's window is complete (`window_open` false), then a gap of
    unmeasured steps follows, sized so that the windows' extra cost is at most `max_overhead` of the
    unmeasured steps' time: the cost is the mean duration of measured steps minus that of unmeasured ones,
    both timed by the loop, so it holds whatever the device (a GPU's queued work is counted where the
    loop waits for it). `max_overhead=1` measures every step.
    """

    def __init__(self, n_batch: int, max_overhead: float = MAX_OVERHEAD):
        check_overhead(max_overhead)
        self.n_batch, self.max_overhead = n_batch, max_overhead
        self.measuring = True
        self._gap_left = 0
        self._seconds: dict[bool, deque[float]] = {True: deque(maxlen=_KEPT), False: deque(maxlen=_KEPT)}
        self.steps = self.measured = 0

    def took(self, seconds: float | None, window_open: bool) -> None:
        """The current step is done, after `seconds` (None: not timed, e.g. an epoch's first); `window_open` is
        whether the estimator's window is still incomplete (a measured phase never ends inside a window)."""
        self.steps += 1
        self.measured += self.measuring
        if seconds is not None and math.isfinite(seconds):
            self._seconds[self.measuring].append(seconds)
        if self.measuring:
            if not window_open:
                self._gap_left = self.gap()
                self.measuring = self._gap_left == 0
        else:
            self._gap_left -= 1
            self.measuring = self._gap_left <= 0

    @property
    def overhead(self) -> float:
        """What measuring every step would add to a step, as a fraction of an unmeasured one (nan until known): the
    mean durations of the two kinds, each without its slowest tenth (a busy machine's stray slow steps)."""
        timed, plain = self._seconds[True], self._seconds[False]
        if len(plain) < _PLAIN_NEEDED or len(timed) < self.n_batch:
            return math.nan
        base = _trimmed_mean(plain)
        return max(_trimmed_mean(timed) - base, 0.0) / base if base > 0 else math.nan

    @property
    def share(self) -> float:
        "The fraction of steps to measure: all while measuring is within budget, else what keeps it there."
        cost = self.overhead
        if not cost > self.max_overhead:
            return 1.0
        return self.max_overhead / cost

    def gap(self) -> int:
        "Unmeasured steps before the next window: a first short gap to time plain steps, then from the share."
        if self.max_overhead >= 1:
            return 0
        if math.isnan(self.overhead):
            return _PLAIN_NEEDED if len(self._seconds[False]) < _PLAIN_NEEDED else 0
        return round(self.n_batch * (1 / self.share - 1))

    def __repr__(self) -> str:
        return (f"MeasureDuty({self.measured}/{self.steps} steps measured, overhead if all "
                f"{self.overhead:.1%}, share {self.share:.2f})")


def _trimmed_mean(seconds: deque[float]) -> float:
    kept = sorted(seconds)[:max(1, math.ceil(0.9 * len(seconds)))]
    return statistics.fmean(kept)


def check_overhead(max_overhead: float) -> None:
    "A ValueError unless `max_overhead` is a number in (0, 1]."
    if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not 0 < max_overhead <= 1:
        raise ValueError(f"max_overhead must be a number in (0, 1] (the fraction of training time measuring may "
                         f"add; 1 measures every step), got {max_overhead!r}")
