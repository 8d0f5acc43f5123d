"""`AdaptiveView`, the adaptive batch size live in the notebook, without a browser: what its charts, headline and
details show after a fit, its throttle, the background fit (wait, Stop, an error), watch() on the user's own fit or
loop, and that a view attached changes nothing in training."""
import math
import re
import threading
import time

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from torch import nn

from gns_widget import AdaptiveBatchSize, AdaptiveLoader, AdaptiveView
from gns_widget.adaptive import Decision
from gns_widget.widget.adaptive_view import Snapshot, Throttle, _thin, decision_text, headline_html, plain_reason
from tests.test_adaptive import STEP_BOUND, _learner, _loop, _torch_setup  # the same problems, the batch grows


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#x27;", "'")


def _check_charts(view: AdaptiveView, record, records) -> None:
    "Every chart shows the record: noise scale by step, batch size and lr per step, each change marked on all three."
    c, steps = view.charts, record.steps
    assert np.array_equal(c.lines["bs"].x, steps.step) and np.array_equal(c.lines["bs"].y, steps.bs)
    assert np.array_equal(c.lines["lr"].x, steps.step) and np.array_equal(c.lines["lr"].y, steps.lr)
    ns = [(r.iteration, r.noise_scale) for r in records if r.noise_scale > 0 and math.isfinite(r.noise_scale)]
    assert ns and np.array_equal(c.lines["noise_scale"].x, [i for i, _ in ns])
    assert np.array_equal(c.lines["noise_scale"].y, [v for _, v in ns])
    changes = record.changes
    for name in ("noise_scale", "bs", "lr"):
        assert list(c.markers[name].x) == [d.step for d in changes], name
        assert list(c.markers[name].names) == [decision_text(d) for d in changes]
        assert np.array(c.rules[name].x).ravel().tolist() == [d.step for d in changes for _ in (0, 1)]
    assert list(c.markers["bs"].y) == [d.new_bs for d in changes]
    assert c.figures["bs"].axes[0].scale.max == len(steps)  # the x axis ends at the run's last step


# ---------------------------------------------------------------- the background fit
def test_a_background_fit_shows_its_record_and_trains_exactly_as_without_the_view():
    plain_cb = AdaptiveBatchSize(throughput=STEP_BOUND, max_overhead=1)
    plain = _learner()
    with plain.no_bar(), plain.no_logging():
        plain.fit_one_cycle(6, 3e-3, cbs=[plain_cb])

    learn, cb, view = _learner(), AdaptiveBatchSize(throughput=STEP_BOUND, max_overhead=1), AdaptiveView()
    start = time.monotonic()
    view.fit(learn, 6, 3e-3, cb=cb)
    assert view.running  # it returned at once: the fit goes on in the background
    assert view.wait() is cb.record and not view.running and view.error is None
    elapsed = time.monotonic() - start

    # bit-identical: the view only reads
    for a, b in zip(plain.model.parameters(), learn.model.parameters()):
        assert torch.equal(a, b)
    assert [(d.step, d.old_bs, d.new_bs) for d in cb.record.decisions] == \
        [(d.step, d.old_bs, d.new_bs) for d in plain_cb.record.decisions]
    assert cb.record.rows == plain_cb.record.rows and cb.record.changes  # the batch size moved, in both

    _check_charts(view, cb.record, cb.recorder_.records)
    steps = cb.record.steps
    headline = _text(view.headline.value)
    assert "Finished at 100% of the planned run" in headline and f"batch size {steps.bs.iloc[-1]}" in headline
    assert f"{len(steps)} steps instead of the planned 240 at batch size 16 ({240 / len(steps):.2f}× fewer)" in headline
    details = _text(view.details_box.value)
    for d in cb.record.decisions:
        assert f" {d.step} {d.epoch} {d.old_bs} {d.new_bs} " in details
    assert f"{cb.record.changes[0].gain:.2f}×" in details and "each epoch" in details and "valid loss" in details
    assert "finished" in _text(view.status.value) and view.stop_button.disabled
    assert view.progress.value == 1.0
    # throttled: a few redraws a second, not one per step, and the last one after the last step
    assert 1 <= view.redraws <= elapsed / 0.25 + 3 and view.redraws < len(steps) / 2
    # the Learner and the callback as they were
    assert learn.dls.train.bs == 16 and learn.n_epoch == 6 and cb.on_step is None and cb.on_decision is None
    assert learn.logger is print


def test_stop_ends_the_fit_at_the_next_batch_cleanly():
    view, seen = AdaptiveView(), []

    def mine(record):  # the user's own hook: chained, and it presses Stop at the 10th step
        seen.append(len(record.rows))
        if len(record.rows) == 10:
            view.stop()

    learn, cb = _learner(), AdaptiveBatchSize(throughput=STEP_BOUND, max_overhead=1, on_step=mine)
    view.fit(learn, 20, 3e-3, cb=cb, method="fit")
    record = view.wait()
    assert record is cb.record and len(record.rows) == 10 and seen == list(range(1, 11))
    assert view.stopped and view.error is None and not view.running
    assert "stopped at" in _text(view.status.value) and "after 10 steps" in _text(view.status.value)
    assert "Stopped at" in _text(view.headline.value) and "10 steps, worth 10 of the 800 planned" in \
        _text(view.headline.value)
    assert learn.dls.train.bs == 16 and learn.n_epoch == 20  # fastai's after_fit ran: the callback put them back
    assert cb.on_step is mine  # given back
    _check_charts(view, record, cb.recorder_.records)


class _Boom(Callback):
    def after_batch(self):
        if self.training and self.iter == 4:
            raise RuntimeError("boom at batch 5")


def test_an_error_in_the_fit_is_shown_and_kept():
    view = AdaptiveView()
    view.fit(_learner(), 2, 3e-3, cb=AdaptiveBatchSize(throughput=STEP_BOUND, max_overhead=1), cbs=[_Boom()])
    assert view.wait() is None
    assert isinstance(view.error, RuntimeError) and not view.running and not view.stopped
    status = view.status.value
    assert "gns-c-error" in status and "RuntimeError" in status and "boom at batch 5" in _text(status)
    assert view.stop_button.disabled and "boom at batch 5" in str(view.error)


def test_close_during_a_fit_returns_once_the_fit_has_ended():
    started = threading.Event()
    learn = _learner()
    def mine(record):
        if len(record.rows) >= 3:
            started.set()

    cb = AdaptiveBatchSize(throughput=STEP_BOUND, max_overhead=1, on_step=mine)
    view = AdaptiveView()
    view.fit(learn, 50, 3e-3, cb=cb)
    assert started.wait(30)
    view.close()
    assert not view.running and view.stopped and len(cb.record.rows) < 50 * 40
    assert not [t for t in threading.enumerate() if t.name.startswith("AdaptiveView fit")]
    assert learn.dls.train.bs == 16 and learn.n_epoch == 50 and cb.on_step is mine  # the user's hook is back


def test_bad_arguments_are_named():
    view = AdaptiveView()
    with pytest.raises(ValueError, match="method"):
        view.fit(_learner(), 2, method="fine_tune")
    with pytest.raises(ValueError, match="n_epoch"):
        view.fit(_learner(), 0)
    with pytest.raises(TypeError, match="Learner"):
        view.fit(nn.Linear(2, 2), 2)
    with pytest.raises(TypeError, match="AdaptiveBatchSize or an AdaptiveLoader"):
        view.watch(object())
    with pytest.raises(ValueError, match="interval"):
        AdaptiveView(interval=0)


# ---------------------------------------------------------------- watch
def test_watch_follows_the_users_own_fit_and_chains_their_hooks():
    decisions = []
    cb = AdaptiveBatchSize(throughput=STEP_BOUND, max_overhead=1, on_decision=decisions.append)
    view = AdaptiveView().watch(cb)
    learn = _learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(6, 3e-3, cbs=[cb])
    assert decisions == cb.record.decisions and cb.record.changes  # theirs still called, each decision once
    _check_charts(view, cb.record, cb.recorder_.records)  # the last step drew at once: the plan was done
    assert "finished" in _text(view.status.value) and "Finished at 100%" in _text(view.headline.value)
    view.unwatch()
    assert cb.on_decision == decisions.append and cb.on_step is None


def _torch_run(view: AdaptiveView | None, on_step=None):
    ds, model, opt = _torch_setup()
    adapt = AdaptiveLoader(ds, 16, epochs=5, model=model, opt=opt, loss_func=nn.functional.cross_entropy,
                           throughput=STEP_BOUND, on_step=on_step, max_overhead=1)
    if view is not None:
        view.watch(adapt)
    _loop(adapt, model, opt)
    return adapt, model


def test_watch_follows_a_plain_torch_loop_without_changing_it():
    steps, view = [], AdaptiveView(interval=0.05)
    adapt, model = _torch_run(view, on_step=lambda r: steps.append(len(r.rows)))
    plain, plain_model = _torch_run(None)
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    assert adapt.record.rows == plain.record.rows and adapt.record.changes
    assert steps == list(range(1, len(adapt.record.rows) + 1))  # the user's hook, every step
    _check_charts(view, adapt.record, adapt.recorder.records)
    assert view.stop_button.layout.display == "none"  # Stop is for view.fit: a loop stops with ■


# ---------------------------------------------------------------- throttle and words
def test_the_throttle_draws_a_few_times_a_second_and_always_the_last_state():
    shown, state = [], {"n": 0}
    throttle = Throttle(lambda: shown.append(state["n"]), interval=0.1)
    start = time.monotonic()
    while time.monotonic() - start < 0.5:
        state["n"] += 1
        throttle.poke()
    elapsed = time.monotonic() - start
    time.sleep(0.25)  # the trailing draw
    assert state["n"] > 1000 and 2 <= throttle.draws <= elapsed / 0.1 + 2
    assert shown[-1] == state["n"]  # the final state shows, though no poke came after it
    throttle.poke()
    throttle.flush()  # the end of a run: drawn now, and the pending draw dropped
    n = throttle.draws
    time.sleep(0.15)
    assert throttle.draws == n


def test_draws_from_two_threads_never_overlap():
    inside, overlaps = threading.Lock(), []

    def draw():
        if not inside.acquire(blocking=False):
            overlaps.append(1)
            return
        time.sleep(0.002)
        inside.release()

    throttle = Throttle(draw, interval=0.0)
    threads = [threading.Thread(target=lambda: [throttle.poke() for _ in range(50)]) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps and throttle.draws == 150


def test_the_words_are_plain():
    for reason in ("noise scale 100 (58–181): 64 makes ×2.43 the progress per second of 16 at the low end",
                   "64 makes the most progress per second at the noise scale's low end 66.2",
                   "32 would gain ×1.05 at the low end 9.3, below the ×1.10 a move needs",
                   "|G|² is not yet distinguishable from its noise (the interval reaches 0)",
                   "too few estimates for an interval yet; measuring a step adds 12% to it, so 30 of 72 steps were "
                   "measured (max_overhead=0.02 of the run)"):
        words = plain_reason(reason)
        assert not re.search(r"low end|\|G\||progress per second|interval|adds", words), words
    assert "measuring costs 12% of a step on this machine, so 30 of the 72 steps so far were measured" in words
    d = Decision(40, 1, 0.3, 16, 64, 100.0, 58.0, 181.0, 58.0, 2.43, 1.56, "noise scale 100 (58–181): 64 makes "
                 "×2.43 the progress per second of 16 at the low end")
    assert decision_text(d).startswith("step 40 (epoch 1): batch size 16 → 64, lr ×1.56, predicted 2.43× ")
    empty = Snapshot.of(None, [])
    assert empty.steps == 0 and headline_html(empty) == ""


def test_a_long_run_is_thinned_but_keeps_every_change():
    keep = np.array([1234, 1235, 4000])
    i = _thin(10_000, keep)
    assert len(i) <= 2010 and i[-1] == 9_999 and set(keep) <= set(i) and np.all(np.diff(i) > 0)
    assert np.array_equal(_thin(50), np.arange(50))


def test_a_view_that_fails_to_draw_does_not_end_the_training():
    view = AdaptiveView(interval=0.01)

    def broken(*_, **__):
        raise RuntimeError("no frontend")

    view.charts.show = broken
    adapt, _ = _torch_run(view)
    assert adapt.pct == 1.0  # trained to the end
    assert "could not redraw" in _text(view.status.value) and "gns-c-warn" in view.status.value
