"""One finder run on a daemon thread, reporting to the panel at a bounded rate.

The engine calls `on_update` once per estimate, which can be hundreds of times a second
on a small model; sending a widget message for each would flood the frontend. The
listener keeps every record but only refreshes the view when `interval` seconds have
passed, and the runner always refreshes once more at the end so the final state shows.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..engine import bs_find
from ..result import GNSRecord, GNSResult

__all__ = ["Runner", "ThrottledListener"]


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
    """Runs `bs_find` on a daemon thread; `done(result, error)` is called on that thread when it ends.

    A daemon thread never keeps the kernel from exiting, and `stop()` ends a run at its next step.
    """

    def __init__(self):
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: GNSResult | None = None
        self.error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, args: tuple, kwargs: dict[str, Any], listener: ThrottledListener,
              done: Callable[[GNSResult | None, BaseException | None], None]) -> None:
        self.stop_event = threading.Event()
        self.result, self.error = None, None

        def work() -> None:
            try:
                self.result = bs_find(*args, on_update=listener, stop_event=self.stop_event, **kwargs)
            except Exception as e:  # shown in the panel: a worker has nobody else to tell
                self.error = e
            done(self.result, self.error)

        self.thread = threading.Thread(target=work, name="gns-widget-run", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        "Block until the run ends (True) or `timeout` seconds pass (False)."
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running
