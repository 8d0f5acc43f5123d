"""fastai's `Learner.bs_find`, next to `Learner.lr_find`.

The patch lives in a module of its own, above the engine, so nothing below the engine imports it.
"""
from __future__ import annotations

from fastai.learner import Learner
from fastcore.basics import patch

from .engine import bs_find as _bs_find
from .result import GNSResult

__all__ = ["Learner"]


@patch
def bs_find(self: Learner, lr: float = 1e-3, num_it: int | str | None = None, n_batch: int = 20,
            beta: float | None = None, show_plot: bool = True, **kwargs) -> GNSResult:
    """Measure the gradient noise scale and suggest a batch size, like `lr_find` suggests a learning rate.

    Trains a mock run of `num_it` small batches (one epoch by default) and puts the
    model, its optimizer and every RNG back exactly as they were. `lr=0` measures at the
    current weights without training; `beta=None` averages every estimate equally there and
    smooths with 0.99 while training. Other keyword arguments go to `gns_widget.bs_find`.
    """
    res = _bs_find(self, lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, **kwargs)
    if show_plot and len(res.history):
        res.plot()
    return res
