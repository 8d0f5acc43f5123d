"""The three live bqplot charts: noise tr(Σ), scale |G|² and the noise scale B_simple against iteration.

Noise and scale can be negative early in a run (they are differences of noisy estimates),
so their y axes are linear. The noise scale spans orders of magnitude, so its axis is
logarithmic and only its positive, finite points are drawn: a log scale turns anything
else into an invalid SVG path.
"""
from __future__ import annotations

import math

import bqplot as bq
import ipywidgets as ipw
import numpy as np

from ..result import GNSRecord

__all__ = ["GNSCharts", "CHARTS"]

# (record field, title, log y)
CHARTS = (("noise", "noise tr(Σ)", False), ("scale", "scale |G|²", False), ("noise_scale", "noise scale", True))


def _figure(name: str, title: str, log: bool) -> tuple[bq.Figure, bq.Lines, bq.Lines | None]:
    x = bq.LinearScale()
    # bqplot derives a log domain from every mark, empty ones included, and then draws nothing:
    # the noise-scale axis gets an explicit domain instead (see GNSCharts.show)
    y = bq.LogScale(min=1.0, max=1000.0) if log else bq.LinearScale()
    line = bq.Lines(x=[], y=[], scales={"x": x, "y": y}, colors=["#1f77b4"])
    marks = [line]
    suggestion = None
    if log:  # the suggested batch size, drawn where the user compares it with the noise scale
        suggestion = bq.Lines(x=[], y=[], scales={"x": x, "y": y}, colors=["#ff7f0e"], line_style="dashed",
                              labels=["suggested bs"], display_legend=False)
        marks.append(suggestion)
    axes = [bq.Axis(scale=x, label="iteration", side="bottom", num_ticks=4, tick_format="d"),
            bq.Axis(scale=y, side="left", tick_format=".3~g", num_ticks=4)]
    fig = bq.Figure(marks=marks, axes=axes, title=title, animation_duration=0,
                    fig_margin={"top": 40, "bottom": 40, "left": 55, "right": 25},
                    layout=ipw.Layout(width="300px", height="240px"))
    fig.add_class("gns-chart")
    fig.add_class(f"gns-chart-{name.replace('_', '-')}")
    return fig, line, suggestion


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else "–"


class GNSCharts(ipw.HBox):
    """Three figures updated in one batch per refresh (one comm message per changed widget, not per point)."""

    def __init__(self):
        built = [_figure(*spec) for spec in CHARTS]
        self.figures = [f for f, _, _ in built]
        self.lines = {spec[0]: line for spec, (_, line, _) in zip(CHARTS, built)}
        self.suggestion_line = built[-1][2]
        self.log_scale = self.suggestion_line.scales["y"]
        super().__init__(self.figures)
        self.add_class("gns-charts")

    def show(self, records: list[GNSRecord], suggested_bs: int | None = None) -> None:
        "Draw `records` (the whole history so far) and the suggestion line, if any."
        it = np.array([r.iteration for r in records], dtype=float)
        for (name, title, log), fig in zip(CHARTS, self.figures):
            y = np.array([getattr(r, name) for r in records], dtype=float)
            keep = np.isfinite(y) & (y > 0) if log else np.isfinite(y)
            line = self.lines[name]
            with line.hold_sync():
                line.x, line.y = it[keep], y[keep]
            fig.title = f"{title}: {_fmt(y[-1])}" if len(y) else title
        self._log_domain(records, suggested_bs)
        with self.suggestion_line.hold_sync():
            if suggested_bs is not None and len(it):
                self.suggestion_line.x, self.suggestion_line.y = [it[0], it[-1]], [suggested_bs, suggested_bs]
                self.suggestion_line.labels = [f"suggested bs {suggested_bs}"]
            else:
                self.suggestion_line.x, self.suggestion_line.y = [], []
        if suggested_bs is not None:
            self.figures[-1].title += f" (bs {suggested_bs})"

    def _log_domain(self, records: list[GNSRecord], suggested_bs: int | None) -> None:
        "Fit the log axis to the positive noise scales and the suggestion, with a little margin."
        values = [r.noise_scale for r in records if math.isfinite(r.noise_scale) and r.noise_scale > 0]
        values += [suggested_bs] if suggested_bs is not None else []
        if values:
            with self.log_scale.hold_sync():
                self.log_scale.min, self.log_scale.max = min(values) / 1.25, max(values) * 1.25
