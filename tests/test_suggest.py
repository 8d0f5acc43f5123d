"The suggestion rules, the learning-rate advice and the trade-off curve."
import math

import pandas as pd
import pytest

from gns_widget.interval import Interval
from gns_widget.lr_rules import lr_factor
from gns_widget.suggest import MAX_DRIFT, suggest_batch_size, tradeoff


def _history(noise_scales, noise=1.0, scale=None):
    n = len(noise_scales)
    scales = [scale if scale is not None else noise / v for v in noise_scales]
    return pd.DataFrame({"iteration": [10 * (i + 1) for i in range(n)], "noise_scale": noise_scales,
                         "noise": [noise] * n, "scale": scales})


def test_power_of_two_near_a_stable_noise_scale():
    assert suggest_batch_size(_history([400.0] * 20), n_train=10_000).bs == 512
    assert suggest_batch_size(_history([300.0] * 20), n_train=10_000).bs == 256


def test_capped_by_training_set():
    s = suggest_batch_size(_history([5000.0] * 20), n_train=1000)
    assert s.bs == 512 and "capped by the training set size (1000)" in s.reason


@pytest.mark.parametrize("hist, words", [
    (_history([]), "no estimate"),
    (_history([100.0] * 20, scale=-0.1), "|G|² estimate is not positive"),
    (_history([100.0] * 20, noise=-1.0, scale=0.1), "tr(Σ) estimate is not positive"),
    (_history([100.0] * 3), "increase num_it to at least 100"),
    (_history([100.0] * 15 + [100.0 * (1 + 2 * MAX_DRIFT)] * 5), "still moving"),
])
def test_unreliable_estimates_say_why_and_what_to_change(hist, words):
    s = suggest_batch_size(hist, n_train=10_000)
    assert s.bs is None and words in s.reason


def test_lr_factor_linear_below_noise_scale_and_saturating_above():
    assert lr_factor(32, 64, noise_scale=1e6, rule="sgd") == pytest.approx(2, rel=1e-3)
    assert lr_factor(32, 64, noise_scale=1e6, rule="adam") == pytest.approx(math.sqrt(2), rel=1e-3)
    assert lr_factor(32, 64, noise_scale=1e6, rule="momentum") == pytest.approx(math.sqrt(2), rel=1e-3)
    assert lr_factor(4096, 8192, noise_scale=100, rule="sgd") < 1.03  # past the noise scale: almost no step size
    with pytest.raises(ValueError, match="rule"):
        lr_factor(32, 64, 100, rule="rmsprop")


def test_tradeoff_follows_the_papers_curve():
    t = tradeoff(100.0, [10, 100, 1000])
    assert t.steps.tolist() == pytest.approx([11, 2, 1.1])
    assert t.examples.tolist() == pytest.approx([1.1, 2, 11])
    # (S/S_min - 1)(E/E_min - 1) = 1 for every batch size
    assert ((t.steps - 1) * (t.examples - 1)).tolist() == pytest.approx([1, 1, 1])


def test_uncertain_with_windows_smaller_than_the_noise_scale_says_widen_them():
    "Bikeshare's case: B_simple ≈ 1,000 against 20 × 32 = 640 per window; a longer run barely helps, wider windows do."
    hist = _history([1000.0] * 30).assign(samples=lambda d: 32 * d.iteration, n_batch=20)
    wide = Interval(1000.0, 600.0, 2500.0)
    s = suggest_batch_size(hist, n_train=10_000, interval=wide)
    assert s.bs is None and "raise n_batch to about 63" in s.reason and "640" in s.reason
    small = suggest_batch_size(hist.assign(n_batch=100), n_train=10_000, interval=wide)
    assert "raise n_batch" not in small.reason and "increase num_it" in small.reason
