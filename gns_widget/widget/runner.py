"""One finder run on a daemon thread, reporting to the panel at a bounded rate.

The engine calls `on_update` once per estimate, which can be hundreds of times a second
on a small model; sending a widget message for each would flood the frontend. The
listener keeps every record but only refreshes the view when `interval` seconds have
passed, and the runner always refreshes once more at the end so the final state shows.

The end of a run is signalled by an Event, never by `Thread.join`: on Python 3.11 a
KeyboardInterrupt that lands in `join` marks the still-running thread as finished, and
ipykernel then closes that thread's message socket (its next widget update fails with
`ZMQError: Socket operation on non-socket`). A kernel interrupt while `wait()` blocks
stops the run at its next step instead, waits for the model to be restored, and re-raises.
"""
from __future__ import annotations

import atexit
import itertools
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from ..engine import bs_find
from ..guard import active_run, claim
from ..result import GNSRecord, GNSResult

__all__ = ["Runner", "ThrottledListener", "OWNER", "runner_of"]

OWNER = "GNSWidget"  # how the guard names a panel's run in its "already running" error
_numbers = itertools.count(1)
_live: weakref.WeakSet[Runner] = weakref.WeakSet()  # runners with a run in progress


class ThrottledListener:
    "Collects records; calls `flush(records)` at most once per `interval` seconds."

    def __init__(self, flush: Callable[[list[GNSRecord]], None], interval: float = 0.25):
        self.flush, self.interval = flush, interval
        self.records: list[GNSRecord] = []
        self._last = -float("inf")
        self.flushes = 0

    def __call__(self, record: GNSRecord) -> None:
        self.records.append(record)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.flush_now()

    def flush_now(self) -> None:
        self.flushes += 1
        self.flush(list(self.records))


class Runner:
    """Runs `bs_find` on `model` on a daemon thread; `done(result, error)` is called on that thread when it ends.

    The thread claims `model` for the whole run (`guard.claim`), so a second panel or `bs_find`
    on the same model is refused. `stop(reason)` ends a run at its next step; `stop_reason`
    then says who stopped it (None: the Stop button or `stop()` without a reason).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.stop_event = threading.Event()
        self.finished = threading.Event()
        self.finished.set()  # no run yet
        self.thread: threading.Thread | None = None
        self.result: GNSResult | None = None
        self.error: BaseException | None = None
        self.stop_reason: str | None = None

    @property
    def running(self) -> bool:
        return not self.finished.is_set()

    def check_free(self) -> None:
        "Raise the guard's `FinderBusyError` (naming the holder) now if another run holds the model."
        with claim(self.model, OWNER):
            pass

    def start(self, args: tuple, kwargs: dict[str, Any], listener: ThrottledListener,
              done: Callable[[GNSResult | None, BaseException | None], None]) -> None:
        self.check_free()
        self.stop_event, self.finished = threading.Event(), threading.Event()
        self.result, self.error, self.stop_reason = None, None, None

        def work() -> None:
            try:
                try:
                    # the panel's claim; bs_find's own claim on this thread nests inside it
                    with claim(self.model, OWNER, self.stop_event):
                        self.result = bs_find(*args, on_update=listener, stop_event=self.stop_event, **kwargs)
                # shown in the panel: a worker has nobody else to tell. BaseException too: a sys.exit() in the
                # user's loss ends only this thread, and the panel would say "running" and wait() block forever
                except BaseException as e:
                    self.error = e
                done(self.result, self.error)
            finally:
                self.finished.set()
                _live.discard(self)

        # a unique name: the guard tells a nested claim from a second run by the thread's name
        self.thread = threading.Thread(target=work, name=f"GNSWidget run {next(_numbers)}", daemon=True)
        _live.add(self)
        self.thread.start()

    def stop(self, reason: str | None = None) -> None:
        if self.running and not self.stop_event.is_set():
            self.stop_reason = reason
        self.stop_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (True) or `timeout` seconds pass (False).

        A KeyboardInterrupt (the notebook's ■) stops the run, waits until its model is restored
        and is raised again; a second interrupt during that short wait gives up waiting.
        """
        try:
            return self.finished.wait(timeout)
        except KeyboardInterrupt:
            self.stop("interrupted (kernel interrupt)")
            self.finished.wait()
            raise

    def stop_and_wait(self, reason: str, timeout: float | None = None) -> bool:
        self.stop(reason)
        return self.finished.wait(timeout)


def runner_of(model: nn.Module) -> Runner | None:
    "The panel runner whose run holds `model` now, if the holder is a panel."
    held = active_run(model)
    if held is None or held.owner != OWNER:
        return None
    return next((r for r in list(_live) if r.model is model and r.running), None)


@atexit.register
def _stop_all() -> None:
    """Stop and wait for every run when the interpreter exits.

    A daemon thread still inside torch when Python finalizes aborts the process (SIGABRT);
    stopping at the next step and restoring first lets a script end cleanly.
    """
    for runner in list(_live):
        runner.stop_and_wait("the Python process is exiting", timeout=60)
