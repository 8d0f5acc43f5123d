"""A finder run's settings: one object, checked in one place, for every entry point.

`bs_find`, the panel (`GNSWidget`) and `GNSCallback` take the same run settings: `lr`, `num_it`, `n_batch`,
`beta` and `method`. Each builds a `Settings` and has it checked here, so their limits and messages cannot
disagree: `problem()` says what is wrong, naming the argument and its accepted range (the panel shows it
inline), `check()` raises it as a ValueError and returns the settings ready to run. `n_batch` and `beta` are the
estimator's own arguments: `NoiseScaleEstimator.check_args` is their rule, here as everywhere.

The defaults are the same everywhere, except where an entry point has a reason:
- `num_it`: one epoch (None) for `bs_find`, a measurement as long as a training epoch; "auto" in the panel,
  which is there to give a suggestion and so runs until the noise scale is known to ±10% (`PanelSettings`).
- `beta`: None picks it from the lr (`resolve_beta`); `GNSCallback` defaults to `TRAINING_BETA`, the same
  value, as it always trains.
- the least `num_it`: `bs_find` runs anything that makes one estimate (a short look, whose result says why it
  suggests nothing); a run from the panel's Start button must be long enough to suggest (`PanelSettings`).
- `n_batch` and `beta` in the panel: its sliders hold n_batch 2–100 and have no beta 0 (`PanelSettings`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

from .estimator import NoiseScaleEstimator
from .interval import MIN_WINDOWS as MIN_ESTIMATES
from .interval import AutoStop
from .loaders import current_batch_size, loader_len

__all__ = ["Settings", "PanelSettings", "METHODS", "TRAINING_BETA", "PANEL_N_BATCH", "resolve_beta"]

METHODS = ("fixed", "sequential", "per_example")
TRAINING_BETA = 0.99  # the EMA decay beta=None picks while training (about the last 100 estimates)
PANEL_N_BATCH = (2, 100)  # the panel's n_batch slider: wider windows than 100 small batches are num_it='auto''s job


def resolve_beta(lr: Any, beta: float | None = None) -> float | Any:
    "`beta`, or for None: 1 (a plain average) at lr=0, where the weights do not move, else TRAINING_BETA."
    if beta is not None:
        return beta
    return 1.0 if isinstance(lr, numbers.Real) and not isinstance(lr, bool) and lr == 0 else TRAINING_BETA


@dataclass(frozen=True)
class Settings:
    """The settings of one finder run, as `bs_find` takes them (see its docstring for what each does).

    `distributed`: the model is a `DistributedDataParallel` in a process group, known once the target is; each
    rank's batch is then a small batch and every step one estimate, as with method="per_example".
    """
    lr: float = 1e-3  # the trial run's lr (0 measures at the current weights), not necessarily the one you train with
    num_it: int | str | AutoStop | None = None  # small batches; None: one epoch; "auto" or an AutoStop: until precise
    n_batch: int = 20  # small batches per estimate
    beta: float | None = None  # the EMA decay per estimate; None: resolve_beta(lr)
    method: str = "fixed"
    distributed: bool = False

    @property
    def per_step(self) -> bool:
        "Whether every step is one estimate (per-example norms, or the ranks of a distributed job)."
        return self.distributed or self.method == "per_example"

    @property
    def auto(self) -> AutoStop | None:
        "The rule that ends the run once the noise scale is precise enough, when num_it asks for one."
        return AutoStop.of(self.num_it)

    def problem(self) -> str | None:
        "What is wrong with these settings, naming the argument and its accepted range; None when nothing is."
        return (self._estimator_problem() or self._lr_problem() or self._method_problem()
                or self._num_it_problem())

    def check(self) -> Settings:
        """Raise a ValueError with `problem()`, if any; else the settings to run: n_batch and num_it plain ints (numpy
        integers are accepted), "auto" its `AutoStop`, beta resolved from the lr when None."""
        msg = self.problem()
        if msg is not None:
            raise ValueError(msg)
        num_it = self.num_it
        if self.auto is not None:
            num_it = self.auto
        elif num_it is not None:
            num_it = int(num_it)
        return replace(self, n_batch=int(self.n_batch), num_it=num_it, beta=resolve_beta(self.lr, self.beta))

    def least_num_it(self) -> int:
        "The fewest small batches that give the estimates a suggestion needs."
        return MIN_ESTIMATES * (1 if self.per_step else self.n_batch)

    def iterations(self, train_dl: Any) -> int:
        """The small batches the run takes from `train_dl`: auto's most, num_it, or one epoch; a ValueError when
        the loader cannot give them (empty, or one epoch asked of a loader without a length or too short for one
        estimate)."""
        auto = self.auto
        if auto is not None:
            return auto.max_it
        n = loader_len(train_dl)
        if n == 0:
            raise ValueError("train_dl is empty: give it a non-empty dataset (and drop_last=False if the dataset is "
                             "smaller than one batch)")
        if self.num_it is not None:
            return self.num_it
        if n is None:
            raise ValueError("train_dl has no length, so 'one epoch' is unknown: pass num_it")
        window = 1 if self.per_step else self.n_batch
        if n < window:
            raise ValueError(f"one epoch is only {n} batches, fewer than n_batch={window}: pass num_it >= "
                             f"{MIN_ESTIMATES * window} (the {MIN_ESTIMATES} estimates a suggestion needs; the "
                             "loader is cycled) or lower n_batch")
        return n

    def _estimator_problem(self) -> str | None:
        try:
            NoiseScaleEstimator.check_args(self.n_batch, resolve_beta(self.lr, self.beta))
        except ValueError as e:
            return str(e)
        return None

    def _lr_problem(self) -> str | None:
        lr = self.lr
        if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr >= 0):
            return f"lr must be a finite number >= 0 (0 measures without training), got {lr!r}"
        return None

    def _method_problem(self) -> str | None:
        if self.method not in METHODS:
            return f"method must be one of {METHODS}, got {self.method!r}"
        if self.distributed and self.method != "fixed":
            return (f"method={self.method!r} is not available under DistributedDataParallel: use method='fixed' "
                    "(each rank's batch is a small batch, the all-reduced batch the big one)")
        return None

    def _num_it_problem(self) -> str | None:
        num_it = self.num_it
        if num_it is None or self.auto is not None:
            return None
        least, what = (1, "1") if self.method == "per_example" else (self.n_batch, f"n_batch ({self.n_batch})")
        if isinstance(num_it, bool) or not isinstance(num_it, numbers.Integral) or num_it < least:
            return (f"num_it must be an integer >= {what} so at least one estimate is made, None for one epoch, or "
                    f"'auto'; got {num_it!r}")
        return None


@dataclass(frozen=True)
class PanelSettings(Settings):
    """The settings of a run from the panel's Start button, with the panel's own limits.

    `num_it` is what the num_it box holds: 0 (or None) for one epoch, which must then give the estimates a
    suggestion needs, as must any count: the panel is there for the suggestion. Its n_batch slider holds
    `PANEL_N_BATCH` and its beta slider starts above 0 ("auto", then 0.9: a beta of 0 would keep only the latest
    estimate, and the charts would show noise).
    """
    num_it: int | str | AutoStop | None = "auto"

    def epoch_problem(self, train_dl: Any) -> str | None:
        "Why one epoch of `train_dl` (num_it 0) cannot give a suggestion, or None (also when num_it is no epoch)."
        if self.auto is not None or self.num_it not in (None, 0):
            return None
        least = self.least_num_it()
        epoch = loader_len(train_dl)
        if epoch is None:
            return f"num_it=0 means one epoch, but the loader has no length: set num_it ≥ {least}"
        if epoch < least:
            return (f"one epoch is only {epoch} batches at batch size {current_batch_size(train_dl)}, and "
                    f"{self._need()}: set num_it ≥ {least} (the loader is cycled) or lower n_batch")
        return None

    def _need(self) -> str:
        return f"a suggestion needs {MIN_ESTIMATES} estimates" + ("" if self.per_step else
                                                                  f" of n_batch={self.n_batch} small batches each")

    def _estimator_problem(self) -> str | None:
        lo, hi = PANEL_N_BATCH
        n_batch, beta = self.n_batch, self.beta
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or not lo <= n_batch <= hi:
            return f"n_batch must be an integer from {lo} to {hi} (the slider's range), got {n_batch!r}"
        msg = super()._estimator_problem()
        if msg is None and beta is not None and beta <= 0:
            msg = f"beta must be in (0, 1] or None (smoothing; None picks it from the lr), got {beta!r}"
        return msg

    def _num_it_problem(self) -> str | None:
        if self.auto is not None:
            return None
        num_it = 0 if self.num_it is None else self.num_it
        least = self.least_num_it()
        if isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < 0:
            return f"num_it must be an integer ≥ {least} ({self._need()}), 0 for one epoch, or 'auto'; got {num_it!r}"
        if 0 < num_it < least:
            return f"num_it must be ≥ {least} ({self._need()}), or 0 for one epoch; got {num_it}"
        return None
