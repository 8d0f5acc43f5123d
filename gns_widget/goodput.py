"""Goodput: which batch size reaches the same loss soonest on this device.

Time to a given loss at batch size B is (examples needed at B) / (examples per second at B).
McCandlish et al. give the first from the noise scale, E(B)/E_min = 1 + B/B_noise; the second is
measured on the user's device (`throughput.py`). Pollux (Qiao et al., OSDI 2021) schedules by
the same product; here it picks the batch size for one user's run, and only moves away from the
user's batch size when the gain holds over the noise scale's whole interval.

Every prediction is made at the interval's conservative end: its low end for a bigger batch
(the fewer examples a step is worth, the less a bigger batch gains) and its high end for a
smaller one. The same end sets the lr factor and the extra epochs, so the plan errs on the side
of reaching the loss rather than on the side of speed.
"""
from __future__ import annotations

import math

from .interval import Interval
from .throughput import Throughput

__all__ = ["GAIN_NEEDED", "EPOCH_SLACK", "MAX_EXAMPLES_FACTOR", "examples_ratio", "round_epochs", "speedup",
           "conservative_end", "sizes_worth_timing"]

GAIN_NEEDED = 1.1  # a predicted wall-time gain below ×1.1 keeps the user's batch size: not worth a change
# A bigger batch may at most double the examples to the same loss: at B = B_noise the paper's E and S are both twice
# their minimum, and past it a device whose steps cost the same at every size would still gain a little time for many
# more epochs (×57 the epochs for ×1.5 the speed), which no measured device keeps up with for long.
MAX_EXAMPLES_FACTOR = 2.0
EPOCH_SLACK = 0.2  # epochs round up, unless that adds more than this fraction of an epoch
MAX_DOUBLINGS = 6  # sizes up to 64× the user's are timed; down to 1/8 of it
MAX_HALVINGS = 3


def examples_ratio(old_bs: int, new_bs: int, noise_scale: float) -> float:
    "E(new)/E(old): the examples needed to reach the same loss, E(B) ∝ 1 + B/B_noise."
    return (1 + new_bs / noise_scale) / (1 + old_bs / noise_scale)


def round_epochs(epochs: float) -> int:
    """Whole epochs for a fractional need: up, so the run sees the examples it needs, unless the excess would be
    more than 1 − EPOCH_SLACK of an epoch (4.02 → 4, 4.3 → 5): at most EPOCH_SLACK of an epoch short, never a
    cliff of a whole extra epoch for a hair over."""
    return max(1, math.ceil(epochs - EPOCH_SLACK))


def speedup(old_bs: int, new_bs: int, noise_scale: float, tp: Throughput, epochs: int | None = None) -> float:
    """Predicted wall time at `old_bs` over wall time at `new_bs` to the same loss on the measured device.

    With `epochs` (the user's at `old_bs`) the new run's epochs are rounded as the advice rounds them.
    """
    ratio = examples_ratio(old_bs, new_bs, noise_scale)
    if epochs:
        ratio = round_epochs(epochs * ratio) / epochs
    per_example_old = tp.seconds_per_step(old_bs) / old_bs
    per_example_new = tp.seconds_per_step(new_bs) / new_bs
    return per_example_old / (per_example_new * ratio)


def conservative_end(interval: Interval, grow: bool) -> float:
    "The noise scale a change is planned with: the interval's low end for a bigger batch, its high end for a smaller."
    return interval.lo if grow else interval.hi


def sizes_worth_timing(old_bs: int, interval: Interval, n_train: int | None, min_steps_per_epoch: int) -> list[int]:
    """The user's batch size and the powers-of-two multiples of it that could gain ×GAIN_NEEDED at the interval's
    conservative end even on a device whose step costs the same at every size (the best case for a bigger batch),
    and the fractions that could on one whose time is per example (the best case for a smaller one).

    A bigger batch must leave an epoch `min_steps_per_epoch` optimizer steps."""
    sizes = [old_bs]
    cap = n_train // min_steps_per_epoch if n_train else math.inf
    lo = interval.lo
    for k in range(1, MAX_DOUBLINGS + 1):
        b = old_bs * 2**k
        if b > cap:
            break
        if not lo > 0 or examples_ratio(old_bs, b, lo) > MAX_EXAMPLES_FACTOR:
            break
        if (b / old_bs) / examples_ratio(old_bs, b, lo) >= GAIN_NEEDED:
            sizes.append(b)
    hi = interval.hi
    if math.isfinite(hi) and hi > 0:
        for k in range(1, MAX_HALVINGS + 1):
            b = old_bs // 2**k
            if b < 1 or b * 2**k != old_bs:
                break
            if 1 / examples_ratio(old_bs, b, hi) >= GAIN_NEEDED:
                sizes.append(b)
    return sorted(sizes)
