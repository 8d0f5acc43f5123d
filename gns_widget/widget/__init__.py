"""The Jupyter panels: `GNSWidget` (the finder), `AdaptiveView` (the adaptive batch size, live during training),
and `Learner.bs_find_widget` for fastai."""
from .adaptive_view import AdaptiveView
from .controller import GNSWidget
from .fastai import bs_find_widget

__all__ = ["GNSWidget", "AdaptiveView", "bs_find_widget"]
