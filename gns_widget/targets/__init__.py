"""What a finder run trains, behind one small interface.

A `Target` gives the engine a model, an iterable of batches, a loss, a way to split a
batch into inputs and targets, and a way to build the run's optimizer. `as_target`
turns a fastai `Learner` or a plain `nn.Module` + loader into one.

fastai is imported only for a Learner: `.fastai` loads inside `as_target` (or on first use of its names here,
PEP 562), and an object can only be a Learner once `fastai.learner` has been imported.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any
from weakref import WeakKeyDictionary

from ..loaders import shuffles
from .base import Target, user_stacklevel
from .torch import module_target

__all__ = ["Target", "as_target"]


def __getattr__(name: str) -> Any:
    if name in ("learner_target", "unrun_callbacks_warning"):
        from . import fastai

        return getattr(fastai, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_learner(obj: Any) -> bool:
    "Whether `obj` is a fastai Learner, without importing fastai (no Learner exists before it is imported)."
    module = sys.modules.get("fastai.learner")
    return module is not None and isinstance(obj, getattr(module, "Learner", ()))


def as_target(target: Any, train_dl: Any = None, loss_func: Any = None, *, opt: Any = None,
              device: Any = None, batch_fn: Any = None, measuring: bool = True) -> Target:
    """A `Target` for a fastai `Learner` or for an `nn.Module` with its `train_dl` and `loss_func`.

    `measuring`: the target is for a noise-scale measurement (not a memory probe), so warn about what would
    silently bias it: a loader that does not shuffle, a Learner's callbacks that the run's steps leave out.
    """
    from torch import nn

    is_learner = _is_learner(target)
    if is_learner:
        from .fastai import learner_target

        tgt = learner_target(target, train_dl=train_dl, loss_func=loss_func, opt=opt, device=device,
                             batch_fn=batch_fn)
    elif isinstance(target, nn.Module):
        tgt = module_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn)
    else:
        raise TypeError(f"target must be a fastai Learner or a torch nn.Module, got {type(target).__name__}")
    if not measuring:
        return tgt
    if is_learner and batch_fn is None and loss_func is None:  # either: the step was made to match
        from .fastai import unrun_callbacks_warning

        _warn_once(target, unrun_callbacks_warning(target))
    if shuffles(tgt.train_dl) is False:
        # the estimator's batches are random draws from the training set: a fixed order (sorted, grouped or
        # time-ordered data) biases it, and the same few windows repeat every epoch
        _warn_once(tgt.train_dl, "train_dl does not shuffle: the noise scale assumes every batch is a random draw "
                   "from the training set, so batches in a fixed order (sorted, grouped or time-ordered data) bias "
                   "it, and the same windows come back every epoch. Measure on the shuffled loader you train with: "
                   "DataLoader(dataset, batch_size=..., shuffle=True), in fastai too")
    return tgt


# the measurement warnings already given, by the object they are about (a loader, a Learner)
_WARNED: WeakKeyDictionary[Any, set[str]] = WeakKeyDictionary()


def _warn_once(about: Any, message: str | None) -> None:
    """Give a measurement warning once per object it is about, as Python gives one once per line of code.

    The panel builds its target when it is made, where the warning shows under the cell, and again on every
    Start, from a worker thread whose output lands wherever the kernel puts it: said once is enough.
    """
    if message is None:
        return
    try:
        seen = _WARNED.setdefault(about, set())
    except TypeError:  # not weakly referenceable or not hashable: say it every time
        seen = set()
    if message not in seen:
        seen.add(message)
        warnings.warn(message, stacklevel=user_stacklevel())
