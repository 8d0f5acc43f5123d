"""The batch size that follows the noise scale during training: the policy, the progress count and the record.

Framework-free: the fastai callback (`adaptive_fastai.py`) and the plain PyTorch loader
(`adaptive_torch.py`) feed it the noise scale's interval and the device's measured throughput.

**Which batch size.** Goodput, as in the advice (`goodput.py`) and Pollux: one optimizer step at batch
size B is worth r(B) = (1 + B_noise/B_0)/(1 + B_noise/B) steps at the user's B_0 (McCandlish et al.:
S(B) ∝ 1 + B_noise/B steps reach a given loss; AdaScale calls r the gain), and it costs t(B) seconds on
this device. The policy picks the B with the most progress per second, r(B)/t(B), planned at the
interval's low end of B_noise (a step is worth less there, so the plan errs towards more training). It
moves only for a gain of ×GAIN_NEEDED beyond the timing noise, within the advice's bounds: at most ×2 the
examples of the user's run, at most ×2 the lr, at least MIN_STEPS_PER_EPOCH steps per epoch.

**How long.** The run ends when its progress, Σ r(B_t) over the steps taken, reaches the user's planned
steps (epochs × steps per epoch at B_0). A schedule (one-cycle, cosine) is driven by that progress, so it
keeps its shape however the batch size moves: AdaScale's scale-invariant iterations. The lr at B is the
schedule's times the rule's factor (linear in r for plain SGD, its square root with momentum or Adam),
the factor that measured best for the one-shot advice.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import pandas as pd

from .advice import MAX_LR_FACTOR, MIN_STEPS_PER_EPOCH
from .duty import MeasureDuty
from .goodput import GAIN_NEEDED, MAX_DOUBLINGS, MAX_EXAMPLES_FACTOR, examples_ratio
from .interval import Interval
from .lr_rules import check_rule, lr_factor
from .steplog import StepLog
from .throughput import MIN_REPEATS, MIN_TIMED_SECONDS, ROUNDS, Throughput

__all__ = ["Decision", "BatchSizePolicy", "Progress", "AdaptiveRecord", "step_gain", "candidate_sizes",
           "default_n_batch", "timing_pays", "look", "trial_origin", "StepTimes", "PAYBACK", "MIN_TIMED_STEPS",
           "TRIAL_STEPS"]

PAYBACK = 10  # sizes are timed only when the run has at least this many times the timing's cost left
MIN_TIMED_STEPS = 5  # training steps at a size before their median counts as its step time
TRIAL_STEPS = 12  # steps the torch loader trains at a size it tries before it looks again (median of 11)


def step_gain(base_bs: int, bs: int, noise_scale: float) -> float:
    "How many steps at `base_bs` one step at `bs` is worth: r = (1 + B_noise/base_bs)/(1 + B_noise/bs)."
    if bs == base_bs or not noise_scale > 0:  # no plan yet: a step is worth what it is at the base size
        return 1.0
    return (1 + noise_scale / base_bs) / (1 + noise_scale / bs)


def candidate_sizes(base_bs: int, n_train: int | None) -> list[int]:
    """The sizes an adaptive run may take, timed once before it starts: the user's and its powers-of-two
    multiples up to ×2^MAX_DOUBLINGS, each leaving an epoch at least MIN_STEPS_PER_EPOCH steps."""
    cap = n_train // MIN_STEPS_PER_EPOCH if n_train else math.inf
    return [base_bs * 2**k for k in range(MAX_DOUBLINGS + 1) if k == 0 or base_bs * 2**k <= cap]


def default_n_batch(steps_per_epoch: int) -> int:
    """Small batches per estimate while adapting: 4, or fewer for an epoch under 40 steps (at least ten windows per
    epoch, the interval's MIN_WINDOWS by the first decision; never under 2). Short windows because the weights move
    between a window's batches while training: consecutive gradients of an optimizer that oscillates cancel, which
    biases |G|² low, the more so the longer the window (on a Fashion-MNIST MLP with Adam the noise scale read with
    20 batches per window was negative every epoch, with 4 it was 150-250 and positive)."""
    return max(2, min(4, steps_per_epoch // 10))


def timing_pays(sizes: list[int], bs: int, seconds_per_step: float, steps_left: float) -> tuple[bool, str]:
    """Whether timing `sizes` (`probe_throughput`) is worth it with `steps_left` steps of `seconds_per_step` (measured
    in training at `bs`) to go, and if not, why. Its cost is estimated as if time were per example (a CPU's case,
    the most it can be): a short run has no time to win back."""
    if not sizes:
        return True, ""
    cost = ROUNDS * sum(max(MIN_REPEATS * seconds_per_step * b / bs, MIN_TIMED_SECONDS) for b in sizes)
    left = steps_left * seconds_per_step
    if left >= PAYBACK * cost:
        return True, ""
    return False, (f"timing batch sizes {', '.join(map(str, sizes))} would cost about {cost:.2g} s, more than "
                   f"1/{PAYBACK} of the {left:.2g} s left: too short a run to win it back")


def look(policy: BatchSizePolicy, bs: int, interval: Interval | None, progress: Progress, *, planned_at: float,
         epoch: int, durations: Sequence[float], step_seconds: float,
         time_sizes: Callable[[list[int]], Throughput] | None, duty: MeasureDuty | None = None
         ) -> tuple[Decision, float]:
    """One decision of an adaptive run at batch size `bs`, for the fastai callback and the torch loader alike.

    The steps' `durations` since the last look time `bs` (their median, once there are MIN_TIMED_STEPS); the sizes
    the interval allows are probed with `time_sizes` when the run has time left to pay for it (`timing_pays`; never
    when None: the sizes are then tried in training, see `BatchSizePolicy._trial`); then the policy decides.
    Returns the decision and the loop's step time (`step_seconds` when not measured now).
    `duty` says, when there is no interval yet, whether that is because measuring is spaced out to stay cheap.
    A look while a trial is under way (`policy.tried_from`) ends it: `after_trial` judges it from where it started.
    """
    if len(durations) >= MIN_TIMED_STEPS:
        step_seconds = statistics.median(durations)
        policy.observe(bs, step_seconds)
    why = ""
    if interval is not None and interval.lo > 0 and time_sizes is not None:
        need = policy.to_time(bs, interval.lo)
        steps_left = (progress.planned - progress.steps_done) / policy.step_gain(bs, planned_at)
        pays, why = timing_pays(need, bs, step_seconds, steps_left)
        if need and pays:
            policy.timed(time_sizes(need), need)
    if interval is None and duty is not None and duty.measured < duty.steps:
        why = (f"measuring a step adds {duty.overhead:.0%} to it, so {duty.measured} of {duty.steps} steps were "
               f"measured (max_overhead={duty.max_overhead:g} of the run)")
    at = dict(planned_at=planned_at, step=progress.steps_taken, epoch=epoch, progress=progress.pct, untimed=why)
    home = policy.tried_from
    if home is not None and home != bs:
        d = policy.after_trial(bs, home, interval, **at)
    else:
        d = policy.decide(bs, interval, **at)
    policy.tried_from = trial_origin(d, home)
    return d, step_seconds


class StepTimes:
    """A loop's step durations at its current size since the last look, the measured steps apart.

    A measured step also pays for two norms and an add (+30-60 % of a small MLP's CPU step), and the duty measures
    every step early in a run and few later, so a size timed on measured steps would look slower than one timed on
    plain steps, and a trial would win or lose on when it ran. `durations` are the plain ones once there are
    MIN_TIMED_STEPS of them, else all (a run that measures every step is timed on measured steps throughout)."""

    def __init__(self):
        self.plain: list[float] = []
        self.measured: list[float] = []

    def add(self, seconds: float, measured: bool) -> None:
        (self.measured if measured else self.plain).append(seconds)

    @property
    def durations(self) -> list[float]:
        return self.plain if len(self.plain) >= MIN_TIMED_STEPS else self.plain + self.measured


def trial_origin(d: Decision, tried_from: int | None) -> int | None:
    "The size a trial that goes on after decision `d` started from (None when no trial does): `policy.tried_from`."
    if not d.trial:
        return None
    return d.old_bs if d.changed else tried_from


@dataclass(frozen=True)
class Decision:
    "One look at the noise scale during training, and what it changed (`new_bs == old_bs`: nothing)."
    step: int  # optimizer steps taken before it
    epoch: int  # the epoch it starts
    progress: float  # fraction of the planned run done
    old_bs: int
    new_bs: int
    noise_scale: float  # the smoothed value (nan without an interval)
    lo: float  # the interval's ends
    hi: float
    planned_at: float  # the noise scale the new size's step gain and lr factor are planned at (the low end)
    gain: float  # predicted progress per second at new_bs over old_bs (1 when kept)
    lr_factor: float  # the lr at new_bs over the schedule's (the user's at base bs)
    reason: str
    trial: bool = False  # a size tried untimed: its steps in training time it (the torch loader looks again soon)

    @property
    def changed(self) -> bool:
        return self.new_bs != self.old_bs

    def __str__(self) -> str:
        if not self.changed:
            return f"step {self.step} (epoch {self.epoch}): keep {self.old_bs}: {self.reason}"
        return (f"step {self.step} (epoch {self.epoch}): {self.old_bs} → {self.new_bs}, lr ×{self.lr_factor:.3g}, "
                f"predicted ×{self.gain:.2f} progress per second: {self.reason}")


class BatchSizePolicy:
    """Picks the batch size with the most progress per second on the measured device (see the module docstring).

    `base_bs` is the user's batch size (the schedule's lr is for it), `throughput` the device's step time at
    each candidate size, `rule` the lr rule ("sgd", "momentum", "adam"), `gain_needed` the predicted gain a
    move must clear (times 1 + the timing noise).
    """

    def __init__(self, base_bs: int, throughput: Throughput | None = None, *, n_train: int | None,
                 rule: str = "momentum", gain_needed: float = GAIN_NEEDED, max_bs: int | None = None):
        check_rule(rule)
        if not gain_needed >= 1:
            raise ValueError(f"gain_needed must be a number >= 1 (the predicted speedup a move must clear), "
                             f"got {gain_needed!r}")
        self.base_bs, self.n_train, self.rule = base_bs, n_train, rule
        self.gain_needed, self.max_bs = gain_needed, max_bs
        self.throughput = Throughput({}, device="not timed")
        self.stale: set[int] = set()  # sizes whose timing was too noisy to decide on: timed again when asked
        self.explore = True  # try the next size up for an epoch when it could gain and is not timed (see _trial)
        self.probed: set[int] = set()  # sizes timed by probe_throughput (the rest: measured in training)
        self.tried_from: int | None = None  # the size the trial under way started from (`look` keeps it)
        if throughput is not None:  # a given timing stands for the device's: training does not override it
            self.timed(throughput, [])

    def add_timing(self, tp: Throughput) -> None:
        "Merge a timing of some sizes into what is known (a later timing of a size replaces the earlier one)."
        old = self.throughput
        self.throughput = Throughput({**old.step_seconds, **tp.step_seconds}, {**old.load_seconds, **tp.load_seconds},
                                     tp.workers, tp.device, tp.max_fit if tp.max_fit is not None else old.max_fit,
                                     {**{b: v for b, v in old.spread.items() if b not in tp.step_seconds},
                                      **tp.spread})
        if tp.max_fit is not None:  # a size that ran out of memory is never chosen
            self.max_bs = min(self.max_bs or tp.max_fit, tp.max_fit)

    def within_bounds(self, noise_scale: float) -> list[int]:
        "The candidate sizes a plan at `noise_scale` may use: within the examples, lr, memory and epoch bounds."
        out = []
        for b in candidate_sizes(self.base_bs, self.n_train):
            if b != self.base_bs and self.max_bs is not None and b > self.max_bs:
                continue
            if examples_ratio(self.base_bs, b, noise_scale) > MAX_EXAMPLES_FACTOR:
                continue
            if lr_factor(self.base_bs, b, noise_scale, self.rule) > MAX_LR_FACTOR:
                continue
            out.append(b)
        return out

    def allowed(self, noise_scale: float) -> list[int]:
        "The sizes within bounds at `noise_scale` whose step time is known."
        return [b for b in self.within_bounds(noise_scale) if b in self.throughput.step_seconds]

    def timed(self, tp: Throughput, asked: list[int]) -> None:
        """Add a timing of the sizes `asked`; those it left out (past the device's saturation, too slow a step, out
        of memory) cap the sizes from then on, so they are not asked again."""
        self.add_timing(tp)
        self.stale -= set(tp.step_seconds)
        self.probed |= set(tp.step_seconds)
        if any(b not in tp.step_seconds for b in asked):
            top = max(tp.step_seconds)
            self.max_bs = top if self.max_bs is None else min(self.max_bs, top)

    def to_time(self, bs: int, noise_scale: float) -> list[int]:
        "The sizes a decision at `noise_scale` needs timed: those within bounds not timed yet, and the current one."
        known = self.throughput.step_seconds
        need = [b for b in self.within_bounds(noise_scale) if b not in known or b in self.stale]
        return sorted(set(need) | ({bs} if need or bs not in known else set()))

    def progress_rate(self, bs: int, noise_scale: float) -> float:
        "Planned steps at the base size done per second at `bs`."
        return step_gain(self.base_bs, bs, noise_scale) / self.throughput.seconds_per_step(bs)

    def decide(self, bs: int, interval: Interval | None, *, planned_at: float = math.nan, step: int = 0,
               epoch: int = 0, progress: float = 0.0, untimed: str = "") -> Decision:
        """The decision at batch size `bs` for the noise scale's current interval. `planned_at` is the noise scale
        the current size was planned at: a look that cannot decide keeps it, one that can re-plans at the new low
        end (a step at the same size is then worth more, or less, as AdaScale's gain follows the noise).
        `untimed` says why sizes within bounds were not timed (a run too short): added to a decision to keep."""
        def keep(reason: str, value: float = math.nan, lo: float = math.nan, hi: float = math.nan,
                 at: float = planned_at) -> Decision:
            reason = f"{reason}; {untimed}" if untimed else reason
            return Decision(step, epoch, progress, bs, bs, value, lo, hi, at, 1.0, self.lr_factor(bs, at), reason)

        if interval is None:
            return keep("too few estimates for an interval yet")
        value, lo, hi = interval.value, interval.lo, interval.hi
        if not value > 0:  # the smoothed |G|² itself is negative: consecutive steps' gradients cancel out
            return keep("the gradient signal measured along training is negative: consecutive steps' gradients "
                        "cancel more than noise explains (an optimizer oscillating), so this training gives no "
                        "noise scale to act on; bs_find(lr=0) measures one at fixed weights", value, lo, hi)
        if not lo > 0:
            return keep("|G|² is not yet distinguishable from its noise (the interval reaches 0)", value, lo, hi)
        if bs not in self.throughput.step_seconds:
            return Decision(step, epoch, progress, bs, bs, value, lo, hi, planned_at, 1.0,
                            self.lr_factor(bs, planned_at), untimed or f"batch size {bs} is not timed on this device")
        sizes = self.allowed(lo)
        if bs not in sizes:  # the interval fell below what the current size needs: back to the best allowed
            sizes = sizes or [self.base_bs]
        best = max(sizes, key=lambda b: self.progress_rate(b, lo))
        current = self.progress_rate(bs, lo) if bs in self.throughput.step_seconds else 0.0
        gain = self.progress_rate(best, lo) / current if current > 0 else math.inf
        needed = self.gain_needed * (1 + self.throughput.noise(bs, best))
        if best == bs:
            trial = self._trial(bs, lo)
            if trial is not None:
                nxt, up_to = trial
                why = (f"noise scale {interval}: trying {nxt}, up to ×{up_to:.2f} the progress per second of {bs} at "
                       f"the low end if a step costs the same; its step time is measured as it trains")
                return Decision(step, epoch, progress, bs, nxt, value, lo, hi, lo, up_to, self.lr_factor(nxt, lo), why,
                                trial=True)
            return keep(f"{bs} makes the most progress per second at the noise scale's low end {lo:.3g}",
                        value, lo, hi, lo)
        if bs in sizes and gain < needed:
            if gain >= self.gain_needed:  # only the timing's noise stands in the way: time both again next look
                self.stale |= {bs, best}
            return keep(f"{best} would gain ×{gain:.2f} at the low end {lo:.3g}, below the ×{needed:.2f} a move "
                        "needs", value, lo, hi, lo)
        why = (f"noise scale {interval}: {best} makes ×{gain:.2f} the progress per second of {bs} at the low end"
               if bs in sizes else f"noise scale {interval}: {bs} is past its bounds now")
        return Decision(step, epoch, progress, bs, best, value, lo, hi, lo, gain, self.lr_factor(best, lo), why)

    def after_trial(self, bs: int, home: int, interval: Interval | None, **at) -> Decision:
        """The look that ends a trial of `bs` from `home`: both sizes are now timed in training, so the better one at
        the interval's low end is kept, with no margin either way. The margin a move must clear guards a move made
        on a prediction; a trial has measured what it predicted, and going back to `home` is no safer a bet than
        staying (a margin for going back keeps a size that measured slower; one for staying undoes one that paid).
        A kept trial may lead to the next size up; a signal that is gone (no positive low end, `bs` past its
        bounds) ends it as `decide` would from `home`. While `bs` is not timed yet the trial goes on (`trial` set).
        `at`: `decide`'s keyword arguments."""
        if bs not in self.throughput.step_seconds:
            d = self.decide(bs, interval, **at)
            return replace(d, trial=True, reason=f"still trying {bs}: {d.reason}")
        if (interval is None or not (interval.value > 0 and interval.lo > 0) or home not in self.throughput.step_seconds
                or bs not in self.within_bounds(interval.lo)):
            d = self.decide(home, interval, **at)
            return replace(d, old_bs=bs, gain=1.0, reason=f"the trial of {bs} ends: {d.reason}")
        lo = interval.lo
        gain = self.progress_rate(bs, lo) / self.progress_rate(home, lo)
        if gain >= 1:
            d = self.decide(bs, interval, **at)
            kept = f"{bs} kept after its trial: ×{gain:.2f} the progress per second of {home} at the low end {lo:.3g}"
            return d if d.changed else replace(d, reason=kept)
        return Decision(at.get("step", 0), at.get("epoch", 0), at.get("progress", 0.0), bs, home, interval.value, lo,
                        interval.hi, lo, 1 / gain, self.lr_factor(home, lo),
                        f"the trial of {bs} did not pay: {home} makes ×{1 / gain:.2f} its progress per second at the "
                        f"low end {lo:.3g}")

    def _trial(self, bs: int, lo: float) -> tuple[int, float] | None:
        """The next size up to try when `bs` is the best timed one: twice it, if within bounds, not timed yet, and
        worth ×gain_needed even at its best (a step that costs what one at `bs` does). None otherwise."""
        if not self.explore:
            return None
        nxt = 2 * bs
        if nxt in self.throughput.step_seconds or nxt not in self.within_bounds(lo):
            return None
        up_to = self.step_gain(nxt, lo) / self.step_gain(bs, lo)
        return (nxt, up_to) if up_to >= self.gain_needed else None

    def observe(self, bs: int, seconds_per_step: float) -> None:
        """The step time measured in training at `bs` (the median step of an epoch, loading included), for a size
        no probe timed: the sizes tried one epoch at a time when the run is too short for a probe to pay."""
        if bs in self.probed or not (seconds_per_step > 0 and math.isfinite(seconds_per_step)):
            return  # a probed size is compared with the other probed ones, in the same conditions
        old = self.throughput
        self.throughput = Throughput({**old.step_seconds, bs: seconds_per_step},
                                     {b: v for b, v in old.load_seconds.items() if b != bs}, old.workers, old.device,
                                     old.max_fit, {b: v for b, v in old.spread.items() if b != bs})
        self.stale.discard(bs)

    def lr_factor(self, bs: int, noise_scale: float) -> float:
        "The lr at `bs` over the schedule's lr (which is for the base size)."
        return 1.0 if bs == self.base_bs or not noise_scale > 0 else lr_factor(self.base_bs, bs, noise_scale, self.rule)

    def step_gain(self, bs: int, noise_scale: float) -> float:
        "Planned steps one step at `bs` is worth, planned at `noise_scale`."
        return step_gain(self.base_bs, bs, noise_scale)


@dataclass
class Progress:
    """The planned run's progress in steps at the base batch size: Σ r(B_t) over the steps taken.

    `planned` is epochs × steps per epoch at the base size; `pct` drives the schedule, `done` ends the run.
    """
    planned: float
    steps_done: float = 0.0
    steps_taken: int = 0
    examples: int = 0

    def advance(self, gain: float, batch_size: int) -> None:
        self.steps_done += gain
        self.steps_taken += 1
        self.examples += batch_size

    @property
    def pct(self) -> float:
        return min(self.steps_done / self.planned, 1.0) if self.planned > 0 else 1.0

    @property
    def done(self) -> bool:
        return self.steps_done >= self.planned - 1e-9


@dataclass
class AdaptiveRecord:
    """What an adaptive run did: its decisions (when, from, to, why, predicted gain) and, per optimizer step,
    the batch size, the lr factor and the progress. `plot()` draws them over the noise scale."""
    base_bs: int
    planned_steps: float
    decisions: list[Decision] = field(default_factory=list)
    rows: StepLog = field(default_factory=StepLog)  # per step: (step, epoch, bs, lr, pct), in typed arrays

    def log_step(self, epoch: int, bs: int, lr: float, pct: float) -> None:
        self.rows.append(epoch, bs, lr, pct)

    @property
    def steps(self) -> pd.DataFrame:
        "One row per optimizer step: step, epoch, bs, lr (the effective one, last parameter group) and pct."
        return pd.DataFrame(self.rows.columns())

    @property
    def changes(self) -> list[Decision]:
        "The decisions that moved the batch size."
        return [d for d in self.decisions if d.changed]

    def decisions_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(d) for d in self.decisions])

    def summary(self) -> str:
        steps = self.steps
        if not len(steps):
            return "no step taken"
        sizes = " → ".join(str(b) for b in [self.base_bs] + [d.new_bs for d in self.changes])
        return (f"{len(steps)} optimizer steps for a plan of {self.planned_steps:g} at batch size {self.base_bs} "
                f"(×{self.planned_steps / len(steps):.2f} fewer); batch size {sizes}")

    def plot(self, history: pd.DataFrame | None = None):
        "Batch size and lr over the steps, each change marked; with a GNSResult's history, the noise scale too."
        import matplotlib.pyplot as plt

        steps = self.steps
        n = 3 if history is not None else 2
        fig, axs = plt.subplots(1, n, figsize=(4.3 * n, 3.3))
        axs[0].step(steps.step, steps.bs, where="post")
        axs[0].set_title("batch size")
        axs[1].plot(steps.step, steps.lr)
        axs[1].set_title("lr (effective)")
        if history is not None:
            axs[2].plot(history.iteration, history.noise_scale)  # small batches; steps here are one per batch
            axs[2].set_title("noise scale B_simple")
        for d in self.changes:
            for ax in axs:
                ax.axvline(d.step, ls="--", c="C1", lw=0.8)
        for ax in axs:
            ax.set_xlabel("step")
        fig.tight_layout()
        return fig

    def __str__(self) -> str:
        return "\n".join([self.summary()] + [f"  {d}" for d in self.decisions])
