"""The raw suggestion (`suggest.suggest_batch_size`) and the paper's trade-off curve (`suggest.tradeoff`).

A suggestion is the measurement alone: a power of two near the late-run noise scale, or no batch size and the
reason, with what to change. What to train with on a given device (goodput, the lr, the epochs) is the advice's
job: see test_advice.py.
"""
import numpy as np
import pandas as pd
import pytest

from gns_widget.interval import Interval
from gns_widget.suggest import MAX_DRIFT, MAX_LOSS_RISE, suggest_batch_size, tradeoff


def _history(noise_scales, noise=1.0, scale=None):
    n = len(noise_scales)
    scales = [scale if scale is not None else noise / v for v in noise_scales]
    return pd.DataFrame({"iteration": [10 * (i + 1) for i in range(n)], "noise_scale": noise_scales,
                         "noise": [noise] * n, "scale": scales})


def _losses_history(losses, noise_scale=5.0):
    "A steady noise scale with the run's loss: what the rise rule reads."
    return _history([noise_scale] * len(losses)).assign(loss=losses)


# --- A suggestion from a reliable measurement ----------------------------------------------------------------------


def test_power_of_two_near_a_stable_noise_scale():
    assert suggest_batch_size(_history([400.0] * 20), n_train=10_000).bs == 512
    assert suggest_batch_size(_history([300.0] * 20), n_train=10_000).bs == 256


def test_capped_by_training_set():
    s = suggest_batch_size(_history([5000.0] * 20), n_train=1000)
    assert s.bs == 512 and "capped by the training set size (1000)" in s.reason


# --- No suggestion: why, and what to change -----------------------------------------------------------------------


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


def test_uncertain_with_windows_smaller_than_the_noise_scale_says_widen_them():
    "Bikeshare's case: B_simple ≈ 1,000 against 20 × 32 = 640 per window; a longer run barely helps, wider windows do."
    hist = _history([1000.0] * 30).assign(samples=lambda d: 32 * d.iteration, n_batch=20)
    wide = Interval(1000.0, 600.0, 2500.0)
    s = suggest_batch_size(hist, n_train=10_000, interval=wide)
    assert s.bs is None and "raise n_batch to about 63" in s.reason and "640" in s.reason
    small = suggest_batch_size(hist.assign(n_batch=100), n_train=10_000, interval=wide)
    assert "raise n_batch" not in small.reason and "increase num_it" in small.reason


def test_a_run_whose_loss_rose_gives_no_suggestion():
    "Trained at an lr the model cannot take, the loss doubles and stays up: bouncing weights have no noise scale."
    rose = _losses_history([2.3, 2.2, 2.4, 2.3, 4.1, 5.2, 6.0, 5.5, 5.8, 6.1, 5.9, 6.2])
    s = suggest_batch_size(rose, n_train=1438, trained=True)
    assert s.bs is None and "loss rose" in s.reason and "lower lr" in s.reason and "lr=0" in s.reason
    assert suggest_batch_size(rose, n_train=1438).bs == 4  # at lr=0 the loss is the windows' noise, not a trend
    fell = _losses_history([2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2])
    flat = _losses_history([0.30, 0.31, 0.29, 0.32, 0.30, 0.31, 0.30, 0.32, 0.31, 0.30, 0.31, 0.32])  # converged
    spike = _losses_history([2.3, 2.2, 6.0, 2.1, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2])  # one bad window, recovered
    for ok in (fell, flat, spike):
        assert suggest_batch_size(ok, n_train=1438, trained=True).bs == 4


def test_a_converged_models_noisy_batch_losses_are_not_a_rise():
    """per_example records one small batch each, and a converged model's batch losses spread widely around a flat
    mean (here from a lucky 0.05 to several times the mean of 0.075): the rise rule compares means over many
    batches, so this reliable run is not 'the loss rose'."""
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 0.075 / 2, 1000)
    losses[0] = 0.05
    assert losses.max() > 2 * MAX_LOSS_RISE * losses[0]  # what a record-by-record rule would fire on
    s = suggest_batch_size(_losses_history(list(losses), noise_scale=500.0), n_train=1438, trained=True)
    assert "loss rose" not in s.reason


# --- The trade-off curve ------------------------------------------------------------------------------------------


def test_tradeoff_follows_the_papers_curve():
    t = tradeoff(100.0, [10, 100, 1000])
    assert t.steps.tolist() == pytest.approx([11, 2, 1.1])
    assert t.examples.tolist() == pytest.approx([1.1, 2, 11])
    # (S/S_min - 1)(E/E_min - 1) = 1 for every batch size
    assert ((t.steps - 1) * (t.examples - 1)).tolist() == pytest.approx([1, 1, 1])
