"""fastai: a `Learner` as a finder target, `Learner.bs_find`, and `GNSCallback` to monitor ordinary training.

`bs_find` on a Learner builds its own optimizer with the Learner's `opt_func`, so the
Learner's optimizer and its state are never touched; batches come from `dls.train`
with all its transforms, split into inputs and targets with `dls.n_inp` as fastai does.
"""
from __future__ import annotations

from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastcore.basics import patch

from ..estimator import NoiseScaleEstimator
from ..loaders import current_batch_size, dataset_len, population_size
from ..result import GNSResult, RunRecorder
from .base import BatchFn, Target, batch_size_of, check_model, default_device
from .torch import module_target

__all__ = ["learner_target", "GNSCallback"]


def learner_target(learn: Learner, *, train_dl: Any = None, loss_func: Any = None, opt: Any = None,
                   device: Any = None, batch_fn: BatchFn | None = None) -> Target:
    check_model(learn.model)
    dl = train_dl if train_dl is not None else learn.dls.train
    n_inp = getattr(learn.dls, "n_inp", None)

    def split(b):
        i = n_inp if n_inp is not None else (1 if len(b) == 1 else len(b) - 1)
        return b[:i], b[i:]

    device = torch.device(device if device is not None else (learn.dls.device or default_device()))
    if opt is not None:  # the user's own optimizer: the same rules as for a plain module
        return module_target(learn.model, dl, loss_func or learn.loss_func, opt=opt, device=device,
                             batch_fn=batch_fn or split)
    return Target(model=learn.model, train_dl=dl, loss_func=loss_func or learn.loss_func,
                  split_batch=batch_fn or split,
                  make_opt=lambda lr: learn.opt_func(learn.splitter(learn.model), lr=lr), user_opt=None,
                  device=device, batch_size=current_batch_size(dl), n_train=dataset_len(dl))


@patch
def bs_find(self: Learner, lr: float = 1e-3, num_it: int | None = None, n_batch: int = 20, beta: float = 0.99,
            show_plot: bool = True, **kwargs) -> GNSResult:
    """Measure the gradient noise scale and suggest a batch size, like `lr_find` suggests a learning rate.

    Trains a mock run of `num_it` small batches (one epoch by default) and puts the
    model, its optimizer and every RNG back exactly as they were. `lr=0` measures at the
    current weights without training. Other keyword arguments go to `gns_widget.bs_find`.
    """
    from ..engine import bs_find

    res = bs_find(self, lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, **kwargs)
    if show_plot and len(res.history):
        res.plot()
    return res


class GNSCallback(Callback):
    """Monitor the noise scale during ordinary `learn.fit`, without changing the training.

    Gradients are read in `before_step`, after fastai's `MixedPrecision` has unscaled them
    and before any clipping; a step that `MixedPrecision` skips for overflow never reaches
    this callback. With fastai's `GradientAccumulation` the micro-batches are the small
    batches and each accumulation cycle is one window (so `n_batch` becomes `n_acc // bs`);
    the running sum is then read after each backward, still scaled, so it is divided by the
    loss scale and a cycle that overflowed is dropped. The result of the latest fit is in
    `self.result` (a `GNSResult`).
    """

    order = 15  # after MixedPrecision (10) unscales, before GradientClip (20)

    def __init__(self, n_batch: int = 20, beta: float = 0.99):
        NoiseScaleEstimator.check_args(n_batch, beta)
        self.n_batch, self.beta = n_batch, beta
        self.estimator: NoiseScaleEstimator | None = None
        self.result: GNSResult | None = None

    def before_fit(self):
        bs = current_batch_size(self.dls.train)
        acc = next((cb for cb in self.learn.cbs if isinstance(cb, GradientAccumulation)), None)
        self.n_acc = acc.n_acc if acc is not None and acc.n_acc > bs else None
        if self.n_acc is not None and self.n_acc % bs:
            raise ValueError(f"GradientAccumulation(n_acc={self.n_acc}) must be a multiple of the batch size ({bs}) "
                             "for GNSCallback: each accumulation cycle is one window of micro-batches")
        self.estimator = NoiseScaleEstimator(self.n_acc // bs if self.n_acc else self.n_batch, self.beta,
                                             n_train=population_size(self.dls.train),
                                             accumulated=self.n_acc is not None)
        self.recorder_ = RunRecorder(self.estimator, total=self.n_epoch * len(self.dls.train))

    def after_backward(self):
        if self.n_acc is not None:  # the running sum; fastai scaled this micro-batch's loss by bs/n_acc
            bs = batch_size_of(self.yb, self.xb)
            scaler = getattr(self.learn, "scaler", None)  # set by MixedPrecision for its fit
            grad_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
            self.recorder_.step(self.learn.loss, bs, self.learn.model, weight=bs / self.n_acc, grad_scale=grad_scale)

    def before_step(self):
        if self.n_acc is None:
            self.recorder_.step(self.learn.loss, batch_size_of(self.yb, self.xb), self.learn.model)

    def after_fit(self):
        lr = self.opt.hypers[-1]["lr"] if self.opt is not None else float("nan")
        self.result = self.recorder_.result(batch_size=current_batch_size(self.dls.train),
                                            n_train=dataset_len(self.dls.train), lr=lr, method="training")
