"""One finder run per model at a time.

Two runs on one model (a panel cell re-run during a run, two panels, `bs_find` in a thread
while the panel runs) would train the same weights at once and each restore its own snapshot
over the other's. Every run (`bs_find`, the panel's, the memory probe) claims its model here
first; a second claim is refused with `FinderBusyError`, which names the run holding the
model and how to stop it. `active_run(model)` lets a new panel find an old run and stop it.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

__all__ = ["FinderBusyError", "RunInfo", "active_run", "claim"]


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
