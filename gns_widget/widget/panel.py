"""`GNSWidget`: the batch-size finder as a Jupyter panel (controls, live charts, result, Apply).

The kernel's main thread owns the controls and stays responsive; one daemon worker thread
runs `bs_find` and is the only writer of the charts and progress bar while it runs, in
batches (`hold_sync`) and at a throttled rate. Handlers never raise: the ipywidgets
dispatcher would swallow the exception, so every error is shown in the status line.
"""
from __future__ import annotations

import functools
import html
import math
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as ipw
from torch import nn

from ..loaders import apply_batch_size, current_batch_size
from ..result import GNSRecord, GNSResult
from .charts import GNSCharts
from .runner import Runner, ThrottledListener

__all__ = ["GNSWidget", "BETAS", "optimizer_rule"]

BETAS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)
_ADAM_LIKE = ("adam", "lamb", "ranger", "lion", "adafactor", "rmsprop")


def optimizer_rule(target: Any, opt: Any = None) -> tuple[str, str]:
    "('adam' or 'sgd', the optimizer's name): how to scale the lr, from the optimizer that will train."
    if opt is None and _is_learner(target):
        opt = target.opt_func
    if opt is None:
        return "sgd", "SGD (bs_find's default)"
    name = getattr(opt, "__name__", None) or type(opt).__name__
    if isinstance(opt, functools.partial):
        name = getattr(opt.func, "__name__", name)
    return ("adam" if any(k in name.lower() for k in _ADAM_LIKE) else "sgd"), name


def _is_learner(obj: Any) -> bool:
    from fastai.learner import Learner

    return isinstance(obj, Learner)


def _guarded(handler: Callable) -> Callable:
    "Show any exception of a button handler in the status line instead of losing it in the dispatcher."

    @functools.wraps(handler)
    def wrapper(self: GNSWidget, *args: Any) -> Any:
        try:
            return handler(self, *args)
        except Exception as e:
            self._set_status(f"error: {type(e).__name__}: {e}", "error")
            return None

    return wrapper


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60)} s"


class GNSWidget(ipw.VBox):
    """Measure the gradient noise scale of a model live and apply the suggested batch size.

    `target`, `train_dl` and `loss_func` are as for `bs_find`; `lr`, `num_it`, `n_batch`
    and `beta` in `bs_find_kwargs` set the controls' initial values and the rest (`opt`,
    `method`, `amp`, `device`, `batch_fn`) go to every run. `on_apply(new_loader)` is called when
    Apply gives a plain torch loader a new batch size (torch loaders are rebuilt, so code
    holding the old one needs the new one).
    """

    def __init__(self, target: Any, train_dl: Any = None, loss_func: Callable | None = None,
                 on_apply: Callable[[Any], Any] | None = None, **bs_find_kwargs: Any):
        for reserved in ("on_update", "stop_event"):
            if reserved in bs_find_kwargs:
                raise ValueError(f"{reserved} is managed by the widget; use GNSWidget.start/stop/wait instead")
        if not (_is_learner(target) or isinstance(target, nn.Module)):
            raise TypeError(f"target must be a fastai Learner or a torch nn.Module, got {type(target).__name__}")
        self.target, self.train_dl, self.loss_func, self.on_apply = target, train_dl, loss_func, on_apply
        self._controls_init = {k: bs_find_kwargs.pop(k) for k in ("lr", "num_it", "n_batch", "beta")
                               if k in bs_find_kwargs}
        self._extra = bs_find_kwargs
        self.rule, self.opt_name = optimizer_rule(target, bs_find_kwargs.get("opt"))
        self._runner = Runner()
        self._status_lock = threading.Lock()
        self._run_settings: dict[str, Any] = {}
        self._build()
        self._validate()

    # ---------------------------------------------------------------- layout
    def _build(self) -> None:
        init = self._controls_init
        num_it = init.get("num_it")
        beta = init.get("beta", 0.99)
        betas = tuple(sorted(set(BETAS) | {beta}))
        style = {"description_width": "70px"}
        self.n_batch_slider = ipw.IntSlider(value=init.get("n_batch", 20), min=2, max=100, description="n_batch",
                                            style=style, continuous_update=False)
        self.beta_slider = ipw.SelectionSlider(options=betas, value=beta, description="beta", style=style,
                                               continuous_update=False)
        self.num_it_text = ipw.IntText(value=0 if num_it is None else num_it, description="num_it", style=style,
                                       tooltip="small batches to run; 0 = one epoch", layout={"width": "190px"})
        self.lr_text = ipw.FloatText(value=init.get("lr", 1e-3), description="lr", style=style,
                                     tooltip="0 measures at the current weights", layout={"width": "190px"})
        self.bs_label = ipw.HTML()
        self.error_label = ipw.HTML()
        self.note_label = ipw.HTML()
        self.start_button = ipw.Button(description="Start", button_style="primary", icon="play")
        self.stop_button = ipw.Button(description="Stop", icon="stop", disabled=True)
        self.apply_button = ipw.Button(description="Apply suggested bs", button_style="success", icon="check",
                                       disabled=True, layout={"width": "170px"})
        self.progress = ipw.IntProgress(value=0, min=0, max=1, layout={"width": "320px"})
        self.progress_label = ipw.HTML("iteration 0")
        self.status = ipw.HTML()
        self.charts = GNSCharts()
        self.result_box = ipw.HTML()
        for w, cls in ((self.n_batch_slider, "n-batch"), (self.beta_slider, "beta"), (self.num_it_text, "num-it"),
                       (self.lr_text, "lr"), (self.bs_label, "bs"), (self.error_label, "error"),
                       (self.note_label, "note"), (self.start_button, "start"), (self.stop_button, "stop"),
                       (self.apply_button, "apply"), (self.progress, "progress"),
                       (self.progress_label, "progress-label"), (self.status, "status"),
                       (self.result_box, "result")):
            w.add_class(f"gns-{cls}")
        for w in (self.n_batch_slider, self.beta_slider, self.num_it_text, self.lr_text):
            w.observe(self._on_setting, names="value")
        self.start_button.on_click(self._click_start)
        self.stop_button.on_click(self._click_stop)
        self.apply_button.on_click(self._click_apply)
        self._show_bs()
        self._set_status("idle", "idle")
        super().__init__([
            ipw.HBox([self.n_batch_slider, self.beta_slider]),
            ipw.HBox([self.num_it_text, self.lr_text, self.bs_label]),
            self.error_label,
            ipw.HBox([self.start_button, self.stop_button, self.apply_button]),
            ipw.HBox([self.progress, self.progress_label]),
            self.status, self.note_label, self.charts, self.result_box,
        ])
        self.add_class("gns-widget")

    # ---------------------------------------------------------------- state
    @property
    def running(self) -> bool:
        return self._runner.running

    @property
    def result(self) -> GNSResult | None:
        "The latest run's result (partial if stopped), None before a run ends or when it failed."
        return self._runner.result

    @property
    def error(self) -> BaseException | None:
        "The exception that ended the latest run, if any."
        return self._runner.error

    def _loader(self) -> Any:
        "What Apply changes: the given train_dl, else the Learner's DataLoaders."
        return self.train_dl if self.train_dl is not None or not _is_learner(self.target) else self.target.dls

    def _show_bs(self) -> None:
        self.bs_label.value = f"current batch size: <b>{current_batch_size(self._loader())}</b>"

    def _set_status(self, text: str, kind: str) -> None:
        "The one status line, written by either thread (the lock keeps the two writes whole)."
        color = {"error": "#c62828", "finished": "#2e7d32", "running": "#1565c0"}.get(kind, "#444")
        with self._status_lock:
            self.status.value = f'<span style="color:{color}">status: {html.escape(text)}</span>'

    def settings(self) -> dict[str, Any]:
        "The run settings from the controls (num_it 0 means one epoch: None for bs_find)."
        return {"n_batch": self.n_batch_slider.value, "beta": self.beta_slider.value,
                "num_it": self.num_it_text.value or None, "lr": self.lr_text.value}

    def _validate(self) -> str | None:
        "Check the controls; show the problem inline and refuse Start while there is one."
        s = self.settings()
        msg = None
        if not (math.isfinite(s["lr"]) and s["lr"] >= 0):
            msg = f"lr must be a finite number ≥ 0 (0 measures without training), got {s['lr']}"
        elif s["num_it"] is not None and s["num_it"] < 0:
            msg = f"num_it must be ≥ n_batch, or 0 for one epoch; got {s['num_it']}"
        elif s["num_it"] is not None and s["num_it"] < s["n_batch"]:
            msg = f"num_it ({s['num_it']}) must be ≥ n_batch ({s['n_batch']}) to make one estimate, or 0 for one epoch"
        self.error_label.value = f'<span style="color:#c62828">{html.escape(msg)}</span>' if msg else ""
        if not self.running:
            self.start_button.disabled = msg is not None
        return msg

    def _on_setting(self, change: dict) -> None:
        msg = self._validate()
        if self.running and msg is None and self.settings() != self._run_settings:
            self.note_label.value = "<i>settings changed: they apply to the next run</i>"
        elif not self.running:
            self.note_label.value = ""

    # ---------------------------------------------------------------- actions
    def start(self) -> bool:
        "Start a run in the background; False (and the reason in the status line) if it cannot start."
        if self.running:
            self._set_status("running (already running: Stop it before starting again)", "running")
            return False
        msg = self._validate()
        if msg is not None:
            self._set_status(f"error: {msg}", "error")
            return False
        self._run_settings = self.settings()
        self.note_label.value = ""
        self.result_box.value = ""
        self.start_button.disabled, self.stop_button.disabled, self.apply_button.disabled = True, False, True
        with self.progress.hold_sync():
            self.progress.value, self.progress.max = 0, 1
        self.progress_label.value = "iteration 0"
        self.charts.show([])
        self._set_status("running", "running")
        listener = ThrottledListener(self._draw)
        self._listener = listener
        train_dl = None if _is_learner(self.target) and self.train_dl is None else self.train_dl
        self._runner.start((self.target, train_dl, self.loss_func), {**self._run_settings, **self._extra},
                           listener, self._finish)
        return True

    def stop(self) -> None:
        "Ask the run to end at its next step; its partial result stays available."
        if self.running:
            self._runner.stop()
            self._set_status("stopping…", "running")

    def wait(self, timeout: float | None = None) -> GNSResult | None:
        "Block until the run ends (or `timeout` s pass); the result, None if it failed or is still running."
        return self.result if self._runner.wait(timeout) else None

    def apply(self) -> Any:
        """Use the suggested batch size for training; returns the changed loader (or DataLoaders).

        A torch DataLoader cannot change its batch size, so `train_dl` becomes a new loader,
        passed to `on_apply`; fastai DataLoaders change in place. When the run found that the
        suggestion does not fit in device memory, the per-step batch size of its plan is
        applied instead and the status says how many steps to accumulate.
        """
        if self.running:
            self._set_status("cannot apply while running: Stop or wait for the run to finish", "error")
            return None
        res = self.result
        if res is None or not res.reliable:
            why = res.reason if res is not None else "no finished run yet: press Start"
            self._set_status(f"no reliable suggestion to apply ({why})", "error")
            return None
        loader = self._loader()
        old = current_batch_size(loader)
        plan = res.memory_plan
        new_loader = apply_batch_size(loader, plan.batch_size if plan is not None else res.suggested_bs)
        if _is_learner(self.target) and self.train_dl is None:
            changed = new_loader
        else:
            self.train_dl = changed = new_loader
            if self.on_apply is not None:
                self.on_apply(new_loader)
        self._show_bs()
        self.apply_button.disabled = True  # done; the next run's suggestion enables it again
        steps = plan.accumulation_steps if plan is not None else 1
        accumulate = f", with gradient accumulation {steps}" if steps > 1 else ""
        self._set_status(f"train batch size {old} → {current_batch_size(changed)}{accumulate}", "finished")
        return changed

    @_guarded
    def _click_start(self, _button: ipw.Button) -> None:
        self.start()

    @_guarded
    def _click_stop(self, _button: ipw.Button) -> None:
        self.stop()

    @_guarded
    def _click_apply(self, _button: ipw.Button) -> None:
        self.apply()

    def close(self) -> None:
        "Stop a run in progress so its thread does not outlive the panel, then close the widgets."
        if hasattr(self, "_runner"):  # not there when __init__ refused its arguments
            self._runner.stop()
            self.charts.close()
        super().close()

    # ---------------------------------------------------------------- worker thread only
    def _draw(self, records: list[GNSRecord], result: GNSResult | None = None, finished: bool = False) -> None:
        "Refresh charts and progress from the history so far (called on the worker thread)."
        if not records:
            return
        last = records[-1]
        done = last.total if finished else last.iteration
        rate = last.elapsed / last.iteration if last.iteration else math.nan
        eta = 0.0 if finished else rate * (last.total - last.iteration)
        with self.progress.hold_sync():
            self.progress.max, self.progress.value = last.total, done
        self.progress_label.value = (f"iteration {done}/{last.total} · {_duration(last.elapsed)} elapsed"
                                     f" · ETA {_duration(eta)}")
        self.charts.show(records, result.suggested_bs if result is not None else None)

    def _finish(self, result: GNSResult | None, error: BaseException | None) -> None:
        "Final refresh, result box and status at the end of a run (worker thread)."
        try:
            finished = result is not None and not result.stopped
            self._draw(self._listener.records, result, finished)
            if error is not None:
                self._set_status(f"error: {type(error).__name__}: {error}", "error")
            elif result.stopped:
                self._set_status(f"stopped after {result.history.iteration.iloc[-1] if len(result.history) else 0}"
                                 " iterations (partial result)", "idle")
            else:
                self._set_status("finished", "finished")
            if result is not None:
                self.result_box.value = self._result_html(result)
            self.apply_button.disabled = result is None or not result.reliable
        except Exception as e:  # the worker thread has nobody else to report to
            self._set_status(f"error: {type(e).__name__}: {e}", "error")
        finally:
            self.stop_button.disabled = True
            self.start_button.disabled = bool(self.error_label.value)

    def _result_html(self, res: GNSResult) -> str:
        rows = [f"<b>noise scale</b>: {res.noise_scale:.4g}"]
        if res.reliable:
            rows.append(f"<b>suggested batch size</b>: {res.suggested_bs} (now {res.batch_size}) "
                        f"— {html.escape(res.reason)}")
            if res.memory_plan is not None:
                rows.append(f"<b>memory</b>: {html.escape(res.memory_plan.text)}")
            advice = res.lr_advice(rule=self.rule)
            rule = f"{self.rule} rule, for optimizer {html.escape(self.opt_name)}"
            if res.lr > 0:
                rows.append(f"<b>learning rate</b> ({rule}): {html.escape(advice.text)}")
            else:
                rows.append(f"<b>learning rate</b> ({rule}): multiply your training lr by ×{advice.factor:.3g} "
                            f"when moving to batch size {res.suggested_bs}")
        else:
            rows.append(f"<b>no reliable suggestion</b>: {html.escape(res.reason)}")
        if res.noise_scale > 0:
            rows.append(_tradeoff_html(res))
        return '<div class="gns-result-text">' + "<br>".join(rows) + "</div>"


def _tradeoff_html(res: GNSResult) -> str:
    "The paper's cost of each batch size around the noise scale: steps and examples relative to their minimum."
    center = res.suggested_bs or 2 ** max(0, round(math.log2(res.noise_scale)))
    sizes = sorted({res.batch_size or center, *(center * 2**k for k in range(-3, 4) if center * 2**k >= 1)})
    t = res.tradeoff(sizes)
    head = "".join(f"<th style='padding:0 6px'>{b}</th>" for b in t.batch_size)
    steps = "".join(f"<td style='padding:0 6px'>×{v:.2f}</td>" for v in t.steps)
    examples = "".join(f"<td style='padding:0 6px'>×{v:.2f}</td>" for v in t.examples)
    return ("<b>trade-off</b> (predicted steps and examples to reach the same loss, relative to their minimum):"
            f"<table class='gns-tradeoff'><tr><th>batch size</th>{head}</tr>"
            f"<tr><td>steps</td>{steps}</tr><tr><td>examples</td>{examples}</tr></table>")
