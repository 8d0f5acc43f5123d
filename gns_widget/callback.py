"""`GNSCallback`: monitor the noise scale during ordinary fastai training."""
from __future__ import annotations

from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation

from .advice import detect_rule
from .estimator import NoiseScaleEstimator
from .loaders import current_batch_size, dataset_len, population_size
from .recorder import RunRecorder
from .result import GNSResult
from .settings import TRAINING_BETA, Settings
from .targets.base import batch_size_of

__all__ = ["GNSCallback"]


class GNSCallback(Callback):
    """Monitor the noise scale during ordinary `learn.fit`, without changing the training.

    Gradients are read in `before_step`, after fastai's `MixedPrecision` has unscaled them
    and before any clipping; a step that `MixedPrecision` skips for overflow never reaches
    this callback. With fastai's `GradientAccumulation` the micro-batches are the small
    batches and each accumulation cycle is one window (so `n_batch` becomes `n_acc // bs`);
    the running sum is then read after each backward, still scaled, so it is divided by the
    loss scale and a cycle that overflowed is dropped. The result of the latest fit is in
    `self.result` (a `GNSResult`); its `advice()` needs this device's speed:
    `res.advice(lr, epochs, throughput=measure_throughput(learn, batch_sizes=[...]))`.
    """

    order = 15  # after MixedPrecision (10) unscales, before GradientClip (20)

    def __init__(self, n_batch: int = 20, beta: float = TRAINING_BETA):  # bs_find's beta while training: it trains
        Settings(n_batch=n_batch, beta=beta).check()  # the limits and messages of bs_find and the panel
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
        self._params: list = []

    def before_train(self):
        self._params = [p for p in self.learn.model.parameters() if p.requires_grad]  # not the module tree each step

    def after_backward(self):
        if self.n_acc is not None:  # the running sum; fastai scaled this micro-batch's loss by bs/n_acc
            learn = self.learn
            bs = batch_size_of(learn.yb, learn.xb)
            scaler = getattr(learn, "scaler", None)  # set by MixedPrecision for its fit
            grad_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
            self.recorder_.step(learn.loss, bs, self._params, weight=bs / self.n_acc, grad_scale=grad_scale,
                                epoch=learn.epoch)

    def before_step(self):
        if self.n_acc is None:
            learn = self.learn
            self.recorder_.step(learn.loss, batch_size_of(learn.yb, learn.xb), self._params, epoch=learn.epoch)

    # fastai asks every callback for `training` at each of a batch's events, and for each event's handler. Through
    # GetAttr, a name the callback lacks is looked up on the Learner and then its model: ~1.3 µs a name, ~4 µs for
    # an event nobody defines, tens of µs a step in all. Found on the class, each costs a plain attribute read.
    @property
    def training(self) -> bool:
        "The Learner's flag, read directly (see above)."
        return self.learn.training

    def _not_handled(self) -> None:
        "A per-batch event this callback has nothing to do at (see above)."

    after_pred = after_loss = before_backward = _not_handled

    def after_fit(self):
        lr = self.opt.hypers[-1]["lr"] if self.opt is not None else float("nan")
        self.result = self.recorder_.result(batch_size=current_batch_size(self.dls.train),
                                            n_train=dataset_len(self.dls.train), lr=lr, method="training",
                                            rule=detect_rule(self.learn.opt_func))  # the optimizer that trained
