"""`RunRecorder`: feeds an estimator during a run and turns its estimates into `GNSRecord`s and a `GNSResult`.

The engine (`bs_find`) and `GNSCallback` each drive one: they own the training loop, the recorder owns what a
step adds to the estimate, the window's mean loss and the timing.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .estimator import NoiseScaleEstimator, WindowEstimate
from .interval import Interval, noise_scale_interval
from .result import GNSRecord, GNSResult

if TYPE_CHECKING:
    from .memory_plan import MemoryPlan
    from .throughput import Throughput

__all__ = ["RunRecorder"]


class RunRecorder:
    """Feeds an estimator step by step and turns each completed window into a `GNSRecord`.

    Losses stay on the device until the window ends, so a step costs no host sync: one per record
    (`step_norms` is given host numbers by a caller that reads many steps at once).
    """

    def __init__(self, estimator: NoiseScaleEstimator, total: int):
        self.estimator, self.total = estimator, total
        self.records: list[GNSRecord] = []
        self.iteration = self.samples = 0
        self._window_losses: list[Tensor] = []
        self._start = time.perf_counter()
        self._interval: tuple[int, Interval | None] = (0, None)  # the last interval, and the records it is of

    def interval(self) -> Interval | None:
        """The noise scale so far with its 90% interval, the windows weighted by the estimator's decay (as its EMAs).
        Computed again only when a window was added (an adaptive run looks often, and its windows may be sparse)."""
        recs = self.records
        if self._interval[0] != len(recs):
            self._interval = (len(recs), noise_scale_interval([r.noise_raw for r in recs], [r.scale_raw for r in recs],
                                                              self.estimator.beta, weights=[r.n_batch for r in recs]))
        return self._interval[1]

    def step(self, loss: Tensor, batch_size: int, model, weight: float | None = None,
             grad_scale: float | None = None, epoch: int | None = None) -> GNSRecord | None:
        """Record one small batch whose gradient is ready; return the new record when a window completes.

        `weight`, `grad_scale` and `epoch` are passed to the estimator (gradient accumulation, mixed
        precision, small datasets). A skipped batch's loss is left out of the window's mean loss, a dropped
        window's losses all are. No host sync until a window completes.
        """
        self.iteration += 1
        self.samples += batch_size
        self._window_losses.append(loss.detach())
        skipped, dropped = self.estimator.n_skipped, self.estimator.n_dropped
        estimate = self.estimator.update(model, batch_size, weight, grad_scale, epoch=epoch)
        if estimate is None:
            if self.estimator.n_dropped != dropped:  # a whole window (accumulation cycle) was dropped
                self._window_losses = []
            elif self.estimator.n_skipped != skipped:  # this batch alone
                self._window_losses.pop()
            return None
        return self._record(estimate)

    def skip(self, batch_size: int) -> None:
        "A training step left unmeasured (between windows): counted, so records keep the run's step numbers."
        self.iteration += 1
        self.samples += batch_size

    def step_norms(self, loss: float, batch_size: int, small_sq: float, big_sq: float, b_small: float,
                   b_big: float, grad_scale: float | None = None, at: float | None = None) -> GNSRecord | None:
        """Record one step that measured its small and big batch at once (per-example or distributed).

        Takes host numbers (a tensor would be read here, one host sync each): the engine reads many steps'
        norms and losses in one go, so `at` is the `time.perf_counter()` of the step (default: now). None when
        the step's norms were not finite (a float16 overflow carrying `grad_scale`, or NaN/inf): it is skipped,
        its loss too.
        """
        self.iteration += 1
        self.samples += batch_size
        estimate = self.estimator.update_norms(small_sq, big_sq, b_small, b_big, grad_scale)
        return None if estimate is None else self._record(estimate, float(loss), at)

    def _record(self, estimate: WindowEstimate, loss: float | None = None, at: float | None = None) -> GNSRecord:
        "The record of a completed window: its mean loss from the window's losses and its time now, unless given."
        if loss is None:
            loss = torch.stack(self._window_losses).float().mean().item()  # one host sync per record
        self._window_losses = []
        est = self.estimator
        record = GNSRecord(iteration=self.iteration, samples=self.samples, loss=loss,
                           noise=est.noise, scale=est.scale, noise_scale=est.noise_scale,
                           noise_raw=estimate.noise, scale_raw=estimate.scale, n_batch=estimate.n_small,
                           elapsed=(time.perf_counter() if at is None else at) - self._start, total=self.total)
        self.records.append(record)
        return record

    def result(self, *, batch_size: int | None, n_train: int | None, lr: float, method: str,
               beta: float | None = None, stopped: bool = False, throughput: Throughput | None = None,
               rule: str | None = None, memory_plan: MemoryPlan | None = None) -> GNSResult:
        "The run's result; `beta` is the decay the user asked for (default: the estimator's); see `GNSResult`."
        return GNSResult(self.records, batch_size=batch_size, n_train=n_train, lr=lr, n_batch=self.estimator.n_batch,
                         beta=self.estimator.beta if beta is None else beta, method=method, stopped=stopped,
                         n_skipped=self.estimator.n_skipped, n_dropped=self.estimator.n_dropped,
                         decay=self.estimator.beta, throughput=throughput, rule=rule, memory_plan=memory_plan)
