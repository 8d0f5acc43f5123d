"""`GNSWidget`: the batch-size finder as a Jupyter panel (controls, live charts, result, Apply).

The kernel's main thread owns the controls and stays responsive; one daemon worker thread
runs `bs_find` and is the only writer of the charts and progress bar while it runs, in
batches (`hold_sync`) and at a throttled rate. Handlers never raise: the ipywidgets
dispatcher would swallow the exception, so every error is shown in the status line.

One run per model: a panel built for a model whose run belongs to another panel (the panel
cell re-run during a run) stops that run and waits until its model is restored; any other
run on the model (`bs_find` in a thread) makes Start refuse with the guard's error.

The result shows `GNSResult.advice()` (batch size, lr, epochs, with the noise scale's interval),
and Apply applies the advice's batch size, not the raw suggestion, which ignores the dataset size.
"""
from __future__ import annotations

import functools
import html
import math
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as ipw
import torch
from torch import nn

from ..advice import BatchAdvice, check_epochs, check_lr, format_lr
from ..ddp import is_distributed
from ..engine import METHODS
from ..estimator import NoiseScaleEstimator
from ..guard import FinderBusyError
from ..interval import AutoStop
from ..loaders import apply_batch_size, current_batch_size
from ..precision import resolve_amp
from ..result import GNSRecord, GNSResult
from ..suggest import MIN_ESTIMATES
from ..targets import as_target
from ..targets.base import loader_len
from .charts import GNSCharts
from .runner import Runner, ThrottledListener, runner_of

__all__ = ["GNSWidget", "BETAS", "AUTO_BETA", "N_BATCH_RANGE", "optimizer_rule", "eta_seconds"]

BETAS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)
AUTO_BETA = "auto"  # the beta slider's first stop: bs_find(beta=None), chosen from the lr
N_BATCH_RANGE = (2, 100)  # the n_batch slider's range
_ADAM_LIKE = ("adam", "lamb", "ranger", "lion", "adafactor", "rmsprop")
# JupyterLab's theme variables (light and dark), with fallbacks for other frontends
_COLORS = {"error": "var(--jp-error-color1, #c62828)", "finished": "var(--jp-success-color1, #2e7d32)",
           "running": "var(--jp-brand-color1, #1565c0)", "warn": "var(--jp-warn-color1, #e65100)",
           "idle": "var(--jp-ui-font-color1, inherit)"}
_APPLY_TIP = "train with the advised batch size from now on (the advice's text says why it may differ)"
_HELP = {  # one plain line per control: shown under it and as its tooltip
    "n_batch": "small batches averaged into one noise estimate: more is steadier but gives fewer estimates",
    "beta": "smoothing of the curves: 0.99 averages about the last 100 estimates, 1 all of them equally; "
            "auto is 1 at lr 0 (the weights do not move) and 0.99 while training",
    "num_it": "small batches the trial run trains on (0 = one epoch); your model is restored afterwards",
    "auto": "run until the noise scale's 90% interval is narrow enough, up to a cap, instead of a fixed num_it",
    "apply_lr": "Apply also sets learn.lr, which fit and fit_one_cycle use when called without an lr",
    "lr": "learning rate of the trial run; 0 measures at the current weights without training",
    "epochs": "the epochs you train for at your batch size (0: not given); the advice scales them to the new one",
}


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
            if e is not self._reported:  # else its own, fuller line is in the status already
                self._set_status(f"error: {type(e).__name__}: {e}", "error")
            return None

    return wrapper


def _duration(seconds: float) -> str:
    "Tenths under 10 s, whole seconds under a minute, then minutes and seconds (an ETA is no more precise)."
    if not math.isfinite(seconds):
        return "–"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def eta_seconds(records: list[GNSRecord]) -> float:
    """Seconds left, at the average rate since the first estimate (NaN until there are two).

    The first estimate carries the run's start-up (first batches, optimizer creation), so
    measuring from it instead of from zero keeps the ETA from starting minutes too high, and
    the average over the whole run keeps it from jumping with each refresh.
    """
    if len(records) < 2 or records[-1].iteration <= records[0].iteration:
        return math.nan
    first, last = records[0], records[-1]
    rate = (last.elapsed - first.elapsed) / (last.iteration - first.iteration)
    return rate * (last.total - last.iteration)


def _names_of(obj: Any) -> list[str]:
    "The notebook variables bound to `obj` (to write a line the user can copy), if running under IPython."
    try:
        from IPython import get_ipython
    except ImportError:
        return []
    shell = get_ipython()
    if shell is None:
        return []
    return [k for k, v in list(shell.user_ns.items()) if v is obj and not k.startswith("_")]


class GNSWidget(ipw.VBox):
    """Measure the gradient noise scale of a model live and apply the suggested batch size.

    `target`, `train_dl`, `loss_func` and the keyword arguments are those of `bs_find`, checked
    when the panel is built; `lr`, `num_it`, `n_batch` and `beta` set the controls, the rest go to
    every run. `epochs`, the epochs you train for at your batch size, fills the epochs box so the
    advice gives an epoch budget at the new batch size (editable after the run). `num_it="auto"`
    (the default, or an `AutoStop`) ticks the auto box: runs stop once
    the noise scale's 90% interval is within ±10%; the num_it box, used when auto is off, then
    holds one epoch. `num_it=None` picks one epoch when that gives the `MIN_ESTIMATES` estimates a
    suggestion needs, else the smallest num_it that does. `on_apply(new_loader)` is called when
    Apply gives a plain torch loader a new batch size (torch loaders are rebuilt, so code
    holding the old one needs the new one: `w.train_dl`).
    """

    def __init__(self, target: Any, train_dl: Any = None, loss_func: Callable | None = None,
                 on_apply: Callable[[Any], Any] | None = None, *, lr: float = 1e-3,
                 num_it: int | str | AutoStop | None = "auto",
                 n_batch: int = 20, beta: float | None = None, opt: Any = None, method: str = "fixed",
                 amp: torch.dtype | None = None, device: Any = None, batch_fn: Callable | None = None,
                 probe_memory: bool | None = None, epochs: int | None = None):
        if not (_is_learner(target) or isinstance(target, nn.Module)):
            raise TypeError(f"target must be a fastai Learner or a torch nn.Module, got {type(target).__name__}")
        if on_apply is not None and not callable(on_apply):
            raise TypeError(f"on_apply must be a function new_loader -> None, got {on_apply!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.target, self.train_dl, self.loss_func, self.on_apply = target, train_dl, loss_func, on_apply
        self._extra = dict(opt=opt, method=method, amp=amp, device=device, batch_fn=batch_fn,
                           probe_memory=probe_memory)
        tgt = as_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn)  # checks them
        resolve_amp(target, amp)
        self.model = tgt.model
        self._per_step = method == "per_example" or is_distributed(tgt.model)
        _check_build_args(lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, epochs=epochs)
        auto = AutoStop.of(num_it)
        self._auto_rule = auto or AutoStop()  # the rule each auto run copies (a run changes its state)
        self._auto_run: AutoStop | None = None  # the latest run's rule, when it ran with auto
        if auto is not None:
            num_it = None
        if num_it is None:
            num_it = 0 if self._check_num_it(0, n_batch) is None else self.least_num_it(n_batch)
        elif (msg := self._check_num_it(num_it, n_batch)) is not None:
            raise ValueError(msg)
        self._status_lock = threading.Lock()
        self._live = False  # a run is going and its final status is not written yet
        self._run_settings: dict[str, Any] = {}
        self._shown: tuple[int, int] | None = None  # (done, total) of the result the result box shows
        self._applied: tuple[int | None, int, bool, str] | None = None  # (old bs, new bs, in place, panel name)
        self._listener: ThrottledListener | None = None
        self._lr_applied: tuple[GNSResult, float, float] | None = None  # (result, learn.lr before, lr Apply set)
        self._reported: BaseException | None = None  # an error apply() has shown in the status line itself
        self._closed = False
        old = runner_of(self.model)
        if old is not None:  # the panel cell was re-run during a run: no run may outlive its panel
            old.stop_and_wait("a new panel for this model took over")
        self._runner = Runner(self.model)
        self._build(lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, auto=auto is not None, epochs=epochs)
        self._validate()

    # ---------------------------------------------------------------- layout
    def _build(self, *, lr: float, num_it: int, n_batch: int, beta: float | None, auto: bool,
               epochs: int | None) -> None:
        betas = (AUTO_BETA, *sorted(set(BETAS) | ({beta} - {None})))
        style = {"description_width": "60px"}
        lo, hi = N_BATCH_RANGE
        fit = {"width": "100%", "max_width": "360px"}  # shrinks in a narrow notebook instead of overflowing
        self.n_batch_slider = ipw.IntSlider(value=n_batch, min=lo, max=hi, description="n_batch", style=style,
                                            continuous_update=False, tooltip=_HELP["n_batch"], layout=fit)
        self.beta_slider = ipw.SelectionSlider(options=betas, value=AUTO_BETA if beta is None else beta,
                                               description="beta", style=style,
                                               continuous_update=False, tooltip=_HELP["beta"], layout=fit)
        self.num_it_text = ipw.IntText(value=num_it, description="num_it", style=style, tooltip=_HELP["num_it"],
                                       layout={"width": "200px"}, disabled=auto)
        self.auto_box = ipw.Checkbox(value=auto, description=f"auto (until ±{self._auto_rule.rel_halfwidth:.0%})",
                                     indent=False, tooltip=_HELP["auto"], layout={"width": "200px"})
        self.apply_lr_box = ipw.Checkbox(value=False, description="also set lr", indent=False,
                                         tooltip=_HELP["apply_lr"], layout={"width": "110px"})
        self.lr_text = ipw.FloatText(value=lr, description="lr", style=style, tooltip=_HELP["lr"],
                                     layout={"width": "200px"})
        self.epochs_text = ipw.IntText(value=epochs or 0, description="epochs", style=style,
                                       tooltip=_HELP["epochs"], layout={"width": "200px"})
        self.num_it_help = ipw.HTML()
        self.bs_label = ipw.HTML()
        self.error_label = ipw.HTML()
        self.note_label = ipw.HTML()
        self.start_button = ipw.Button(description="Start", button_style="primary", icon="play",
                                       tooltip="train a short trial run and measure the noise scale")
        self.stop_button = ipw.Button(description="Stop", icon="stop", disabled=True,
                                      tooltip="end the run at the next step; the model is restored")
        self.apply_button = ipw.Button(description="Apply advice", button_style="success", icon="check",
                                       disabled=True, layout={"width": "170px"}, tooltip=_APPLY_TIP)
        self.progress = ipw.IntProgress(value=0, min=0, max=1, layout={"width": "260px"})
        self.progress_label = ipw.HTML("iteration 0")
        self.status = ipw.HTML()
        self.charts = GNSCharts()
        self.result_box = ipw.HTML(layout={"overflow": "auto"})  # a wide table scrolls alone
        for w, cls in ((self.n_batch_slider, "n-batch"), (self.beta_slider, "beta"), (self.num_it_text, "num-it"),
                       (self.lr_text, "lr"), (self.num_it_help, "num-it-help"), (self.bs_label, "bs"),
                       (self.error_label, "error"), (self.note_label, "note"), (self.start_button, "start"),
                       (self.stop_button, "stop"), (self.apply_button, "apply"), (self.progress, "progress"),
                       (self.progress_label, "progress-label"), (self.status, "status"),
                       (self.result_box, "result"), (self.auto_box, "auto"), (self.apply_lr_box, "apply-lr"),
                       (self.epochs_text, "epochs")):
            w.add_class(f"gns-{cls}")
        for w in (self.n_batch_slider, self.beta_slider, self.num_it_text, self.lr_text, self.auto_box):
            w.observe(self._on_setting, names="value")
        self.epochs_text.observe(self._on_epochs, names="value")
        self.start_button.on_click(self._click_start)
        self.stop_button.on_click(self._click_stop)
        self.apply_button.on_click(self._click_apply)
        self._set_status("idle", "idle")
        controls = ipw.GridBox(
            [self._with_help(self.n_batch_slider, _HELP["n_batch"]), self._with_help(self.beta_slider, _HELP["beta"]),
             ipw.VBox([self.auto_box, self.num_it_text, self.num_it_help]),
             self._with_help(self.lr_text, _HELP["lr"]), self._with_help(self.epochs_text, _HELP["epochs"])],
            layout={"grid_template_columns": "repeat(auto-fill, minmax(260px, 1fr))", "grid_gap": "0 12px"})
        row = {"flex_flow": "row wrap", "align_items": "center"}
        super().__init__([
            controls, self.error_label,
            ipw.HBox([self.start_button, self.stop_button, self.apply_button,
                      *([self.apply_lr_box] if _is_learner(self.target) else []), self.bs_label], layout=row),
            ipw.HBox([self.progress, self.progress_label], layout=row),
            self.status, self.note_label, self.charts, self.result_box,
        ])
        self.add_class("gns-widget")

    @staticmethod
    def _with_help(control: ipw.Widget, text: str) -> ipw.VBox:
        "The control with its one-line explanation right under it (the tooltip only covers the label)."
        return ipw.VBox([control, _help_html(text)])

    # ---------------------------------------------------------------- state
    @property
    def rule(self) -> str:
        "'adam' or 'sgd': how the advice scales the lr, from the optimizer that trains now (learn.opt_func may change)."
        return optimizer_rule(self.target, self._extra["opt"])[0]

    @property
    def opt_name(self) -> str:
        return optimizer_rule(self.target, self._extra["opt"])[1]

    @property
    def running(self) -> bool:
        return self._runner.running

    @property
    def result(self) -> GNSResult | None:
        "The latest run's result (partial if stopped), None before a run ends or when it failed."
        return None if self.running else self._runner.result

    @property
    def error(self) -> BaseException | None:
        "The exception that ended the latest run, if any."
        return None if self.running else self._runner.error

    def _uses_learner_dls(self) -> bool:
        return _is_learner(self.target) and self.train_dl is None

    def _loader(self) -> Any:
        "What runs train on and Apply changes: the given train_dl, else the Learner's DataLoaders."
        return self.target.dls if self._uses_learner_dls() else self.train_dl

    def _train_loader(self) -> Any:
        "The loader a run iterates (a Learner's training loader, not its DataLoaders)."
        return self.target.dls.train if self._uses_learner_dls() else self.train_dl

    def least_num_it(self, n_batch: int) -> int:
        "The fewest small batches that give the estimates a suggestion needs."
        return MIN_ESTIMATES * (1 if self._per_step else n_batch)

    def _check_num_it(self, num_it: int, n_batch: int) -> str | None:
        "Why `num_it` (0: one epoch) cannot give a suggestion, or None."
        least = self.least_num_it(n_batch)
        need = (f"a suggestion needs {MIN_ESTIMATES} estimates"
                + ("" if self._per_step else f" of n_batch={n_batch} small batches each"))
        if isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < 0:
            return f"num_it must be an integer ≥ {least} ({need}), 0 for one epoch, or 'auto'; got {num_it!r}"
        if num_it == 0:
            epoch = loader_len(self._train_loader())
            if epoch is None:
                return f"num_it=0 means one epoch, but the loader has no length: set num_it ≥ {least}"
            if epoch < least:
                return (f"one epoch is only {epoch} batches at batch size {current_batch_size(self._loader())}, "
                        f"and {need}: set num_it ≥ {least} (the loader is cycled) or lower n_batch")
            return None
        if num_it < least:
            return f"num_it must be ≥ {least} ({need}), or 0 for one epoch; got {num_it}"
        return None

    def _show_bs(self) -> None:
        bs = current_batch_size(self._loader())
        if self._applied is None:
            text = f"batch size now: <b>{bs}</b>"
        elif self._applied[2]:
            where = "dls.train" if self._uses_learner_dls() else "train_dl"
            text = f"batch size now: <b>{bs}</b> ({where}, changed in place by Apply)"
        else:
            text = (f"batch size now: <b>{bs}</b> in <code>{html.escape(self._applied[3])}.train_dl</code>, a new "
                    f"DataLoader; loaders made before Apply still give {self._applied[0]}")
        self.bs_label.value = text

    def _set_status(self, text: str, kind: str, only_while_running: bool = False, final: bool = False) -> None:
        """The one status line, written by either thread.

        The lock keeps writes whole and in order: once the run's final status is written (`final`),
        a late "running" or "stopping…" from the main thread (`only_while_running`) is dropped.
        """
        color = _COLORS.get(kind, _COLORS["idle"])
        with self._status_lock:
            if only_while_running and not self._live:
                return
            if final:
                self._live = False
            self.status.value = f'<span style="color:{color}">status: {html.escape(text)}</span>'

    def settings(self) -> dict[str, Any]:
        "The run settings from the controls (num_it 0 means one epoch: None for bs_find; 'auto' when ticked)."
        num_it = "auto" if self.auto_box.value else self.num_it_text.value or None
        beta = None if self.beta_slider.value == AUTO_BETA else self.beta_slider.value
        return {"n_batch": self.n_batch_slider.value, "beta": beta, "num_it": num_it,
                "lr": self.lr_text.value}

    def _validate(self) -> str | None:
        "Check the controls; show the problem inline and refuse Start while there is one."
        s = self.settings()
        n_batch = s["n_batch"]
        self._show_bs()  # the loader may have changed since (learn.dls replaced, dls.train.bs set by hand)
        epoch = loader_len(self._train_loader())
        epoch_text = f"; one epoch = {epoch} batches" if epoch is not None else ""
        per = "" if self._per_step else f" × n_batch {n_batch}"
        auto = self.auto_box.value
        self.num_it_text.disabled = auto
        if auto:
            rule = self._auto_rule
            self.num_it_help.value = _help_text(
                f"auto: the run stops once the noise scale's 90% interval is within ±{rule.rel_halfwidth:.0%}, "
                f"at most {rule.max_it:,} small batches{epoch_text}; untick to set num_it")
        else:
            self.num_it_help.value = _help_text(f"{_HELP['num_it']}. A suggestion needs num_it ≥ {MIN_ESTIMATES}"
                                                f"{per} = {self.least_num_it(n_batch)}{epoch_text}")
        msg = None
        if not (math.isfinite(s["lr"]) and s["lr"] >= 0):
            msg = f"lr must be a finite number ≥ 0 (0 measures without training), got {s['lr']}"
        elif not auto:
            msg = self._check_num_it(self.num_it_text.value, n_batch)
        if msg is None and self.epochs_text.value < 0:
            msg = (f"epochs must be ≥ 0 (the epochs you train for at your batch size; 0: not given), "
                   f"got {self.epochs_text.value}")
        self.error_label.value = f'<span style="color:{_COLORS["error"]}">{html.escape(msg)}</span>' if msg else ""
        if not self.running:
            self.start_button.disabled = msg is not None
        return msg

    def _on_epochs(self, change: dict) -> None:
        "A new epoch count re-words the finished run's advice (the epochs it advises follow it)."
        self._validate()
        if self.result is not None and not self.running and self._shown is not None:
            self.result_box.value = self._result_html(self.result, *self._shown, self._advice_for(self.result))

    def _on_setting(self, change: dict) -> None:
        msg = self._validate()
        if self.running and msg is None and self.settings() != self._run_settings:
            self.note_label.value = "<i>settings changed: they apply to the next run</i>"
        elif not self.running:
            self.note_label.value = ""

    # ---------------------------------------------------------------- actions
    def start(self) -> bool:
        """Start a run in the background; False if it cannot start.

        A Start while this panel runs is ignored (a double click), unless the run was asked to stop:
        Stop then Start waits for it to end (one step) and starts the next. Any other reason (bad
        settings, another run on the same model, a closed panel) is shown in the status line.
        The Learner is read now, not when the panel was built: its model, dls and opt_func may have changed.
        """
        if self._closed:
            self._set_status("error: this panel was closed: build a new one to run again", "error")
            return False
        if self._still_running():
            return False  # a double click
        model = self.target.model if _is_learner(self.target) else self.target
        if model is not self.model:  # learn.model was replaced since the panel was built: claim the one that trains
            self.model, self._runner = model, Runner(model)
            self._per_step = self._extra["method"] == "per_example" or is_distributed(model)
        msg = self._validate()
        if msg is not None:
            self._set_status(f"error: {msg}", "error")
            return False
        try:
            self._runner.check_free()
        except FinderBusyError as e:  # another run holds the model: say so before touching the panel
            self._set_status(f"error: {type(e).__name__}: {e}", "error")
            return False
        settings = self.settings()
        listener = ThrottledListener(self._draw)
        train_dl = None if self._uses_learner_dls() else self.train_dl
        rule = self._auto_rule
        auto = (AutoStop(rule.rel_halfwidth, rule.max_it, rule.min_windows, rule.level)
                if settings["num_it"] == "auto" else None)
        # everything the run's end will overwrite is written before its thread starts
        self._run_settings, self._listener, self._auto_run = settings, listener, auto
        self.note_label.value = ""
        self.result_box.value = ""
        with self.progress.hold_sync():
            self.progress.value, self.progress.max = 0, 1
        self.progress_label.value = "iteration 0"
        self.charts.show([])
        self.apply_button.tooltip = _APPLY_TIP
        self.start_button.disabled, self.stop_button.disabled, self.apply_button.disabled = True, False, True
        with self._status_lock:
            self._live = True
        self._set_status("running", "running", only_while_running=True)
        try:
            self._runner.start((self.target, train_dl, self.loss_func),
                               {**settings, "num_it": auto or settings["num_it"], **self._extra}, listener,
                               self._finish)
        except Exception as e:  # a run that claimed the model in between
            with self._status_lock:
                self._live = False
            self.stop_button.disabled, self.start_button.disabled = True, False
            self._set_status(f"error: {type(e).__name__}: {e}", "error")
            return False
        return True

    def stop(self) -> None:
        "Ask the run to end at its next step; its partial result stays available."
        if self.running:
            self._runner.stop()
            self._set_status("stopping…", "running", only_while_running=True)

    def _still_running(self) -> bool:
        """Whether a run is going on, after waiting for one that was asked to stop (Stop, then Start or Apply in the
        same cell): it ends at its next step with its model restored, and Apply can use its partial result."""
        if self.running and self._runner.stop_event.is_set():
            self._runner.wait()
        return self.running

    def wait(self, timeout: float | None = None) -> GNSResult | None:
        """Block until the run ends (or `timeout` s pass); the result, None if it failed or is still running.

        A kernel interrupt (■) while waiting stops the run at its next step, restores the model,
        leaves the panel ready for the next run and raises KeyboardInterrupt.
        """
        return self.result if self._runner.wait(timeout) else None

    def training_lr(self) -> float | slice | None:
        "The lr the advice scales: a Learner's `lr` (what fit uses by default; a slice too), else the run's."
        if _is_learner(self.target):
            lr = self.target.lr
            if self._lr_applied is not None:
                res, before, after = self._lr_applied
                if res is self.result and lr == after:  # Apply set it from this advice: advise from the lr before
                    lr = before
            try:
                check_lr(lr)
            except ValueError:
                return None
            return lr if isinstance(lr, slice) else float(lr)
        return None  # GNSResult.advice falls back to the run's lr

    def advice(self) -> BatchAdvice | None:
        "The latest result's advice at the training lr and the optimizer's scaling rule (None without a result)."
        res = self.result
        return None if res is None else self._advice_for(res)

    def _advice_for(self, result: GNSResult) -> BatchAdvice:
        "`result.advice` at the training lr, the optimizer's rule and the epochs typed in the panel (0: none)."
        epochs = self.epochs_text.value
        return result.advice(lr=self.training_lr(), epochs=epochs if epochs > 0 else None, rule=self.rule)

    def apply(self) -> Any:
        """Use the advised batch size for training; returns the changed loader (or DataLoaders).

        The advice's batch size, not the raw suggestion: it may be capped so that an epoch keeps
        enough steps (`advice.py`). With "also set lr" ticked, a Learner's `lr` becomes the advised
        one. fastai DataLoaders change in place. A torch DataLoader cannot change its batch size, so
        `train_dl` becomes a new loader (passed to `on_apply`, after the panel shows it: an exception
        of the callback is shown and raised, the batch size stays applied), and the panel shows the line
        that puts it in the user's variable. Applying the same advice again changes nothing: the lr is
        scaled from the one the run was advised for, not again from the one Apply set. When the run
        found that the suggestion does not fit in device memory, the per-step batch size of its plan
        is applied instead and the status says how many steps to accumulate (re-planned for the
        advice's size when the advice caps it). An advice that keeps the batch size returns the loader
        unchanged; without a reliable advice (or while running) it returns None and the status says why.
        """
        if self._still_running():
            self._set_status("cannot apply while running: Stop or wait for the run to finish", "error")
            return None
        res = self.result
        if res is None or not res.reliable:
            why = res.reason if res is not None else "no finished run yet: press Start"
            self._set_status(f"no reliable suggestion to apply ({why})", "error")
            return None
        advice = self.advice()
        if advice.batch_size is None:
            self._set_status(f"no batch size to apply: {advice.text}", "error")
            return None
        loader = self._loader()
        if advice.batch_size == advice.old_batch_size:  # nothing to change: `train_dl = w.apply()` keeps its loader
            self._set_status(f"train batch size already {advice.batch_size}, the size the advice keeps: "
                             f"{advice.text}", "idle")
            return loader
        old = current_batch_size(loader)
        new_bs, steps = advice.micro_batch_size, advice.accumulation_steps  # planned for the advice's batch size
        accumulate = f", with gradient accumulation {steps}" if steps > 1 else ""
        if old == new_bs:  # applied already (Apply pressed again): no loader to rebuild, no new one to announce
            self.apply_button.disabled = True
            self._set_status(f"train batch size already {new_bs}{accumulate}{self._apply_lr(advice)}", "finished")
            return loader
        names = _names_of(loader)  # before the panel drops its reference to the old loader
        new_loader = apply_batch_size(loader, new_bs)
        in_place = new_loader is loader
        self.apply_button.disabled = True  # done; the next run's suggestion enables it again
        if not self._uses_learner_dls():
            self.train_dl = new_loader
        panel_names = _names_of(self)
        self._applied = (old, new_bs, in_place, panel_names[0] if panel_names else "w")
        self._validate()  # one epoch is shorter at a bigger batch size; shows the new batch size
        done = f"train batch size {old} → {current_batch_size(new_loader)}{accumulate}{self._apply_lr(advice)}"
        self._set_status(done, "finished")
        self.note_label.value = "" if in_place else _new_loader_note(old, new_bs, names, self._applied[3])
        if self.on_apply is not None and not self._uses_learner_dls():
            try:  # last: the panel is right whatever the user's callback does
                self.on_apply(new_loader)
            except Exception as e:
                self._reported = e
                self._set_status(f"error: on_apply raised {type(e).__name__}: {e}. The batch size was applied "
                                 f"({done}): {self._applied[3]}.train_dl is the new loader", "error")
                raise
        return new_loader

    def _apply_lr(self, advice: BatchAdvice) -> str:
        "Set a Learner's lr to the advised one when the box is ticked; the status text that says so."
        if not (self.apply_lr_box.value and _is_learner(self.target)):
            return ""
        if advice.lr is None:
            return "; learn.lr unchanged: it is not a positive number or a slice of them, so there is nothing to scale"
        old = self.target.lr
        if old == advice.lr:
            return f"; learn.lr already {format_lr(old)}"
        self._lr_applied = (self.result, self.training_lr(), advice.lr)
        self.target.lr = advice.lr
        text = (f"; learn.lr {format_lr(old)} → {format_lr(advice.lr)} (fit and fit_one_cycle use it when called "
                "without an lr)")
        return text

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
        """Stop a run in progress and wait until its model is restored, then close the widgets.

        Waiting (one step at most) lets the next line of the cell use the model: it is free and as it was.
        """
        if hasattr(self, "_runner"):  # not there when __init__ refused its arguments
            self._closed = True
            self._runner.stop("the panel was closed")
            self._runner.wait()
            self.charts.close()
        super().close()

    # ---------------------------------------------------------------- worker thread only
    def _draw(self, records: list[GNSRecord], result: GNSResult | None = None) -> None:
        "Refresh charts and progress from the history so far (called on the worker thread)."
        if not records:
            return
        last = records[-1]
        with self.progress.hold_sync():
            self.progress.max, self.progress.value = last.total, last.iteration
        eta = eta_seconds(records)
        auto = self._auto_run
        at_most = "at most " if auto is not None else ""
        eta_text = f"{at_most}about {_duration(eta)} left" if math.isfinite(eta) else "estimating time left…"
        of = (f"iteration {last.iteration} of at most {last.total}" if auto is not None
              else f"iteration {last.iteration}/{last.total}")
        early = (f" · stops early once the noise scale is within ±{auto.rel_halfwidth:.0%}" if auto is not None
                 else "")
        self.progress_label.value = f"{of} · {_duration(last.elapsed)} elapsed · {eta_text}{early}"
        self.charts.show(records, result.suggested_bs if result is not None else None,
                         result.interval if result is not None else None)

    def _finish(self, result: GNSResult | None, error: BaseException | None) -> None:
        "Final refresh, result box and status at the end of a run (worker thread)."
        try:
            records = self._listener.records
            self._draw(records, result)
            last = records[-1] if records else None
            done = last.iteration if last else 0
            total = last.total if last else self.progress.max
            auto = self._auto_run
            why = ""
            if result is not None and not result.stopped:
                if auto is not None:  # it ends when precise enough: the bar ends there too
                    total, why = done, f" ({_auto_end(auto)})"
                with self.progress.hold_sync():
                    self.progress.max, self.progress.value = total, total
                done = total
            elapsed = f" · {_duration(last.elapsed)}" if last else ""
            how = "finished" if result is not None and not result.stopped else "stopped"
            self.progress_label.value = (f"{how} at iteration {done}/{total}{why}{elapsed}" if last else
                                         f"{how} before the first estimate")
            if error is not None:
                status, kind = f"error: {type(error).__name__}: {error}", "error"
            elif result.stopped:
                why = self._runner.stop_reason or "stopped"
                status, kind = f"{why} after {done} iterations; model restored (partial result)", "idle"
            elif result.reliable:
                status, kind = "finished", "finished"
            else:
                status, kind = "finished without a suggestion (why: below)", "warn"
            advice = None
            if result is not None:
                advice = self._advice_for(result)
                self.result_box.value = self._result_html(result, done, total, advice)
                self._shown = (done, total)
            why = _nothing_to_apply(result, advice)
            self.apply_button.disabled = why is not None
            self.apply_button.tooltip = _APPLY_TIP if why is None else f"nothing to apply: {why}"
        except Exception as e:  # the worker thread has nobody else to report to
            status, kind = f"error: {type(e).__name__}: {e}", "error"
        finally:
            self.stop_button.disabled = True
            self.start_button.disabled = bool(self.error_label.value)
        self._set_status(status, kind, final=True)

    def _result_html(self, res: GNSResult, done: int, total: int, advice: BatchAdvice) -> str:
        if res.interval is not None:
            ns = f"{res.interval} examples (90% interval in brackets)"
        else:
            ns = f"{res.noise_scale:.4g} examples" if math.isfinite(res.noise_scale) else "no estimate yet"
        rows = [f"<b>noise scale</b>: {html.escape(ns)} (the batch size beyond which bigger batches stop saving "
                "steps)"]
        if res.reliable:
            partial = f", from a stopped run ({done} of {total} iterations)" if res.stopped else ""
            rows.append(f"<b>suggested batch size</b>: {res.suggested_bs} (measured at batch size {res.batch_size}"
                        f"{partial}) — {html.escape(res.reason)}")
            if res.memory_plan is not None:
                rows.append(f"<b>memory</b>: {html.escape(res.memory_plan.text)} (for the raw suggestion: the advice "
                            "below plans for the batch size it gives)")
            rule = ("scaled in proportion to the batch size (SGD-like optimizer" if self.rule == "sgd" else
                    "scaled by the square root of the batch-size ratio (Adam-like optimizer")
            rule += f" {html.escape(self.opt_name)})"
            rows.append(f"<b>advice</b> (learning rate {rule}): {html.escape(advice.text)}")
        elif res.stopped:
            rows.append(f"<b>no suggestion</b>: the run was stopped after {done} of {total} iterations, before "
                        "the estimate settled; run it to the end for a suggestion")
        else:
            rows.append(f"<b>no suggestion</b>: {html.escape(res.reason)}")
        if res.noise_scale > 0:
            rows.append(_tradeoff_html(res))
        return '<div class="gns-result-text">' + "<br>".join(rows) + "</div>"


def _nothing_to_apply(result: GNSResult | None, advice: BatchAdvice | None) -> str | None:
    "Why Apply has nothing to do after a run (None: it has), for its tooltip."
    if result is None or advice is None:
        return "no result"
    if advice.batch_size is None:
        return advice.text
    if advice.batch_size == advice.old_batch_size:  # the run after an Apply, often, or a small dataset
        return f"the run was measured at batch size {advice.old_batch_size}, the size the advice keeps ({advice.text})"
    return None


def _auto_end(auto: AutoStop) -> str:
    "Why a num_it='auto' run that was not stopped ended (and the n_batch it widened windows to, if it did)."
    widened = (f"; windows widened to n_batch {auto.widened_to}, as the noise scale exceeded them"
               if auto.widened_to else "")
    if auto.interval is not None and auto.interval.rel_halfwidth <= auto.rel_halfwidth:
        return f"auto: the noise scale is within ±{auto.rel_halfwidth:.0%}{widened}"
    if auto.saturated:
        return f"auto: the interval stopped narrowing, as beta forgets older estimates{widened}"
    return f"auto: reached the cap of {auto.max_it:,} small batches{widened}"


def _check_build_args(*, lr: Any, num_it: Any, n_batch: Any, beta: Any, epochs: Any) -> None:
    "The control values given to the constructor: a ValueError naming the argument, never a silent clamp."
    lo, hi = N_BATCH_RANGE
    if isinstance(n_batch, bool) or not isinstance(n_batch, int) or not lo <= n_batch <= hi:
        raise ValueError(f"n_batch must be an integer from {lo} to {hi} (the slider's range), got {n_batch!r}")
    if beta is not None:
        NoiseScaleEstimator.check_args(n_batch, beta)
        if beta <= 0:
            raise ValueError(f"beta must be in (0, 1] or None (smoothing; None picks it from the lr), got {beta!r}")
    check_epochs(epochs)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number ≥ 0 (0 measures without training), got {lr!r}")


def _help_text(text: str) -> str:
    return ('<span style="display:block;line-height:1.35;font-size:var(--jp-ui-font-size0, 11px);'
            f'color:var(--jp-ui-font-color2, #616161)">{html.escape(text)}</span>')


def _help_html(text: str) -> ipw.HTML:
    w = ipw.HTML(_help_text(text))
    w.add_class("gns-help")
    return w


def _new_loader_note(old: int | None, new: int, loader_names: list[str], panel: str) -> str:
    "The copyable line that makes the user's own variable the new loader (a torch loader cannot be resized)."
    loader = loader_names[0] if loader_names else "train_dl"
    line = f"{loader} = {panel}.train_dl"
    return (f"A PyTorch DataLoader cannot change its batch size, so Apply built a new one with batch size {new} "
            f"in <code>{html.escape(panel)}.train_dl</code>. Loaders made before Apply still give batches of {old}. "
            f"Train with the new one: <code class='gns-copy' style='user-select:all'>{html.escape(line)}</code>")


def _tradeoff_html(res: GNSResult) -> str:
    "The paper's cost of each batch size around the noise scale: steps and examples relative to their minimum."
    center = res.suggested_bs or 2 ** max(0, round(math.log2(res.noise_scale)))
    sizes = sorted({res.batch_size or center, *(center * 2**k for k in range(-3, 4) if center * 2**k >= 1)})
    t = res.tradeoff(sizes)
    head = "".join(f"<th style='padding:0 6px'>{b}</th>" for b in t.batch_size)
    steps = "".join(f"<td style='padding:0 6px'>×{v:.2f}</td>" for v in t.steps)
    examples = "".join(f"<td style='padding:0 6px'>×{v:.2f}</td>" for v in t.examples)
    return ("<b>trade-off</b> (predicted steps and examples to reach the same loss, relative to their minimum):"
            f"<div style='overflow-x:auto;max-width:100%'><table class='gns-tradeoff'><tr><th>batch size</th>{head}"
            f"</tr><tr><td>steps</td>{steps}</tr><tr><td>examples</td>{examples}</tr></table></div>")
