"""fastai's `Learner.bs_find` (next to `Learner.lr_find`) and `Learner.bs_find_widget`, without importing fastai.

`import gns_widget` must not pay for fastai, yet a fastai user expects `learn.bs_find()` after
`import gns_widget`, whichever of the two was imported first. So the two methods are put on `Learner`
the moment `fastai.learner` exists:

- fastai already imported: `install()` (run by `import gns_widget`) patches `Learner` at once;
- fastai imported later: `install()` leaves a one-shot finder on `sys.meta_path` that lets the normal
  finders load `fastai.learner` and patches `Learner` right after the module has run, then removes itself.

The patch only sets two attributes: nothing is imported while fastai is half-way through its own imports.
The methods import the engine (and the panel) when called. The patch lives in a module of its own,
above the engine, so nothing below the engine imports it.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastai.learner import Learner

    from .result import GNSResult
    from .widget.panel import GNSWidget

__all__ = ["bs_find", "bs_find_widget", "install", "patch_learner"]

FASTAI_LEARNER = "fastai.learner"


def bs_find(self: Learner, lr: float = 1e-3, num_it: int | str | None = None, n_batch: int = 20,
            beta: float | None = None, show_plot: bool = True, **kwargs) -> GNSResult:
    """Measure the gradient noise scale and suggest a batch size, like `lr_find` suggests a learning rate.

    Trains a mock run of `num_it` small batches (one epoch by default) and puts the
    model, its optimizer and every RNG back exactly as they were. `lr=0` measures at the
    current weights without training; `beta=None` averages every estimate equally there and
    smooths with 0.99 while training. Other keyword arguments go to `gns_widget.bs_find`.
    """
    from .engine import bs_find as _bs_find

    res = _bs_find(self, lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, **kwargs)
    if show_plot and len(res.history):
        res.plot()
    return res


def bs_find_widget(self: Learner, **kwargs: Any) -> GNSWidget:
    """A `GNSWidget` for this Learner: display it, press Start (or call `.start()`), then Apply.

    Keyword arguments are those of `GNSWidget` (and so of `bs_find`): `lr`, `num_it`,
    `n_batch`, `beta`, `method`, ...; Apply sets `dls.train.bs` in place.
    """
    from fastai.learner import Learner

    from .widget import fastai  # noqa: F401  (loads the panel, whose own `bs_find_widget` replaces this one)

    return Learner.bs_find_widget(self, **kwargs)


def patch_learner(learner_cls: type) -> None:
    "Put `bs_find` and `bs_find_widget` on fastai's `Learner` (the panel's own `bs_find_widget` is kept if set)."
    for f in (bs_find, bs_find_widget):
        current = learner_cls.__dict__.get(f.__name__)
        if current is not None and getattr(current, "__module__", None) != __name__:
            continue  # already patched by its own module (gns_widget.widget.fastai): keep it
        setattr(learner_cls, f.__name__, f)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    "A one-shot finder: `fastai.learner` is found by the other finders and `Learner` is patched once it has run."

    def __init__(self) -> None:
        self._finding = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != FASTAI_LEARNER or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)  # the next finders (this one declines while finding)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module: Any) -> None:
            exec_module(module)
            _uninstall(self)
            patch_learner(module.Learner)

        spec.loader.exec_module = exec_then_patch  # this one loader object, for this one import
        return spec


def _uninstall(finder: _PatchOnImport) -> None:
    with contextlib.suppress(ValueError):  # another thread's import of fastai.learner removed it first
        sys.meta_path.remove(finder)


def install() -> None:
    "Patch `Learner` now if fastai is imported, else as soon as `fastai.learner` is imported (run once)."
    module = sys.modules.get(FASTAI_LEARNER)
    if module is not None and hasattr(module, "Learner"):
        patch_learner(module.Learner)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
