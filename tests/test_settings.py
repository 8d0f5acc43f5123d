"One settings object: bs_find, the panel and GNSCallback check their run settings in one place (issue 20, item 2)."
import pytest

from gns_widget.interval import AutoStop
from gns_widget.settings import PANEL_N_BATCH, TRAINING_BETA, PanelSettings, Settings


@pytest.mark.parametrize("kwargs, message", [
    ({"n_batch": 1}, "n_batch must be an integer >= 2"),
    ({"beta": 1.5}, r"beta must be in \[0, 1\]"),
    ({"lr": float("nan")}, "lr must be a finite number >= 0"),
    ({"method": "fast"}, "method must be one of"),
    ({"num_it": 5, "n_batch": 10}, "num_it must be an integer >= n_batch"),
    ({"method": "per_example", "distributed": True}, "not available under DistributedDataParallel"),
])
def test_problem_names_the_argument_and_check_raises_it(kwargs, message):
    settings = Settings(**kwargs)
    with pytest.raises(ValueError, match=message):
        settings.check()
    assert settings.problem() == str(pytest.raises(ValueError, settings.check).value)


def test_check_returns_the_settings_to_run():
    import numpy as np

    s = Settings(lr=0, num_it=np.int64(200), n_batch=np.int64(10)).check()
    assert (s.num_it, s.n_batch, s.beta) == (200, 10, 1.0) and type(s.num_it) is int and type(s.n_batch) is int
    assert Settings(lr=0.1).check().beta == TRAINING_BETA
    auto = Settings(num_it="auto").check()
    assert isinstance(auto.num_it, AutoStop) and auto.auto is auto.num_it  # one rule the run then updates


def test_the_panel_differs_only_where_it_says_why():
    "The panel: n_batch within its slider, no beta 0, and a run long enough to suggest; bs_find takes all three."
    lo, hi = PANEL_N_BATCH
    for kwargs in ({"n_batch": hi + 1}, {"beta": 0.0}, {"num_it": 30, "n_batch": 10}):
        assert Settings(**kwargs).problem() is None
        assert PanelSettings(**kwargs).problem() is not None
    assert PanelSettings().num_it == "auto" and Settings().num_it is None  # a suggestion vs one epoch
    assert PanelSettings(num_it=100, n_batch=10).problem() is None
    assert PanelSettings(num_it=10, method="per_example").problem() is None  # every step is an estimate


def test_gns_callback_checks_with_the_same_rule():
    from gns_widget import GNSCallback

    with pytest.raises(ValueError, match="n_batch must be an integer >= 2"):
        GNSCallback(n_batch=1)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        GNSCallback(beta=2.0)
    assert GNSCallback().beta == TRAINING_BETA
