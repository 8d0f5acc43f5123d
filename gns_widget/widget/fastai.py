"`Learner.bs_find_widget`: the panel for a fastai Learner, next to `Learner.bs_find`."
from __future__ import annotations

from typing import Any

from fastai.learner import Learner
from fastcore.basics import patch

from .controller import GNSWidget

__all__ = ["bs_find_widget"]


@patch
def bs_find_widget(self: Learner, **kwargs: Any) -> GNSWidget:
    """A `GNSWidget` for this Learner: display it, press Start (or call `.start()`), then Apply.

    Keyword arguments are those of `GNSWidget` (and so of `bs_find`): `lr`, `num_it`,
    `n_batch`, `beta`, `method`, ...; Apply sets `dls.train.bs` in place.
    """
    return GNSWidget(self, **kwargs)
