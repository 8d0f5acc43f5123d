"The `Target` interface and the batch plumbing shared by every kind of target."
from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Target", "BatchFn", "pair_batch", "to_device", "batch_size_of", "default_device",
           "check_device", "check_loss", "check_model", "user_stacklevel"]

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
    during_run: Callable[[], AbstractContextManager] = nullcontext  # held while a run trains (a Learner refuses fit)

    @property
    def loss_module(self) -> nn.Module | None:
        "The loss function when it is a module (it may hold parameters or buffers of its own), else None."
        return self.loss_func if isinstance(self.loss_func, nn.Module) else None

    def to_run_device(self) -> None:
        "Move the model and a loss module to the run's device, and the user's optimizer state along with them."
        for m in (self.model, self.loss_module):
            if m is not None:
                m.to(self.device)
        if self.user_opt is not None and self.user_opt.state:
            # load_state_dict casts each state tensor to its parameter's device (Adam's step stays where it must)
            self.user_opt.load_state_dict(self.user_opt.state_dict())

    def check_dataset_size(self) -> None:
        "Refuse a training set that fits in one batch: every batch is then the full gradient, with no noise to measure."
        if self.n_train and self.batch_size and self.n_train <= self.batch_size:
            raise ValueError(f"the training set ({self.n_train} examples) fits in one batch of {self.batch_size}: "
                             "every batch is the whole dataset, so there is no gradient noise to measure and no batch "
                             f"size to suggest beyond {self.n_train} (full-batch training). Measure with a smaller "
                             "batch size, or on more data")

    def batches(self, total: int, stop_event: threading.Event) -> Iterator[tuple[Any, Any, int, int]]:
        """(inputs, targets, batch size, epoch) on the run's device, `total` of them, until `stop_event` is set; the
        loader is cycled epoch after epoch. A loader that cannot tell its batch size learns it from the first batch."""
        batches = _cycle(self.train_dl)
        for _ in range(total):
            if stop_event.is_set():
                return
            epoch, batch = next(batches)
            inputs, targets = self.inputs_and_targets(to_device(batch, self.device))
            bs = batch_size_of(targets, inputs)
            if self.batch_size is None:
                self.batch_size = bs
            yield inputs, targets, bs, epoch

    def inputs_and_targets(self, batch: Any) -> tuple[Sequence[Any], Sequence[Any]]:
        "`split_batch(batch)`, checked: a batch_fn that returns anything but (inputs, targets) is named."
        out = self.split_batch(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(p, (tuple, list)) for p in out)):
            what = f"a {len(out)}-tuple" if isinstance(out, (tuple, list)) else type(out).__name__
            raise ValueError(f"batch_fn must return (inputs, targets), two tuples such as ((x,), (y,)), got {what}; "
                             "the model is called as model(*inputs) and the loss as loss_func(pred, *targets)")
        return out

    def fresh_loss(self, inputs: Sequence[Any], targets: Sequence[Any], amp: torch.dtype | None = None,
                   around_loss: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
        """The loss of one batch with the gradients cleared for its backward, the forward under autocast when `amp`;
        `around_loss()` is held while the loss is computed from the prediction (per-example norms follow it)."""
        self.model.zero_grad(set_to_none=True)
        if self.loss_module is not None:
            self.loss_module.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            pred = self.model(*inputs)
            with around_loss():
                return _checked_loss(self.loss_func, pred, targets)


def _cycle(dl: Any) -> Iterator[tuple[int, Any]]:
    "(epoch, batch) from `dl`, epoch after epoch (a fresh iterator each epoch, as a training loop does)."
    epoch, first_epoch_len = 0, None
    while True:
        n = 0
        for b in dl:
            n += 1
            yield epoch, b
        if n == 0 and first_epoch_len:
            raise ValueError(f"train_dl was exhausted after {first_epoch_len} batches and yields nothing on a second "
                             "pass: it is a one-shot iterator (a generator?). Pass a DataLoader or a list of "
                             f"batches, or num_it <= {first_epoch_len}")
        if n == 0:
            raise ValueError("train_dl yielded no batches: give it a non-empty dataset (and drop_last=False if the "
                             "dataset is smaller than one batch); a generator can only be iterated once")
        first_epoch_len = first_epoch_len or n
        epoch += 1


def _checked_loss(loss_func: Callable, pred: Any, targets: Sequence[Any]) -> torch.Tensor:
    """`loss_func(pred, *targets)`, with the mismatches of a first run named instead of surfacing deep in autograd:
    a model that returns a tuple, dict or output object, a loss per example, a loss with no gradient."""
    try:
        loss = loss_func(pred, *targets)
    except (TypeError, AttributeError) as e:
        if isinstance(pred, torch.Tensor):
            raise
        raise ValueError(f"loss_func failed on the model's output, a {type(pred).__name__} rather than a tensor ({e}). "
                         "It is called as loss_func(model(*inputs), *targets): pass one that picks the prediction, "
                         f"e.g. loss_func=lambda out, y: nn.functional.cross_entropy({_picked(pred)}, y)") from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_func must return the batch's mean loss as one number (a scalar tensor), got {what}: "
                         "use reduction='mean' (the default), or end a per-example loss with .mean()")
    if not loss.requires_grad:
        raise ValueError("loss_func returned a loss with no gradient to the model's trainable parameters: is it a "
                         "metric (accuracy), or is the prediction detached before it (.detach(), .item(), .numpy(), "
                         "torch.no_grad in the forward)?")
    return loss


def _picked(pred: Any) -> str:
    "How a loss would pick the prediction out of a model's output, for the error's example."
    if isinstance(pred, (tuple, list)):
        return "out[0]"
    if isinstance(pred, dict) and pred:
        return f"out[{next(iter(pred))!r}]"
    return "out.logits" if hasattr(pred, "logits") else "out.<prediction>"


def pair_batch(batch: Any) -> tuple[tuple, tuple]:
    "The default batch_fn: batches are (x, y) pairs."
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0],), (batch[1],)
    if isinstance(batch, dict) and batch:  # Hugging Face style: name the keys in the example to copy
        keys = list(batch)
        y = next((k for k in keys if str(k).lower() in _TARGET_KEYS), keys[-1])
        xs = ", ".join(f"b[{k!r}]" for k in keys if k != y)
        raise ValueError(f"expected each batch to be an (x, y) pair, got a dict with keys {keys}: pass batch_fn to say "
                         f"which are the model's inputs and which the loss's targets, e.g. batch_fn=lambda b: "
                         f"(({xs},), (b[{y!r}],))")
    kind = f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ValueError(f"expected each batch to be an (x, y) pair, got {kind}: pass batch_fn=lambda b: "
                     "((inputs...), (targets...)) to say how to split it")


_TARGET_KEYS = {"y", "label", "labels", "target", "targets"}


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def batch_size_of(*parts: Sequence[Any]) -> int:
    """Examples in a batch: the leading dimension of its first tensor (targets first, then inputs).

    A 0-d target means the "batch" is one example (a loader with batch_size=None): its inputs'
    leading dimension would be a feature count, so that is refused rather than misread.
    """
    for part in parts:
        for t in part:
            if isinstance(t, torch.Tensor) and t.ndim == 0 and part is parts[0]:
                raise ValueError("the batch's target is a single value (0-d tensor): each item is one example, not "
                                 "a batch (a DataLoader with batch_size=None?). Use a loader that yields batches, "
                                 "e.g. DataLoader(dataset, batch_size=32, shuffle=True)")
            if isinstance(t, torch.Tensor) and t.ndim > 0:
                return t.shape[0]
    raise ValueError("cannot tell the batch size: no tensor with a batch dimension in the batch")


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
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError("the model has tensors on the meta device (no data): load or initialise its weights "
                         "before measuring (e.g. model.to_empty(device='cpu') and load_state_dict)")


def check_loss(loss_func: Any) -> None:
    "A loss summed over the batch grows its gradient with the batch size, one per example is no gradient: means only."
    reduction = getattr(loss_func, "reduction", "mean")
    if reduction in ("sum", "none"):
        raise ValueError(f"loss_func must average over the batch (reduction='mean'), not reduction={reduction!r}: the "
                         "noise scale is defined for mean gradients")


def check_device(device: Any) -> torch.device:
    """`device` as a torch.device the run can use, checked before the model is touched.

    A device the model cannot come back from ('meta': no data) or one this machine lacks would
    otherwise fail halfway, with the model moved.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from e
    if device.type == "meta":
        raise ValueError("device='meta' holds no data, so nothing can be trained or restored there: use 'cpu', "
                         "'cuda' or 'mps'")
    try:
        torch.empty(1, device=device)
    except Exception as e:  # e.g. "Torch not compiled with CUDA enabled", an invalid device index
        raise ValueError(f"device={str(device)!r} is not usable on this machine ({e}); None picks cuda, mps or cpu") \
            from e
    return device


def user_stacklevel() -> int:
    "The `stacklevel` for a warning raised by our caller that points at the user's line (outside gns_widget, fastcore)."
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("gns_widget", "fastcore"):
        frame, level = frame.f_back, level + 1
    return level
