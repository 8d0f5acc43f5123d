"""fastai: a `Learner` as a finder target.

`bs_find` on a Learner builds its own optimizer with the Learner's `opt_func`, so the
Learner's optimizer and its state are never touched; batches come from `dls.train`
with all its transforms, split into inputs and targets with `dls.n_inp` as fastai does.
Each step is a plain training step, not `learn.fit`: the Learner's callbacks do not run, so
those that would change the batch, the prediction, the loss or the gradients (MixUp,
GradientAccumulation, BnFreeze, a user's `before_batch`) are named in a warning
(`unrun_callbacks_warning`, issued by `as_target` for a measurement). While a run trains the Learner's model,
`learn.fit` on it is refused (its training would be undone when the run restores the weights).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastai.callback.core import Callback
from fastai.learner import Learner

from ..guard import FinderBusyError
from ..loaders import current_batch_size, dataset_len
from .base import BatchFn, Target, check_device, check_loss, check_model, default_device
from .torch import module_target

__all__ = ["learner_target", "unrun_callbacks_warning"]


def learner_target(learn: Learner, *, train_dl: Any = None, loss_func: Any = None, opt: Any = None,
                   device: Any = None, batch_fn: BatchFn | None = None) -> Target:
    check_model(learn.model)
    dl = train_dl if train_dl is not None else learn.dls.train
    n_inp = getattr(learn.dls, "n_inp", None)

    def split(b):
        i = n_inp if n_inp is not None else (1 if len(b) == 1 else len(b) - 1)
        return b[:i], b[i:]

    device = check_device(device if device is not None else (learn.dls.device or default_device()))
    loss_func = loss_func or learn.loss_func
    if opt is not None:  # the user's own optimizer: the same rules as for a plain module (check_loss included)
        tgt = module_target(learn.model, dl, loss_func, opt=opt, device=device, batch_fn=batch_fn or split)
        tgt.during_run = lambda: _refusing_fit(learn)
        return tgt
    check_loss(loss_func)
    return Target(model=learn.model, train_dl=dl, loss_func=loss_func,
                  split_batch=batch_fn or split,
                  make_opt=lambda lr: learn.opt_func(learn.splitter(learn.model), lr=lr), user_opt=None,
                  device=device, batch_size=current_batch_size(dl), n_train=dataset_len(dl),
                  during_run=lambda: _refusing_fit(learn))


# the events of a training step that can change what its gradients are (before_step: what the step does with them)
_STEP_EVENTS = ("before_train", "before_batch", "after_pred", "after_loss", "before_backward", "after_backward",
                "before_step")


def unrun_callbacks_warning(learn: Learner) -> str | None:
    """The warning that names the Learner's callbacks that would shape a training step but do not run in the
    finder's (None when there are none).

    Without the warning MixUp's mixed batches, GradientAccumulation's bigger steps or a `before_batch` that
    reshapes the input would be silently left out of the measurement. fastai's own bookkeeping, MixedPrecision
    (followed through `amp`), GradientClip (applied after the gradients are read) and gns_widget's callbacks
    change nothing the finder measures.
    """
    from fastai.callback.core import TrainEvalCallback
    from fastai.callback.fp16 import MixedPrecision
    from fastai.callback.progress import ProgressCallback
    from fastai.callback.schedule import ParamScheduler
    from fastai.callback.training import GradientAccumulation, GradientClip
    from fastai.learner import CastToTensor, Recorder

    harmless = (TrainEvalCallback, Recorder, ProgressCallback, CastToTensor, MixedPrecision, GradientClip,
                ParamScheduler)
    unrun = [cb for cb in learn.cbs if not isinstance(cb, harmless) and not type(cb).__module__.startswith("gns_widget")
             and any(getattr(type(cb), e, None) is not None for e in _STEP_EVENTS)]
    if not unrun:
        return None
    names = ", ".join(type(cb).__name__ for cb in unrun)
    acc = next((cb for cb in unrun if isinstance(cb, GradientAccumulation)), None)
    extra = (f" GradientAccumulation steps once per {acc.n_acc} examples, but the advice is for the loader's "
             f"batch size {learn.dls.train.bs}." if acc is not None else "")
    return (f"bs_find runs plain training steps on learn.dls.train (learn.model, then learn.loss_func), not "
            f"learn.fit, so these callbacks of the Learner take no part in the measurement: {names}. Where one "
            "changes the batch, the prediction, the loss or the gradients, the noise scale is that of training "
            f"without it.{extra} Do the same change in bs_find's batch_fn= or loss_func= (either one silences "
            "this), or measure during real training with learn.fit(..., cbs=GNSCallback()), which runs them all")


class _FinderRunning(Callback):
    "Stops `learn.fit`, `validate` and `get_preds` (all fire before_fit) while a finder run trains the Learner's model."

    order = -100

    def before_fit(self):
        raise FinderBusyError("a batch-size finder run is training this Learner's model right now: fit would be undone "
                              "when the run restores the weights, and validate or get_preds would switch the model "
                              "to eval mode under the run. Stop the run first (its panel's Stop button or "
                              "widget.stop()) or wait for it to finish")


@contextmanager
def _refusing_fit(learn: Learner) -> Iterator[None]:
    cb = _FinderRunning()
    learn.add_cb(cb)
    try:
        yield
    finally:
        learn.remove_cb(cb)
