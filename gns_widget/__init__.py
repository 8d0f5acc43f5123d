"""gns_widget: find the largest useful batch size from the gradient noise scale (McCandlish et al. 2018).

    from gns_widget import bs_find
    res = bs_find(model, train_dl, nn.CrossEntropyLoss())   # or learn.bs_find() with fastai
    res.suggested_bs, res.noise_scale, res.plot()

`import gns_widget` costs torch alone: every name below is imported from its module when first used
(PEP 562), so fastai, ipywidgets and bqplot load only with the parts that need them. `Learner.bs_find` and
`Learner.bs_find_widget` are put on fastai's Learner as soon as fastai is imported, before or after this
package (see `gns_widget.learner`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import learner as _learner
from .estimator import NoiseScaleEstimator

if TYPE_CHECKING:
    from .adaptive_fastai import AdaptiveBatchSize
    from .adaptive_torch import AdaptiveLoader
    from .advice import BatchAdvice
    from .callback import GNSCallback
    from .ddp import DDPNoiseScale
    from .engine import bs_find
    from .guard import FinderBusyError
    from .interval import AutoStop
    from .loaders import apply_batch_size
    from .memory import max_batch_size
    from .per_example import PerExampleNorms
    from .result import GNSRecord, GNSResult
    from .throughput import Throughput, measure_throughput
    from .widget import AdaptiveView, GNSWidget

_learner.install()

# public name -> the module that defines it, imported on first use
_LAZY = {
    "bs_find": ".engine",
    "GNSRecord": ".result",
    "GNSResult": ".result",
    "GNSCallback": ".callback",      # fastai
    "AdaptiveBatchSize": ".adaptive_fastai",  # fastai
    "AdaptiveLoader": ".adaptive_torch",
    "apply_batch_size": ".loaders",
    "GNSWidget": ".widget",          # ipywidgets, bqplot
    "AdaptiveView": ".widget",       # ipywidgets, bqplot
    "FinderBusyError": ".guard",
    "BatchAdvice": ".advice",
    "AutoStop": ".interval",
    "DDPNoiseScale": ".ddp",
    "max_batch_size": ".memory",
    "PerExampleNorms": ".per_example",
    "measure_throughput": ".throughput",
    "Throughput": ".throughput",
}

__all__ = ["bs_find", "NoiseScaleEstimator", "GNSRecord", "GNSResult", "GNSCallback", "apply_batch_size",
           "GNSWidget", "FinderBusyError", "BatchAdvice", "AutoStop", "DDPNoiseScale", "max_batch_size",
           "PerExampleNorms", "measure_throughput", "Throughput", "AdaptiveBatchSize", "AdaptiveLoader",
           "AdaptiveView"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # an AttributeError lets `from gns_widget import engine` import the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
