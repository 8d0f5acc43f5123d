"""The panel without a browser: controls, the background run, charts, result, Apply and every error path."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

import gns_widget
from gns_widget import GNSWidget
from gns_widget.datasets import bikeshare, digits_loaders
from gns_widget.loaders import current_batch_size
from gns_widget.widget import panel, runner
from gns_widget.widget.charts import CHARTS
from gns_widget.widget.runner import ThrottledListener

# lr=0 measures at fixed weights: fast, deterministic and reliable on digits (noise scale ~80 → bs 64)
QUICK = dict(lr=0.0, num_it=200, n_batch=10, beta=0.99)
LONG = dict(lr=0.0, num_it=10**7, n_batch=10, beta=0.99)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def train_dl():
    return digits_loaders(bs=32)[0]


@pytest.fixture(scope="module")
def finished(train_dl):
    "One finished quick run, shared by the read-only checks."
    applied = []
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), on_apply=applied.append, **QUICK)
    assert w.start()
    res = w.wait(timeout=120)
    assert res is not None, w.status.value
    w.applied = applied
    return w


def wait_for(pred, timeout=30.0):
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        done.wait(0.05)
    return False


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model: nn.Module, before: dict) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_construct_shows_controls_and_idle(train_dl):
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), n_batch=15, beta=0.999)
    assert (w.n_batch_slider.value, w.beta_slider.value, w.num_it_text.value) == (15, 0.999, 0)
    assert (w.n_batch_slider.min, w.n_batch_slider.max) == (2, 100)
    assert {0.9, 0.99, 0.999, 0.9999} <= set(w.beta_slider.options)
    assert w.settings()["num_it"] is None  # 0 in the box = one epoch
    assert "idle" in w.status.value and "32" in w.bs_label.value
    assert w.apply_button.disabled and w.stop_button.disabled and not w.start_button.disabled
    assert w.result is None and w.wait() is None
    assert isinstance(w, gns_widget.GNSWidget) and len(w.charts.figures) == 3
    w.close()


def test_reserved_and_bad_target_are_refused(train_dl):
    with pytest.raises(ValueError, match="on_update"):
        GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), on_update=print)
    with pytest.raises(TypeError, match="target"):
        GNSWidget("model", train_dl, nn.CrossEntropyLoss())


def test_finished_run_fills_charts_progress_status_and_result(finished):
    w, res = finished, finished.result
    assert res.reliable and res.suggested_bs == 64
    h = res.history
    for name, _title, log in CHARTS:
        line = w.charts.lines[name]
        keep = (h[name] > 0) if log else np.isfinite(h[name])
        assert len(line.x) > 0
        np.testing.assert_allclose(line.x, h.iteration[keep])
        np.testing.assert_allclose(line.y, h[name][keep])
    assert list(w.charts.suggestion_line.y) == [64, 64]
    assert "(bs 64)" in w.charts.figures[2].title and f"{res.noise_scale:.4g}" in w.charts.figures[2].title
    assert w.progress.value == w.progress.max == QUICK["num_it"]
    assert f"iteration {QUICK['num_it']}/{QUICK['num_it']}" in w.progress_label.value
    assert "ETA" in w.progress_label.value and "elapsed" in w.progress_label.value
    assert "status: finished" in w.status.value
    assert "noise scale" in w.result_box.value and "suggested batch size</b>: 64" in w.result_box.value
    assert "sgd rule" in w.result_box.value  # plain module, no opt: bs_find trains with SGD
    # the trade-off row for the suggested size: steps 1 + B_noise/B, examples 1 + B/B_noise
    ns = w.result.noise_scale
    assert "gns-tradeoff" in w.result_box.value
    assert f"×{1 + ns / 64:.2f}" in w.result_box.value and f"×{1 + 64 / ns:.2f}" in w.result_box.value
    assert not w.apply_button.disabled and w.stop_button.disabled and not w.start_button.disabled


def test_apply_rebuilds_torch_loader_and_calls_on_apply(finished):
    old = finished.train_dl
    new = finished.apply()
    assert new is finished.train_dl and new is not old
    assert current_batch_size(new) == 64 and current_batch_size(old) == 32
    assert finished.applied == [new]
    assert "train batch size 32 → 64" in finished.status.value and "64" in finished.bs_label.value
    assert finished.apply_button.disabled


def test_buttons_start_stop_and_apply_refused_while_running(train_dl):
    model = mlp()
    before = snapshot(model)
    w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), **LONG)
    w.start_button.click()
    assert w.running and "running" in w.status.value and w.apply_button.disabled
    assert wait_for(lambda: w.progress.value > 0)
    assert w.apply() is None and "cannot apply while running" in w.status.value
    w.n_batch_slider.value = 20
    assert "next run" in w.note_label.value
    w.stop_button.click()
    res = w.wait(timeout=30)
    assert res is not None and res.stopped
    assert "stopped after" in w.status.value and w.progress.value < w.progress.max
    assert same_weights(model, before)
    assert not w.start_button.disabled and w.stop_button.disabled


def test_start_twice_runs_once(train_dl, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return gns_widget.bs_find(*args, **kwargs)

    monkeypatch.setattr(runner, "bs_find", counting)
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **{**QUICK, "num_it": 2000})
    assert w.start()
    assert not w.start()
    w.start_button.click()
    assert "already running" in w.status.value
    w.stop()
    assert w.wait(timeout=30) is not None
    assert len(calls) == 1


@pytest.mark.parametrize("setting, value, message", [
    ("num_it_text", 5, "num_it (5) must be ≥ n_batch (10)"),
    ("num_it_text", -3, "num_it must be ≥ n_batch"),
    ("lr_text", -0.1, "lr must be a finite number"),
])
def test_bad_settings_give_inline_error_and_refuse_start(train_dl, setting, value, message):
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    getattr(w, setting).value = value
    assert message in w.error_label.value and w.start_button.disabled
    assert not w.start() and "error:" in w.status.value and not w.running
    getattr(w, setting).value = QUICK["num_it"] if setting == "num_it_text" else 0.0
    assert w.error_label.value == "" and not w.start_button.disabled


def test_exception_in_run_shows_in_status_and_restores_weights(train_dl):
    def broken_loss(out, y):
        raise ValueError("this loss is broken")

    model = mlp()
    before = snapshot(model)
    w = GNSWidget(model, train_dl, broken_loss, **QUICK)
    w.start_button.click()
    assert w.wait(timeout=30) is None
    assert "error: ValueError: this loss is broken" in w.status.value
    assert isinstance(w.error, ValueError) and same_weights(model, before)
    assert w.apply_button.disabled and not w.start_button.disabled
    w.apply_button.click()  # disabled in the browser; programmatically it is refused with a message
    assert "no reliable suggestion to apply" in w.status.value


def test_divergence_shows_in_status_and_restores_weights(train_dl):
    model = mlp()
    before = snapshot(model)
    w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), lr=1e9, num_it=200, n_batch=5)
    w.start()
    assert w.wait(timeout=30) is None
    assert "error: RuntimeError" in w.status.value and "lower lr" in w.status.value
    assert same_weights(model, before)


def test_exception_in_click_handler_is_shown(finished, monkeypatch):
    def boom():
        raise OSError("disk full")

    monkeypatch.setattr(finished, "apply", boom)
    finished.apply_button.click()
    assert "error: OSError: disk full" in finished.status.value


def test_listener_throttles_and_keeps_every_record():
    flushed = []
    listener = ThrottledListener(flushed.append, interval=3600)
    for i in range(50):
        listener(i)
    assert len(flushed) == 1 and listener.records == list(range(50))
    listener.flush_now()
    assert len(flushed[-1]) == 50


def test_optimizer_rule():
    assert panel.optimizer_rule(mlp())[0] == "sgd"
    assert panel.optimizer_rule(mlp(), torch.optim.AdamW)[0] == "adam"
    assert panel.optimizer_rule(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1))[0] == "sgd"


def test_fastai_learner_widget_applies_in_place():
    from fastai.tabular.all import Categorify, Normalize, RegressionBlock, TabularDataLoaders, tabular_learner

    df = bikeshare().drop(columns=["casual", "registered"]).iloc[:3000]
    df["bikers"] = np.log1p(df["bikers"]).astype("float32")
    dls = TabularDataLoaders.from_df(df, y_names="bikers", cat_names=["season", "hr", "workingday", "weathersit"],
                                     cont_names=["temp", "hum"], procs=[Categorify, Normalize], bs=64,
                                     y_block=RegressionBlock(), valid_idx=list(range(2500, 3000)))
    torch.manual_seed(0)
    learn = tabular_learner(dls, layers=[50], y_range=(0, 7.5))
    before = snapshot(learn.model)
    w = learn.bs_find_widget(lr=0.0, num_it=200, n_batch=10)
    assert w.rule == "adam" and "64" in w.bs_label.value
    w.start()
    res = w.wait(timeout=120)
    assert res is not None and res.reliable, w.status.value
    assert "adam rule, for optimizer Adam" in w.result_box.value
    assert same_weights(learn.model, before)
    assert w.apply() is dls
    assert dls.train.bs == res.suggested_bs
    assert f"train batch size 64 → {res.suggested_bs}" in w.status.value
