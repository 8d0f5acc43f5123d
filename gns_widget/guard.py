"""One finder run per model at a time.

Two runs on one model (a panel cell re-run during a run, two panels, `bs_find` in a thread
while the panel runs) would train the same weights at once and each restore its own snapshot
over the other's. Every run (`bs_find`, the panel's, the memory probe) claims its model here
first; a second claim is refused with `FinderBusyError`, which names the run holding the
model and how to stop it. `active_run(model)` lets a new panel find an old run and stop it.
`refuse_other_threads` refuses another thread's forward and zero_grad on a model while a run trains it.

While a run trains, `OtherSteps` refuses every optimizer step on the model but the run's own (and, through
`refuse_other_threads`, other threads' gradient work), and `WeightWatch` notices any other change of its
weights or train mode between the run's steps: the run stops rather than measure, and then undo, two trainings.
"""
from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["FinderBusyError", "RunInfo", "active_run", "claim", "refuse_other_threads", "OtherSteps", "WeightWatch"]


class FinderBusyError(RuntimeError):
    "Raised when a finder run is started on a model that another finder run is using."


@dataclass
class RunInfo:
    "Who holds a model: shown in the error, and used to stop that run."
    owner: str  # "bs_find", "GNSWidget", "max_batch_size", ...
    stop_event: threading.Event
    thread: str = field(default_factory=lambda: threading.current_thread().name)  # for people
    thread_id: int = field(default_factory=threading.get_ident)  # for the nesting check: names need not be unique
    started: float = field(default_factory=time.time)

    def describe(self) -> str:
        started = time.strftime("%H:%M:%S", time.localtime(self.started))
        return f"{self.owner} in thread {self.thread!r}, started at {started}"


_lock = threading.Lock()
_runs: weakref.WeakKeyDictionary[nn.Module, RunInfo] = weakref.WeakKeyDictionary()


def active_run(model: nn.Module) -> RunInfo | None:
    "The run that holds `model` now, or None."
    with _lock:
        return _runs.get(model)


@contextmanager
def claim(model: nn.Module, owner: str, stop_event: threading.Event | None = None) -> Iterator[RunInfo]:
    """Hold `model` for one run; raise `FinderBusyError` if another run holds it.

    A run that nests another on the same thread (bs_find's memory probe) passes through: it is
    part of the run that holds the model, not a second one.
    """
    with _lock:
        held = _runs.get(model)
        if held is not None and held.thread_id == threading.get_ident():
            nested = True
        elif held is not None:
            # `del w` leaves a panel's run going (the thread and the widget registry hold the panel): say how to stop it
            lost = ("; a panel no longer in a variable: building a new GNSWidget for this model stops its run"
                    if held.owner == "GNSWidget" else "")
            raise FinderBusyError(
                f"a finder run is already using this model ({held.describe()}): one run per model at a time. "
                "Stop it first (its panel's Stop button, widget.stop(), or set the stop_event you gave bs_find"
                f"{lost}), or wait for it to finish")
        else:
            nested = False
            held = RunInfo(owner, stop_event or threading.Event())
            _runs[model] = held
    try:
        yield held
    finally:
        if not nested:
            with _lock:
                if _runs.get(model) is held:
                    del _runs[model]


# ---------------------------------------------------------------- another thread's training, refused before it starts
_guards_lock = threading.Lock()
_guards: list[_GradientGuard] = []  # the live runs' guards (usually none or one)
_patched = False


class _GradientGuard:
    "One run's: which parameters it trains, on which thread, and what to call when another thread reaches for them."

    def __init__(self, model: nn.Module, refuse: Callable[[str], None]):
        self.model, self.ids, self.refuse = model, {id(p) for p in model.parameters()}, refuse
        self.thread_id = threading.get_ident()

    def check(self, what: str) -> None:
        if threading.get_ident() != self.thread_id:
            self.refuse(what)

    def remove(self) -> None:
        self._hook.remove()
        with _guards_lock:
            if self in _guards:
                _guards.remove(self)


def refuse_other_threads(model: nn.Module, refuse: Callable[[str], None]) -> _GradientGuard:
    """Until `.remove()`, call `refuse(what)` (which raises) on another thread's gradient work on `model`.

    That work is a forward pass with gradients enabled, `model.zero_grad()` or `zero_grad()` of a torch
    optimizer over its parameters: each is refused before it touches a gradient. A training loop in
    another cell that got as far as the run's gradients raced the run's backward: autograd's
    "modified by an inplace operation" error, and sometimes a segmentation fault in `zero_grad` that
    killed the kernel. Forwards under `no_grad`/`inference_mode` are not refused (they touch no gradient).
    The calling thread (the run's) is never refused.
    """
    guard = _GradientGuard(model, refuse)

    def forward_pre_hook(module: nn.Module, args: Any) -> None:
        # `module is model`: nn.DataParallel's replicas carry the hook too and run on its own threads
        if module is model and torch.is_grad_enabled():
            guard.check("a forward pass with gradients")

    guard._hook = model.register_forward_pre_hook(forward_pre_hook)
    _patch_zero_grad()
    with _guards_lock:
        _guards.append(guard)
    return guard


def _patch_zero_grad() -> None:
    "Wrap `Optimizer.zero_grad` and `Module.zero_grad` once: with no run live, the wrappers only read an empty list."
    global _patched
    with _guards_lock:
        if _patched:
            return
        _patched = True
    opt_zero, module_zero = torch.optim.Optimizer.zero_grad, nn.Module.zero_grad

    @functools.wraps(opt_zero)
    def optimizer_zero_grad(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if _guards:
            ids = {id(p) for group in self.param_groups for p in group["params"]}
            for guard in list(_guards):
                if not ids.isdisjoint(guard.ids):
                    guard.check("optimizer.zero_grad()")
        return opt_zero(self, *args, **kwargs)

    @functools.wraps(module_zero)
    def module_zero_grad(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if _guards:
            for guard in list(_guards):
                if self is guard.model or not guard.ids.isdisjoint(id(p) for p in self.parameters()):
                    guard.check("model.zero_grad()")
        return module_zero(self, *args, **kwargs)

    torch.optim.Optimizer.zero_grad = optimizer_zero_grad
    nn.Module.zero_grad = module_zero_grad


# ---------------------------------------------------------------- the run's own training, told from anyone else's
class WeightWatch:
    """Notices when something other than this run changes the model's weights or its train mode during the run.

    Training the same model in another cell (or thread) while the panel runs would be silently
    undone by the restore at the end, and mixes two trainings meanwhile. Every in-place change of
    a tensor bumps its version counter; the run's own optimizer steps are accounted for. An
    evaluation in another cell (`model.eval()`) would leave the rest of the run measuring in eval mode.
    """

    def __init__(self, model: torch.nn.Module, others: OtherSteps):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.others = others
        self.version = self._sum()
        self.model, self.training = model, model.training  # the mode the run set: eval elsewhere would measure eval

    def _sum(self) -> int:
        return sum(p._version for p in self.params)

    def step(self, opt: Any) -> None:
        "The run's own optimizer step."
        self.check()
        with self.others.own():
            opt.step()
        self.rebase()

    def rebase(self) -> None:
        """After the run's own forward and backward: what the model changed in them is its own doing
        (`nn.Embedding(max_norm=...)` renormalises its rows in place). Checked before each batch and step."""
        self.version = self._sum()

    def check(self) -> None:
        if self.others.refused is not None:
            thread, what = self.others.refused
            done = ("another optimizer stepped this model's weights during the run" if what == "step" else
                    f"another optimizer or training loop reached for this model during the run ({what})")
            raise RuntimeError(f"{done} (in thread {thread!r}: training in another cell?). It was refused with a "
                               "FinderBusyError where it was called, and this run stopped and put the weights back "
                               "as they were before it started: run the finder and your training one after the other")
        if self.model.training != self.training:
            raise RuntimeError("the model was switched to eval mode by something other than the finder during the "
                               "run (model.eval() or an evaluation in another cell or thread?): the rest of the run "
                               "would have measured it without dropout and with BatchNorm's running statistics, "
                               "another noise scale. The run stopped and put the model back as it was before it "
                               "started, its train/eval mode too: evaluate before or after the run")
        if self._sum() != self.version:
            raise RuntimeError("the model's weights were changed by something other than the finder during the run "
                               "(training in another cell or thread?). The run stopped and put the weights back as "
                               "they were before it started, so changes made meanwhile are undone: run the finder "
                               "and your training one after the other")


class OtherSteps:
    """While a run trains a model, refuses every optimizer step on its weights but the run's own.

    The weight watch sees in-place changes between the run's steps, but not one that lands during its forward and
    backward, which it must take for the model's own doing (`rebase`): a training loop in another cell would
    then be measured as if it were the run's, and undone at its end. torch calls global step hooks from every
    thread, so the other loop's first `opt.step()` fails in its own cell, before it changes anything.

    Its forward (with gradients) and zero_grad come before any step and race the run's backward on the same
    `.grad` tensors (autograd's in-place error, or a segmentation fault that kills the kernel): they are refused
    on any thread but the run's, before they touch a gradient (`guard.refuse_other_threads`).
    """

    def __init__(self, model: torch.nn.Module, held: RunInfo):
        self.model = model
        self.ids = {id(p) for p in model.parameters()}
        self.held = held
        self.refused: tuple[str, str] | None = None  # (the thread whose work was refused, what it was)
        self._local = threading.local()

    def __enter__(self) -> OtherSteps:  # on the run's thread: the one thread whose forward and zero_grad may run
        self._handle = register_optimizer_step_pre_hook(self._check)
        self._others = refuse_other_threads(self.model, self._refuse)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def release(self) -> None:
        "After the restore: the model is the user's again (the restore writes weights and gradients too)."
        if hasattr(self, "_others"):
            self._others.remove()

    def _refuse(self, what: str) -> None:
        "Another thread's forward or zero_grad on the model: refused in its own cell, and the run stops."
        self.refused = self.refused or (threading.current_thread().name, what)  # the first one says why the run stopped
        raise FinderBusyError(f"{what} refused: a finder run is training this model ({self.held.describe()}), and "
                              "training it from another cell at the same time would mix both trainings (the run puts "
                              "the weights back when it ends). The run stops now; train once it has ended, or stop it "
                              "first (its panel's Stop button, widget.stop())")

    @contextmanager
    def own(self) -> Iterator[None]:
        "The run's own step, on the run's thread."
        self._local.own = True
        try:
            yield
        finally:
            self._local.own = False

    def _check(self, opt: Any, args: Any, kwargs: Any) -> None:
        if getattr(self._local, "own", False):
            return
        if any(id(p) in self.ids for group in opt.param_groups for p in group["params"]):
            self.refused = self.refused or (threading.current_thread().name, "step")
            raise FinderBusyError(f"optimizer step refused: the model's weights would be changed by something other "
                                  f"than the finder during its run ({self.held.describe()}), and the run puts them "
                                  "back when it ends, so this training would be undone. The run stops now; train "
                                  "once it has ended, or stop it first (its panel's Stop button, widget.stop())")
