"""The notebook's ■ (interrupt the kernel) stops a run started with the panel's Start button.

While a cell executes, ipykernel raises KeyboardInterrupt in it (`Runner.wait` turns that into a stop).
Between cells the kernel ignores SIGINT: it installs `SIG_IGN` at start-up and, around every message
it handles, saves the handler in `kernel.saved_sigint_handler`, installs Python's default one, and puts
the saved one back. So the interrupt of an idle kernel, the only way ■ reaches a run started from the
button, was lost and the run went on. `stop_on_kernel_interrupt` makes the handler the kernel puts back
one that stops every panel run in progress, and then does what the kernel's own handler did (ignore).
Outside ipykernel (a script, a terminal IPython) nothing changes: Ctrl-C raises in the main thread.
"""
from __future__ import annotations

import signal
import threading
import weakref
from typing import Any

from .runner import Runner

__all__ = ["stop_on_kernel_interrupt", "on_sigint"]

_runners: weakref.WeakSet[Runner] = weakref.WeakSet()  # runs started from panels; the handler stops those running
STOP_REASON = "interrupted (kernel interrupt)"


class _StopRuns:
    "A SIGINT handler: stop the panels' runs, then hand the signal to the handler it replaced."

    def __init__(self, previous: Any):
        self.previous = previous

    def __call__(self, signum: int, frame: Any) -> None:
        on_sigint()
        if callable(self.previous):
            self.previous(signum, frame)


def on_sigint() -> int:
    "Stop every panel run in progress (at its next step; each restores its model); how many were stopped."
    stopped = 0
    for runner in list(_runners):
        if runner.running and not runner.stop_event.is_set():
            runner.stop(STOP_REASON)
            stopped += 1
    return stopped


def _kernel() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return getattr(shell, "kernel", None) if shell is not None else None


def stop_on_kernel_interrupt(runner: Runner, kernel: Any = None) -> bool:
    """Make the kernel's interrupt stop `runner` while it runs; False where there is no ipykernel to hook.

    Called on the kernel's main thread (a button handler or a cell), where ipykernel has saved the
    handler to restore once the message is handled: that saved handler is wrapped, once.
    """
    _runners.add(runner)
    kernel = kernel if kernel is not None else _kernel()
    if kernel is None or not hasattr(kernel, "saved_sigint_handler"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    saved = kernel.saved_sigint_handler
    if not isinstance(saved, _StopRuns):
        kernel.saved_sigint_handler = _StopRuns(saved)
    current = signal.getsignal(signal.SIGINT)  # idle now (called from a thread, a timer): install it at once
    if current in (signal.SIG_IGN, None):
        signal.signal(signal.SIGINT, kernel.saved_sigint_handler)
    return True
