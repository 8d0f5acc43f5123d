"A plain PyTorch model trained on a `torch.utils.data.DataLoader` (or any re-iterable of batches)."
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..loaders import current_batch_size, dataset_len
from .base import BatchFn, Target, check_device, check_loss, check_model, default_device, pair_batch

__all__ = ["module_target"]


def module_target(model: nn.Module, train_dl: Any, loss_func: Callable | None, *, opt: Any = None,
                  device: Any = None, batch_fn: BatchFn | None = None) -> Target:
    if train_dl is None:
        raise ValueError("train_dl is required when target is an nn.Module (a DataLoader of (x, y) batches)")
    if loss_func is None:
        raise ValueError("loss_func is required when target is an nn.Module, e.g. nn.CrossEntropyLoss()")
    check_loss(loss_func)
    check_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if opt is None:
        user_opt, make_opt = None, lambda lr: torch.optim.SGD(params, lr=lr)
    elif isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "param_groups"):
        user_opt, make_opt = opt, lambda lr: _with_lr(opt, lr)
    elif callable(opt):
        user_opt, make_opt = None, lambda lr: _with_lr(opt(params), lr)
    else:
        raise ValueError(f"opt must be an optimizer, a factory params -> optimizer, or None; got {opt!r}")
    return Target(model=model, train_dl=train_dl, loss_func=loss_func, split_batch=batch_fn or pair_batch,
                  make_opt=make_opt, user_opt=user_opt,
                  device=check_device(device) if device is not None else _device_for(model),
                  batch_size=current_batch_size(train_dl), n_train=dataset_len(train_dl))


def _device_for(model: nn.Module) -> torch.device:
    "A DDP replica stays where the user put it (each rank its own GPU); otherwise cuda, then mps, then cpu."
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return next(model.parameters()).device
    return default_device()


def _with_lr(opt: Any, lr: float) -> Any:
    """The finder's lr becomes the largest group's for the run; the other groups keep their ratio to it.

    Discriminative lrs (a body at 1e-5 under a head at 1e-3, a group held still at lr 0) are part of how the
    user trains: flattened to one lr, the mock run would train the body 100x too fast. The user's values come
    back on restore.
    """
    if not hasattr(opt, "param_groups"):
        raise ValueError(f"opt: the factory returned {type(opt).__name__}, not an optimizer; it must return one, "
                         "e.g. opt=lambda params: torch.optim.Adam(params, lr=1e-3)")
    top = max((float(g["lr"]) for g in opt.param_groups), default=0.0)
    for group in opt.param_groups:
        group["lr"] = lr * float(group["lr"]) / top if top > 0 else lr
    return opt
