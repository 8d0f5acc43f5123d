"""The Jupyter panel: `GNSWidget`, and `Learner.bs_find_widget` for fastai."""
from .controller import GNSWidget
from .fastai import bs_find_widget

__all__ = ["GNSWidget", "bs_find_widget"]
