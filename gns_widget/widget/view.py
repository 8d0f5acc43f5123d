"""The panel's layout: every widget, its CSS class, tooltip and place; no behaviour.

From top to bottom: the controls (each with a plain line under it), inline errors, the buttons and
the loader's batch size, progress, status, a note (the copyable line after Apply), the answer
(one headline), its details (collapsed), then the three live charts. `GNSWidget` (controller.py)
wires the behaviour onto these widgets; `texts.py` words what they show.
"""
from __future__ import annotations

import ipywidgets as ipw

from ..interval import AutoStop
from ..settings import PANEL_N_BATCH
from .charts import GNSCharts
from .texts import HELP, STYLE, help_text

__all__ = ["PanelView", "BETAS", "AUTO_BETA", "N_BATCH_RANGE"]

BETAS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)
AUTO_BETA = "auto"  # the beta slider's first stop: bs_find(beta=None), chosen from the lr
N_BATCH_RANGE = PANEL_N_BATCH  # the n_batch slider's range: the panel's limit (settings.PanelSettings)
DETAILS_TITLE = "Details: noise scale, trade-off table, how it was measured"


def _help_html(text: str) -> ipw.HTML:
    w = ipw.HTML(help_text(text))
    w.add_class("gns-help")
    return w


def _with_help(control: ipw.Widget, text: str) -> ipw.VBox:
    "The control with its one-line explanation right under it (the tooltip only covers the label)."
    return ipw.VBox([control, _help_html(text)])


class PanelView(ipw.VBox):
    "The widgets of the panel, laid out; `learner` adds the 'also set learn.lr' box, else the 'your lr' input."

    def _build_view(self, *, lr: float, num_it: int, n_batch: int, beta: float | None, auto: bool,
                    epochs: int | None, train_lr: float | None, learner: bool, auto_rule: AutoStop) -> None:
        betas = (AUTO_BETA, *sorted(set(BETAS) | ({beta} - {None})))
        style = {"description_width": "60px"}
        lo, hi = N_BATCH_RANGE
        fit = {"width": "100%", "max_width": "360px"}  # shrinks in a narrow notebook instead of overflowing
        self.n_batch_slider = ipw.IntSlider(value=n_batch, min=lo, max=hi, description="n_batch", style=style,
                                            continuous_update=False, tooltip=HELP["n_batch"], layout=fit)
        self.beta_slider = ipw.SelectionSlider(options=betas, value=AUTO_BETA if beta is None else beta,
                                               description="beta", style=style,
                                               continuous_update=False, tooltip=HELP["beta"], layout=fit)
        self.num_it_text = ipw.IntText(value=num_it, description="num_it", style=style, tooltip=HELP["num_it"],
                                       layout={"width": "200px"}, disabled=auto)
        self.auto_box = ipw.Checkbox(value=auto, description=f"auto (until ±{auto_rule.rel_halfwidth:.0%})",
                                     indent=False, tooltip=HELP["auto"], layout={"width": "200px"})
        self.apply_lr_box = ipw.Checkbox(value=False, description="also set learn.lr", indent=False,
                                         tooltip=HELP["apply_lr"], layout={"width": "150px"})
        self.lr_text = ipw.FloatText(value=lr, description="lr", style=style, tooltip=HELP["lr"],
                                     layout={"width": "200px"})
        self.train_lr_text = ipw.FloatText(value=train_lr or 0.0, description="your lr", style=style,
                                           tooltip=HELP["train_lr"], layout={"width": "200px"})
        self.epochs_text = ipw.IntText(value=epochs or 0, description="epochs", style=style,
                                       tooltip=HELP["epochs"], layout={"width": "200px"})
        self.num_it_help = ipw.HTML()
        self.bs_label = ipw.HTML()
        self.error_label = ipw.HTML()
        self.note_label = ipw.HTML()
        self.start_button = ipw.Button(description="Start", button_style="primary", icon="play",
                                       tooltip="train a short trial run and measure the noise scale")
        self.stop_button = ipw.Button(description="Stop", icon="stop", disabled=True,
                                      tooltip="end the run at the next step; the model is restored")
        self.apply_button = ipw.Button(description="Apply advice", button_style="success", icon="check",
                                       disabled=True, layout={"width": "170px"},
                                       tooltip="nothing to apply yet: press Start and wait for the run to finish")
        self.progress = ipw.IntProgress(value=0, min=0, max=1, layout={"width": "260px"})
        self.progress_label = ipw.HTML("iteration 0")
        self.status = ipw.HTML()
        self.headline = ipw.HTML()  # a VBox stretches its children: a width of 100% plus margins would overflow
        self.charts = GNSCharts()
        self.result_box = ipw.HTML()  # the details, collapsed under the headline
        self.details = ipw.Accordion([self.result_box], titles=(DETAILS_TITLE,), selected_index=None,
                                     layout={"display": "none"})
        self.style_html = ipw.HTML(STYLE, layout={"display": "none"})  # the theme colours (texts.STYLE)
        for w, cls in ((self.n_batch_slider, "n-batch"), (self.beta_slider, "beta"), (self.num_it_text, "num-it"),
                       (self.lr_text, "lr"), (self.num_it_help, "num-it-help"), (self.bs_label, "bs"),
                       (self.error_label, "error"), (self.note_label, "note"), (self.start_button, "start"),
                       (self.stop_button, "stop"), (self.apply_button, "apply"), (self.progress, "progress"),
                       (self.progress_label, "progress-label"), (self.status, "status"),
                       (self.result_box, "result"), (self.auto_box, "auto"), (self.apply_lr_box, "apply-lr"),
                       (self.epochs_text, "epochs"), (self.train_lr_text, "train-lr"), (self.headline, "headline"),
                       (self.details, "details")):
            w.add_class(f"gns-{cls}")
        controls = ipw.GridBox(
            [_with_help(self.n_batch_slider, HELP["n_batch"]), _with_help(self.beta_slider, HELP["beta"]),
             ipw.VBox([self.auto_box, self.num_it_text, self.num_it_help]),
             _with_help(self.lr_text, HELP["lr"]),
             *([] if learner else [_with_help(self.train_lr_text, HELP["train_lr"])]),
             _with_help(self.epochs_text, HELP["epochs"])],
            layout={"grid_template_columns": "repeat(auto-fill, minmax(260px, 1fr))", "grid_gap": "0 12px"})
        row = {"flex_flow": "row wrap", "align_items": "center"}
        super().__init__([
            controls, self.error_label,
            ipw.HBox([self.start_button, self.stop_button, self.apply_button,
                      *([self.apply_lr_box] if learner else []), self.bs_label], layout=row),
            ipw.HBox([self.progress, self.progress_label], layout=row),
            self.status, self.note_label, self.headline, self.details, self.charts, self.style_html,
        ], layout={"min_width": "0"})
        self.add_class("gns-widget")
