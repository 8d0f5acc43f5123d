"""`AdaptiveView`: the adaptive batch size live in the notebook while a model trains.

A sibling of the finder's panel (`GNSWidget`), in its chart style: three live bqplot charts over optimizer
steps (the noise scale, smoothed, with the batch size dashed in the same units; the batch size; the effective
lr), every decision that moved the batch size marked on all three (a dashed rule and a diamond whose tooltip
says step, from → to, predicted gain and why), a headline (batch size now, share of the planned run, steps so
far and about how many in all) and, collapsed, the decision history and each epoch's results.

Two ways in:

- `view.fit(learn, 5, 3e-3)` trains on a daemon thread (fastai's `fit_one_cycle` by default, `method="fit"` or
  `"fit_flat_cos"` otherwise) with an `AdaptiveBatchSize` (the one given as `cb=`, one already in `learn.cbs`, or
  a new one) and returns at once; Stop (or `view.stop()`, or ■ interrupting the kernel) ends the fit at the next
  batch through fastai's `CancelFitException`; `view.wait()` blocks until it ends. An error in the fit is shown
  in the status line and kept on `view.error`.
- `view.watch(cb_or_loader)` attaches to an `AdaptiveBatchSize` or an `AdaptiveLoader` that the user's own cell
  drives; their `on_step`/`on_decision` functions are chained, not replaced (`unwatch()` puts them back).

The view only observes: its hooks read the callback's record and noise-scale records (host numbers, no device
sync) and never touch the model, the optimizer, the loader or a random generator. A step costs one `poke` of
`Throttle`; the charts are redrawn at most once per `interval` seconds, from the step's thread or a timer
thread, and once more when the run ends, so the last state always shows.
"""
from __future__ import annotations

import atexit
import html
import itertools
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import bqplot as bq
import ipywidgets as ipw
import numpy as np

from ..adaptive import AdaptiveRecord, Decision
from ..steplog import StepLog
from . import texts
from .charts import _LINE, GNSCharts, _caption, chart_box
from .charts import _SUGGESTION as _MARK  # the finder's colours: the curve, and what was decided
from .interrupt import stop_on_kernel_interrupt

__all__ = ["AdaptiveView", "AdaptiveCharts", "Throttle", "Snapshot", "FIT_METHODS", "plain_reason",
           "decision_text", "finished_text", "headline_html", "decisions_html", "epochs_html"]

FIT_METHODS = ("fit_one_cycle", "fit", "fit_flat_cos")  # the Learner methods `fit` runs: one fit, one schedule
MAX_POINTS = 2000  # points per line sent to the browser; longer runs are thinned (every batch-size change kept)
# the panel's STYLE lets words break anywhere (long paths); numbers and headers in these tables stay whole
TABLE_STYLE = ("<style>.gns-adaptive .gns-decisions td,.gns-adaptive .gns-decisions th,.gns-adaptive .gns-epochs td,"
               ".gns-adaptive .gns-epochs th{white-space:nowrap;overflow-wrap:normal}"
               ".gns-adaptive .gns-decisions td.gns-why{white-space:normal;overflow-wrap:break-word}</style>")
_numbers = itertools.count(1)
_live: weakref.WeakSet[_FitJob] = weakref.WeakSet()  # background fits in progress


# ---------------------------------------------------------------- words (pure functions)
_NUM = r"([\d.e+-]*\d)"  # a number as the policy writes it (10.8, 1e+03)
_PLAIN = ((re.compile(r"\|G\|² is not yet distinguishable from its noise \(the interval reaches 0\)"),
           "the gradient signal is still lost in its noise"),
          (re.compile(r"noise scale (\S+) \(([^()]+)\):"), r"noise scale \1 (90% range \2):"),
          (re.compile(r"too few estimates for an interval yet"), "too few noise-scale estimates yet to decide"),
          (re.compile(r"batch size (\d+) is not timed on this device"),
           r"the speed of batch size \1 on this machine is not measured yet"),
          (re.compile(r"makes the most progress per second at the noise scale's low end " + _NUM),
           r"trains fastest at a noise scale of \1 (the cautious end of its 90% range)"),
          (re.compile(r"would gain ×" + _NUM + r" at the low end " + _NUM + r", below the ×" + _NUM +
                      r" a move needs"),
           r"would train \1× faster at a noise scale of \2 (the cautious end of its 90% range), short of the \3× a "
           r"change needs"),
          (re.compile(r"makes ×" + _NUM + r" the progress per second of (\d+) at the low end"),
           r"trains \1× faster than \2 at the cautious end of that range"),
          (re.compile(r"(\d+) is past its bounds now"),
           r"\1 is now bigger than this noise scale allows (more than twice the examples, or the lr)"),
          (re.compile(r"measuring a step adds (\d+)% to it, so (\d+) of (\d+) steps were measured \(max_overhead="
                      + _NUM + r" of the run\)"),
           r"measuring costs \1% of a step on this machine, so \2 of the \3 steps so far were measured, to keep it "
           r"within max_overhead=\4 of the run's time"),
          (re.compile(r"at the (?:noise scale's )?low end"), "at the cautious end of the noise scale's 90% range"),
          (re.compile(r"progress per second"), "training speed"))


def plain_reason(reason: str) -> str:
    "A decision's reason with the policy's terms said plainly (`widget.texts.plain` does the same for the finder)."
    for pattern, words in _PLAIN:
        reason = pattern.sub(words, reason)
    return texts.plain(reason)


def decision_text(d: Decision) -> str:
    "One line for a decision's marker: step, from → to, the predicted gain and why."
    if not d.changed:
        return f"step {d.step} (epoch {d.epoch}): kept batch size {d.old_bs}: {plain_reason(d.reason)}"
    return (f"step {d.step} (epoch {d.epoch}): batch size {d.old_bs} → {d.new_bs}, lr ×{d.lr_factor:.3g}, "
            f"predicted {d.gain:.2f}× the training speed: {plain_reason(d.reason)}")


@dataclass(frozen=True)
class Snapshot:
    """What a redraw shows, read once from the run's record: per step (1, 2, ...) the batch size, the effective lr
    and the planned run's progress, the noise-scale estimates by step and the decisions so far."""
    step: np.ndarray
    bs: np.ndarray
    lr: np.ndarray
    pct: np.ndarray
    epoch: np.ndarray
    ns_step: np.ndarray
    noise_scale: np.ndarray
    decisions: list[Decision]
    base_bs: int | None
    planned: float  # the planned run's steps at the base batch size (0: no run yet)

    @classmethod
    def of(cls, record: AdaptiveRecord | None, records: Sequence[Any]) -> Snapshot:
        cols = (record.rows if record is not None else StepLog()).columns()  # copies: the training thread appends
        recs = list(records)
        return cls(cols["step"], cols["bs"], cols["lr"], cols["pct"], cols["epoch"],
                   np.array([r.iteration for r in recs], dtype=int),
                   np.array([r.noise_scale for r in recs], dtype=float),
                   list(record.decisions) if record is not None else [],
                   record.base_bs if record is not None else None,
                   float(record.planned_steps) if record is not None else 0.0)

    @property
    def steps(self) -> int:
        return len(self.step)

    @property
    def changes(self) -> list[Decision]:
        return [d for d in self.decisions if d.changed]

    @property
    def done(self) -> bool:
        return self.steps > 0 and self.pct[-1] >= 1.0

    def projected_steps(self) -> int:
        "About how many optimizer steps the whole run takes: those so far, and the rest at the last step's pace."
        n = self.steps
        if n == 0:
            return int(math.ceil(self.planned))
        left = (1.0 - self.pct[-1]) * self.planned
        last = (self.pct[-1] - (self.pct[-2] if n > 1 else 0.0)) * self.planned  # the last step's worth, in plan steps
        return n + (int(math.ceil(left / last - 1e-9)) if left > 0 and last > 0 else 0)


def headline_html(s: Snapshot, state: str = "running") -> str:
    "The one plain line over the charts: the batch size now, the share of the planned run and the steps."
    if s.planned <= 0:
        return ""
    if s.steps == 0:
        main, sub = f"Batch size {s.base_bs}: waiting for the first training step", ""
    else:
        bs, pct = int(s.bs[-1]), float(s.pct[-1])
        moved = f" (started at {s.base_bs})" if bs != s.base_bs else ""
        if state == "running":
            main = f"Batch size {bs} now{moved} · {pct:.0%} of the planned run"
            sub = (f"step {s.steps:,} of about {s.projected_steps():,} · the plan: {s.planned:,.0f} steps at batch "
                   f"size {s.base_bs}")
        else:
            how = "Finished" if s.done else "Stopped" if state == "stopped" else "Ended"
            main = f"{how} at {pct:.0%} of the planned run · batch size {bs}{moved}"
            sub = finished_text(s) if s.done else (f"{s.steps:,} steps, worth {s.planned * pct:,.0f} of the "
                                                     f"{s.planned:,.0f} planned at batch size {s.base_bs}")
        if s.changes:
            sub += " · batch size " + " → ".join([str(s.changes[0].old_bs)] + [str(d.new_bs) for d in s.changes])
    sub_html = (f'<div style="color:var(--jp-ui-font-color2,#616161);font-size:0.95em">{html.escape(sub)}</div>'
                if sub else "")
    return (f'<div class="gns-answer gns-c-idle" style="font-size:1.3em;font-weight:600;line-height:1.35;'
            f'margin:6px 0 2px">{html.escape(main)}</div>{sub_html}')


def finished_text(s: Snapshot) -> str:
    "How many steps the planned run took, against the plan at the user's batch size."
    fewer = f" ({s.planned / s.steps:.2f}× fewer)" if s.steps and s.steps < s.planned else ""
    return f"{s.steps:,} steps instead of the planned {s.planned:,.0f} at batch size {s.base_bs}{fewer}"


def decisions_html(decisions: Sequence[Decision]) -> str:
    "Every look at the noise scale as a table: step, epoch, from, to, predicted gain, why (a kept size: no gain)."
    if not decisions:
        return "<b>decisions</b>: none yet (the batch size is reconsidered at the start of each epoch after the first)"
    rows = []
    for d in decisions:
        cls = " class='gns-advised'" if d.changed else ""
        gain = f"{d.gain:.2f}×" if d.changed else "–"
        rows.append(f"<tr{cls}><td>{d.step:,}</td><td>{d.epoch}</td><td>{d.old_bs}</td><td>{d.new_bs}</td>"
                    f"<td>{gain}</td><td class='gns-why' style='text-align:left'>"
                    f"{html.escape(plain_reason(d.reason))}</td></tr>")
    return ("<b>decisions</b>: each time the batch size was reconsidered (bold: it changed; the predicted gain is "
            "the training speed at the new size over the old, on this machine)"
            "<div style='overflow-x:auto;max-width:100%'><table class='gns-tradeoff gns-decisions'><tr><th>step</th>"
            "<th>epoch</th><th>from</th><th>to</th><th>predicted gain</th><th style='text-align:left'>why</th></tr>"
            f"{''.join(rows)}</table></div>")


def epochs_html(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    "fastai's per-epoch results (what its progress bar would print), as a small table."
    if not rows:
        return ""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(n).replace('_', ' '))}</th>" for n in names)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return ("<b>each epoch</b><div style='overflow-x:auto;max-width:100%'><table class='gns-tradeoff gns-epochs'>"
            f"<tr>{head}</tr>{body}</table></div>")


# ---------------------------------------------------------------- throttle
class Throttle:
    """Calls `draw()` at most once per `interval` seconds however often `poke()` is called.

    A poke draws at once when the last draw is old enough, else a timer draws once the interval is up: the
    latest state always shows within `interval` of the last poke, however the run ends. Draws never overlap.
    `flush()` draws now (the end of a run); `cancel()` drops a pending draw. `draws` counts them.
    """

    def __init__(self, draw: Callable[[], None], interval: float = 0.25):
        self.draw, self.interval = draw, interval
        self.draws = 0
        self._last = -math.inf
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # the timer's state
        self._drawing = threading.Lock()  # one draw at a time

    def poke(self) -> None:
        with self._lock:
            if self._timer is not None:  # a draw is due already: it will show this state too
                return
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                self._timer = threading.Timer(wait, self._fire)
                self._timer.daemon = True
                self._timer.start()
                return
            self._last = time.monotonic()
        self._draw()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
        self._draw()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def flush(self) -> None:
        self.cancel()
        with self._lock:
            self._last = time.monotonic()
        self._draw()

    def _draw(self) -> None:
        with self._drawing:
            self.draws += 1
            self.draw()


# ---------------------------------------------------------------- charts
CHARTS = (  # (name, title, y label, log y, the plain line under the chart)
    ("noise_scale", "noise scale, in examples", "examples", True,
     "The batch size beyond which bigger batches barely cut the steps needed, as measured while training "
     "(smoothed). Dashed: the batch size, in the same units. Diamonds: the batch size changed here."),
    ("bs", "batch size", "examples", False,
     "Examples per optimizer step. It moves only where a bigger (or smaller) batch is predicted to train faster "
     "on this machine; hover a diamond for why."),
    ("lr", "learning rate", "lr", False,
     "The lr each step used: your schedule's, scaled for the batch size as your optimizer needs."),
)


def _thin(n: int, keep: np.ndarray | None = None, limit: int = MAX_POINTS) -> np.ndarray:
    "Indices of at most about `limit` evenly spread points of `n`, the last always and every index in `keep`."
    if n <= limit:
        return np.arange(n)
    idx = np.unique(np.concatenate([np.linspace(0, n - 1, limit).astype(int), [n - 1],
                                    keep if keep is not None else []]).astype(int))
    return idx


def _chart(name: str, title: str, ylabel: str, log: bool, help_text: str):
    "One figure in the finder's style (`charts._figure`), over optimizer steps, with decision rules and markers."
    x = bq.LinearScale(min=0.0, max=1.0, allow_padding=False)
    y = bq.LogScale(min=1.0, max=1000.0) if log else bq.LinearScale(min=0.0, max=1.0, allow_padding=False)
    sc = {"x": x, "y": y}
    line = bq.Lines(x=[], y=[], scales=sc, colors=[_LINE], interpolation="step-before" if name == "bs" else "linear")
    rules = bq.Lines(x=[], y=[], scales=sc, colors=[_MARK], line_style="dashed", stroke_width=1, opacities=[0.7])
    markers = bq.Scatter(x=[], y=[], names=[], display_names=False, scales=sc, colors=[_MARK], marker="diamond",
                         default_size=48, tooltip=bq.Tooltip(fields=["name"], labels=["decision"]))
    marks = [rules, line, markers]
    extra = None
    if log:  # the batch size over the noise scale: the policy keeps it below, planning at the cautious end
        extra = bq.Lines(x=[], y=[], scales=sc, colors=[_MARK], line_style="dashed", interpolation="step-before")
        marks.insert(1, extra)
    box, fig = chart_box(f"gns-chart-adaptive-{name.replace('_', '-')}", title, "optimizer step", ylabel, marks, x, y,
                         help_text)
    return box, fig, line, rules, markers, extra


class AdaptiveCharts(ipw.HBox):
    """The three live figures; `show(snapshot)` redraws them in one batch (one message per changed widget)."""

    def __init__(self):
        built = {spec[0]: _chart(*spec) for spec in CHARTS}
        self.figures = {k: b[1] for k, b in built.items()}
        self.lines = {k: b[2] for k, b in built.items()}
        self.rules = {k: b[3] for k, b in built.items()}
        self.markers = {k: b[4] for k, b in built.items()}
        self.bs_over_noise = built["noise_scale"][5]
        self.captions = {k: b[0].children[1] for k, b in built.items()}
        super().__init__([b[0] for b in built.values()], layout=ipw.Layout(flex_flow="row wrap", width="100%"))
        self.add_class("gns-charts")

    def show(self, s: Snapshot, ended: bool = False) -> None:
        """Draw `s`; the x axis runs to about the run's last step (its projection), or to the last one taken once
        it `ended` (finished, stopped or failed)."""
        total = (s.steps if ended or s.done else max(s.projected_steps(), s.steps, 1)) if s.planned > 0 else 0
        changed_at = np.flatnonzero(np.diff(s.bs)) if s.steps else np.array([], dtype=int)
        keep = np.unique(np.concatenate([changed_at, changed_at + 1])) if len(changed_at) else None
        i = _thin(s.steps, keep)
        ns_ok = np.isfinite(s.noise_scale) & (s.noise_scale > 0)
        series = {"noise_scale": (s.ns_step[ns_ok].astype(float), s.noise_scale[ns_ok]),
                  "bs": (s.step[i].astype(float), s.bs[i].astype(float)),
                  "lr": (s.step[i].astype(float), s.lr[i])}
        changes = s.changes
        for name, _title, _label, log, help_text in CHARTS:
            x, y = series[name]
            line = self.lines[name]
            with line.hold_sync():
                line.x, line.y = x, y
                line.marker = "circle" if len(x) == 1 else None
            values = list(y)
            if log and s.steps:
                values += [float(s.bs.min()), float(s.bs.max())]
                with self.bs_over_noise.hold_sync():
                    self.bs_over_noise.x, self.bs_over_noise.y = series["bs"]
            elif log:
                with self.bs_over_noise.hold_sync():
                    self.bs_over_noise.x, self.bs_over_noise.y = [], []
            mx, my, names = [], [], []
            for d in changes:
                v = {"noise_scale": d.noise_scale, "bs": float(d.new_bs),
                     "lr": float(s.lr[d.step]) if d.step < s.steps else math.nan}[name]
                if math.isfinite(v) and (v > 0 or not log):
                    mx.append(float(d.step))
                    my.append(v)
                    names.append(decision_text(d))
            values += my
            GNSCharts._axes(self.figures[name], total, values, log)  # the finder's domains and round ticks
            markers = self.markers[name]
            with markers.hold_sync():
                markers.x, markers.y, markers.names = mx, my, names
            scale = self.figures[name].axes[1].scale
            rules = self.rules[name]
            with rules.hold_sync():
                if changes and values:
                    rules.x = [[float(d.step)] * 2 for d in changes]
                    rules.y = [[scale.min, scale.max]] * len(changes)
                    rules.colors = [_MARK] * len(changes)
                else:
                    rules.x, rules.y = [], []
            now = {"noise_scale": f"now: {y[-1]:,.4g}" if len(y) else "",
                   "bs": f"now: {int(y[-1])}" if len(y) else "",
                   "lr": f"now: {y[-1]:.3g}" if len(y) else ""}[name]
            caption = _caption(now, help_text)
            if self.captions[name].value != caption:
                self.captions[name].value = caption


# ---------------------------------------------------------------- the background fit
class _FitJob:
    "One fit on a daemon thread; duck-types `runner.Runner` for `interrupt` (running, stop_event, stop)."

    def __init__(self):
        self.stop_event, self.finished = threading.Event(), threading.Event()
        self.stop_reason: str | None = None
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and not self.finished.is_set()

    def stop(self, reason: str | None = None) -> None:
        if self.running and not self.stop_event.is_set():
            self.stop_reason = reason
        self.stop_event.set()


def _stop_callback(stop_event: threading.Event):
    "A fastai Callback that ends the fit before its next batch once `stop_event` is set (fastai's clean way out)."
    from fastai.callback.core import Callback, CancelFitException

    class StopFit(Callback):
        order = -100  # before any other callback touches the batch

        def before_batch(self):
            if stop_event.is_set():
                raise CancelFitException()

    return StopFit()


@atexit.register
def _stop_all() -> None:
    "A daemon thread still inside torch when Python finalizes aborts the process: stop every fit and wait first."
    for job in list(_live):
        job.stop("the Python process is exiting")
        job.finished.wait(60)


# ---------------------------------------------------------------- the view
class AdaptiveView(ipw.VBox):
    """The adaptive batch size, live: noise scale, batch size and lr over optimizer steps, decisions marked.

    `view.fit(learn, 5, 3e-3)` trains in the background (see `fit`); `view.watch(cb_or_loader)` follows an
    `AdaptiveBatchSize` or `AdaptiveLoader` your own code drives. `interval` is the least time between two redraws
    (seconds). After a run: `view.record` (the `AdaptiveRecord`), `view.error`, `view.stopped`.
    """

    def __init__(self, interval: float = 0.25):
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise ValueError(f"interval must be a number of seconds > 0 (the least time between redraws), "
                             f"got {interval!r}")
        self.source: Any = None  # the AdaptiveBatchSize or AdaptiveLoader watched
        self.error: BaseException | None = None
        self.stopped = False
        self._hooks: tuple[Any, Any, Any, Any] | None = None  # (source, its on_step, on_decision, ours) to put back
        self._job = _FitJob()
        self._state = "idle"
        self._epoch_names: list[str] = []
        self._epoch_rows: list[list[Any]] = []
        self._throttle = Throttle(self._draw_safely, interval)
        self._status_lock = threading.Lock()
        self._build()

    # ---------------------------------------------------------------- layout
    def _build(self) -> None:
        self.status = ipw.HTML()
        self.headline = ipw.HTML()
        self.progress = ipw.FloatProgress(value=0.0, min=0.0, max=1.0, layout={"width": "260px"})
        self.progress_label = ipw.HTML()
        self.stop_button = ipw.Button(description="Stop", icon="stop", disabled=True, layout={"display": "none"},
                                      tooltip="end the training at the next batch; the model keeps what it learned")
        self.stop_button.on_click(self._click_stop)
        self.charts = AdaptiveCharts()
        self.details_box = ipw.HTML()
        self.details = ipw.Accordion([self.details_box], titles=("Details: every decision, and each epoch",),
                                     selected_index=None)
        for w, cls in ((self.status, "status"), (self.headline, "headline"), (self.progress, "progress"),
                       (self.progress_label, "progress-label"), (self.stop_button, "stop"),
                       (self.details_box, "result"), (self.details, "details")):
            w.add_class(f"gns-{cls}")
        row = {"flex_flow": "row wrap", "align_items": "center"}
        super().__init__([self.headline, ipw.HBox([self.stop_button, self.progress, self.progress_label],
                                                  layout=row),
                          self.status, self.details, self.charts,
                          ipw.HTML(texts.STYLE + TABLE_STYLE, layout={"display": "none"})], layout={"min_width": "0"})
        self.add_class("gns-widget")
        self.add_class("gns-adaptive")
        self._set_status("idle: train with view.fit(learn, epochs, lr), or follow your own training with "
                         "view.watch(...)", "idle")
        self.details_box.value = decisions_html([])

    def _set_status(self, text: str, kind: str) -> None:
        with self._status_lock:
            self.status.value = texts.status_html(text, kind)

    # ---------------------------------------------------------------- state
    @property
    def running(self) -> bool:
        "Whether a fit started by `fit` is going on."
        return self._job.running

    @property
    def record(self) -> AdaptiveRecord | None:
        "The watched run's record: its decisions and per-step batch size, lr and progress."
        return getattr(self.source, "record", None)

    @property
    def redraws(self) -> int:
        "How many times the charts were redrawn (the throttle keeps it to a few a second)."
        return self._throttle.draws

    def snapshot(self) -> Snapshot:
        "What the charts show, read now from the watched run."
        return Snapshot.of(self.record, self._records())

    def _records(self) -> list[Any]:
        src = self.source
        if src is None:
            return []
        from ..adaptive_torch import AdaptiveLoader

        recorder = src.recorder if isinstance(src, AdaptiveLoader) else getattr(src, "recorder_", None)
        return list(recorder.records) if recorder is not None else []

    # ---------------------------------------------------------------- watch
    def watch(self, source: Any) -> AdaptiveView:
        """Follow an `AdaptiveBatchSize` or `AdaptiveLoader` that your own code trains with; returns the view.

        Its `on_step` and `on_decision` become functions that call yours (if any) and then refresh the view: yours
        are chained, not replaced, and `unwatch()` puts them back. Stop is for `fit`: your own cell or loop stops
        with ■ (interrupt the kernel), as always.
        """
        from ..adaptive_torch import AdaptiveLoader

        if not (isinstance(source, AdaptiveLoader) or _is_adaptive_callback(source)):
            raise TypeError(f"watch() follows an AdaptiveBatchSize or an AdaptiveLoader, got {type(source).__name__}")
        if self.running:
            raise RuntimeError("this view is following its own fit: wait for it (view.wait()) or stop it first")
        self.unwatch()
        user_step, user_decision = source.on_step, source.on_decision

        def on_step(record: AdaptiveRecord) -> Any:
            out = user_step(record) if user_step is not None else None
            self._on_step(record)
            return out

        def on_decision(decision: Decision) -> Any:
            out = user_decision(decision) if user_decision is not None else None
            self._on_decision()
            return out

        source.on_step, source.on_decision = on_step, on_decision
        self.source, self._hooks = source, (source, user_step, user_decision, (on_step, on_decision))
        self.error, self.stopped = None, False
        self._state = "watching"
        if not self.running:
            self._set_status("watching: the charts follow your training as it runs", "running")
        self.refresh()
        return self

    def unwatch(self) -> None:
        "Stop following: the watched object's on_step and on_decision are yours again (unless you replaced them)."
        if self._hooks is None:
            return
        source, user_step, user_decision, (ours_step, ours_decision) = self._hooks
        if source.on_step is ours_step:
            source.on_step = user_step
        if source.on_decision is ours_decision:
            source.on_decision = user_decision
        self._hooks = None
        self._throttle.cancel()

    def _on_step(self, record: AdaptiveRecord) -> None:
        "Every training step, on the training thread: cheap (the throttle decides), and never raises into training."
        if record.rows and record.rows[-1][4] >= 1.0:  # the planned run is done: its final state, now
            self._throttle.flush()
        else:
            self._throttle.poke()

    def _on_decision(self) -> None:
        self._throttle.poke()

    def _draw_safely(self) -> None:
        "What the throttle calls, on the training thread or its timer's: a view must not end a training."
        try:
            self._draw()
        except Exception as e:
            self._set_status(f"the view could not redraw ({type(e).__name__}: {e}); training goes on", "warn")

    def refresh(self) -> None:
        "Redraw now (at most one redraw runs at a time)."
        self._throttle.flush()

    def _draw(self) -> None:
        s = self.snapshot()
        if self._state == "watching" and s.done:  # the watched run reached its plan
            self._state = "finished"
            self._set_status(f"finished: {finished_text(s)}", "finished")
        state = self._state if self._state in ("stopped", "finished", "error") else "running"
        self.charts.show(s, ended=state != "running")
        headline = headline_html(s, state)
        if self.headline.value != headline:
            self.headline.value = headline
        with self.progress.hold_sync():
            self.progress.value = float(s.pct[-1]) if s.steps else 0.0
        label = (f"{float(s.pct[-1]):.0%} of the planned run · step {s.steps:,}" if s.steps else "")
        if self.progress_label.value != label:
            self.progress_label.value = label
        details = decisions_html(s.decisions) + ("<br>" + epochs_html(self._epoch_names, self._epoch_rows)
                                                 if self._epoch_rows else "")
        if self.details_box.value != details:
            self.details_box.value = details

    # ---------------------------------------------------------------- fit in the background
    def fit(self, learn: Any, n_epoch: int, lr: Any = None, *, cb: Any = None, method: str = "fit_one_cycle",
            **kwargs: Any) -> None:
        """Train `learn` for `n_epoch` planned epochs with an adaptive batch size, in the background; returns at once.

        `learn.fit_one_cycle(n_epoch, lr, ...)` by default, the schedule most fastai users train with; `method="fit"`
        (a constant lr) or `"fit_flat_cos"` for those. Other keyword arguments go to that method (`wd=`, `cbs=`,
        `pct_start=`...). The `AdaptiveBatchSize` is `cb` if given, else the one in `learn.cbs`, else a new one with
        its defaults; the view watches it (`watch`) for the fit and lets go after. fastai's progress bar is left
        out (a background thread would print it into whichever cell runs); each epoch's results are in the
        details. Stop, `view.stop()` or ■ (interrupting the kernel) ends the fit before its next batch, cleanly
        (fastai's `CancelFitException`: the callback's `after_fit` puts the loader's batch size back); an error
        is shown in the status line and kept in `view.error`. `view.wait()` blocks until the fit ends.
        """
        if method not in FIT_METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, FIT_METHODS))}, got {method!r}")
        if self.running:
            raise RuntimeError("this view is already training: Stop or wait for it (view.wait()) first")
        from fastai.callback import schedule  # noqa: F401  (puts fit_one_cycle and fit_flat_cos on Learner)
        from fastai.learner import Learner

        from ..adaptive_fastai import AdaptiveBatchSize

        if not isinstance(learn, Learner):
            raise TypeError(f"fit() trains a fastai Learner, got {type(learn).__name__}; for a plain PyTorch loop "
                            "use an AdaptiveLoader and view.watch(loader)")
        if cb is not None and not isinstance(cb, AdaptiveBatchSize):
            raise TypeError(f"cb must be an AdaptiveBatchSize, got {type(cb).__name__}")
        if not (isinstance(n_epoch, int) and n_epoch >= 1):
            raise ValueError(f"n_epoch must be a positive integer (the epochs you plan at your batch size), "
                             f"got {n_epoch!r}")
        own = next((c for c in learn.cbs if isinstance(c, AdaptiveBatchSize)), None)
        if cb is None:
            cb = own or AdaptiveBatchSize()
        elif own is not None and own is not cb:
            raise ValueError("learn.cbs already has another AdaptiveBatchSize: pass that one as cb=, or none")
        user_cbs = kwargs.pop("cbs", None)
        user_cbs = [] if user_cbs is None else list(user_cbs) if isinstance(user_cbs, (list, tuple)) else [user_cbs]
        job = _FitJob()
        cbs = [*user_cbs, *([] if cb is own else [cb]), _stop_callback(job.stop_event)]
        args = (n_epoch,) if lr is None else (n_epoch, lr)
        self.watch(cb)
        self._job, self._state, self._epoch_names, self._epoch_rows = job, "running", [], []
        self.stop_button.layout.display = None
        self.stop_button.disabled = False
        self._set_status(f"training ({method.replace('_', ' ')}, {n_epoch} planned epochs)", "running")

        def work() -> None:
            try:
                try:
                    with learn.no_bar(), _logging_to(learn, self._log_epoch):
                        getattr(learn, method)(*args, cbs=cbs, **kwargs)
                # shown in the view: a worker has nobody else to tell (BaseException: a sys.exit() in a loss)
                except BaseException as e:
                    self.error = e
                self._end()
            finally:
                job.finished.set()
                _live.discard(job)

        job.thread = threading.Thread(target=work, name=f"AdaptiveView fit {next(_numbers)}", daemon=True)
        _live.add(job)
        job.thread.start()
        stop_on_kernel_interrupt(job)  # ■ stops a fit running in the background, as it stops a cell

    def _log_epoch(self, values: Any) -> None:
        "fastai's Recorder logs each epoch's results here instead of printing them from the background."
        row = list(values)
        if row and row[0] == "epoch":
            return
        if not self._epoch_names:
            self._epoch_names = [str(n) for n in getattr(self.source.learn.recorder, "metric_names", [])]
        self._epoch_rows.append(row)
        self._throttle.poke()

    def _end(self) -> None:
        "The fit ended (worker thread): the final redraw, the status, and the callback's hooks given back."
        job, error = self._job, self.error
        self.stopped = job.stop_event.is_set() and error is None
        self._state = "error" if error is not None else "stopped" if self.stopped else "finished"
        try:
            self.unwatch()
            self._throttle.flush()
        except Exception as e:  # the worker thread has nobody else to report to
            if error is None:
                self.error = error = e
        s = self.snapshot()
        if error is not None:
            text, kind = f"error: {type(error).__name__}: {error}", "error"
        elif self.stopped:
            why = job.stop_reason or "stopped"
            pct = f" at {float(s.pct[-1]):.0%} of the planned run" if s.steps else " before the first step"
            text, kind = f"{why}{pct}, after {s.steps:,} steps; the model keeps what it learned", "idle"
        else:
            text, kind = f"finished: {finished_text(s)}", "finished"
        self.stop_button.disabled = True
        self._set_status(text, kind)

    def stop(self, reason: str | None = None) -> None:
        "End the background fit before its next batch (fastai's CancelFitException)."
        if self.running:
            self._job.stop(reason)
            self._set_status("stopping at the next batch…", "running")

    def _click_stop(self, _button: Any) -> None:
        try:
            self.stop()
        except Exception as e:  # the widgets' dispatcher would swallow it
            self._set_status(f"error: {type(e).__name__}: {e}", "error")

    def wait(self, timeout: float | None = None) -> AdaptiveRecord | None:
        """Block until the background fit ends (or `timeout` s pass); its record, None if it failed or still runs.

        A kernel interrupt (■) while waiting stops the fit at its next batch, waits for it to end and is raised
        again. The end is an Event, never `Thread.join` (see `runner.py`: an interrupt inside `join` breaks the
        worker's widget messages).
        """
        job = self._job
        try:
            ended = job.finished.wait(timeout) if job.thread is not None else True
        except KeyboardInterrupt:
            job.stop("interrupted (kernel interrupt)")
            job.finished.wait()
            raise
        return self.record if ended and self.error is None else None

    def close(self) -> None:
        "Stop a background fit, wait for it, let go of a watched run, close the widgets."
        if hasattr(self, "_job"):
            self._job.stop("the view was closed")
            if self._job.thread is not None:
                self._job.finished.wait()
            self.unwatch()
            self._throttle.cancel()
            self.charts.close()
        super().close()


def _is_adaptive_callback(obj: Any) -> bool:
    try:
        from ..adaptive_fastai import AdaptiveBatchSize
    except ImportError:  # no fastai: it cannot be one
        return False
    return isinstance(obj, AdaptiveBatchSize)


class _logging_to:
    "Route a Learner's epoch log (`learn.logger`) to `log` for the fit, and put the old one back."

    def __init__(self, learn: Any, log: Callable[[Any], None]):
        self.learn, self.log = learn, log

    def __enter__(self) -> None:
        self.old = self.learn.logger
        self.learn.logger = self.log

    def __exit__(self, *exc: Any) -> None:
        self.learn.logger = self.old
