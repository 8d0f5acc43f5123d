"What a finder run produces: one `GNSRecord` per estimate while it runs, a `GNSResult` at the end."
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import pandas as pd

from .advice import BatchAdvice, advise
from .interval import Interval, noise_scale_interval
from .lr_rules import LRAdvice, check_rule
from .suggest import Suggestion, suggest_batch_size, tradeoff

if TYPE_CHECKING:
    from .memory_plan import MemoryPlan
    from .throughput import Throughput

__all__ = ["GNSRecord", "GNSResult"]

MIN_TREND_WINDOWS = 10  # windows in each half of a run before its trend is told
GROWING = 1.25  # a second half this many times the first: still growing


def _ratio_of_sums(h: pd.DataFrame) -> float:
    "The noise scale of some windows: their weighted raw tr(Σ) over their weighted raw |G|²."
    scale = float((h.scale_raw * h.n_batch).sum())
    return float((h.noise_raw * h.n_batch).sum()) / scale if scale > 0 else math.nan


@dataclass(frozen=True)
class GNSRecord:
    "One row of the history, emitted to listeners each time a window of n_batch small batches completes."
    iteration: int  # small batches processed so far
    samples: int  # examples processed so far
    loss: float  # mean training loss over the window
    noise: float  # smoothed tr(Σ)
    scale: float  # smoothed |G|²
    noise_scale: float  # smoothed B_simple = noise / scale
    noise_raw: float  # this window's unsmoothed tr(Σ)
    scale_raw: float  # this window's unsmoothed |G|²
    n_batch: int  # small batches in this window (num_it="auto" may widen windows at lr=0); its weight
    elapsed: float  # seconds since the run started
    total: int  # iterations planned for the run


COLUMNS = [f.name for f in fields(GNSRecord)]


class GNSResult:
    """The outcome of `bs_find`: the noise scale, a suggested batch size (or why not) and the history.

    `suggested_bs` is None whenever the estimate cannot be trusted; `reason` then says
    what to change. `noise_scale_interval` is its 90% interval and `advice()` the batch size,
    learning rate and epochs to train with. Like fastai's `lr_find` result, it plots itself.

    `lr` is the trial run's lr (0: it measured at fixed weights), which need not be the one you train with:
    `advice(lr=...)` takes yours. Without it, the advice scales the trial run's lr when the run trained, and its
    text says so; at lr=0 there is no lr to scale, and the advice gives the lr factor alone.

    `decay` is the EMA decay per record (default `beta`; methods with an estimate per step decay
    by beta**(1/n_batch) per record). `throughput` (this device's speed by batch size), `rule` (the lr rule of
    the optimizer you train with) and `memory_plan` are what `bs_find` measured besides, None where it did not.
    """

    def __init__(self, records: list[GNSRecord], *, batch_size: int, n_train: int | None, lr: float,
                 n_batch: int, beta: float, method: str, stopped: bool = False, n_skipped: int = 0,
                 n_dropped: int = 0, decay: float | None = None, throughput: Throughput | None = None,
                 rule: str | None = None, memory_plan: MemoryPlan | None = None):
        self.history = pd.DataFrame([asdict(r) for r in records], columns=COLUMNS)
        self.batch_size, self.n_train, self.lr = batch_size, n_train, lr
        self.n_batch, self.beta, self.method, self.stopped = n_batch, beta, method, stopped
        self.decay = beta if decay is None else decay
        self.n_skipped = n_skipped  # small batches (accumulation cycles) whose gradients were not finite
        self.n_dropped = n_dropped  # windows left out whole because such a batch was found at their end
        self._interval = noise_scale_interval(self.history.noise_raw, self.history.scale_raw, self.decay,
                                              weights=self.history.n_batch)
        self.suggestion: Suggestion = suggest_batch_size(self.history, n_train, self._interval,
                                                         trained=self.trained)
        self.memory_plan = memory_plan  # when the suggestion was checked against device memory
        self.throughput = throughput  # this device's speed by batch size, when bs_find timed it
        self.rule = rule  # the lr rule of the optimizer the user trains with (`advice.detect_rule`), if known

    @property
    def trained(self) -> bool:
        "Whether the run took optimizer steps (lr > 0), so its windows lie along a stretch of training."
        return isinstance(self.lr, (int, float)) and self.lr > 0

    @property
    def decidable(self) -> bool:
        """Whether the measurement can carry a decision: a usable suggestion state and an interval with a positive
        low end (the end a bigger batch is planned at). Only then does this device's speed matter."""
        iv = self._interval
        return self.suggestion.usable and iv is not None and iv.lo > 0

    @property
    def growth(self) -> float | None:
        """How the noise scale moved while the run trained: its second half's value over its first half's (ratio of
        the windows' summed raw estimates), None at lr=0 (nothing moved) or with too few windows."""
        h = self.history
        if not self.trained or len(h) < 2 * MIN_TREND_WINDOWS:
            return None
        half = len(h) // 2
        first, second = (_ratio_of_sums(part) for part in (h.iloc[:half], h.iloc[half:]))
        return second / first if first > 0 and second > 0 else None

    @property
    def trend(self) -> str:
        "How representative the noise scale is of the training ahead, in words for the advice."
        if not self.trained:
            return ("measured at one point of training (lr=0): the noise scale usually grows as training goes on, "
                    "so a later measurement may allow a bigger batch")
        g = self.growth
        if g is None:
            return ""
        if g >= GROWING:
            return (f"the noise scale grew ×{g:.2g} during the run and is still growing: measure again later in "
                    "training to go further")
        if g <= 1 / GROWING:
            return f"the noise scale fell ×{1 / g:.2g} during the run: measure again later in training"
        return f"the noise scale held steady during the run (×{g:.2g} from its first half to its second)"

    @property
    def noise_scale(self) -> float:
        "The final smoothed noise scale B_simple (NaN when no window completed)."
        return float(self.history.noise_scale.iloc[-1]) if len(self.history) else math.nan

    @property
    def noise_scale_interval(self) -> tuple[float, float] | None:
        """(lo, hi), a 90% interval for `noise_scale` (hi is inf when |G|² may be zero; None before 10 windows).

        From the windows' raw estimates by Fieller's method for a ratio and batch means for their
        autocorrelation (`interval.py`); it covers the exact B_simple at fixed weights (see the tests).
        """
        return None if self._interval is None else (self._interval.lo, self._interval.hi)

    @property
    def interval(self) -> Interval | None:
        "The noise scale with its 90% interval, printed as '91 (80–104)'."
        return self._interval

    @property
    def suggested_bs(self) -> int | None:
        return self.suggestion.bs

    @property
    def reason(self) -> str:
        return self.suggestion.reason

    @property
    def reliable(self) -> bool:
        return self.suggestion.bs is not None

    def advice(self, lr: float | slice | None = None, epochs: int | None = None, rule: str | None = None,
               throughput: Throughput | None = None) -> BatchAdvice:
        """The batch size, learning rate and epochs that reach the same loss soonest on this device; `.text` says why.

        `lr` and `epochs` are what you train with at the current batch size (fastai's `slice(body, head)` gets
        both ends scaled). Without `lr`, the trial run's lr (`self.lr`) stands in when the run trained, and the
        text says it is the run's: pass yours when you train at another. `rule` is the lr
        rule, "sgd" (linear), "momentum" or "adam" (square root); None takes the one of the optimizer
        the run used (`self.rule`), and the square root when that is unknown. `throughput` is the
        device's speed by batch size (default: what `bs_find` measured; `measure_throughput` for a
        `GNSCallback`'s result). `.kind` says grow, keep, shrink or uncertain; see `advice.py`.
        """
        if rule is not None:
            check_rule(rule)
        from_run = lr is None and self.trained  # the trial run's lr stands in for yours, said in the text
        if from_run:
            lr = self.lr
        plan = self.memory_plan  # probed for the raw suggestion: its per-step batch fits
        return advise(self._interval, self.batch_size, throughput=throughput or self.throughput, n_train=self.n_train,
                      lr=lr, epochs=epochs, rule=rule or self.rule or "momentum",
                      reason="" if self.decidable else self.suggestion.reason,
                      max_fit=plan.batch_size if plan is not None else None, lr_from_run=from_run,
                      suggested_bs=self.suggested_bs, trend=self.trend)

    def lr_advice(self, lr: float | slice | None = None, rule: str = "sgd") -> LRAdvice | None:
        "Deprecated: the learning-rate part of `advice()` (its `.lr`, `.lr_factor` and `.lr_text`)."
        warnings.warn("GNSResult.lr_advice is deprecated and goes in the next version: use advice(), whose .lr, "
                      ".lr_factor and .lr_text are the lr for the batch size it advises", DeprecationWarning,
                      stacklevel=2)
        a = self.advice(lr, rule=rule)
        if a.batch_size is None:
            return None
        return LRAdvice(a.lr if a.lr is not None else math.nan, a.lr_factor, a.rule, a.lr_text)

    def tradeoff(self, batch_sizes) -> pd.DataFrame:
        "Predicted steps and examples (relative to their minimum) for each batch size."
        return tradeoff(self.noise_scale, batch_sizes)

    def plot(self, x: str = "iteration"):
        "Noise, scale and noise scale against `x` ('iteration' or 'samples'), as in the fastai write-up."
        import matplotlib.pyplot as plt

        fig, axs = plt.subplots(1, 3, figsize=(13, 3.5))
        h = self.history
        for ax, col, title in zip(axs, ("noise", "scale", "noise_scale"),
                                  ("noise  tr(Σ)", "scale  |G|²", "noise scale  B_simple")):
            ax.plot(h[x], h[col])
            ax.set_title(title)
            ax.set_xlabel(x)
        if self._interval is not None and math.isfinite(self._interval.hi):
            axs[2].axhspan(self._interval.lo, self._interval.hi, color="C0", alpha=0.15, label="90% interval")
        if self.reliable:
            axs[2].axhline(self.suggested_bs, ls="--", c="C1", label=f"suggested bs {self.suggested_bs}")
        if self._interval is not None or self.reliable:
            axs[2].legend()
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        shown = str(self._interval) if self._interval is not None else f"{self.noise_scale:.4g}"
        head = f"GNSResult(noise_scale={shown}, "
        if self.reliable:
            head += f"suggested_bs={self.suggested_bs}"
        else:
            head += "suggested_bs=None"
        state = ", stopped early" if self.stopped else ""
        state += f", {self.n_skipped} batches with non-finite gradients skipped" if self.n_skipped else ""
        state += f" ({self.n_dropped} windows dropped)" if self.n_dropped else ""
        # the plan reaches the raw suggestion; advice() only advises sizes that fit in one step
        plan = (f"\n  {self.memory_plan.text} (for the raw suggestion: res.advice() gives the batch size, lr and "
                "epochs to train with)" if self.memory_plan is not None else "")
        return (f"{head}, estimates={len(self.history)}, batch_size={self.batch_size}, "
                f"method={self.method!r}{state})\n  {self.reason}{plan}")
