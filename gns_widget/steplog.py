"""`StepLog`: an adaptive run's per-step epoch, batch size, lr and progress, in typed arrays.

A run of a million optimizer steps is an ordinary GPU training. As a list of tuples the log took about 190 bytes
a step (190 MB), and a live view's snapshot of it, a Python loop over every row, took 1.5 s with the GIL held,
several times a second: the view would have slowed the training it shows. Here a step is 24 bytes and a snapshot
is four buffer copies (milliseconds).
"""
from __future__ import annotations

from array import array
from collections.abc import Iterator

import numpy as np

__all__ = ["StepLog"]

Row = tuple[int, int, int, float, float]  # step (1-based), epoch, batch size, lr, pct
_DTYPES = {"q": np.int64, "d": np.float64}


class StepLog:
    """Appended to by the training loop, one row per optimizer step; read as a sequence of (step, epoch, bs, lr,
    pct) tuples or, whole, as numpy columns (`columns`), safely while another thread appends."""

    def __init__(self):
        self._epoch, self._bs = array("q"), array("q")
        self._lr, self._pct = array("d"), array("d")

    def append(self, epoch: int, bs: int, lr: float, pct: float) -> None:
        # pct last: a reader on another thread takes the shortest column, so it never sees a half-written row
        self._epoch.append(epoch)
        self._bs.append(bs)
        self._lr.append(lr)
        self._pct.append(pct)

    def __len__(self) -> int:
        return len(self._pct)

    def __getitem__(self, i: int) -> Row:
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"step log index {i} out of range for {n} steps")
        return j + 1, self._epoch[j], self._bs[j], self._lr[j], self._pct[j]

    def __iter__(self) -> Iterator[Row]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepLog):
            return NotImplemented
        return (self._epoch, self._bs, self._lr, self._pct) == (other._epoch, other._bs, other._lr, other._pct)

    def columns(self) -> dict[str, np.ndarray]:
        """Copies of the columns as numpy arrays: step (1-based), epoch, bs, lr, pct. Each array is sliced (a copy
        made with the GIL held) before numpy reads it, so an append on the training thread never meets a buffer
        that numpy still holds."""
        n = len(self)
        epoch, bs, lr, pct = (np.frombuffer(a[:n], dtype=_DTYPES[a.typecode])
                              for a in (self._epoch, self._bs, self._lr, self._pct))
        return dict(step=np.arange(1, n + 1), epoch=epoch, bs=bs, lr=lr, pct=pct)

    def __repr__(self) -> str:
        return f"StepLog({len(self)} steps)"
