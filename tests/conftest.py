import os

# One intra-op thread per test process, as the benchmarks use (benchmarks/common.py). On a small shared machine
# torch's default (one thread per core) spins threads that other jobs have descheduled: the fastai and advice tests
# ran 4x slower in wall time, with 4x the CPU time, than on one thread. Set before torch is imported, so the
# subprocesses the tests start (notebook kernels, DDP ranks, benchmark scripts) inherit it; an explicit
# OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The subprocesses the tests start (notebook kernels, JupyterLab's kernels, scripts) import the checkout under
# test, as this process does (pytest's pythonpath), not whichever gns_widget the venv has installed: a venv shared
# by several checkouts (git worktrees) installs one of them.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from gns_widget.datasets import digits_loaders  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file


@pytest.fixture
def digits_dl():
    torch.manual_seed(0)
    return digits_loaders(bs=32)[0]


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.BatchNorm1d(32), nn.Linear(32, 10))


def pytest_collection_modifyitems(items):
    "A browser test drives JupyterLab end to end: it is slow too (`make test-fast` leaves out `-m slow`)."
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(pytest.mark.slow)
