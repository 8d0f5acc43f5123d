"The `Target` interface and the batch plumbing shared by every kind of target."
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Target", "BatchFn", "pair_batch", "to_device", "batch_size_of", "loader_len", "default_device"]

# batch -> (inputs, targets); the model is called as model(*inputs), the loss as loss_func(pred, *targets)
BatchFn = Callable[[Any], tuple[Sequence[Any], Sequence[Any]]]


@dataclass
class Target:
    model: nn.Module
    train_dl: Iterable  # the user's loader, iterated as is
    loss_func: Callable
    split_batch: BatchFn
    make_opt: Callable[[float], Any]  # lr -> the optimizer used for the run
    user_opt: Any  # an optimizer of the user's that the run steps (snapshot and restored), or None
    device: torch.device
    batch_size: int | None  # the loader's current batch size, when it can tell
    n_train: int | None  # training examples, to cap the suggestion

    def fresh_loss(self, inputs: Sequence[Any], targets: Sequence[Any], amp: torch.dtype | None = None) -> torch.Tensor:
        "The loss of one batch with the gradients cleared for its backward, the forward under autocast when `amp`."
        self.model.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            return self.loss_func(self.model(*inputs), *targets)


def pair_batch(batch: Any) -> tuple[tuple, tuple]:
    "The default batch_fn: batches are (x, y) pairs."
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0],), (batch[1],)
    kind = f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ValueError(f"expected each batch to be an (x, y) pair, got {kind}: pass batch_fn=lambda b: "
                     "((inputs...), (targets...)) to say how to split it")


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def batch_size_of(*parts: Sequence[Any]) -> int:
    "Examples in a batch: the leading dimension of its first tensor (targets first, then inputs)."
    for part in parts:
        for t in part:
            if isinstance(t, torch.Tensor) and t.ndim > 0:
                return t.shape[0]
    raise ValueError("cannot tell the batch size: no tensor with a batch dimension in the batch")


def loader_len(dl: Any) -> int | None:
    try:
        return len(dl)
    except TypeError:
        return None


def default_device() -> torch.device:
    "cuda, then mps, then cpu."
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_model(model: nn.Module) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to measure")
