"""One finder run: snapshot → train `num_it` small batches feeding the estimator → restore.

Two ways to train while measuring:
- ``mode="fixed"`` (default): the `n_batch` small-batch gradients of a window are all taken
  at the same weights, then one optimizer step is taken with their average (the big-batch
  gradient). This is the estimator as the paper defines it: small and big batch estimate
  the same gradient.
- ``mode="sequential"``: an optimizer step after every small batch, as in the 2019 fastai
  write-up. The window's gradients then come from different weights, which biases the
  estimate; it is kept to compare with that method.
With ``lr=0`` nothing is stepped and both modes measure at the current weights.

The engine knows nothing of widgets: it reports through `on_update` and stops when
`stop_event` is set.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .estimator import NoiseScaleEstimator, gradients_of
from .loaders import population_size
from .result import GNSRecord, GNSResult, RunRecorder
from .state import UserState
from .targets import Target, as_target
from .targets.base import batch_size_of, loader_len, to_device

__all__ = ["bs_find", "MODES"]

MODES = ("fixed", "sequential")


def bs_find(target: Any, train_dl: Any = None, loss_func: Callable | None = None, *, lr: float = 1e-3,
            num_it: int | None = None, n_batch: int = 20, beta: float = 0.99, opt: Any = None,
            device: Any = None, mode: str = "fixed", batch_fn: Callable | None = None,
            on_update: Callable[[GNSRecord], None] | None = None,
            stop_event: threading.Event | None = None) -> GNSResult:
    """Measure the gradient noise scale of `target` and suggest a batch size.

    `target` is a fastai `Learner` (its `dls.train` and `loss_func` are used) or an
    `nn.Module` with `train_dl` and `loss_func`. `opt` is an optimizer, a factory
    `params -> optimizer`, or None (SGD; a Learner's own `opt_func`). `num_it` small batches
    are used (None: one epoch; more than an epoch cycles the loader). `lr=0` measures at
    the current weights. `on_update(record)` receives every new estimate; setting
    `stop_event` ends the run at the next step with a partial result. Whatever happens,
    the model, optimizer, loader and RNG states are restored exactly.
    """
    NoiseScaleEstimator.check_args(n_batch, beta)
    _check_args(lr=lr, num_it=num_it, n_batch=n_batch, mode=mode)
    tgt = as_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn)
    total = _total_iterations(tgt.train_dl, num_it, n_batch)
    estimator = NoiseScaleEstimator(n_batch, beta, n_train=population_size(tgt.train_dl))
    state = UserState(tgt.model, tgt.user_opt, tgt.train_dl)
    try:
        recorder, stopped = _run(tgt, estimator, total, lr, mode, on_update, stop_event)
    finally:
        state.restore()
    return recorder.result(batch_size=tgt.batch_size, n_train=tgt.n_train, lr=lr, mode=mode, stopped=stopped)


def _run(tgt: Target, estimator: NoiseScaleEstimator, total: int, lr: float, mode: str,
         on_update: Callable | None, stop_event: threading.Event | None) -> tuple[RunRecorder, bool]:
    model = tgt.model
    model.to(tgt.device)
    model.train()
    opt = tgt.make_opt(lr) if lr > 0 else None
    step_every_batch = opt is not None and mode == "sequential"
    recorder = RunRecorder(estimator, total)
    batches = _cycle(tgt.train_dl)
    for _ in range(total):
        if stop_event is not None and stop_event.is_set():
            return recorder, True
        inputs, targets = tgt.split_batch(to_device(next(batches), tgt.device))
        bs = batch_size_of(targets, inputs)
        if tgt.batch_size is None:
            tgt.batch_size = bs
        model.zero_grad(set_to_none=True)
        loss = tgt.loss_func(model(*inputs), *targets)
        loss.backward()
        record = recorder.step(loss, bs, model)
        if step_every_batch:
            opt.step()
        if record is None:
            continue
        _check_finite(recorder, record, lr)
        if opt is not None and mode == "fixed":
            torch._foreach_copy_(gradients_of(model), estimator.big_batch_grads())
            opt.step()
        if on_update is not None:
            on_update(record)
    return recorder, False


def _cycle(dl: Any) -> Iterator:
    "Batches from `dl`, epoch after epoch (a fresh iterator each epoch, as a training loop does)."
    while True:
        empty = True
        for b in dl:
            empty = False
            yield b
        if empty:
            raise ValueError("train_dl yielded no batches: give it a non-empty dataset (and drop_last=False "
                             "if the dataset is smaller than one batch)")


def _check_finite(recorder: RunRecorder, record: GNSRecord, lr: float) -> None:
    losses = recorder.last_window_losses
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        it = record.iteration - len(losses) + 1 + int(bad[0])
        raise RuntimeError(f"the loss became {losses[int(bad[0])].item()} at iteration {it}: training diverged "
                           f"at lr={lr:g}; lower lr, or use lr=0 to measure at the current weights")
    if not (math.isfinite(record.noise_raw) and math.isfinite(record.scale_raw)):
        raise RuntimeError(f"the gradients were not finite in iterations {record.iteration - len(losses) + 1}"
                           f"–{record.iteration}: lower lr, or use lr=0 to measure at the current weights")


def _total_iterations(dl: Any, num_it: int | None, n_batch: int) -> int:
    n = loader_len(dl)
    if n == 0:
        raise ValueError("train_dl is empty: give it a non-empty dataset (and drop_last=False if the dataset is "
                         "smaller than one batch)")
    if num_it is None:
        if n is None:
            raise ValueError("train_dl has no length, so 'one epoch' is unknown: pass num_it")
        if n < n_batch:
            raise ValueError(f"one epoch is only {n} batches, fewer than n_batch={n_batch}: pass num_it >= "
                             f"{5 * n_batch} (the loader is cycled) or lower n_batch")
        return n
    return num_it


def _check_args(*, lr: float, num_it: int | None, n_batch: int, mode: str) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0 (0 measures without training), got {lr!r}")
    if num_it is not None and (isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < n_batch):
        raise ValueError(f"num_it must be an integer >= n_batch ({n_batch}) so at least one estimate is made, "
                         f"or None for one epoch; got {num_it!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
