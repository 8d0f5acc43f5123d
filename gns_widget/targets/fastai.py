"""fastai: a `Learner` as a finder target.

`bs_find` on a Learner builds its own optimizer with the Learner's `opt_func`, so the
Learner's optimizer and its state are never touched; batches come from `dls.train`
with all its transforms, split into inputs and targets with `dls.n_inp` as fastai does.
While a run trains the Learner's model, `learn.fit` on it is refused (its training would be
undone when the run restores the weights).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastai.callback.core import Callback
from fastai.learner import Learner

from ..guard import FinderBusyError
from ..loaders import current_batch_size, dataset_len
from .base import BatchFn, Target, check_device, check_model, default_device
from .torch import module_target

__all__ = ["learner_target"]


def learner_target(learn: Learner, *, train_dl: Any = None, loss_func: Any = None, opt: Any = None,
                   device: Any = None, batch_fn: BatchFn | None = None) -> Target:
    check_model(learn.model)
    dl = train_dl if train_dl is not None else learn.dls.train
    n_inp = getattr(learn.dls, "n_inp", None)

    def split(b):
        i = n_inp if n_inp is not None else (1 if len(b) == 1 else len(b) - 1)
        return b[:i], b[i:]

    device = check_device(device if device is not None else (learn.dls.device or default_device()))
    if opt is not None:  # the user's own optimizer: the same rules as for a plain module
        tgt = module_target(learn.model, dl, loss_func or learn.loss_func, opt=opt, device=device,
                            batch_fn=batch_fn or split)
        tgt.during_run = lambda: _refusing_fit(learn)
        return tgt
    return Target(model=learn.model, train_dl=dl, loss_func=loss_func or learn.loss_func,
                  split_batch=batch_fn or split,
                  make_opt=lambda lr: learn.opt_func(learn.splitter(learn.model), lr=lr), user_opt=None,
                  device=device, batch_size=current_batch_size(dl), n_train=dataset_len(dl),
                  during_run=lambda: _refusing_fit(learn))


class _FinderRunning(Callback):
    "Stops `learn.fit` before it starts while a finder run is training this Learner's model."

    order = -100

    def before_fit(self):
        raise FinderBusyError("a batch-size finder run is training this Learner's model right now; fitting at the "
                              "same time would be undone when the run restores the weights. Stop the run first "
                              "(its panel's Stop button or widget.stop()) or wait for it to finish")


@contextmanager
def _refusing_fit(learn: Learner) -> Iterator[None]:
    cb = _FinderRunning()
    learn.add_cb(cb)
    try:
        yield
    finally:
        learn.remove_cb(cb)
