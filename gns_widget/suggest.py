"""From measured noise scales to advice: a batch size, whether to trust it, and the learning rate.

The noise scale B_noise is where, per McCandlish et al., a bigger batch stops buying fewer
steps: for batch B, steps ∝ 1 + B_noise/B and examples ∝ 1 + B/B_noise. We round it to a
power of two and refuse to suggest anything when the measurement does not support it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

__all__ = ["Suggestion", "LRAdvice", "suggest_batch_size", "scale_lr", "tradeoff", "MIN_ESTIMATES", "MAX_DRIFT"]

MIN_ESTIMATES = 5  # windows needed before the smoothed estimate means anything
MAX_DRIFT = 0.25  # relative change over the run's last quarter above which it is "still moving"


@dataclass(frozen=True)
class Suggestion:
    bs: int | None  # None when the estimate is not reliable
    reason: str  # why `bs` is None, or what it rests on


@dataclass(frozen=True)
class LRAdvice:
    lr: float
    factor: float
    rule: str  # "sgd" (linear) or "adam" (square root)
    text: str


def suggest_batch_size(history: pd.DataFrame, n_train: int | None = None) -> Suggestion:
    "A power of two near the late-run noise scale, capped by `n_train`, or None with the reason."
    n = len(history)
    if n == 0:
        return Suggestion(None, "no estimate yet: the run ended before one window of n_batch small batches; "
                                "increase num_it or lower n_batch")
    last = history.iloc[-1]
    if not last.scale > 0:
        return Suggestion(None, f"the |G|² estimate is not positive ({last.scale:.3g}): the gradient signal is "
                                "still below the noise; increase num_it or n_batch, or raise beta")
    if not last.noise > 0:
        return Suggestion(None, f"the tr(Σ) estimate is not positive ({last.noise:.3g}); increase n_batch or num_it")
    if n < MIN_ESTIMATES:
        need = MIN_ESTIMATES * int(history.iteration.iloc[0])
        return Suggestion(None, f"only {n} estimate(s), {MIN_ESTIMATES} needed: increase num_it to at least "
                                f"{need} or lower n_batch")
    drift = _late_drift(history.noise_scale)
    if drift > MAX_DRIFT:
        return Suggestion(None, f"still moving: the noise scale changed {drift:.0%} over the last quarter of the "
                                f"run (≤{MAX_DRIFT:.0%} needed); increase num_it, or raise beta to smooth more")
    ns = float(last.noise_scale)
    bs = 2 ** max(0, round(math.log2(ns)))
    reason = f"noise scale {ns:.4g}, stable within {drift:.0%} over the last quarter of the run"
    if n_train and bs > n_train:
        bs = 2 ** int(math.log2(n_train))
        reason += f"; capped by the training set size ({n_train})"
    return Suggestion(bs, reason)


def _late_drift(noise_scale: pd.Series) -> float:
    "Relative change of the smoothed noise scale between 3/4 of the run and its end."
    values = noise_scale.to_numpy()
    ref, end = values[int(0.75 * (len(values) - 1))], values[-1]
    return abs(end - ref) / abs(end) if end else math.inf


def scale_lr(lr: float, old_bs: int, new_bs: int, noise_scale: float, rule: str = "sgd") -> LRAdvice:
    """The learning rate to use when the batch size goes from `old_bs` to `new_bs`.

    The paper's optimal step size is ε(B) = ε_max / (1 + B_noise/B): it grows like B
    below the noise scale and saturates above it. For SGD-like optimizers we scale by
    that ratio (linear while B ≪ B_noise); for Adam-like ones by its square root.
    """
    if rule not in ("sgd", "adam"):
        raise ValueError(f"rule must be 'sgd' or 'adam', got {rule!r}")
    if not (noise_scale > 0):
        raise ValueError(f"noise_scale must be positive to scale the learning rate, got {noise_scale!r}")
    ratio = (1 + noise_scale / old_bs) / (1 + noise_scale / new_bs)
    factor = ratio if rule == "sgd" else math.sqrt(ratio)
    how = "linear (SGD-like)" if rule == "sgd" else "square-root (Adam-like)"
    text = (f"batch size {old_bs} → {new_bs}: lr {lr:.3g} → {lr * factor:.3g} (×{factor:.3g}, {how} scaling, "
            f"saturating at the noise scale {noise_scale:.4g})")
    return LRAdvice(lr * factor, factor, rule, text)


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
