"""The panel without a browser: controls, the background run, charts, result, Apply and every error path."""
from __future__ import annotations

import html
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import gns_widget
from gns_widget import GNSWidget
from gns_widget.datasets import bikeshare, digits_loaders
from gns_widget.guard import FinderBusyError, active_run
from gns_widget.loaders import current_batch_size
from gns_widget.result import GNSRecord
from gns_widget.widget import controller, runner, texts, view
from gns_widget.widget.charts import CHARTS, Y_FORMAT, GNSCharts, log_ticks, nice_ticks
from gns_widget.widget.runner import ThrottledListener
from tests.devices import fake_timing

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
    with fake_timing():  # a device whose step costs the same at every size: the advice grows, Apply applies it
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
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), n_batch=15, beta=0.999, num_it=300)
    assert (w.n_batch_slider.value, w.beta_slider.value, w.num_it_text.value) == (15, 0.999, 300)
    assert (w.n_batch_slider.min, w.n_batch_slider.max) == view.N_BATCH_RANGE == (2, 100)
    assert {0.9, 0.99, 0.999, 0.9999} <= set(w.beta_slider.options)
    assert "idle" in w.status.value and "32" in w.bs_label.value
    assert w.apply_button.disabled and w.stop_button.disabled and not w.start_button.disabled
    assert w.result is None and w.wait() is None
    assert isinstance(w, gns_widget.GNSWidget) and len(w.charts.figures) == 3
    w.close()


def test_default_num_it_is_one_epoch_only_when_that_can_suggest(train_dl):
    "digits at bs 32: one epoch is 45 batches; a suggestion needs 10 estimates of n_batch batches."
    assert GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), n_batch=4).num_it_text.value == 0  # 45 ≥ 40
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), n_batch=15, num_it=None)
    assert w.num_it_text.value == 150 and w.settings()["num_it"] == 150 and w.error_label.value == ""
    assert "num_it ≥ 10 × n_batch 15 = 150" in w.num_it_help.value and "one epoch = 45 batches" in w.num_it_help.value
    per_example = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), n_batch=15, method="per_example")
    assert per_example.num_it_text.value == 0  # every step is an estimate: 45 ≥ 10


def test_reserved_and_bad_target_are_refused(train_dl):
    with pytest.raises(TypeError, match="on_update"):
        GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), on_update=print)
    with pytest.raises(TypeError, match="target"):
        GNSWidget("model", train_dl, nn.CrossEntropyLoss())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(n_batches=10), TypeError, "n_batches"),
    (dict(n_batch=200), ValueError, "n_batch must be an integer from 2 to 100"),
    (dict(n_batch=1), ValueError, "n_batch must be an integer from 2 to 100"),
    (dict(n_batch=2.5), ValueError, "n_batch"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(lr=-1.0), ValueError, "lr must be a finite number"),
    (dict(lr=math.inf), ValueError, "lr must be a finite number"),
    (dict(num_it=30, n_batch=10), ValueError, r"num_it must be ≥ 100 \(a suggestion needs 10 estimates"),
    (dict(num_it=0, n_batch=10), ValueError, "one epoch is only 45 batches at batch size 32"),
    (dict(num_it=-1), ValueError, "num_it must be an integer"),
    (dict(method="exact"), ValueError, "method must be one of"),
    (dict(on_apply=3), TypeError, "on_apply"),
    (dict(amp=torch.int8), ValueError, "amp"),
    (dict(opt=42), ValueError, "opt"),
])
def test_bad_arguments_raise_when_the_panel_is_built(train_dl, kwargs, error, message):
    "Item 4: every argument is checked at construction, none silently clamped or left for Start to find."
    with pytest.raises(error, match=message):
        GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **kwargs)


def test_missing_loss_is_refused_at_build(train_dl):
    with pytest.raises(ValueError, match="loss_func is required"):
        GNSWidget(mlp(), train_dl)


def test_finished_run_fills_charts_progress_status_and_result(finished):
    w, res = finished, finished.result
    assert res.reliable and res.suggested_bs == 64
    h = res.history
    for name, _title, _label, log, _help in CHARTS:
        line = w.charts.lines[name]
        keep = (h[name] > 0) if log else np.isfinite(h[name])
        assert len(line.x) > 0
        np.testing.assert_allclose(line.x, h.iteration[keep])
        np.testing.assert_allclose(line.y, h[name][keep])
    assert list(w.charts.suggestion_line.y) == [64, 64]
    assert w.charts.figures[2].title == "noise scale, in examples"  # short and plain: never clipped
    assert f"now: {res.interval} (90% interval) · suggested batch size 64" in w.charts.captions["noise_scale"].value
    lo, hi = res.noise_scale_interval
    assert 0 < lo < res.noise_scale < hi < math.inf
    np.testing.assert_allclose(w.charts.band.y, [[lo, lo], [hi, hi]])
    assert list(w.charts.band.x) == [0, QUICK["num_it"]] and w.charts.band.fill == "between"
    assert w.progress.value == w.progress.max == QUICK["num_it"]
    assert w.progress_label.value.startswith(f"finished at iteration {QUICK['num_it']}/{QUICK['num_it']}")
    assert "left" not in w.progress_label.value  # no ETA once the run is over
    assert "status: finished" in w.status.value and "gns-c-finished" in w.status.value
    assert f"noise scale</b>: {res.interval} examples (90% interval" in w.result_box.value
    assert "suggested batch size</b>: 64" in w.result_box.value
    advice = res.advice()  # lr=0: no lr to scale, a factor only; no opt: the square-root rule, as the panel's
    assert advice == w.advice() and advice.kind == "grow" and html.escape(advice.headline) in w.headline.value
    assert html.escape(texts.plain(advice.text)) in w.result_box.value
    assert "measured at batch size 32" in w.result_box.value  # not "(now 32)", which Apply would make stale
    assert "not given (the run uses SGD)" in w.result_box.value  # plain module, no opt: bs_find trains with SGD
    # the trade-off row for the suggested size: steps 1 + B_noise/B, examples 1 + B/B_noise
    ns = w.result.noise_scale
    assert "gns-tradeoff" in w.result_box.value
    assert f"×{1 + ns / 64:.2f}" in w.result_box.value and f"×{1 + 64 / ns:.2f}" in w.result_box.value
    assert not w.apply_button.disabled and w.stop_button.disabled and not w.start_button.disabled


def test_axes_are_round_and_start_at_zero(finished):
    "Item 8: x from 0 to num_it with round ticks, the log axis on 1-2-5 values around the data and the suggestion."
    for fig in finished.charts.figures:
        x_axis, y_axis = fig.axes
        assert (x_axis.scale.min, x_axis.scale.max) == (0, QUICK["num_it"]) and not x_axis.scale.allow_padding
        assert list(x_axis.tick_values) == [0, 50, 100, 150, 200]
        assert y_axis.label and x_axis.label == "iteration (small batches)"
        assert len(y_axis.tick_values) >= 2 and not fig.display_toolbar
    log_scale = finished.charts.figures[2].axes[1].scale
    ns = finished.charts.lines["noise_scale"].y
    assert log_scale.min <= min(ns.min(), 64) and log_scale.max >= max(ns.max(), 64)
    assert all(lo <= t <= hi for t in finished.charts.figures[2].axes[1].tick_values
               for lo, hi in [(log_scale.min, log_scale.max)])


def test_tick_helpers():
    assert nice_ticks(0, 1000, 4, integer=True) == [0, 500, 1000]
    assert nice_ticks(0, 20000, 4, integer=True) == [0, 5000, 10000, 15000, 20000]
    assert nice_ticks(0, 3, 4, integer=True) == [0, 1, 2, 3]
    assert nice_ticks(5.77, 14.4) == [7.5, 10, 12.5]
    assert log_ticks(39.5, 1540) == (20, 2000, [20, 50, 100, 200, 500, 1000, 2000])
    assert log_ticks(1, 1e6)[2] == [1, 10, 100, 1e3, 1e4, 1e5, 1e6]  # wide: decades only
    assert log_ticks(60, 90) == (50, 100, [50, 70, 100])  # narrow: still at least the two ends


def _record(it: int, value: float, elapsed: float, total: int = 100) -> GNSRecord:
    return GNSRecord(iteration=it, samples=32 * it, loss=1.0, noise=value, scale=1.0, noise_scale=value,
                     noise_raw=value, scale_raw=1.0, n_batch=1, elapsed=elapsed, total=total)


def test_charts_before_a_run_and_with_a_single_estimate():
    "No '0 0 1 1' ticks before data; one estimate is drawn as a dot on a non-degenerate axis, not a blank chart."
    charts = GNSCharts()
    assert all(list(ax.tick_values) == [] for fig in charts.figures for ax in fig.axes)
    charts.show([_record(10, 80.0, 0.5)])
    for name, fig in zip(charts.lines, charts.figures):
        line = charts.lines[name]
        assert list(line.y) == [80.0 if name != "scale" else 1.0] and line.marker == "circle"
        assert fig.axes[1].scale.min < line.y[0] < fig.axes[1].scale.max
    charts.show([_record(10, 80.0, 0.5), _record(20, 90.0, 1.0)])
    assert charts.lines["noise"].marker is None


def test_layout_wraps_and_explains_every_control_and_chart(finished):
    "Items 10 and 12: charts wrap on narrow screens; every control has a tooltip, every chart a plain caption."
    assert finished.charts.layout.flex_flow == "row wrap"
    for w in (finished.n_batch_slider, finished.beta_slider, finished.num_it_text, finished.lr_text,
              finished.start_button, finished.stop_button, finished.apply_button):
        assert w.tooltip and w.tooltip != "null"
    captions = [box.children[1].value for box in finished.charts.children]
    assert len(captions) == 3 and all(len(c) > 40 for c in captions)


def test_status_colours_follow_the_jupyterlab_theme(train_dl):
    "Item 11: every status colour is a class the panel's style colours for the light and the dark theme."
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    for kind in ("idle", "running", "finished", "error", "warn"):
        w._set_status("x", kind)
        assert f'class="gns-c-{kind}"' in w.status.value
        if kind != "idle":  # idle is the theme's own text colour
            light, dark = texts.COLORS["light"][kind], texts.COLORS["dark"][kind]
            assert f".gns-c-{kind}{{color:{light}}}" in w.style_html.value
            assert f'body[data-jp-theme-light="false"] .gns-widget .gns-c-{kind}{{color:{dark}}}' in w.style_html.value


def test_every_status_colour_has_aa_contrast_in_both_themes():
    "Issue 19 item 5: the light theme's orange was 2.7:1 and its green 4.1:1; WCAG AA asks 4.5:1."
    ratios = {(theme, kind, bg): texts.contrast(color, bg) for theme, colors in texts.COLORS.items()
              for kind, color in colors.items() for bg in texts.BACKGROUNDS[theme]}
    assert min(ratios.values()) >= 4.5, min(ratios.items(), key=lambda kv: kv[1])
    assert texts.contrast("#f57c00", "#ffffff") < 4.5 and texts.contrast("#388e3c", "#ffffff") < 4.5  # the old ones


def test_eta_uses_the_average_rate_after_start_up():
    "Item 13: a slow first estimate (start-up) does not inflate the ETA: 5 s to start, then 0.01 s per iteration."
    assert math.isnan(texts.eta_seconds([_record(10, 1, 5.0, 1000)]))  # one estimate: no rate yet
    records = [_record(10 * k, 1, 5.0 + 0.1 * (k - 1), 1000) for k in range(1, 21)]
    for n in range(2, 21):
        assert texts.eta_seconds(records[:n]) == pytest.approx(0.01 * (1000 - 10 * n))
    assert texts.duration(9.84) == "9.8 s" and texts.duration(75) == "1 min 15 s"


def test_apply_rebuilds_torch_loader_and_says_which_object_to_use(finished):
    "Item 5: the panel never claims the user's own loader changed; it shows the line that makes it so."
    old = finished.train_dl
    bs = finished.advice().batch_size
    new = finished.apply()
    assert new is finished.train_dl and new is not old
    assert current_batch_size(new) == bs > 32 and current_batch_size(old) == 32
    assert finished.applied == [new]
    assert f"train batch size 32 → {bs}" in finished.status.value
    assert f"<b>{bs}</b> in <code>w.train_dl</code>, a new DataLoader" in finished.bs_label.value
    assert "made before Apply still give 32" in finished.bs_label.value
    assert "cannot change its batch size" in finished.note_label.value
    assert "train_dl = w.train_dl" in finished.note_label.value  # not under IPython: the usual names
    assert "measured at batch size 32" in finished.result_box.value  # still true after Apply
    assert finished.apply_button.disabled
    # one epoch at the new size is under 100 batches, too few for 10 estimates of 10: the control says so
    finished.num_it_text.value = 0
    assert f"one epoch is only {math.ceil(1438 / bs)} batches at batch size {bs}" in finished.error_label.value
    assert finished.start_button.disabled
    finished.num_it_text.value = QUICK["num_it"]


@pytest.mark.usefixtures("step_bound_device")
def test_copy_line_uses_the_notebook_variable_names(train_dl, monkeypatch):
    import IPython

    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    w.start()
    w.wait(60)

    class Shell:
        user_ns = {"my_dl": train_dl, "panel_w": w, "_": w}

    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    w.apply()
    assert "my_dl = panel_w.train_dl" in w.note_label.value


@pytest.mark.usefixtures("step_bound_device")
def test_buttons_start_stop_and_apply_refused_while_running(train_dl):
    model = mlp()
    before = snapshot(model)
    w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), **LONG)
    w.start_button.click()
    assert w.running and "running" in w.status.value and w.apply_button.disabled
    assert wait_for(lambda: w.progress.value > 0)
    assert w.apply() is train_dl and "cannot apply while running" in w.status.value  # `train_dl = w.apply()` is safe
    w.n_batch_slider.value = 20
    assert "next run" in w.note_label.value
    w.stop_button.click()
    res = w.wait(timeout=30)
    assert res is not None and res.stopped
    assert "stopped after" in w.status.value and "model restored" in w.status.value
    assert w.progress.value < w.progress.max
    assert w.progress_label.value.startswith("stopped at iteration") and "left" not in w.progress_label.value
    # the result area says the run was stopped (a run stopped after enough windows still has a suggestion)
    assert "stopped after" in w.result_box.value or "from a stopped run" in w.result_box.value
    assert "increase num_it" not in w.result_box.value
    assert same_weights(model, before)
    assert not w.start_button.disabled and w.stop_button.disabled


def test_start_twice_runs_once_and_keeps_the_status(train_dl, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return gns_widget.bs_find(*args, **kwargs)

    monkeypatch.setattr(runner, "bs_find", counting)
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **{**QUICK, "num_it": 2000})
    assert w.start()
    assert not w.start()
    w.start_button.click()  # a double click: ignored, and the status is not left saying so all run long
    assert "status: running" in w.status.value and "already" not in w.status.value
    w.stop()
    assert w.wait(timeout=30) is not None
    assert len(calls) == 1


def test_finished_without_suggestion_is_not_shown_as_success(train_dl, monkeypatch):
    "Item 6: no green 'finished' when there is nothing to apply."
    from gns_widget.suggest import Suggestion

    def unsettled(*args, **kwargs):
        res = gns_widget.bs_find(*args, **kwargs)
        res.suggestion = Suggestion(None, "still moving: increase num_it")
        return res

    monkeypatch.setattr(runner, "bs_find", unsettled)
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    w.start()
    assert w.wait(timeout=60) is not None
    assert "finished without a suggestion" in w.status.value and "gns-c-warn" in w.status.value
    assert "no suggestion</b>: still moving" in w.result_box.value and w.apply_button.disabled


@pytest.mark.parametrize("setting, value, message", [
    ("num_it_text", 5, "num_it must be ≥ 100 (a suggestion needs 10 estimates of n_batch=10"),
    ("num_it_text", 30, "num_it must be ≥ 100"),
    ("num_it_text", -3, "num_it must be an integer ≥ 100"),
    ("num_it_text", 0, "one epoch is only 45 batches"),
    ("lr_text", -0.1, "lr must be a finite number"),
])
def test_bad_settings_give_inline_error_and_refuse_start(train_dl, setting, value, message):
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    getattr(w, setting).value = value
    assert message in w.error_label.value and w.start_button.disabled
    assert not w.start() and "error:" in w.status.value and not w.running
    getattr(w, setting).value = QUICK["num_it"] if setting == "num_it_text" else 0.0
    assert w.error_label.value == "" and not w.start_button.disabled


def test_num_it_help_follows_n_batch(train_dl):
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    w.n_batch_slider.value = 20
    assert "= 200" in w.num_it_help.value and w.error_label.value == ""
    w.n_batch_slider.value = 21
    assert "num_it must be ≥ 210" in w.error_label.value and w.start_button.disabled


# ---------------------------------------------------------------- one run per model (item 1)
def test_a_new_panel_for_the_same_model_stops_the_old_run(train_dl):
    "The panel cell re-run during a run: the old run stops, the model is restored, one run at most is alive."
    model = mlp()
    before = snapshot(model)
    old = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), **LONG)
    assert old.start() and wait_for(lambda: old.progress.value > 0)
    assert active_run(model).owner == "GNSWidget" and active_run(model).thread.startswith("GNSWidget run")
    new = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), **LONG)
    assert not old.running and active_run(model) is None  # stopped and restored before the new panel exists
    assert "a new panel for this model took over" in old.status.value
    assert same_weights(model, before)
    assert new.start() and wait_for(lambda: new.progress.value > 0)
    assert not old.start() and "FinderBusyError" in old.status.value and "GNSWidget in thread" in old.status.value
    new.stop()
    assert new.wait(30) is not None and same_weights(model, before)
    assert not [t for t in threading.enumerate() if t.name.startswith("GNSWidget run")]


def test_start_is_refused_at_once_while_bs_find_holds_the_model(train_dl):
    model = mlp()
    stop = threading.Event()
    worker = threading.Thread(target=gns_widget.bs_find, args=(model, train_dl, nn.CrossEntropyLoss()),
                              kwargs={**LONG, "stop_event": stop}, name="my bs_find")
    worker.start()
    try:
        assert wait_for(lambda: active_run(model) is not None)
        w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), **QUICK)  # bs_find is not stopped by a panel
        assert active_run(model).owner == "bs_find"
        assert not w.start() and not w.running
        assert "FinderBusyError" in w.status.value and "bs_find in thread &#x27;my bs_find&#x27;" in w.status.value
        assert "Stop it first" in w.status.value and not w.start_button.disabled
    finally:
        stop.set()
        worker.join(30)


def test_bs_find_is_refused_while_the_panel_runs(train_dl):
    model = mlp()
    w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), **LONG)
    assert w.start()
    try:
        with pytest.raises(FinderBusyError, match="GNSWidget in thread 'GNSWidget run"):
            gns_widget.bs_find(model, train_dl, nn.CrossEntropyLoss(), **QUICK)
    finally:
        w.stop()
        w.wait(30)


# ---------------------------------------------------------------- interrupts and exit (item 3)
def test_keyboard_interrupt_while_waiting_stops_the_run_and_restores(train_dl, monkeypatch):
    """The notebook's ■ during `w.wait()`: the run stops at its next step, the model is restored, the panel works.

    A real SIGINT, as the kernel gets: on Python 3.11 one landing in `Thread.join` marked the live
    thread finished, and ipykernel then closed its socket (ZMQError) while it kept training.
    """
    model = mlp()
    before = snapshot(model)
    w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), **LONG)
    assert w.start() and wait_for(lambda: w.progress.value > 0)

    def join(*args, **kwargs):
        raise AssertionError("Thread.join is not interrupt-safe on Python 3.11: wait on the run's Event")

    monkeypatch.setattr(w._runner.thread, "join", join)
    # a cell runs with Python's own SIGINT handler (ipykernel installs it around each cell), whatever another
    # test of this process left behind
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            w.wait()
    finally:
        signal.signal(signal.SIGINT, old)
    assert not w.running and active_run(model) is None
    assert same_weights(model, before)
    assert "interrupted (kernel interrupt) after" in w.status.value and "model restored" in w.status.value
    assert not w.start_button.disabled and w.stop_button.disabled
    assert w.start() and wait_for(lambda: w.progress.value > 0)  # usable again
    w.stop()
    assert w.wait(30) is not None and same_weights(model, before)


def test_a_script_that_ends_during_a_run_exits_cleanly(tmp_path):
    "A daemon thread still in torch when Python finalizes aborted the process (SIGABRT); the exit hook stops it."
    script = tmp_path / "ends_early.py"
    script.write_text(textwrap.dedent("""
        import time
        from torch import nn
        from gns_widget import GNSWidget
        from gns_widget.datasets import digits_loaders

        w = GNSWidget(nn.Linear(64, 10), digits_loaders(bs=32)[0], nn.CrossEntropyLoss(), lr=0.1,
                      num_it=10**7, n_batch=10)
        w.start()
        while w.progress.value == 0:
            time.sleep(0.05)
        print("leaving mid-run", flush=True)
    """))
    path = os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])  # keep the caller's
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaving mid-run" in proc.stdout and "Traceback" not in proc.stderr


def test_demo_shows_a_fastprogress_bar(tmp_path, capsys):
    "Item 14: the command-line demo's progress is fastprogress's console bar, not a hand-written one."
    from gns_widget.__main__ import main

    assert main(["demo", "--num-it", "60", "--n-batch", "10", "--out", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    assert "100.00% [60/60" in out and "noise scale" in out and (tmp_path / "plot.png").exists()


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
    assert w.apply_button.tooltip == "nothing to apply: the run failed (the status line says why)"
    w.apply_button.click()  # disabled in the browser; programmatically it is refused with a message
    assert "nothing to apply (no finished run yet" in w.status.value


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
    "The panel reads the rule the core detects (advice.detect_rule); none given: the square root, as advice() does."
    assert controller.optimizer_rule(mlp())[0] == "momentum"
    assert controller.optimizer_rule(mlp(), torch.optim.AdamW)[0] == "adam"
    assert controller.optimizer_rule(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1))[0] == "sgd"
    assert controller.optimizer_rule(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1, momentum=0.9))[0] == "momentum"


@pytest.mark.usefixtures("per_example_device")  # a fresh tabular model: noise scale ≈ 8 at bs 64, shrink
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
    assert "square root of the gain of the bigger batch, as for Adam-like optimizers" in w.result_box.value
    assert "optimizer: Adam" in w.result_box.value
    assert same_weights(learn.model, before)
    advice = w.advice()
    bs = advice.batch_size
    assert advice.kind == "shrink" and advice.lr == pytest.approx(1e-3 * advice.lr_factor), advice.text
    assert advice.lr != pytest.approx(learn.lr)  # else the lr checks below could not fail
    assert html.escape(texts.plain(res.advice(lr=learn.lr, rule="adam").text)) in w.result_box.value  # learn.lr
    assert w.apply_lr_box in w.children[2].children and not w.apply_lr_box.value  # off by default
    assert w.apply() is dls
    assert dls.train.bs == bs and learn.lr == 1e-3
    assert f"train batch size 64 → {bs}" in w.status.value and "learn.lr" not in w.status.value
    assert f"<b>{bs}</b> (dls.train, changed in place by Apply)" in w.bs_label.value
    assert w.note_label.value == ""  # nothing to copy: the user's dls is the object that changed
    w.apply_lr_box.value = True
    w.apply()
    assert learn.lr == pytest.approx(advice.lr)
    assert f"learn.lr 0.001 → {advice.lr:.3g} (fit and fit_one_cycle use it" in w.status.value


def test_also_set_lr_is_offered_for_a_learner_only(finished):
    assert finished.apply_lr_box not in finished.children[2].children


# ---------------------------------------------------------------- advice, interval band, num_it="auto" (issue 11)
def _patched_run(monkeypatch, change):
    "Make the panel's runs return bs_find's result after `change(result)`."
    def run(*args, **kwargs):
        res = gns_widget.bs_find(*args, **kwargs)
        change(res)
        return res

    monkeypatch.setattr(runner, "bs_find", run)


def test_apply_is_disabled_when_the_dataset_is_too_small_for_a_bigger_batch(train_dl, monkeypatch):
    "300 training examples at the suggested 64 is 4 steps an epoch: the advice keeps 32 (it capped at 16 before)."
    _patched_run(monkeypatch, lambda res: setattr(res, "n_train", 300))
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    w.start()
    res = w.wait(60)
    advice = res.advice(rule=w.rule)
    assert res.suggested_bs == 64 and advice.batch_size == 32 and advice.lr_factor == 1
    assert "keep batch size 32" in w.result_box.value and w.apply_button.disabled
    assert w.apply() is train_dl and "already 32, the size the advice keeps: keep batch size 32" in w.status.value
    assert w.train_dl is train_dl and current_batch_size(train_dl) == 32


@pytest.mark.usefixtures("step_bound_device")
def test_apply_never_accumulates_the_memory_plan_is_for_the_raw_suggestion(train_dl, monkeypatch):
    "10 fit in one step: the advice stays at sizes that fit (accumulating is no faster), the plan is the raw one's."
    from gns_widget.memory_plan import plan_batch

    _patched_run(monkeypatch, lambda res: setattr(res, "memory_plan", plan_batch(128, 10)))
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    w.start()
    w.wait(60)
    advice = w.advice()
    assert advice.batch_size <= 32 and "accumulat" not in advice.text
    assert "accumulation 13 (effective 130) (for the raw suggestion: the advice gives only sizes that fit" \
        in w.result_box.value


def test_apply_is_disabled_with_the_reason_when_the_advice_keeps_the_batch_size(train_dl, monkeypatch):
    from gns_widget.advice import BatchAdvice

    keep = BatchAdvice(None, None, None, "keep batch size 32: the test says so", 32)
    _patched_run(monkeypatch, lambda res: setattr(res, "advice", lambda *a, **k: keep))
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    w.start()
    assert w.wait(60).reliable
    assert w.apply_button.disabled and "the test says so" in w.apply_button.tooltip
    assert w.apply() is w.train_dl and "no batch size to apply: keep batch size 32: the test says so" in w.status.value
    assert current_batch_size(w.train_dl) == 32


def test_interval_band_is_clipped_to_the_axis():
    from gns_widget.interval import Interval

    charts = GNSCharts()
    records = [_record(10 * k, 80.0 + k, 0.1 * k) for k in range(1, 6)]
    charts.show(records, 64, Interval(85.0, 70.0, 95.0))
    assert list(charts.band.x) == [0, 100]
    np.testing.assert_allclose(charts.band.y, [[70, 70], [95, 95]])
    assert "now: 85 (70–95) (90% interval) · suggested batch size 64" in charts.captions["noise_scale"].value
    y = charts.figures[2].axes[1].scale
    assert y.min <= 64 and y.max >= 95
    charts.show(records, None, Interval(85.0, 0.0, math.inf))  # |G|² may be zero: open above, log axis has no 0
    np.testing.assert_allclose(charts.band.y, [[y.min, y.min], [y.max, y.max]])
    assert "85 (0–∞)" in charts.captions["noise_scale"].value
    charts.show(records)  # during a run: no band yet
    assert len(charts.band.x) == 0


def test_auto_num_it_is_the_default_and_a_number_turns_it_off(train_dl):
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), n_batch=10)
    assert w.auto_box.value and w.settings()["num_it"] == "auto" and w.num_it_text.disabled
    assert w.auto_box.description == "auto (until ±10%)" and "at most 20,000 small batches" in w.num_it_help.value
    w.num_it_text.value = 3  # ignored while auto is on
    assert w.error_label.value == "" and not w.start_button.disabled
    w.auto_box.value = False
    assert not w.num_it_text.disabled and "num_it must be ≥ 100" in w.error_label.value and w.start_button.disabled
    assert not GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), num_it=200).auto_box.value
    custom = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), num_it=gns_widget.interval.AutoStop(0.05, 5000))
    assert custom.auto_box.value and custom.auto_box.description == "auto (until ±5%)"
    assert "at most 5,000 small batches" in custom.num_it_help.value


def test_auto_run_stops_early_and_the_progress_says_so(train_dl, monkeypatch):
    "The bar's cap is AutoStop's max_it while it runs; it ends full at the iteration where the interval is narrow."
    seen = {}

    def run(*args, num_it, on_update, **kwargs):
        seen["num_it"] = num_it
        labels = seen.setdefault("labels", [])

        def update(record):
            on_update(record)
            labels.append(w.progress_label.value)

        return gns_widget.bs_find(*args, num_it=num_it, on_update=update, **kwargs)

    monkeypatch.setattr(runner, "bs_find", run)
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), lr=0.0, n_batch=10)
    assert w.start()
    res = w.wait(120)
    assert isinstance(seen["num_it"], gns_widget.interval.AutoStop) and seen["num_it"].max_it == 20_000
    assert any("of at most 20000" in label and "stops early once the noise scale is within ±10%" in label
               for label in seen["labels"])
    done = int(res.history.iteration.iloc[-1])
    assert res.reliable and done < 20_000 and res.interval.rel_halfwidth <= 0.1
    assert w.progress.value == w.progress.max == done
    assert w.progress_label.value.startswith(f"finished at iteration {done}/{done} (auto: the noise scale is within")
    widened = seen["num_it"].widened_to
    assert (f"windows widened to n_batch {widened}" in w.progress_label.value) == bool(widened)


def test_beta_slider_starts_on_auto_and_passes_none(train_dl):
    "'auto' lets bs_find pick beta from the lr (1 at lr=0, 0.99 while training); a number is passed as is."
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss())
    assert w.beta_slider.value == view.AUTO_BETA and w.settings()["beta"] is None
    assert 1.0 in w.beta_slider.options
    w.beta_slider.value = 0.999
    assert w.settings()["beta"] == 0.999


@pytest.mark.usefixtures("step_bound_device")
def test_epochs_box_gives_the_advice_an_epoch_budget(train_dl):
    "With the user's epochs the advice says how many to train at the new batch size; editing the box re-words it."
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), epochs=0)
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), epochs=8, **QUICK)
    assert w.epochs_text.value == 8
    w.start()
    res = w.wait(60)
    assert res.reliable, res.reason
    advised = w.advice()
    assert advised == res.advice(epochs=8, rule=w.rule) and advised.epochs is not None
    assert html.escape(f"epochs 8 → {advised.epochs}") in w.result_box.value
    w.epochs_text.value = 4
    assert html.escape(f"epochs 4 → {w.advice().epochs}") in w.result_box.value and "epochs 8" not in w.result_box.value
    w.epochs_text.value = 0  # not given: a factor, no number
    assert w.advice().epochs is None and "type your epochs in" in w.result_box.value



def test_the_panels_advice_is_the_results_at_the_panels_lr_and_epochs(train_dl):
    """w.advice() is w.result.advice(lr, epochs) with what the panel holds: the lr rule too is the result's (a factory
    tells its optimizer once built), not one the panel would read again."""
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), opt=lambda params: torch.optim.SGD(params, lr=0.1),
                  epochs=5, train_lr=0.1, **QUICK)
    w.start()
    res = w.wait(60)
    assert res.rule == "sgd" and w.rule == "momentum"  # the panel cannot tell the factory's optimizer unbuilt
    assert w.advice() == res.advice(lr=w.training_lr(), epochs=5) == res.advice(lr=0.1, epochs=5)
    assert w.advice().rule == "sgd"

def test_a_measurement_warning_is_given_when_the_panel_is_built_not_again_on_start(train_dl):
    "An unshuffled loader is named under the cell that builds the panel; the worker thread's run does not repeat it."
    dl = DataLoader(train_dl.dataset, batch_size=32)  # shuffle=False
    with pytest.warns(UserWarning, match="does not shuffle"):
        w = GNSWidget(mlp(), dl, nn.CrossEntropyLoss(), **QUICK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # no help from Python's once-per-line registry
        assert w.start()
        assert w.wait(timeout=120) is not None
    assert not [c for c in caught if "does not shuffle" in str(c.message)]
    with pytest.warns(UserWarning, match="does not shuffle"):  # another loader is told anew
        GNSWidget(mlp(), DataLoader(train_dl.dataset, batch_size=16), nn.CrossEntropyLoss(), **QUICK)


# ---------------------------------------------------------------- the result area and wording (issue 19)
def _advice_of_kind(kind: str, bs: int = 32, new: int = 64):
    from gns_widget.advice import BatchAdvice

    headline = {"grow": f"Train with batch size {new} · lr 0.0037 · 7 epochs", "keep": f"Keep batch size {bs}: "
                "a different batch size would not train faster here", "uncertain": "Not sure yet: run longer (auto)"}
    return BatchAdvice(new if kind == "grow" else bs if kind == "keep" else None, None, None, f"{kind} text", bs,
                       "85 (78–94)", kind=kind, headline=headline[kind])


@pytest.mark.parametrize("kind, colour, can_apply", [("grow", "finished", True), ("keep", "idle", False),
                                                      ("uncertain", "warn", False)])
def test_one_headline_coloured_by_kind_and_details_collapsed(train_dl, monkeypatch, kind, colour, can_apply):
    "Item 1/2: the advice's headline, big, at the top of the result; keep is a normal outcome, never red."
    advice = _advice_of_kind(kind)
    _patched_run(monkeypatch, lambda res: setattr(res, "advice", lambda *a, **k: advice))
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    assert w.details.layout.display == "none" and w.headline.value == ""  # nothing to show before a run
    w.start()
    w.wait(60)
    assert html.escape(advice.headline) in w.headline.value and f"gns-c-{colour}" in w.headline.value
    assert "gns-c-error" not in w.headline.value + w.status.value
    children = list(w.children)
    assert children.index(w.headline) + 1 == children.index(w.details) < children.index(w.charts)
    assert w.details.selected_index is None and w.details.layout.display is None  # shown, collapsed
    assert w.details.children == (w.result_box,) and "how it was measured" in w.result_box.value
    assert w.apply_button.disabled == (not can_apply)
    tip = w.apply_button.tooltip
    assert tip.startswith("nothing to apply") != can_apply
    if kind == "keep":
        assert "measured at batch size 32, the size the advice keeps" in tip and "status: finished" in w.status.value
    if can_apply:
        w.apply()
        assert w.apply_button.tooltip.startswith("applied: the train loader's batch size is 64")


def test_apply_returns_the_loader_unchanged_when_there_is_nothing_to_apply(train_dl):
    "Issue 19 item 1: `train_dl = w.apply()` before any run kept nothing (None); it gets the loader back."
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    assert w.apply() is train_dl and "no finished run yet" in w.status.value and "gns-c-idle" in w.status.value


def test_a_run_stopped_before_its_first_estimate_says_so(train_dl):
    "Item 8: not 'stopped after 0 iterations; model restored (partial result)'."
    def slow_loss(out, y):  # 50 ms a batch: the first estimate (10 batches) is half a second away
        threading.Event().wait(0.05)
        return nn.functional.cross_entropy(out, y)

    w = GNSWidget(mlp(), train_dl, slow_loss, **LONG)
    w.start()
    w.stop()
    w.wait(30)
    assert not w._listener.records
    assert "stopped before the first estimate; model restored" in w.status.value and "partial" not in w.status.value
    assert texts.end_status(w.result, None, None, 0, None)[0] == "stopped before the first estimate; model restored"


def test_texts_are_plain():
    "Item 8: no formula or code-speak in the headline, titles or reasons the panel shows."
    assert [spec[1] for spec in CHARTS] == ["gradient noise", "gradient signal", "noise scale, in examples"]
    assert "tr(Σ)" in CHARTS[0][4] and "|G|²" in CHARTS[1][4]  # formulas in the captions
    assert texts.plain("no suggestion: |G|² is not distinguishable from its noise") == \
        "no suggestion: the gradient signal is still lost in its noise"
    assert "rounding line" not in texts.plain("bs 64; 64 as the interval reaches below the rounding line 90.5")
    assert "pass" not in texts.plain("train ×1.3 the epochs (the paper's trade-off; pass epochs= for a number)")
    assert "pass lr=" not in texts.plain("lr 0.1 (the finder run's lr: pass lr= the one you train with) → 0.2")
    assert "widen" not in texts.auto_end(type("A", (), {"widened_to": 40, "interval": None, "saturated": False,
                                                         "max_it": 100, "rel_halfwidth": 0.1})())


def test_one_tick_format_on_every_y_axis():
    "Item 3: '5e+3, 1e+4' on one chart against '1,000' on another; the title clears the top tick."
    charts = GNSCharts()
    assert {fig.axes[1].tick_format for fig in charts.figures} == {Y_FORMAT}
    assert all(fig.fig_margin["top"] >= 44 for fig in charts.figures)


def test_tradeoff_sizes_are_consecutive_and_fit_the_dataset():
    "Item 9: 1,438 examples listed sizes up to 32,768, and without a suggestion 128 and 256 were skipped."
    assert texts.tradeoff_sizes(32, 64, 1438) == [8, 16, 32, 64, 128]  # ≥ 10 steps an epoch: at most 143
    assert texts.tradeoff_sizes(32, 512, 10**6) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert texts.tradeoff_sizes(32, 1024, 300) == [8, 16, 32]  # the run's own size stays
    assert texts.tradeoff_sizes(48, 64, None) == [8, 16, 32, 48, 64, 128, 256]


@pytest.mark.usefixtures("step_bound_device")
def test_your_lr_is_what_the_advice_scales_for_a_torch_model(train_dl):
    "Item 10: a plain torch model had no way to enter the lr it trains with; the advice used the run's."
    with pytest.raises(ValueError, match="lr must be"):
        GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), train_lr=-1.0)
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), train_lr=0.05, **QUICK)
    assert w.train_lr_text.value == 0.05 and w.train_lr_text.tooltip == texts.HELP["train_lr"]
    assert any(w.train_lr_text in box.children for box in w.children[0].children)
    w.start()
    res = w.wait(60)
    assert w.advice().lr == pytest.approx(0.05 * w.advice().lr_factor)
    w.train_lr_text.value = 0.2  # re-words the advice at once
    assert w.advice().lr == pytest.approx(0.2 * res.advice(lr=0.2).lr_factor)
    assert "0.2 →" in w.result_box.value
    w.train_lr_text.value = -1.0
    assert "your lr must be" in w.error_label.value and w.start_button.disabled


def test_kernel_interrupt_stops_a_run_started_with_the_button(train_dl, monkeypatch):
    """Item 6: ■ on an idle kernel (a run started from Start) was ignored (ipykernel ignores SIGINT between
    cells) and the run went on. The handler the kernel puts back after the click now stops it."""
    import signal as sig

    from gns_widget.widget import interrupt

    class Kernel:  # what ipykernel's pre_handler_hook leaves while it handles the click
        saved_sigint_handler = sig.SIG_IGN

    kernel = Kernel()
    monkeypatch.setattr(interrupt, "_kernel", lambda: kernel)
    model = mlp()
    before = snapshot(model)
    w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), **LONG)
    w.start_button.click()
    assert isinstance(kernel.saved_sigint_handler, interrupt._StopRuns)
    assert wait_for(lambda: w.progress.value > 0)
    old = sig.signal(sig.SIGINT, kernel.saved_sigint_handler)  # the kernel's post_handler_hook, then idle
    try:
        os.kill(os.getpid(), sig.SIGINT)
        assert wait_for(lambda: not w.running)
    finally:
        sig.signal(sig.SIGINT, old)
    assert "interrupted (kernel interrupt) after" in w.status.value and same_weights(model, before)
    w.start_button.click()  # a second run wraps the handler once, not twice
    assert isinstance(kernel.saved_sigint_handler, interrupt._StopRuns)
    assert not isinstance(kernel.saved_sigint_handler.previous, interrupt._StopRuns)
    w.stop()
    w.wait(30)


def test_apply_tooltip_says_what_apply_will_do():
    "Item 10: the tooltip said 'train with the advised batch size from now on' before and after Apply alike."
    grow = _advice_of_kind("grow")
    grow = type(grow)(**{**grow.__dict__, "lr": 0.0037})
    assert texts.apply_tooltip(grow) == f"{texts.APPLY_TIP}: batch size 32 → 64"  # a torch model
    assert "tick 'also set learn.lr'" in texts.apply_tooltip(grow, lr_too=False)
    assert texts.apply_tooltip(grow, lr_too=True).endswith(", and learn.lr → 0.0037")
    assert texts.apply_tooltip(None).startswith("nothing to apply yet")
    assert texts.apply_tooltip(grow, texts.Applied(32, 64, True, "w")).startswith("applied:")


@pytest.mark.usefixtures("step_bound_device")
def test_apply_follows_the_advice_where_the_raw_suggestion_is_withheld(train_dl, monkeypatch):
    "An interval too wide for a raw suggestion can still carry a grow at its low end: Apply applies that advice."
    from gns_widget.suggest import Suggestion

    def wide(res):
        res.suggestion = Suggestion(None, "uncertain: noise scale too wide for a suggestion", res.interval,
                                    usable=True)

    _patched_run(monkeypatch, wide)
    w = GNSWidget(mlp(), train_dl, nn.CrossEntropyLoss(), **QUICK)
    w.start()
    res = w.wait(60)
    advice = w.advice()
    assert not res.reliable and advice.kind == "grow" and not w.apply_button.disabled
    assert current_batch_size(w.apply()) == advice.batch_size > 32


def test_the_uncertain_headline_says_what_to_do_in_the_panel_not_in_code():
    "The core's 'run longer (num_it='auto')' is code-speak in a panel: it reads 'tick auto' there."
    assert texts.plain("Not sure yet: keep batch size 32; run longer (num_it='auto')") == \
        "Not sure yet: keep batch size 32; run longer (tick 'auto')"
