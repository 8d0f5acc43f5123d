"""The Jupyter panel: `GNSWidget`, and `Learner.bs_find_widget` for fastai."""
from .fastai import bs_find_widget
from .panel import GNSWidget

__all__ = ["GNSWidget", "bs_find_widget"]
