"""`GNSWidget`: the batch-size finder as a Jupyter panel (controls, live charts, result, Apply).

The kernel's main thread owns the controls and stays responsive; one daemon worker thread
runs `bs_find` and is the only writer of the charts and progress bar while it runs, in
batches (`hold_sync`) and at a throttled rate. Handlers never raise: the ipywidgets
dispatcher would swallow the exception, so every error is shown in the status line.

One run per model: a panel built for a model whose run belongs to another panel (the panel
cell re-run during a run) stops that run and waits until its model is restored; any other
run on the model (`bs_find` in a thread) makes Start refuse with the guard's error.

The result area shows the advice's one-line headline (`BatchAdvice.headline`, coloured by its kind)
with the details collapsed under it; Apply is enabled only when the advice changes the batch size,
and applies the advice's batch size, not the raw suggestion, which ignores the dataset size.

This module is the controller: the layout is `view.PanelView`, every text is a pure function in
`texts`, and the kernel's interrupt reaches a run started from the button through `interrupt`.
"""
from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ipywidgets as ipw
import torch
from torch import nn

from ..advice import BatchAdvice, check_epochs, check_lr, detect_rule, format_lr
from ..ddp import is_distributed
from ..guard import FinderBusyError
from ..interval import AutoStop
from ..loaders import current_batch_size, loader_len
from ..precision import resolve_amp
from ..result import GNSRecord, GNSResult
from ..settings import PanelSettings
from ..suggest import MIN_ESTIMATES
from ..targets import as_target
from . import texts
from .interrupt import stop_on_kernel_interrupt
from .runner import Runner, ThrottledListener, runner_of
from .texts import HELP, Applied, LrApplied, Shown
from .view import AUTO_BETA, BETAS, N_BATCH_RANGE, PanelView

__all__ = ["GNSWidget", "BETAS", "AUTO_BETA", "N_BATCH_RANGE", "optimizer_rule"]


def optimizer_rule(target: Any, opt: Any = None) -> tuple[str, str]:
    """(the lr rule, the optimizer's name), from the optimizer that will train: `advice.detect_rule`'s rule, or
    "momentum" (the square root, what `GNSResult.advice` uses) when the panel was given none."""
    if opt is None and _is_learner(target):
        opt = target.opt_func
    if opt is None:
        return "momentum", "not given (the run uses SGD)"
    name = getattr(opt, "__name__", None) or type(opt).__name__
    if isinstance(opt, functools.partial):
        name = getattr(opt.func, "__name__", name)
    return detect_rule(opt) or "momentum", name


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


class GNSWidget(PanelView):
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
    holding the old one needs the new one: `w.train_dl`). `train_lr`, for a plain torch model, is the lr
    you train with at your batch size (the "your lr" box): the advice scales it (a Learner's `lr` is read).
    """

    def __init__(self, target: Any, train_dl: Any = None, loss_func: Callable | None = None,
                 on_apply: Callable[[Any], Any] | None = None, *, lr: float = 1e-3,
                 num_it: int | str | AutoStop | None = "auto",
                 n_batch: int = 20, beta: float | None = None, opt: Any = None, method: str = "fixed",
                 amp: torch.dtype | None = None, device: Any = None, batch_fn: Callable | None = None,
                 probe_memory: bool | None = None, epochs: int | None = None, train_lr: float | None = None):
        if not (_is_learner(target) or isinstance(target, nn.Module)):
            raise TypeError(f"target must be a fastai Learner or a torch nn.Module, got {type(target).__name__}")
        if on_apply is not None and not callable(on_apply):
            raise TypeError(f"on_apply must be a function new_loader -> None, got {on_apply!r}")
        self.target, self.train_dl, self.loss_func, self.on_apply = target, train_dl, loss_func, on_apply
        self._extra = dict(opt=opt, method=method, amp=amp, device=device, batch_fn=batch_fn,
                           probe_memory=probe_memory)
        tgt = as_target(target, train_dl, loss_func, opt=opt, device=device, batch_fn=batch_fn)  # checks them
        resolve_amp(target, amp)
        self.model = tgt.model
        self._distributed = is_distributed(tgt.model)
        settings = PanelSettings(lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, method=method,
                                 distributed=self._distributed)
        settings.check()  # never a silent clamp: a ValueError naming the argument
        check_epochs(epochs)
        if train_lr is not None:
            check_lr(train_lr)
        auto = settings.auto
        self._auto_rule = auto or AutoStop()  # the rule each auto run copies (a run changes its state)
        self._auto_run: AutoStop | None = None  # the latest run's rule, when it ran with auto
        if auto is not None or num_it is None:  # the num_it box: one epoch (0) when that can suggest
            one_epoch = replace(settings, num_it=0)
            num_it = 0 if one_epoch.epoch_problem(self._train_loader()) is None else one_epoch.least_num_it()
        elif (msg := settings.epoch_problem(self._train_loader())) is not None:
            raise ValueError(msg)
        self._status_lock = threading.Lock()
        self._live = False  # a run is going and its final status is not written yet
        self._run_settings: dict[str, Any] = {}
        self._shown: Shown | None = None  # how far the run the result area shows went
        self._applied: Applied | None = None  # what the last Apply did to the loader
        self._listener: ThrottledListener | None = None
        self._lr_applied: LrApplied | None = None  # a Learner's lr Apply set
        self._reported: BaseException | None = None  # an error apply() has shown in the status line itself
        self._closed = False
        old = runner_of(self.model)
        if old is not None:  # the panel cell was re-run during a run: no run may outlive its panel
            old.stop_and_wait("a new panel for this model took over")
        self._runner = Runner(self.model)
        self._build(lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, auto=auto is not None, epochs=epochs,
                    train_lr=train_lr)
        self._validate()

    # ---------------------------------------------------------------- layout (view.py)
    def _build(self, *, lr: float, num_it: int, n_batch: int, beta: float | None, auto: bool,
               epochs: int | None, train_lr: float | None) -> None:
        self._build_view(lr=lr, num_it=num_it, n_batch=n_batch, beta=beta, auto=auto, epochs=epochs,
                         train_lr=train_lr, learner=_is_learner(self.target), auto_rule=self._auto_rule)
        for w in (self.n_batch_slider, self.beta_slider, self.num_it_text, self.lr_text, self.auto_box):
            w.observe(self._on_setting, names="value")
        self.epochs_text.observe(self._on_advice_input, names="value")
        self.train_lr_text.observe(self._on_advice_input, names="value")
        self.apply_lr_box.observe(self._on_apply_lr_box, names="value")
        self.start_button.on_click(self._click_start)
        self.stop_button.on_click(self._click_stop)
        self.apply_button.on_click(self._click_apply)
        self._set_status("idle", "idle")

    # ---------------------------------------------------------------- state
    @property
    def rule(self) -> str:
        """The lr rule of the optimizer the next run is given (learn.opt_func may change): "sgd", "momentum" or "adam".
        A result's advice scales the lr by the rule of the optimizer its run was given (`GNSResult.rule`)."""
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

    def _settings(self) -> PanelSettings:
        "The controls' run settings, with the panel's limits (`settings.PanelSettings`)."
        s = self.settings()
        return PanelSettings(lr=s["lr"], num_it=s["num_it"], n_batch=s["n_batch"], beta=s["beta"],
                             method=self._extra["method"], distributed=self._distributed)

    def _show_bs(self) -> None:
        self.bs_label.value = texts.bs_text(current_batch_size(self._loader()), self._applied, self._uses_learner_dls())

    def _set_status(self, text: str, kind: str, only_while_running: bool = False, final: bool = False) -> None:
        """The one status line, written by either thread.

        The lock keeps writes whole and in order: once the run's final status is written (`final`),
        a late "running" or "stopping…" from the main thread (`only_while_running`) is dropped.
        """
        with self._status_lock:
            if only_while_running and not self._live:
                return
            if final:
                self._live = False
            self.status.value = texts.status_html(text, kind)

    def settings(self) -> dict[str, Any]:
        "The run settings from the controls (num_it 0 means one epoch: None for bs_find; 'auto' when ticked)."
        num_it = "auto" if self.auto_box.value else self.num_it_text.value or None
        beta = None if self.beta_slider.value == AUTO_BETA else self.beta_slider.value
        return {"n_batch": self.n_batch_slider.value, "beta": beta, "num_it": num_it,
                "lr": self.lr_text.value}

    def _validate(self) -> str | None:
        "Check the controls; show the problem inline and refuse Start while there is one."
        s = self._settings()
        self._show_bs()  # the loader may have changed since (learn.dls replaced, dls.train.bs set by hand)
        epoch = loader_len(self._train_loader())
        epoch_text = f"; one epoch = {epoch} batches" if epoch is not None else ""
        per = "" if s.per_step else f" × n_batch {s.n_batch}"
        auto = self.auto_box.value
        self.num_it_text.disabled = auto
        if auto:
            rule = self._auto_rule
            self.num_it_help.value = texts.help_text(
                f"auto: the run stops once the noise scale's 90% interval is within ±{rule.rel_halfwidth:.0%}, "
                f"at most {rule.max_it:,} small batches{epoch_text}; untick to set num_it")
        else:
            self.num_it_help.value = texts.help_text(f"{HELP['num_it']}. A suggestion needs num_it ≥ {MIN_ESTIMATES}"
                                                f"{per} = {s.least_num_it()}{epoch_text}")
        msg = s.problem() or s.epoch_problem(self._train_loader())
        if msg is None and self.epochs_text.value < 0:
            msg = (f"epochs must be ≥ 0 (the epochs you train for at your batch size; 0: not given), "
                   f"got {self.epochs_text.value}")
        train_lr = self.train_lr_text.value
        if msg is None and not (math.isfinite(train_lr) and train_lr >= 0):
            msg = f"your lr must be a finite number ≥ 0 (the lr you train with; 0: not given), got {train_lr}"
        self.error_label.value = texts.error_html(msg) if msg else ""
        if not self.running:
            self.start_button.disabled = msg is not None
        return msg

    def _on_advice_input(self, change: dict) -> None:
        "A new epoch count or training lr re-words the finished run's advice (what it advises follows them)."
        if self._validate() is None and self.result is not None and not self.running and self._shown is not None:
            self._show_result(self.result, self._shown)

    def _on_apply_lr_box(self, change: dict) -> None:
        "Apply's tooltip says whether it sets learn.lr too."
        if self.result is not None and not self.running and not self.apply_button.disabled:
            self.apply_button.tooltip = texts.apply_tooltip(self._advice_for(self.result), lr_too=self._lr_box())

    def _lr_box(self) -> bool | None:
        "The 'also set learn.lr' box, None for a torch model (no box)."
        return self.apply_lr_box.value if _is_learner(self.target) else None

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
            self._distributed = is_distributed(model)
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
        self.result_box.value = self.headline.value = ""
        self.details.layout.display = "none"
        with self.progress.hold_sync():
            self.progress.value, self.progress.max = 0, 1
        self.progress_label.value = "iteration 0"
        self.charts.show([])
        self.apply_button.tooltip = "nothing to apply while the run goes: wait for it to finish"
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
        stop_on_kernel_interrupt(self._runner)  # ■ stops a run started from the button, as it stops a cell
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
            applied = self._lr_applied
            if applied is not None and applied.result is self.result and lr == applied.after:
                lr = applied.before  # Apply set it from this advice: advise from the lr before
            try:
                check_lr(lr)
            except ValueError:
                return None
            return lr if isinstance(lr, slice) else float(lr)
        train_lr = self.train_lr_text.value  # "your lr" (0: not given)
        return float(train_lr) if math.isfinite(train_lr) and train_lr > 0 else None  # None: the run's lr

    def advice(self) -> BatchAdvice | None:
        """The latest result's advice (None without a result): `w.result.advice(lr, epochs)` with the lr and epochs the
        panel holds (`training_lr()`, the epochs box), the same answer for the same inputs."""
        res = self.result
        return None if res is None else self._advice_for(res)

    def _advice_for(self, result: GNSResult) -> BatchAdvice:
        "`result.advice` at the panel's training lr and the epochs typed in it (0: none); all else is the result's."
        epochs = self.epochs_text.value
        return result.advice(lr=self.training_lr(), epochs=epochs if epochs > 0 else None)

    def apply(self) -> Any:
        """Use the advised batch size for training; returns the loader to train with (or the DataLoaders).

        The advice's batch size, not the raw suggestion: it may be capped so that an epoch keeps
        enough steps (`advice.py`). With "also set learn.lr" ticked, a Learner's `lr` becomes the advised
        one. fastai DataLoaders change in place. A torch DataLoader cannot change its batch size, so
        `train_dl` becomes a new loader (passed to `on_apply`, after the panel shows it: an exception
        of the callback is shown and raised, the batch size stays applied), and the panel shows the line
        that puts it in the user's variable. Applying the same advice again changes nothing: the lr is
        scaled from the one the run was advised for, not again from the one Apply set. When the run
        found that the suggestion does not fit in device memory, the per-step batch size of its plan
        is applied instead and the status says how many steps to accumulate (re-planned for the
        advice's size when the advice caps it).

        Whenever it applies nothing (a run going on, no finished run, an advice that keeps the batch
        size or is not sure yet) it returns the loader unchanged, so `train_dl = w.apply()` never loses
        the user's loader, and the status says why in a neutral colour.
        """
        loader = self._loader()
        if self._still_running():
            self._set_status("cannot apply while running: Stop or wait for the run to finish; the loader is "
                             "unchanged", "warn")
            return loader
        if self.result is None:
            self._set_status("nothing to apply (no finished run yet: press Start); the loader is unchanged", "idle")
            return loader
        advice = self.advice()  # the advice decides, not the raw suggestion: it may act where that one is withheld
        if advice.batch_size is None:
            self._set_status(f"no batch size to apply: {texts.plain(advice.text)}; the loader is unchanged", "idle")
            return loader
        if advice.batch_size == advice.old_batch_size:  # nothing to change: `train_dl = w.apply()` keeps its loader
            self._set_status(f"train batch size already {advice.batch_size}, the size the advice keeps: "
                             f"{texts.plain(advice.text)}", "idle")
            return loader
        old = current_batch_size(loader)
        new_bs = advice.batch_size
        if old == new_bs:  # applied already (Apply pressed again): no loader to rebuild, no new one to announce
            self.apply_button.disabled = True
            self._set_status(f"train batch size already {new_bs}{self._apply_lr(advice)}", "finished")
            return loader
        names = _names_of(loader)  # before the panel drops its reference to the old loader
        new_loader = advice.apply(loader)  # the lr is set by _apply_lr below, when its box is ticked
        in_place = new_loader is loader
        self.apply_button.disabled = True  # done; the next run's suggestion enables it again
        if not self._uses_learner_dls():
            self.train_dl = new_loader
        panel_names = _names_of(self)
        self._applied = Applied(old, new_bs, in_place, panel_names[0] if panel_names else "w")
        self.apply_button.tooltip = texts.apply_tooltip(advice, self._applied)
        self._validate()  # one epoch is shorter at a bigger batch size; shows the new batch size
        done = f"train batch size {old} → {current_batch_size(new_loader)}{self._apply_lr(advice)}"
        self._set_status(done, "finished")
        self.note_label.value = "" if in_place else texts.new_loader_note(old, new_bs, names, self._applied.panel_name)
        if self.on_apply is not None and not self._uses_learner_dls():
            try:  # last: the panel is right whatever the user's callback does
                self.on_apply(new_loader)
            except Exception as e:
                self._reported = e
                self._set_status(f"error: on_apply raised {type(e).__name__}: {e}. The batch size was applied "
                                 f"({done}): {self._applied.panel_name}.train_dl is the new loader", "error")
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
        self._lr_applied = LrApplied(self.result, self.training_lr(), advice.lr)
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
        self.progress_label.value = texts.progress_text(records, self._auto_run)
        self.charts.show(records, result.suggested_bs if result is not None else None,
                         result.interval if result is not None else None)

    def _finish(self, result: GNSResult | None, error: BaseException | None) -> None:
        "Final refresh, result area and status at the end of a run (worker thread)."
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
                    total, why = done, f" ({texts.auto_end(auto)})"
                with self.progress.hold_sync():
                    self.progress.max, self.progress.value = total, total
                done = total
            elapsed = f" · {texts.duration(last.elapsed)}" if last else ""
            how = "finished" if result is not None and not result.stopped else "stopped"
            self.progress_label.value = (f"{how} at iteration {done}/{total}{why}{elapsed}" if last else
                                         f"{how} before the first estimate")
            advice = None
            if result is not None:
                self._shown = Shown(done, total)
                advice = self._show_result(result, self._shown)
            else:  # the run failed: the status says why
                self.apply_button.tooltip = "nothing to apply: the run failed (the status line says why)"
            status, kind = texts.end_status(result, error, advice, done, self._runner.stop_reason)
        except Exception as e:  # the worker thread has nobody else to report to
            status, kind = f"error: {type(e).__name__}: {e}", "error"
        finally:
            self.stop_button.disabled = True
            self.start_button.disabled = bool(self.error_label.value)
        self._set_status(status, kind, final=True)

    def _show_result(self, result: GNSResult, shown: Shown) -> BatchAdvice:
        "The headline, the collapsed details and Apply's state for `result` (after a run, or new epochs or lr)."
        advice = self._advice_for(result)
        with self.headline.hold_sync():
            self.headline.value = texts.headline_html(advice, result)
        self.result_box.value = texts.details_html(result, advice, shown, self.opt_name)
        self.details.layout.display = None  # shown, still collapsed
        can_apply = advice.kind in ("grow", "shrink") and advice.batch_size != advice.old_batch_size
        self.apply_button.disabled = not can_apply
        self.apply_button.tooltip = texts.apply_tooltip(advice, lr_too=self._lr_box())
        return advice
