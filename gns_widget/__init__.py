"""gns_widget: find the largest useful batch size from the gradient noise scale (McCandlish et al. 2018).

    from gns_widget import bs_find
    res = bs_find(model, train_dl, nn.CrossEntropyLoss())   # or learn.bs_find() with fastai
    res.suggested_bs, res.noise_scale, res.plot()
"""
from . import learner  # noqa: F401  (patches Learner.bs_find)
from .callback import GNSCallback
from .engine import bs_find
from .estimator import NoiseScaleEstimator
from .guard import FinderBusyError
from .loaders import apply_batch_size
from .result import GNSRecord, GNSResult
from .widget import GNSWidget

__all__ = ["bs_find", "NoiseScaleEstimator", "GNSRecord", "GNSResult", "GNSCallback", "apply_batch_size",
           "GNSWidget", "FinderBusyError"]
__version__ = "0.1.0"
