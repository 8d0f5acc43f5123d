"""The advice: the batch size, learning rate and epochs that reach the same loss soonest on this device.

A batch size is worth changing only if training gets faster without getting worse, and that
depends on two things: how many more examples a bigger batch needs (the noise scale, McCandlish
et al.) and how many more examples per second this device gets through at it (measured by
`throughput.py`). `goodput.py` combines them; this module turns the choice into numbers to train
with and words that say why:

- **batch size**: among the sizes timed on the device, the one with the best predicted time to the
  same loss at the noise scale's conservative end, if it gains at least ×GAIN_NEEDED; otherwise the
  user's batch size is kept. A bigger batch must leave an epoch `MIN_STEPS_PER_EPOCH` optimizer steps
  (a schedule and the noise that helps generalisation need steps), at most ×MAX_EXAMPLES_FACTOR the
  examples, and the lr may change by at most ×`MAX_LR_FACTOR` either way (beyond it training can
  break: a conv net with SGD and momentum went to chance at ×3.1). The kind is "grow", "shrink",
  "keep", or "uncertain" when the interval straddles the decision (a gain at the measured value,
  none at the conservative end, and an interval too wide to tell): then the user's batch size is
  kept and a longer measurement decides;
- **learning rate**: AdaScale's gain ε(B) ∝ 1/(1 + B_noise/B), linear for plain SGD and its square
  root with momentum or an Adam-like optimizer (`detect_rule`), named with the batch size it is for;
- **epochs**: ×E(B)/E(B0) = (1 + B/B_noise)/(1 + B0/B_noise), the paper's examples to reach the same
  loss, rounded up unless that adds a near-whole epoch (`goodput.round_epochs`): no rounding cliff;
- **memory**: only sizes that fit in one step are advised (`max_fit`, and the timing itself runs out
  of memory above it): accumulating micro-batches gets through examples no faster than one
  micro-batch does, and needs more of them, so it never reaches the same loss sooner.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .goodput import GAIN_NEEDED, MAX_EXAMPLES_FACTOR, conservative_end, examples_ratio, round_epochs, speedup
from .interval import Interval
from .lr_rules import check_rule, lr_factor
from .suggest import MAX_HALFWIDTH
from .throughput import Throughput

__all__ = ["BatchAdvice", "advise", "detect_rule", "check_epochs", "check_lr", "format_lr", "MIN_STEPS_PER_EPOCH",
           "MAX_LR_FACTOR", "KINDS"]

MIN_STEPS_PER_EPOCH = 10  # optimizer steps an epoch keeps at the advised batch size
MAX_LR_FACTOR = 2.0  # the batch size grows only while the lr factor stays at most this
KINDS = ("grow", "keep", "shrink", "uncertain")
_ADAPTIVE = {"lamb", "ranger", "lion", "adafactor", "rmsprop", "adagrad", "adadelta", "sophia", "shampoo"}  # and *adam*


@dataclass(frozen=True)
class BatchAdvice:
    """What to train with next, and why. `batch_size` is None when the advice is "uncertain".

    `kind` is "grow", "keep", "shrink" or "uncertain". `speedup` is the predicted wall time at
    the user's batch size over that at `batch_size`, to the same loss on the device it was measured
    on (1 for keep; None when uncertain), `speedup_range` the same at the two ends of the noise
    scale's interval. `batch_size` is the batch the lr and epochs are for, and it fits on the device in
    one step. `suggested_bs` is the raw measurement's power of two (`GNSResult.suggested_bs`), for reference.
    """
    batch_size: int | None
    lr: float | slice | None  # a slice when the user's was one (fastai's discriminative lrs), both ends scaled
    epochs: int | None
    text: str
    old_batch_size: int | None = None
    noise_scale: str = ""  # the noise scale as shown, with its interval: "91 (80–104)"
    rule: str = "sgd"  # the lr rule: "sgd" (linear), "momentum" or "adam" (square root)
    lr_factor: float = 1.0
    steps_per_epoch: int | None = None
    suggested_bs: int | None = None
    lr_text: str = ""
    kind: str = "uncertain"  # "grow", "keep", "shrink" or "uncertain" (keep the batch size, measure longer)
    speedup: float | None = None  # predicted wall time baseline / advised on this device; None when not measured
    speedup_range: tuple[float, float] | None = None  # the same over the noise scale's 90% interval
    headline: str = ""  # the advice in one plain line, for a title: what to do and the gain it predicts
    total_steps: int | None = None  # optimizer steps of the advised run (with `epochs`): for a loop that counts steps

    def __str__(self) -> str:
        return self.text

    def apply(self, dls_or_loader: Any, learn: Any = None) -> Any:
        """Train with this advice: the loader at the advised batch size (fastai DataLoaders changed in place, a
        torch DataLoader rebuilt: use the one returned), and with `learn` a Learner's `lr` set to the advised one
        (what `fit` and `fit_one_cycle` use when called without an lr). On "keep" or "uncertain" nothing changes
        and the loader comes back as it was, so `train_dl = advice.apply(train_dl)` is always safe."""
        from .loaders import apply_batch_size

        if self.kind not in ("grow", "shrink"):
            return dls_or_loader
        if learn is not None and self.lr is not None:
            learn.lr = self.lr
        return apply_batch_size(dls_or_loader, self.batch_size)


def detect_rule(opt: Any) -> str | None:
    """The lr rule for an optimizer, an optimizer class or factory, or fastai's `opt_func`; None when unknown.

    "adam" for adaptive optimizers (Adam, AdamW, RAdam, LAMB, RMSprop, …), "momentum" for SGD with momentum
    (torch's `momentum`, fastai's `mom`), "sgd" for plain SGD.
    """
    if opt is None:
        return None
    func = opt.func if isinstance(opt, functools.partial) else opt
    name = (getattr(func, "__name__", None) or type(func).__name__).lower()
    if "adam" in name or name in _ADAPTIVE:
        return "adam"
    groups = getattr(opt, "param_groups", None) or getattr(opt, "hypers", None)  # torch / fastai optimizers
    if groups:
        if any("sqr_mom" in g or "betas" in g for g in groups):
            return "adam"
        mom = max(float(g.get("momentum", g.get("mom", 0)) or 0) for g in groups)
        return "momentum" if mom > 0 else "sgd"
    if isinstance(opt, functools.partial):
        mom = opt.keywords.get("momentum", opt.keywords.get("mom", 0))
        return "momentum" if mom else "sgd"
    return "sgd" if name == "sgd" else None


def advise(interval: Interval | None, batch_size: int, *, throughput: Throughput | None = None,
           n_train: int | None = None, lr: float | slice | None = None, epochs: int | None = None,
           rule: str = "sgd", reason: str = "", max_fit: int | None = None, lr_from_run: bool = False,
           suggested_bs: int | None = None, trend: str = "") -> BatchAdvice:
    """The advice for a run at `batch_size` whose noise scale was measured as `interval`.

    `reason` non-empty says the measurement cannot be used (too short, the loss rose): the advice is
    then "uncertain" with that reason. `throughput` is the device's speed at each batch size (without
    it nothing can be predicted: "uncertain"). `lr` and `epochs` are the user's at `batch_size`
    (`lr_from_run`: the lr is the finder run's, not one the user gave); without them the advice gives
    factors. `max_fit` is the most examples the device fits in one step. `trend` says how the noise
    scale moved during the run, for the text.
    """
    check_rule(rule)
    check_epochs(epochs)
    check_lr(lr)
    if throughput is not None and not isinstance(throughput, Throughput):
        raise ValueError(f"throughput must be a Throughput (from measure_throughput or bs_find) or None, got "
                         f"{type(throughput).__name__}")
    shown = str(interval) if interval is not None else "not measured"
    if not reason and not batch_size:
        reason = "the run's batch size is unknown (its loader does not say): give the loader a batch_size"
    if not reason and (interval is None or not interval.lo > 0):
        reason = "no lower bound on the noise scale yet: increase num_it (or use num_it='auto')"
    if not reason and throughput is None:
        reason = ("this device's speed at other batch sizes was not measured: pass throughput=measure_throughput("
                  "...) to advice()")
    if reason:
        return _uncertain(batch_size, lr, epochs, shown, rule, reason, suggested_bs, trend)
    return _decide(interval, batch_size, throughput, n_train=n_train, lr=lr, epochs=epochs, rule=rule,
                   max_fit=max_fit, lr_from_run=lr_from_run, suggested_bs=suggested_bs, trend=trend)


def _uncertain(batch_size: int, lr: Any, epochs: int | None, shown: str, rule: str, why: str,
               suggested_bs: int | None, trend: str, extra: str = "") -> BatchAdvice:
    text = "; ".join(p for p in (f"keep batch size {batch_size} for now (noise scale {shown}): {why}", extra, trend)
                     if p)
    return BatchAdvice(None, lr, epochs, text, batch_size, shown, rule, suggested_bs=suggested_bs, kind="uncertain",
                       headline=f"Not sure yet: keep batch size {batch_size}; {_first_clause(why)}")


def _first_clause(why: str) -> str:
    "The part of a reason that says what to do, for a headline: its last clause after a colon."
    return why.rsplit(": ", 1)[-1]


@dataclass(frozen=True)
class _Option:
    bs: int
    noise_scale: float  # the conservative end it is planned with
    speedup: float  # at that end
    lr_factor: float
    noise: float  # the timing noise of the comparison: the gain must clear GAIN_NEEDED by this much too

    @property
    def clears(self) -> bool:
        return self.speedup >= GAIN_NEEDED * (1 + self.noise)


def _options(interval: Interval, old_bs: int, tp: Throughput, epochs: int | None, rule: str,
             max_fit: int | None, n_train: int | None) -> tuple[list[_Option], list[str]]:
    "Each timed size's conservative speedup, and why sizes were left out."
    options, left_out = [], []
    for b in tp.batch_sizes:
        if b == old_bs or (max_fit is not None and b > max_fit):
            continue
        if b > old_bs and n_train and n_train // b < MIN_STEPS_PER_EPOCH:
            continue  # too few optimizer steps per epoch: said by _keep / _why_not_bigger
        ns = conservative_end(interval, grow=b > old_bs)
        if not math.isfinite(ns):  # a smaller batch never pays when the noise scale may be unbounded
            continue
        if examples_ratio(old_bs, b, ns) > MAX_EXAMPLES_FACTOR:
            left_out.append(f"{b} would need ×{examples_ratio(old_bs, b, ns):.2g} the examples (past the noise scale, "
                            f"above ×{MAX_EXAMPLES_FACTOR:g} a bigger batch buys little time for much more compute)")
            continue
        factor = lr_factor(old_bs, b, ns, rule)
        if factor > MAX_LR_FACTOR:
            left_out.append(f"{b} would need lr ×{factor:.2g} (above ×{MAX_LR_FACTOR:g} training can break)")
            continue
        if factor < 1 / MAX_LR_FACTOR:  # the same bound down: a far smaller batch is a different training
            continue
        options.append(_Option(b, ns, speedup(old_bs, b, ns, tp, epochs), factor, tp.noise(old_bs, b)))
    return options, left_out


def _decide(interval: Interval, old_bs: int, tp: Throughput, *, n_train: int | None, lr: Any, epochs: int | None,
            rule: str, max_fit: int | None, lr_from_run: bool, suggested_bs: int | None, trend: str) -> BatchAdvice:
    shown = str(interval)
    if old_bs not in tp.step_seconds:
        raise ValueError(f"throughput must include the current batch size {old_bs}; it has {tp.batch_sizes}")
    options, left_out = _options(interval, old_bs, tp, epochs, rule, max_fit, n_train)
    best = max([o for o in options if o.clears] or options, key=lambda o: o.speedup, default=None)
    speed = _speed_text(tp)
    if best is None or not best.clears:
        at_value = [(speedup(old_bs, o.bs, interval.value, tp, epochs), o) for o in options]
        gains = [(s, o) for s, o in at_value if s >= GAIN_NEEDED * (1 + o.noise)]
        if gains and not interval.rel_halfwidth <= MAX_HALFWIDTH:
            gain, o = max(gains, key=lambda g: g[0])
            extra = (f"at the measured noise scale batch size {o.bs} would be ×{gain:.2g} faster, but not at "
                     f"the interval's {'low' if o.bs > old_bs else 'high'} end {o.noise_scale:.3g}")
            return _uncertain(old_bs, lr, epochs, shown, rule, "the interval is too wide to decide: run longer "
                              "(num_it='auto')", suggested_bs, trend, "; ".join([extra, speed]))
        return _keep(old_bs, lr, epochs, shown, rule, best, speed, left_out, n_train, suggested_bs, trend, lr_from_run)
    return _change(interval, old_bs, best, tp, n_train=n_train, lr=lr, epochs=epochs, rule=rule,
                   lr_from_run=lr_from_run, suggested_bs=suggested_bs, trend=trend, left_out=left_out, speed=speed)


def _speed_text(tp: Throughput) -> str:
    rows = ", ".join(f"{b}: {tp.examples_per_second(b):,.0f}" for b in tp.batch_sizes)
    return f"measured on {tp.device}, examples per second by batch size: {rows}"


def _keep(old_bs: int, lr: Any, epochs: int | None, shown: str, rule: str, best: _Option | None, speed: str,
          left_out: list[str], n_train: int | None, suggested_bs: int | None, trend: str,
          lr_from_run: bool) -> BatchAdvice:
    need = f"×{GAIN_NEEDED:g}" if best is None or best.noise < 0.005 else \
        f"×{GAIN_NEEDED * (1 + best.noise):.3g}: ×{GAIN_NEEDED:g} beyond the timing noise, ±{best.noise:.0%} here"
    why = ("no other batch size could be faster here" if best is None else
           f"the best other size, {best.bs}, is predicted ×{best.speedup:.3g} as fast to the same loss "
           f"({need} needed to change)")
    if n_train and n_train // (2 * old_bs) < MIN_STEPS_PER_EPOCH:
        left_out = [f"{n_train:,} training examples: a bigger batch would leave fewer than {MIN_STEPS_PER_EPOCH} "
                    "optimizer steps per epoch", *left_out]
    lr_text = _lr_text(lr, 1.0, old_bs, old_bs, rule, lr_from_run)
    epochs_text = f"epochs {epochs} unchanged" if epochs else ""
    text = "; ".join(p for p in (f"keep batch size {old_bs} (noise scale {shown}): {why}", *left_out, speed, lr_text,
                                 epochs_text, trend) if p)
    where = "here" if best is None else "on this machine"
    return BatchAdvice(old_bs, lr, epochs, text, old_bs, shown, rule, 1.0, math.ceil(n_train / old_bs) if n_train
                       else None, suggested_bs, lr_text, kind="keep", speedup=1.0, speedup_range=(1.0, 1.0),
                       headline=f"Keep batch size {old_bs}: another batch size would not train faster {where}",
                       total_steps=epochs * math.ceil(n_train / old_bs) if epochs and n_train else None)


def _change(interval: Interval, old_bs: int, best: _Option, tp: Throughput, *, n_train: int | None, lr: Any,
            epochs: int | None, rule: str, lr_from_run: bool, suggested_bs: int | None, trend: str,
            left_out: list[str], speed: str) -> BatchAdvice:
    bs, ns = best.bs, best.noise_scale
    kind = "grow" if bs > old_bs else "shrink"
    ends = [speedup(old_bs, bs, v, tp, epochs) for v in (interval.lo, interval.hi) if math.isfinite(v)]
    if math.isinf(interval.hi):  # an unbounded noise scale: the examples cost nothing more, the speed ratio is the cap
        ends.append(tp.examples_per_second(bs) / tp.examples_per_second(old_bs))
    spread = (min(ends), max(ends))
    shown = str(interval)
    ratio = examples_ratio(old_bs, bs, ns)
    steps_ratio = ratio * old_bs / bs
    head = f"batch size {old_bs} → {bs} (noise scale {shown})"
    gain = (f"predicted ×{best.speedup:.2g} faster to the same loss on this device (×{spread[0]:.2g}–{spread[1]:.2g} "
            f"over the interval), planned at the noise scale's {'low' if kind == 'grow' else 'high'} end {ns:.3g}: "
            f"×{ratio:.2g} the examples, ×{steps_ratio:.2g} the optimizer steps")
    lr_text = _lr_text(lr, best.lr_factor, bs, old_bs, rule, lr_from_run)
    parts = [head, gain, *_why_not_bigger(old_bs, bs, tp, interval, n_train, left_out), speed, lr_text]
    new_epochs = total_steps = None
    if epochs:
        new_epochs = round_epochs(epochs * ratio)
        parts.append(_epochs_text(epochs, new_epochs, epochs * ratio))
        if n_train:
            total_steps = math.ceil(epochs * ratio * n_train / bs)
    else:
        parts.append(f"train ×{ratio:.2g} the epochs (the examples needed to reach the same loss; pass epochs= for a "
                     "number)")
    if trend:
        parts.append(trend)
    new_lr = _scaled(lr, best.lr_factor) if lr is not None else None
    bits = [f"batch size {bs}"] + ([f"lr {format_lr(new_lr)}"] if new_lr is not None else [])
    bits += [f"{new_epochs} epochs"] if new_epochs is not None else []
    headline = "Train with " + " · ".join(bits) + f" — about {best.speedup:.2g}× faster on this machine"
    return BatchAdvice(bs, new_lr, new_epochs, "; ".join(parts), old_bs, shown, rule, best.lr_factor,
                       math.ceil(n_train / bs) if n_train else None, suggested_bs, lr_text, kind=kind,
                       speedup=best.speedup, speedup_range=spread, headline=headline, total_steps=total_steps)


def _why_not_bigger(old_bs: int, bs: int, tp: Throughput, interval: Interval, n_train: int | None,
                    left_out: list[str]) -> list[str]:
    "What stopped a bigger batch: the data, the lr cap, the device's memory or speed."
    if bs < old_bs:
        return []
    notes = list(left_out)
    if interval.lo > bs:
        if n_train and n_train // (2 * bs) < MIN_STEPS_PER_EPOCH:
            notes.append(f"as large as the data allows: {n_train:,} examples keep ≥ {MIN_STEPS_PER_EPOCH} optimizer "
                         f"steps per epoch up to {bs}, and the noise scale is above it")
        elif tp.max_fit is not None and bs == tp.max_fit:
            notes.append(f"as large as fits on {tp.device} in one step ({tp.max_fit})")
    return notes


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


_RULE_NAMES = {"sgd": "linear (plain SGD)", "momentum": "square-root (SGD with momentum)",
               "adam": "square-root (Adam-like)"}


def _lr_text(lr: float | slice | None, factor: float, bs: int, old_bs: int, rule: str, from_run: bool) -> str:
    "The lr part of the advice, naming the batch size it is for (the lr of another batch size is wrong for it)."
    source = " (the finder run's lr: pass lr= the one you train with)" if lr is not None and from_run else ""
    if bs == old_bs:
        return f"lr {format_lr(lr)}{source} unchanged" if lr is not None else "lr unchanged"
    now = (f"lr {format_lr(lr)}{source} → {format_lr(_scaled(lr, factor))} at batch size {bs} (×{factor:.3g}, "
           if lr is not None else f"lr ×{factor:.3g} at batch size {bs} (")
    return (f"{now}{_RULE_NAMES[rule]} scaling of AdaScale's gain (1 + B_noise/B0)/(1 + B_noise/B); every parameter "
            "group's lr, a one-cycle's max lr too)")


def _epochs_text(epochs: int, new_epochs: int, exact: float) -> str:
    "Epochs with the paper's ratio and how they were rounded."
    if new_epochs == epochs and math.isclose(exact, epochs, rel_tol=0.01):
        return f"epochs {epochs} unchanged"
    how = "rounded up" if new_epochs >= exact else f"rounded down (within {exact - new_epochs:.2g} of an epoch)"
    return (f"epochs {epochs} → {new_epochs} ({exact:.3g} to see ×{exact / epochs:.2g} the examples, the paper's "
            f"examples to reach the same loss; {how})")


def check_epochs(epochs: object) -> None:
    "A ValueError unless `epochs` (what the user trains for at their batch size) is a positive integer or None."
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive integer (the epochs you train for) or None, got {epochs!r}")
