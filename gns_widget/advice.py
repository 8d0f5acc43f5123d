"""Advice that is safe to follow: batch size, learning rate and epochs together, from one noise scale.

The paper's formulas (McCandlish et al. 2018) assume each batch size trains with its own tuned
learning rate and that the noise scale holds for the whole run. Followed blindly on a small
dataset they ruin training (digits: bs 1024 for 1,438 images and lr ×20 ended at 35% accuracy),
so guards sit between the formulas and the numbers a user applies:

- **batch size**: the suggestion, capped so an epoch keeps at least `MIN_STEPS_PER_EPOCH`
  optimizer steps (a schedule and the noise that helps generalisation need steps), and grown
  only as far as the learning rate can follow: to the largest power of two whose ε(B) factor
  is at most `MAX_LR_FACTOR`. A bigger batch without the bigger lr only takes fewer steps, and a
  bigger lr factor is where training breaks: Fashion-MNIST's conv net (SGD with momentum) went to
  chance at ×3.1 despite a warm-up, Bikeshare's loss rose 14% at ×2.5 (`benchmarks/advice.py`).
  The noise scale grows as training goes on, so a further step is for a new measurement at the
  new batch size;
  A cap never turns a bigger suggestion into a smaller batch: on a dataset too small for the
  suggestion the user's batch size is kept (the noise scale says bigger, the step cap says no bigger);
- **learning rate**: ε(B) ∝ 1/(1 + B_noise/B), linear for SGD, square root for Adam, named with the
  batch size it is for (the lr of another batch size is wrong for it);
- **epochs**: E(B)/E(B0) = (1 + B/B_noise)/(1 + B0/B_noise), the paper's examples-to-reach-
  the-same-loss ratio, so a bigger batch gets the extra epochs it needs.
- **memory**: when the device fits less than the advised batch in one step (the memory probe's
  `max_fit`), how to accumulate it: the micro-batch to load, the steps, and the torch and fastai lines.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .interval import Interval
from .memory_plan import plan_batch
from .suggest import lr_factor

__all__ = ["BatchAdvice", "advise", "check_epochs", "check_lr", "format_lr", "MIN_STEPS_PER_EPOCH", "MAX_LR_FACTOR"]

MIN_STEPS_PER_EPOCH = 10  # optimizer steps an epoch keeps at the advised batch size
MAX_LR_FACTOR = 2.0  # the batch size grows only while the paper's lr factor stays at most this


@dataclass(frozen=True)
class BatchAdvice:
    """What to train with next, and why. `batch_size` is None when the measurement is not reliable.

    `batch_size` is the (effective) batch the lr and epochs are for; when the device does not fit it
    in one step, load `micro_batch_size` and accumulate `accumulation_steps` of them (`.text` says how).

    `lr_factor` is the applied ε(B) multiplier; `suggested_bs` the noise scale's power of two
    before the caps; `time_factor` is the (low, high) expected wall-time ratio: low if a step costs
    the same at both batch sizes (an unsaturated GPU), high if time is per example (a saturated device).
    """
    batch_size: int | None
    lr: float | slice | None  # a slice when the user's was one (fastai's discriminative lrs), both ends scaled
    epochs: int | None
    text: str
    old_batch_size: int | None = None
    noise_scale: str = ""  # the noise scale as shown, with its interval: "91 (80–104)"
    rule: str = "sgd"
    lr_factor: float = 1.0
    steps_per_epoch: int | None = None
    suggested_bs: int | None = None
    time_factor: tuple[float, float] | None = None
    lr_text: str = ""
    micro_batch_size: int | None = None  # the batch to load per step: `batch_size` unless it must accumulate
    accumulation_steps: int = 1  # micro-batches accumulated per optimizer step (see `max_fit` in `advise`)
    kind: str = "uncertain"  # "grow", "keep", "shrink" or "uncertain" (keep the batch size, measure longer)
    speedup: float | None = None  # predicted wall time baseline / advised on this device; None when not measured
    speedup_range: tuple[float, float] | None = None  # the same over the noise scale's 90% interval
    headline: str = ""  # the advice in one plain line, for a title: what to do and the gain it predicts

    def __str__(self) -> str:
        return self.text


def advise(noise_scale: float, suggested_bs: int | None, batch_size: int, *, n_train: int | None = None,
           lr: float | slice | None = None, epochs: int | None = None, rule: str = "sgd",
           interval: Interval | None = None, reason: str = "", max_fit: int | None = None,
           lr_from_run: bool = False) -> BatchAdvice:
    """The advice for moving from `batch_size` to the suggestion `suggested_bs` (None: not reliable, `reason` why).

    `lr` and `epochs` are the user's at `batch_size` (`lr_from_run`: the lr is the finder run's, not
    one the user gave); without them the advice gives factors only. `max_fit` is the most examples
    the device fits in one step (the memory probe's): above it the advice says how to accumulate.
    """
    if rule not in ("sgd", "adam"):
        raise ValueError(f"rule must be 'sgd' or 'adam', got {rule!r}")
    check_epochs(epochs)
    check_lr(lr)
    shown = str(interval) if interval is not None else f"{noise_scale:.4g}"
    if suggested_bs is None or not batch_size:
        why = reason or "no batch size known for the run"
        return BatchAdvice(None, lr, epochs, f"keep batch size {batch_size}: {why}", batch_size, shown, rule,
                           kind="uncertain", headline=f"Not sure yet: keep batch size {batch_size} ({why})")
    bs, parts = suggested_bs, []
    if n_train and n_train // bs < MIN_STEPS_PER_EPOCH:
        cap = 2 ** max(0, int(math.log2(max(1, n_train // MIN_STEPS_PER_EPOCH))))
        why = (f"the noise scale suggests {suggested_bs}, but {n_train:,} training examples would give "
               f"{n_train / suggested_bs:.2g} optimizer steps per epoch")
        if suggested_bs > batch_size >= cap:  # the cap must not turn a bigger suggestion into a smaller batch
            parts.append(f"{why}: a batch bigger than {batch_size} would leave fewer than {MIN_STEPS_PER_EPOCH} steps "
                         "per epoch")
            bs = batch_size
        else:
            parts.append(f"{why}: capped at {cap} (≥ {MIN_STEPS_PER_EPOCH} steps per epoch)")
            bs = cap
    followed = _lr_can_follow(batch_size, bs, noise_scale, rule)
    if followed < bs:
        parts.append(f"{bs} would need lr ×{lr_factor(batch_size, bs, noise_scale, rule):.2g}, and above "
                     f"×{MAX_LR_FACTOR:g} training can break: {followed} for now (lr "
                     f"×{lr_factor(batch_size, followed, noise_scale, rule):.2g}), then run the finder again at "
                     f"batch size {followed} to go further (the noise scale grows as training goes on)")
        bs = followed
    steps_per_epoch = math.ceil(n_train / bs) if n_train else None
    factor = 1.0 if bs == batch_size else lr_factor(batch_size, bs, noise_scale, rule)
    head = (f"keep batch size {bs} (noise scale {shown})" if bs == batch_size
            else f"batch size {batch_size} → {bs} (noise scale {shown})")
    lr_text = _lr_text(lr, factor, bs, batch_size, rule, lr_from_run)
    parts = [head, *parts, lr_text]
    ratio = 1.0 if bs == batch_size else _examples_ratio(batch_size, bs, noise_scale)
    new_epochs, time_factor = None, None
    if epochs:
        new_epochs = math.ceil(epochs * ratio - 1e-9)
        parts.append(_epochs_text(epochs, new_epochs, ratio, batch_size / bs))
        time_factor = (new_epochs / epochs * batch_size / bs, new_epochs / epochs)
    elif bs != batch_size:
        parts.append(f"train ×{ratio:.2g} the epochs (the paper's trade-off: the examples needed to reach the same "
                     "loss; pass epochs= for a number)")
    micro, steps = bs, 1
    if max_fit is not None and bs > max_fit:
        plan = plan_batch(bs, max_fit)
        micro, steps = plan.batch_size, plan.accumulation_steps
        parts.append(f"the device fits {max_fit} per step: load batches of {micro} and accumulate {steps} of them per "
                     f"optimizer step (effective {micro * steps}, what the lr and epochs are for): in a torch loop "
                     f"divide the loss by {steps} and step the optimizer every {steps} batches; with fastai add "
                     f"cbs=GradientAccumulation(n_acc={micro * steps}) (n_acc counts examples)")
    new_lr = _scaled(lr, factor) if lr is not None else None
    kind = "keep" if bs == batch_size else "grow" if bs > batch_size else "shrink"
    return BatchAdvice(bs, new_lr, new_epochs, "; ".join(parts), batch_size, shown, rule, factor, steps_per_epoch,
                       suggested_bs, time_factor, lr_text, micro, steps, kind=kind,
                       headline=_headline(kind, bs, new_lr, new_epochs, None))


def _headline(kind: str, bs: int, lr: float | slice | None, epochs: int | None, speedup: float | None) -> str:
    "The advice in one plain line: what to train with and the gain it predicts."
    if kind == "keep":
        return f"Keep batch size {bs}: a different batch size would not train faster here"
    parts = [f"batch size {bs}"] + ([f"lr {format_lr(lr)}"] if lr is not None else [])
    parts += [f"{epochs} epochs"] if epochs is not None else []
    gain = f" — about {speedup:.2g}× faster on this machine" if speedup is not None else ""
    return "Train with " + " · ".join(parts) + gain


def check_lr(lr: object) -> None:
    "A ValueError unless `lr` is None, a finite number > 0, or fastai's `slice(stop)` / `slice(start, stop)` of them."
    ok = lr is None or _positive(lr) or (isinstance(lr, slice) and lr.step is None and _positive(lr.stop)
                                          and (lr.start is None or _positive(lr.start)))
    if not ok:
        raise ValueError(f"lr must be a finite number > 0, a slice(start, stop) of them (fastai's discriminative "
                         f"lrs), or None, got {lr!r}")


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _scaled(lr: float | slice, factor: float) -> float | slice:
    "Every group's lr times the factor: a slice's ends both (fastai spreads the groups between them)."
    if isinstance(lr, slice):
        return slice(None if lr.start is None else lr.start * factor, lr.stop * factor)
    return lr * factor


def format_lr(lr: float | slice) -> str:
    "An lr as the advice shows it: 0.00124, or slice(1.24e-05, 0.00124)."
    if isinstance(lr, slice):
        return f"slice({lr.stop:.3g})" if lr.start is None else f"slice({lr.start:.3g}, {lr.stop:.3g})"
    return f"{lr:.3g}" if isinstance(lr, numbers.Real) else repr(lr)  # a Learner's lr may be anything


def _lr_text(lr: float | slice | None, factor: float, bs: int, old_bs: int, rule: str, from_run: bool) -> str:
    "The lr part of the advice, naming the batch size it is for (the lr of another batch size is wrong for it)."
    source = " (the finder run's lr: pass lr= the one you train with)" if lr is not None and from_run else ""
    if bs == old_bs:
        return f"lr {format_lr(lr)}{source} unchanged" if lr is not None else "lr unchanged"
    how = "linear (SGD)" if rule == "sgd" else "square-root (Adam)"
    now = (f"lr {format_lr(lr)}{source} → {format_lr(_scaled(lr, factor))} at batch size {bs} (×{factor:.3g}, "
           if lr is not None else f"lr ×{factor:.3g} at batch size {bs} (")
    return f"{now}{how} scaling, ε(B) ∝ 1/(1 + B_noise/B); every parameter group's lr, a one-cycle's max lr too)"


def _epochs_text(epochs: int, new_epochs: int, ratio: float, step_per_example: float) -> str:
    "Epochs with the paper's ratio, the whole-epoch rounding when it changes the cost, and the wall-time range."
    if new_epochs == epochs:
        return f"epochs {epochs} unchanged"
    text = (f"epochs {epochs} → {new_epochs} (the paper's trade-off: ×{ratio:.2g} the examples, "
            f"×{ratio * step_per_example:.2g} the steps to reach the same loss")
    rounded = new_epochs / epochs
    if not math.isclose(rounded, ratio, rel_tol=0.05):
        text += (f"; rounded up to whole epochs: ×{rounded:.2g} the examples, "
                 f"×{rounded * step_per_example:.2g} the steps")
    return (f"{text}); wall time ×{rounded * step_per_example:.2g} if a step costs the same at both sizes, "
            f"×{rounded:.2g} if time is per example")


def check_epochs(epochs: object) -> None:
    "A ValueError unless `epochs` (what the user trains for at their batch size) is a positive integer or None."
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive integer (the epochs you train for) or None, got {epochs!r}")


def _lr_can_follow(old_bs: int, bs: int, noise_scale: float, rule: str) -> int:
    "`bs` halved until its lr factor is at most MAX_LR_FACTOR (a factor below a doubling's 2 always is)."
    while bs > old_bs and lr_factor(old_bs, bs, noise_scale, rule) > MAX_LR_FACTOR:
        bs //= 2
    return bs


def _examples_ratio(old_bs: int, new_bs: int, noise_scale: float) -> float:
    "E(new)/E(old): examples to reach the same loss, E ∝ 1 + B/B_noise."
    return (1 + new_bs / noise_scale) / (1 + old_bs / noise_scale)
