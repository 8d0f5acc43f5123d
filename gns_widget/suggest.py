"""From measured noise scales to a suggestion: a batch size and whether to trust it.

The noise scale B_noise is where, per McCandlish et al., a bigger batch stops buying fewer
steps: for batch B, steps ∝ 1 + B_noise/B and examples ∝ 1 + B/B_noise. We round it to a
power of two and refuse to suggest anything when the measurement does not support it: too few
windows, a 90% interval wider than ±MAX_HALFWIDTH, or a value still moving. When the interval
straddles a rounding line the lower power of two is chosen, so runs that differ only by noise
agree (both neighbours of the line cost the same by the paper's trade-off; the lower one is the
safer step for the learning rate). The advice built on the suggestion is in `advice.py`, the lr rules it
scales the learning rate by in `lr_rules.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .interval import MIN_WINDOWS, WIDEN_TO, Interval

__all__ = ["Suggestion", "suggest_batch_size", "stable_power_of_two", "tradeoff", "MIN_ESTIMATES", "MAX_DRIFT",
           "MAX_HALFWIDTH", "MAX_LOSS_RISE"]

MIN_ESTIMATES = MIN_WINDOWS  # windows needed before the estimate and its interval mean anything
MAX_DRIFT = 0.25  # relative change over the run's last quarter above which it is "still moving"
MAX_HALFWIDTH = 0.25  # the 90% interval's half-width, relative to the value, above which it is "uncertain"
MAX_LOSS_RISE = 2.0  # while training, the loss this many times its start, and no fall after: the run diverged
LOSS_SPAN_BATCHES = 30  # the loss means _loss_rose compares are over this many small batches at least


@dataclass(frozen=True)
class Suggestion:
    bs: int | None  # None when the estimate is not reliable
    reason: str  # why `bs` is None, or what it rests on
    interval: Interval | None = None  # the noise scale's 90% interval, when one was computed
    usable: bool = False  # the interval may carry a decision even without `bs` (too wide or still moving for one)


def suggest_batch_size(history: pd.DataFrame, n_train: int | None = None,
                       interval: Interval | None = None, trained: bool = False) -> Suggestion:
    """A power of two near the late-run noise scale, capped by `n_train`, or None with the reason.

    `interval` (from `interval.noise_scale_interval`) makes the verdict and the rounding use the
    measurement's uncertainty; without it only the drift rule judges reliability. `trained`: the run
    took optimizer steps (lr > 0), so a loss that rose means the lr was more than the model can take.
    """
    n = len(history)
    if n == 0:
        return Suggestion(None, "no estimate yet: the run ended before one window of n_batch small batches; "
                                "increase num_it or lower n_batch")
    last = history.iloc[-1]
    if not last.scale > 0:
        return Suggestion(None, f"the |G|² estimate is not positive ({last.scale:.3g}): the gradient signal is "
                                "still below the noise; increase num_it or n_batch, or raise beta", interval,
                          usable=True)
    if not last.noise > 0:
        return Suggestion(None, f"the tr(Σ) estimate is not positive ({last.noise:.3g}); increase n_batch or num_it")
    if n < MIN_ESTIMATES:
        need = MIN_ESTIMATES * int(history.iteration.iloc[0])
        return Suggestion(None, f"only {n} estimate(s), {MIN_ESTIMATES} needed: increase num_it to at least "
                                f"{need} or lower n_batch")
    if trained and "loss" in history and (rose := _loss_rose(history)):
        return Suggestion(None, f"the training loss rose during the run ({rose}): at this lr the model does not "
                                f"train, and the noise scale of weights that bounce ({float(last.noise_scale):.3g}) "
                                "says nothing about the batch size; lower lr (to the one you train with, or "
                                "lr_find's), or measure at lr=0", interval)
    if interval is not None and not interval.rel_halfwidth <= MAX_HALFWIDTH:
        why = ("|G|² is not distinguishable from its noise" if math.isinf(interval.hi)
               else f"±{interval.rel_halfwidth:.0%}, ≤±{MAX_HALFWIDTH:.0%} needed")
        return Suggestion(None, f"uncertain: noise scale {interval} (90% interval; {why}); "
                                f"{_how_to_narrow(history, interval)}", interval, usable=True)
    drift = _late_drift(history.noise_scale)
    if drift > MAX_DRIFT:
        return Suggestion(None, f"still moving: the noise scale changed {drift:.0%} over the last quarter of the "
                                f"run (≤{MAX_DRIFT:.0%} needed); increase num_it, or raise beta to smooth more",
                          interval, usable=True)
    ns = float(last.noise_scale)
    bs = stable_power_of_two(ns, interval)
    shown = str(interval) if interval is not None else f"{ns:.4g}"
    reason = f"noise scale {shown}, stable within {drift:.0%} over the last quarter of the run"
    if interval is not None and bs < 2 ** max(0, round(math.log2(ns))):
        reason += f"; {bs} as the interval reaches below the rounding line {bs * math.sqrt(2):.1f}"
    if n_train and bs > n_train:
        bs = 2 ** int(math.log2(n_train))
        reason += f"; capped by the training set size ({n_train})"
    return Suggestion(bs, reason, interval, usable=True)


def _how_to_narrow(history: pd.DataFrame, interval: Interval) -> str:
    "What narrows the interval: wider windows when the big batch is smaller than the noise scale, else a longer run."
    last = history.iloc[-1]
    b_small = last.samples / last.iteration if "samples" in history else math.nan
    b_big = last.n_batch * b_small if "n_batch" in history else math.nan
    if interval.value > b_big:  # each window's |G|² is then mostly noise: more windows barely help
        need = math.ceil(WIDEN_TO * interval.value / b_small)  # the width num_it='auto' widens to
        return (f"the noise scale exceeds the big batch (n_batch × batch size ≈ {b_big:.0f}), so each estimate is "
                f"mostly noise: raise n_batch to about {need}, or measure at lr=0 with num_it='auto', which widens "
                "the windows itself")
    return "increase num_it (or use num_it='auto'), n_batch, or beta (a longer average)"


def stable_power_of_two(value: float, interval: Interval | None = None) -> int:
    """`value` rounded to a power of two on the log scale, the lower one when `interval` straddles the line.

    Plain rounding flips between neighbours from run to run when the value sits near a line
    2^(j+1/2); choosing the lower power whenever the interval reaches below the line makes every
    run whose interval covers the line agree (90% of them when the true value is on it).
    """
    j = max(0, round(math.log2(value)))
    if interval is not None and j > 0 and interval.lo < 2 ** (j - 0.5):
        j -= 1
    return 2**j


def _loss_rose(history: pd.DataFrame) -> str:
    """'start → peak, late' when the loss rose to MAX_LOSS_RISE × its start and the last quarter's mean is still not
    below the start (a run that diverged and never came back), else ''.

    Every value is a mean over at least LOSS_SPAN_BATCHES small batches (the start, and the rolling peak): a record
    is one small batch with per_example, and a converged model's single batch losses spike to several times a
    lucky first one while their mean stays flat, which is no divergence. A falling loss never reaches the peak.
    """
    loss = history.loss
    per_record = float(history.n_batch.median()) if "n_batch" in history else 1.0
    span = min(max(1, math.ceil(LOSS_SPAN_BATCHES / per_record)), max(1, len(loss) // 4))
    start = float(loss.iloc[:max(span, len(loss) // 10)].mean())
    peak = float(loss.rolling(span).mean().max())
    late = float(loss.iloc[-max(1, len(loss) // 4):].mean())
    if peak > MAX_LOSS_RISE * start and late >= start:
        return f"{start:.3g} at the start, up to {peak:.3g}, {late:.3g} over the last quarter"
    return ""


def _late_drift(noise_scale: pd.Series) -> float:
    "Relative change of the smoothed noise scale between 3/4 of the run and its end."
    values = noise_scale.to_numpy()
    ref, end = values[int(0.75 * (len(values) - 1))], values[-1]
    return abs(end - ref) / abs(end) if end else math.inf


def tradeoff(noise_scale: float, batch_sizes) -> pd.DataFrame:
    """The paper's predicted cost of each batch size, relative to the ideal.

    `steps` is S/S_min = 1 + B_noise/B (optimizer steps needed), `examples` is
    E/E_min = 1 + B/B_noise (data needed): the two cannot both be small.
    """
    bs = pd.Series(list(batch_sizes), dtype=float)
    if (bs <= 0).any():
        raise ValueError("batch_sizes must all be positive")
    return pd.DataFrame({"batch_size": bs.astype(int), "steps": 1 + noise_scale / bs,
                         "examples": 1 + bs / noise_scale})
