"""The noise scale's 90% interval: coverage of the exact B_simple, the ratio and autocorrelation, the auto-stop rule."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find
from gns_widget.interval import AutoStop, Interval, noise_scale_interval
from gns_widget.suggest import stable_power_of_two, suggest_batch_size
from tests.exact import exact_noise_scale

N = 20_000


def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 20, generator=gen)
    y = x @ torch.randn(20, 1, generator=gen) + 0.5 * torch.randn(N, 1, generator=gen)
    torch.manual_seed(0)
    return nn.Linear(20, 1), nn.MSELoss(), x, y


def _windows(rng, k, ratio=100.0, rel_sd=0.5, rho=0.0):
    "k raw (noise, scale) windows with E noise / E scale = ratio, the scale AR(1)-correlated with coefficient rho."
    e = rng.standard_normal(k)
    z = np.empty(k)
    z[0] = e[0]
    for i in range(1, k):
        z[i] = rho * z[i - 1] + math.sqrt(1 - rho**2) * e[i]
    scale = 1.0 + rel_sd * z
    noise = ratio * (1.0 + 0.05 * rng.standard_normal(k))
    return noise, scale


def _naive(noise, scale, decay):
    "Delta method on independent windows: what the interval would be without batch means and Fieller."
    w = decay ** np.arange(len(noise) - 1, -1, -1)
    r = (w @ noise) / (w @ scale)
    z = (noise - r * scale) / (w @ scale / w.sum())
    se = math.sqrt(w**2 @ z**2) / w.sum()
    return r - 1.645 * se, r + 1.645 * se


def test_interval_text_and_half_width():
    iv = Interval(91.2, 80.4, 104.3)
    assert str(iv) == "91 (80–104)"
    assert iv.rel_halfwidth == pytest.approx((104.3 - 80.4) / (2 * 91.2))
    assert str(Interval(91.0, 40.0, math.inf)) == "91 (40–∞)" and math.isinf(Interval(91, 40, math.inf).rel_halfwidth)


def test_centre_is_the_smoothed_ratio_of_averages():
    rng = np.random.default_rng(0)
    noise, scale = _windows(rng, 50)
    iv = noise_scale_interval(noise, scale, decay=0.9)
    w = 0.9 ** np.arange(49, -1, -1)
    assert iv.value == pytest.approx((w @ noise) / (w @ scale))
    assert iv.lo < iv.value < iv.hi
    assert noise_scale_interval(noise[:9], scale[:9], 0.9) is None  # too few windows for a spread


@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_covers_a_known_ratio_with_correlated_windows_where_the_naive_interval_fails(rho):
    "Synthetic windows with a known ratio: 90% coverage with and without autocorrelation; the naive one drops."
    rng = np.random.default_rng(1)
    ours = naive = 0
    runs = 400
    for _ in range(runs):
        noise, scale = _windows(rng, 400, rho=rho)
        iv = noise_scale_interval(noise, scale, decay=0.995)
        ours += iv.lo <= 100 <= iv.hi
        lo, hi = _naive(noise, scale, 0.995)
        naive += lo <= 100 <= hi
    assert 0.85 <= ours / runs <= 0.97
    if rho:  # windows that share a drift look like more information than there is
        assert naive / runs < 0.75


def test_unbounded_when_the_scale_is_not_distinguishable_from_zero():
    rng = np.random.default_rng(2)
    noise = 100 + rng.standard_normal(40)
    scale = 0.05 + rng.standard_normal(40)  # |G|² buried in its noise
    iv = noise_scale_interval(noise, scale, decay=0.99)
    assert math.isinf(iv.hi) and iv.lo >= 0
    hist = pd.DataFrame({"iteration": np.arange(1, 41) * 10, "noise_scale": [iv.value] * 40,
                         "noise": [100.0] * 40, "scale": [max(iv.value, 1) / 100] * 40})
    s = suggest_batch_size(hist, interval=iv)
    assert s.bs is None and "not distinguishable" in s.reason and "num_it='auto'" in s.reason


@pytest.mark.slow
def test_covers_the_exact_noise_scale_in_seeded_runs():
    """20 seeded bs_find(lr=0) runs of 1,000 steps: ≥ 85% cover the exact B_simple, median half-width ≤ 20%.

    The benchmark (benchmarks/advice.py) does the same on four real problems.
    """
    model, loss_func, x, y = _linear_problem()
    _, _, exact = exact_noise_scale(model, loss_func, x, y)
    covered, widths = [], []
    for seed in range(20):
        dl = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
        res = bs_find(model, dl, loss_func, lr=0, num_it=1000, n_batch=10, beta=0.99, device="cpu")
        lo, hi = res.noise_scale_interval
        covered.append(lo <= exact <= hi)
        widths.append(res.interval.rel_halfwidth)
        assert str(res.interval) in repr(res) and str(res.interval) in res.reason
    assert np.mean(covered) >= 0.85, (exact, covered)
    assert np.median(widths) <= 0.20, widths


def test_auto_stops_once_the_interval_is_narrow_and_lands_near_the_exact_value():
    model, loss_func, x, y = _linear_problem()
    _, _, exact = exact_noise_scale(model, loss_func, x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    res = bs_find(model, dl, loss_func, lr=0, num_it="auto", n_batch=10, beta=0.99, device="cpu")
    last = int(res.history.iteration.iloc[-1])
    assert 300 <= last < 20_000  # at least the minimum windows, well before the cap
    assert res.interval.rel_halfwidth <= 0.10
    assert res.noise_scale == pytest.approx(exact, rel=0.10)
    tight = bs_find(model, dl, loss_func, lr=0, num_it=AutoStop(0.05), n_batch=10, beta=0.99, device="cpu")
    assert int(tight.history.iteration.iloc[-1]) > last and tight.interval.rel_halfwidth <= 0.05
    capped = bs_find(model, dl, loss_func, lr=0, num_it=AutoStop(0.01, max_it=400), n_batch=10, device="cpu")
    assert int(capped.history.iteration.iloc[-1]) == 400 and capped.history.total.iloc[-1] == 400


@pytest.mark.parametrize("kwargs, words", [
    ({"rel_halfwidth": 0}, "rel_halfwidth must be in"),
    ({"rel_halfwidth": 1.5}, "rel_halfwidth must be in"),
    ({"max_it": 0}, "max_it must be a positive integer"),
    ({"min_windows": 3}, "min_windows must be an integer >= 10"),
])
def test_auto_stop_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        AutoStop(**kwargs)


def test_auto_is_the_only_string_num_it_accepts():
    model, loss_func, x, y = _linear_problem()
    dl = DataLoader(TensorDataset(x[:200], y[:200]), batch_size=16)
    with pytest.raises(ValueError, match="num_it must be an integer >= n_batch .*or 'auto'"):
        bs_find(model, dl, loss_func, num_it="fast", n_batch=10)


def test_stable_rounding_agrees_across_runs_on_a_rounding_line():
    """Runs differing only by noise, the true noise scale on the 64/128 line (90.5): the suggestion must agree.

    Plain rounding of the value splits about evenly between 64 and 128 (the flip-flop of issue 11).
    """
    rng = np.random.default_rng(3)
    line = 64 * math.sqrt(2)
    stable, plain = [], []
    for _ in range(200):
        noise, scale = _windows(rng, 50, ratio=line, rel_sd=0.3)
        iv = noise_scale_interval(noise, scale, decay=0.99)
        stable.append(stable_power_of_two(iv.value, iv))
        plain.append(stable_power_of_two(iv.value))
    assert set(plain) == {64, 128} and 0.3 < plain.count(64) / 200 < 0.7
    assert stable.count(64) / 200 >= 0.9
    assert stable_power_of_two(100.0, Interval(100.0, 95.0, 105.0)) == 128  # clear of the line: nearest power
    assert stable_power_of_two(100.0, Interval(100.0, 85.0, 115.0)) == 64  # reaches below 90.5
    assert stable_power_of_two(0.7, Interval(0.7, 0.1, 2.0)) == 1


def test_auto_stops_when_the_ema_cannot_average_more_windows():
    "beta=0.9 keeps about 19 windows: past 40 windows the interval cannot narrow, so waiting for the cap is pointless."
    stop = AutoStop(0.01)
    stop.start(0.9)
    rng = np.random.default_rng(4)
    noise, scale = _windows(rng, 1000, rel_sd=0.5)
    n = next(i for i, (a, b) in enumerate(zip(noise, scale), 1)
             if stop.update(pd.Series({"noise_raw": a, "scale_raw": b})))
    assert stop.saturated and 40 <= n <= 42 and stop.interval.rel_halfwidth > 0.01


def _near_optimum_problem():
    "The linear problem a little off its least-squares optimum: B_simple ≈ 266, above the 5 × 16 = 80 of a window."
    model, loss_func, x, y = _linear_problem()
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(N, 1)], 1), y).solution
    with torch.no_grad():
        model.weight.copy_(solution[:20].T + 0.03 * torch.randn(1, 20, generator=torch.Generator().manual_seed(1)))
        model.bias.copy_(solution[20])
    return model, loss_func, x, y


@pytest.mark.slow
def test_auto_widens_windows_smaller_than_the_noise_scale_at_fixed_weights():
    model, loss_func, x, y = _near_optimum_problem()
    exact = exact_noise_scale(model, loss_func, x, y)[2]
    assert exact > 3 * 80  # the case: every 80-example window's |G|² is mostly noise
    dl = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    res = bs_find(model, dl, loss_func, lr=0, num_it="auto", n_batch=5, device="cpu")
    sizes = res.history.n_batch
    assert sizes.iloc[0] == 5 and sizes.iloc[-1] >= 2 * exact / 16  # widened to at least twice the noise scale
    assert (sizes == sizes.iloc[-1]).sum() >= 30  # the stop rests on 30 windows of the final width
    assert res.noise_scale == pytest.approx(exact, rel=0.10) and res.reliable
    h = res.history  # windows weigh by their small batches, in the value and the interval alike
    assert res.noise_scale == pytest.approx((h.n_batch @ h.noise_raw) / (h.n_batch @ h.scale_raw), rel=1e-9)
    training = bs_find(model, dl, loss_func, lr=1e-3, num_it=AutoStop(max_it=2000), n_batch=5, device="cpu")
    assert set(training.history.n_batch) == {5}  # moving weights: the windows keep the user's n_batch


def test_widening_rule_alone():
    stop = AutoStop()
    stop.start(1.0, widen=True)
    record = pd.Series({"noise_raw": 300.0, "scale_raw": 1.0, "n_batch": 5, "samples": 16 * 5, "iteration": 5,
                        "noise_scale": 300.0})
    for _ in range(29):
        stop.update(record)
        assert stop.n_batch_for(record, 5) == 5  # not before min_windows (30) windows
    stop.update(record)
    assert stop.n_batch_for(record, 5) == math.ceil(2 * 300 / 16) == stop.widened_to
    assert stop.n_batch_for(record, 38) == 38  # the next decision waits 30 windows of the new width
    fixed = AutoStop()
    fixed.start(0.99, widen=False)
    for _ in range(40):
        fixed.update(record)
    assert fixed.n_batch_for(record, 5) == 5
