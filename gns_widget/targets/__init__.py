"""What a finder run trains, behind one small interface.

A `Target` gives the engine a model, an iterable of batches, a loss, a way to split a
batch into inputs and targets, and a way to build the run's optimizer. `as_target`
turns a fastai `Learner` or a plain `nn.Module` + loader into one.
"""
from __future__ import annotations

from typing import Any

from .base import Target
from .fastai import learner_target
from .torch import module_target

__all__ = ["Target", "as_target"]


def as_target(target: Any, train_dl: Any = None, loss_func: Any = None, *, opt: Any = None,
              device: Any = None, batch_fn: Any = None) -> Target:
    "A `Target` for a fastai `Learner` or for an `nn.Module` with its `train_dl` and `loss_func`."
    from fastai.learner import Learner
    from torch import nn

    if isinstance(target, Learner):
        return learner_target(target, train_dl=train_dl, loss_func=loss_func, opt=opt, device=device,
                              batch_fn=batch_fn)
    if isinstance(target, nn.Module):
        return module_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn)
    raise TypeError(f"target must be a fastai Learner or a torch nn.Module, got {type(target).__name__}")
