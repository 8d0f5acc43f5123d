"""`StepLog`: an adaptive run's per-step log, small enough for a million steps and safe to read while it grows."""
import threading
import tracemalloc

import numpy as np
import pytest

from gns_widget.steplog import StepLog


def test_it_reads_as_rows_and_as_columns():
    log = StepLog()
    for i in range(5):
        log.append(i // 2, 16 * (1 + i // 3), 0.1 / (i + 1), (i + 1) / 5)
    assert len(log) == 5 and log[0] == (1, 0, 16, 0.1, 0.2) and log[-1] == (5, 2, 32, 0.02, 1.0)
    assert list(log)[2] == log[2] and bool(log) and not StepLog()
    cols = log.columns()
    assert cols["step"].tolist() == [1, 2, 3, 4, 5] and cols["bs"].tolist() == [16, 16, 16, 32, 32]
    assert cols["lr"].dtype == np.float64 and cols["epoch"].dtype == np.int64
    other = StepLog()
    for row in log:
        other.append(*row[1:])
    assert other == log and other != StepLog()
    with pytest.raises(IndexError, match="out of range"):
        log[5]


def test_a_million_steps_fit_in_a_few_dozen_megabytes():
    tracemalloc.start()
    try:
        log = StepLog()
        for i in range(1_000_000):
            log.append(i // 1000, 64, 1e-3, i / 1e6)
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert size < 40e6  # 24 bytes a step and the arrays' growth room; a list of tuples took ~190 MB
    cols = log.columns()
    assert len(cols["pct"]) == 1_000_000 and cols["epoch"][-1] == 999


def test_columns_read_while_another_thread_appends_are_whole_rows():
    log, done, errors = StepLog(), threading.Event(), []

    def train():
        try:
            for i in range(200_000):
                log.append(i, 2 * i, float(i), float(i))
        except Exception as e:  # an append that met a buffer still held by a reader
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=train)
    t.start()
    reads = 0
    while not done.is_set() or reads == 0:
        cols = log.columns()
        n = len(cols["step"])
        assert all(len(c) == n for c in cols.values())
        assert (cols["bs"] == 2 * cols["epoch"]).all() and (cols["pct"] == cols["epoch"]).all()
        reads += 1
    t.join()
    assert not errors and len(log) == 200_000 and reads > 1
