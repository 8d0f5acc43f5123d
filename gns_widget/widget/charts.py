"""The three live bqplot charts: gradient noise, gradient signal and the noise scale, per iteration.

Titles are plain and short, so they fit the narrowest chart (240 px); the latest value and the
formula are in the caption under each chart, which wraps. Every y axis uses one tick format.

Noise and signal can be negative early in a run (they are differences of noisy estimates),
so their y axes are linear. The noise scale spans orders of magnitude, so its axis is
logarithmic and only its positive, finite points are drawn: a log scale turns anything
else into an invalid SVG path.

Every axis gets an explicit domain and explicit round tick values: bqplot's own choice pads
the x axis into negative iterations, ticks at odd values (1005), bunches log labels and,
before any data, labels an empty axis "0 0 1 1". The toolbar bqplot shows on hover would hide
the title, which carries the live value, so it is off. The figures wrap onto new rows when
the notebook is narrow instead of scrolling sideways.

The noise-scale chart shades the result's 90% interval as a band; an interval unbounded above
(|G|² not distinguishable from zero) is clipped to the top of the axis, where it stays visibly open.
"""
from __future__ import annotations

import html
import math

import bqplot as bq
import ipywidgets as ipw
import numpy as np

from ..interval import Interval
from ..result import GNSRecord

__all__ = ["GNSCharts", "CHARTS", "nice_ticks", "log_ticks"]

# (record field, title, y-axis label, log y, one plain line under the chart, with its formula)
CHARTS = (
    ("noise", "gradient noise", "variance per example", False,
     "How much the gradients of single examples disagree: their variance summed over all weights, tr(Σ)."),
    ("scale", "gradient signal", "squared gradient", False,
     "How strong the true gradient is: the squared length of the average gradient, |G|²."),
    ("noise_scale", "noise scale, in examples", "batch size (examples)", True,
     "Noise ÷ signal, B_noise = tr(Σ)/|G|²: bigger batches than this barely cut the steps needed. Dashed: the "
     "suggested batch size; shaded: the 90% interval of the final value."),
)
Y_FORMAT = ",.3~g"  # one format on every y axis: 0.0012, 5,000, 10,000, 1.5e-7 (d3-format)
_LINE, _SUGGESTION = "#1f77b4", "#ff7f0e"  # readable on light and dark backgrounds


def nice_ticks(lo: float, hi: float, n: int = 4, integer: bool = False) -> list[float]:
    "About `n` round values (1, 2, 2.5 or 5 × a power of ten apart) between `lo` and `hi`."
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _round_125(v: float, up: bool) -> float:
    "The nearest 1-2-5 value (1, 2, 5, 10, 20, ...) at or above (`up`) or below `v` > 0."
    k = math.floor(math.log10(v))
    ladder = [m * 10.0**e for e in (k - 1, k, k + 1) for m in (1, 2, 5)]
    return min(x for x in ladder if x >= v * (1 - 1e-9)) if up else max(x for x in ladder if x <= v * (1 + 1e-9))


def log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    "(domain min, domain max, ticks) for positive values in [lo, hi]: ends on 1-2-5 values, ticks spread evenly."
    dmin, dmax = _round_125(lo / 1.1, up=False), _round_125(hi * 1.1, up=True)
    decades = math.log10(dmax / dmin)
    mantissas = (1,) if decades > 2.5 else (1, 2, 5) if decades > 0.9 else (1, 1.5, 2, 3, 5, 7)
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(dmin)), math.ceil(math.log10(dmax)) + 1)
             for m in mantissas]
    return dmin, dmax, sorted({round(t, 12) for t in ticks if dmin * (1 - 1e-9) <= t <= dmax * (1 + 1e-9)})


def _figure(name: str, title: str, ylabel: str, log: bool, help_text: str):
    x = bq.LinearScale(min=0.0, max=1.0, allow_padding=False)
    # bqplot derives a log domain from every mark, empty ones included, and then draws nothing:
    # every scale gets an explicit domain instead (see GNSCharts.show)
    y = bq.LogScale(min=1.0, max=1000.0) if log else bq.LinearScale(min=0.0, max=1.0, allow_padding=False)
    line = bq.Lines(x=[], y=[], scales={"x": x, "y": y}, colors=[_LINE])
    marks = [line]
    suggestion = band = None
    if log:  # the suggested batch size and the interval, drawn where the user compares them with the noise scale
        band = bq.Lines(x=[], y=[], scales={"x": x, "y": y}, colors=[_LINE, _LINE], fill="between",
                        fill_colors=[_LINE], fill_opacities=[0.15], opacities=[0.3, 0.3], stroke_width=1)
        suggestion = bq.Lines(x=[], y=[], scales={"x": x, "y": y}, colors=[_SUGGESTION], line_style="dashed")
        marks = [band, line, suggestion]  # the band behind the curve
    box, fig = chart_box(f"gns-chart-{name.replace('_', '-')}", title, "iteration (small batches)", ylabel, marks,
                         x, y, help_text)
    return box, fig, line, suggestion, band


def chart_box(css_class: str, title: str, xlabel: str, ylabel: str, marks: list, x, y, help_text: str):
    """A figure in the panels' chart style with its caption below, in the box the chart rows wrap: (box, figure).
    The finder's charts and the adaptive view's share it, so the two look and lay out alike."""
    hidden = {"display": "none"}  # no tick labels until there is data (see GNSCharts._axes)
    axes = [bq.Axis(scale=x, label=xlabel, side="bottom", tick_values=[], tick_format="~s", tick_style=hidden),
            bq.Axis(scale=y, label=ylabel, side="left", tick_values=[], tick_format=Y_FORMAT,
                    label_offset="42px", tick_style=hidden)]
    # the top margin keeps the title clear of the top y tick label
    fig = bq.Figure(marks=marks, axes=axes, title=title, animation_duration=0, display_toolbar=False,
                    title_style={"font-size": "14px"},
                    padding_x=0.0, padding_y=0.0, fig_margin={"top": 44, "bottom": 42, "left": 60, "right": 24},
                    layout=ipw.Layout(width="auto", min_width="200px", height="240px"))
    fig.add_class("gns-chart")
    fig.add_class(css_class)
    caption = ipw.HTML(_caption("", help_text))
    caption.add_class("gns-help")
    box = ipw.VBox([fig, caption], layout=ipw.Layout(flex="1 1 260px", min_width="240px", max_width="440px",
                                                     overflow="hidden"))
    box.add_class("gns-chart-box")
    return box, fig


def _fmt(v: float) -> str:
    return f"{v:,.4g}" if math.isfinite(v) else "–"


def _caption(value: str, help_text: str) -> str:
    "The latest value (bold, wraps) over the chart's plain explanation."
    now = f'<b style="color:var(--jp-ui-font-color1, inherit)">{html.escape(value)}</b><br>' if value else ""
    return (f'<span style="display:block;line-height:1.35;font-size:var(--jp-ui-font-size0, 11px);'
            f'color:var(--jp-ui-font-color2, #616161)">{now}{html.escape(help_text)}</span>')


class GNSCharts(ipw.HBox):
    """Three figures updated in one batch per refresh (one comm message per changed widget, not per point)."""

    def __init__(self):
        built = [_figure(*spec) for spec in CHARTS]
        self.figures = [fig for _, fig, _, _, _ in built]
        self.captions = {spec[0]: box.children[1] for spec, (box, *_) in zip(CHARTS, built)}
        self.lines = {spec[0]: line for spec, (_, _, line, _, _) in zip(CHARTS, built)}
        self.suggestion_line, self.band = built[-1][3], built[-1][4]
        super().__init__([box for box, *_ in built], layout=ipw.Layout(flex_flow="row wrap", width="100%"))
        self.add_class("gns-charts")

    def show(self, records: list[GNSRecord], suggested_bs: int | None = None,
             interval: Interval | None = None) -> None:
        """Draw `records` (the whole history so far), the suggestion line and the interval band, if any.

        [] resets the charts. The caption under each chart shows the latest value ('now: 91 (80–104)' with
        an `interval`, and the suggestion).
        """
        it = np.array([r.iteration for r in records], dtype=float)
        total = records[-1].total if records else 0
        for (name, _title, _label, log, help_text), fig in zip(CHARTS, self.figures):
            y = np.array([getattr(r, name) for r in records], dtype=float)
            keep = np.isfinite(y) & (y > 0) if log else np.isfinite(y)
            line = self.lines[name]
            with line.hold_sync():
                line.x, line.y = it[keep], y[keep]
                line.marker = "circle" if keep.sum() == 1 else None  # one estimate is no line: draw a dot
            extra = [suggested_bs] if log and suggested_bs is not None else []
            if log and interval is not None:
                extra += [v for v in (interval.lo, interval.hi) if 0 < v < math.inf]
            self._axes(fig, total, list(y[keep]) + extra, log)
            value = f"now: {_fmt(y[-1])}" if len(y) else ""
            if log and interval is not None:
                value = f"now: {interval} (90% interval)"
            if log and suggested_bs is not None:
                value += f" · suggested batch size {suggested_bs}"
            caption = _caption(value, help_text)
            if self.captions[name].value != caption:
                self.captions[name].value = caption
        with self.suggestion_line.hold_sync():
            if suggested_bs is not None and total:
                self.suggestion_line.x, self.suggestion_line.y = [0, total], [suggested_bs, suggested_bs]
            else:
                self.suggestion_line.x, self.suggestion_line.y = [], []
        self._band(interval, total)

    def _band(self, interval: Interval | None, total: int) -> None:
        "Shade [lo, hi] across the run, clipped to the y axis (a log axis has no 0, and hi may be inf)."
        y = self.figures[-1].axes[1].scale
        with self.band.hold_sync():
            if interval is None or not total or len(self.lines["noise_scale"].y) == 0:
                self.band.x, self.band.y = [], []
                return
            lo, hi = max(interval.lo, y.min), min(interval.hi, y.max)
            self.band.x, self.band.y = [0, total], [[lo, lo], [hi, hi]]

    @staticmethod
    def _axes(fig: bq.Figure, total: int, values: list[float], log: bool) -> None:
        "Fit both scales to the run's length and the values shown, with round ticks; no ticks without data."
        x_axis, y_axis = fig.axes
        x, y = x_axis.scale, y_axis.scale
        with x.hold_sync():
            x.min, x.max = 0.0, float(max(total, 1))
        x_axis.tick_values = nice_ticks(0, total, 4, integer=True) if total else []
        # bqplot reads empty tick_values as "choose for me": hide the labels of an axis with nothing on it
        x_axis.tick_style = {"display": "inline" if total else "none"}
        y_axis.tick_style = {"display": "inline" if values else "none"}
        if not values:
            y_axis.tick_values = []
            return
        lo, hi = min(values), max(values)
        if log:
            lo, hi, ticks = log_ticks(lo, hi)
        else:
            pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
            lo, hi = lo - pad, hi + pad
            ticks = nice_ticks(lo, hi, 4)
        with y.hold_sync():
            y.min, y.max = float(lo), float(hi)
        y_axis.tick_values = ticks
