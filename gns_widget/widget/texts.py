"""What the panel says: every text and HTML fragment it shows, as pure functions of results and advice.

No widgets and no state here, so that unit tests call these directly and the wording lives in one place.
Domain decisions (which batch size, whether the advice keeps it, the lr rule) are read from `BatchAdvice`
and `GNSResult`; these functions only word them. Colours are CSS classes (`gns-c-<kind>`) that `STYLE`
defines for JupyterLab's light and dark themes, each at WCAG AA contrast (≥ 4.5:1) on the theme's backgrounds.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from typing import Any

from ..advice import MIN_STEPS_PER_EPOCH, BatchAdvice, format_lr
from ..interval import AutoStop
from ..result import GNSRecord, GNSResult

__all__ = ["HELP", "APPLY_TIP", "STYLE", "COLORS", "BACKGROUNDS", "KIND_STATUS", "Applied", "LrApplied", "Shown",
           "duration", "eta_seconds", "status_html", "help_text", "error_html", "headline_html", "details_html",
           "tradeoff_sizes", "tradeoff_html", "apply_tooltip", "auto_end", "new_loader_note", "bs_text", "plain",
           "end_status", "contrast", "progress_text"]

HELP = {  # one plain line per control: shown under it and as its tooltip
    "n_batch": "small batches averaged into one noise estimate: more is steadier but gives fewer estimates",
    "beta": "smoothing of the curves: 0.99 averages about the last 100 estimates, 1 all of them equally; "
            "auto is 1 at lr 0 (the weights do not move) and 0.99 while training",
    "num_it": "small batches the trial run trains on (0 = one epoch); your model is restored afterwards",
    "auto": "run until the noise scale's 90% interval is narrow enough, up to a cap, instead of a fixed num_it",
    "apply_lr": "when ticked, Apply also sets learn.lr to the advised learning rate, which fit and fit_one_cycle "
                "use when called without an lr; unticked, only the batch size changes",
    "lr": "learning rate of the trial run; 0 measures at the current weights without training",
    "train_lr": "the learning rate you train with at your batch size (0: not given, the trial run's is used); "
                "the advice scales it to the new batch size",
    "epochs": "the epochs you train for at your batch size (0: not given); the advice scales them to the new one",
}
APPLY_TIP = "train with the advised batch size from now on"

# status kinds: idle (neutral), running, finished (a change to apply), warn (not sure yet), error (a real error)
COLORS = {"light": {"error": "#b71c1c", "finished": "#1b5e20", "running": "#0d47a1", "warn": "#a04e00"},
          "dark": {"error": "#ff8a80", "finished": "#81c784", "running": "#90caf9", "warn": "#ffb74d"}}
# the backgrounds a panel sits on: JupyterLab's layout colours 0-1 and the light theme's grey cell background
BACKGROUNDS = {"light": ("#ffffff", "#f5f5f5", "#eeeeee"), "dark": ("#111111", "#212121")}
KIND_STATUS = {"grow": "finished", "shrink": "finished", "keep": "idle", "uncertain": "warn"}  # advice kind → colour
KERNEL_GONE = ("status: the kernel restarted, so this panel is disconnected: a run it had ended with the kernel. "
               "Run its cells again for a new panel")
# dark themes: JupyterLab and Notebook 7, VS Code, Colab
_DARK = ('body[data-jp-theme-light="false"] .gns-widget', "body.vscode-dark .gns-widget",
         'html[theme="dark"] .gns-widget')
STYLE = "<style>" + "".join(
    f".gns-widget .gns-c-{k}{{color:{c}}}" + "".join(f"{d} .gns-c-{k}{{color:{COLORS['dark'][k]}}}" for d in _DARK)
    for k, c in COLORS["light"].items()) + (
    ".gns-widget .gns-c-idle{color:var(--jp-ui-font-color1,inherit)}"
    # long words (paths, formulas) wrap instead of widening the box; tables scroll alone
    ".gns-widget .widget-html-content{min-width:0;white-space:normal;overflow-wrap:anywhere}"
    ".gns-widget .gns-tradeoff td,.gns-widget .gns-tradeoff th{padding:0 8px;text-align:right}"
    ".gns-widget .gns-tradeoff .gns-advised{font-weight:bold}"
    # after a kernel restart JupyterLab marks every widget view `jupyter-widgets-disconnected` (its comm is gone):
    # the panel says so instead of freezing on "running", and its controls stop looking usable
    f".gns-widget.jupyter-widgets-disconnected .gns-status .widget-html-content>span{{display:none}}"
    f".gns-widget.jupyter-widgets-disconnected .gns-status .widget-html-content::after{{content:'{KERNEL_GONE}';"
    "font-weight:bold}"
    ".gns-widget.jupyter-widgets-disconnected .gns-progress-label{visibility:hidden}"
    ".gns-widget.jupyter-widgets-disconnected button,.gns-widget.jupyter-widgets-disconnected input"
    "{pointer-events:none;opacity:0.5}"
    "</style>")


@dataclass(frozen=True)
class Applied:
    "What the last Apply did to the loader (the batch-size label words it)."
    old_bs: int | None
    new_bs: int
    in_place: bool  # fastai DataLoaders change in place; a torch DataLoader is rebuilt
    panel_name: str  # the notebook variable that holds the panel, for the copyable line


@dataclass(frozen=True)
class LrApplied:
    "A Learner's lr that Apply set from `result`'s advice: the lr before and the one it set."
    result: GNSResult
    before: float | slice | None
    after: float | slice


@dataclass(frozen=True)
class Shown:
    "How far the run the result area shows went: iterations done of those planned."
    done: int
    total: int


def contrast(fg: str, bg: str) -> float:
    "WCAG contrast ratio of two '#rrggbb' colours."
    def lum(h: str) -> float:
        c = [int(h.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        r, g, b = (v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    hi, lo = sorted((lum(fg), lum(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# words of the core's reasons that mean nothing to someone who has not read the paper: said plainly in the panel
_PLAIN = ((re.compile(r"\|G\|² is not distinguishable from (its noise|zero)"),
           "the gradient signal is still lost in its noise"),
          (re.compile(r" as the interval reaches below the rounding line [\d.]+"),
           " as the noise scale's interval reaches the smaller size"),
          (re.compile(r" \(the finder run's lr: pass lr= the one you train with\)"),
           " (the trial run's lr: type the lr you train with in 'your lr')"),
          (re.compile(r"; pass epochs= for a number\)"), "; type your epochs in 'epochs' for a number)"),
          (re.compile(r"run longer \(num_it='auto'\)"), "run longer (tick 'auto')"),
          (re.compile(r"pass throughput=measure_throughput\(\.\.\.\) to advice\(\)"),
           "run it again to the end (the run times this machine once it ends)"))


def plain(text: str) -> str:
    "The core's wording with its jargon and code-speak replaced by what a panel user can act on."
    for pattern, words in _PLAIN:
        text = pattern.sub(words, text)
    return text


def duration(seconds: float) -> str:
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


def progress_text(records: list[GNSRecord], auto: AutoStop | None) -> str:
    "The progress line while a run goes: iteration, elapsed, time left, and when auto stops it."
    last = records[-1]
    eta = eta_seconds(records)
    at_most = "at most " if auto is not None else ""
    eta_text = f"{at_most}about {duration(eta)} left" if math.isfinite(eta) else "estimating time left…"
    of = (f"iteration {last.iteration} of at most {last.total}" if auto is not None
          else f"iteration {last.iteration}/{last.total}")
    early = f" · stops early once the noise scale is within ±{auto.rel_halfwidth:.0%}" if auto is not None else ""
    return f"{of} · {duration(last.elapsed)} elapsed · {eta_text}{early}"


def status_html(text: str, kind: str) -> str:
    "The status line in its kind's colour (idle is the normal text colour: only errors are red)."
    kind = kind if kind in COLORS["light"] or kind == "idle" else "idle"
    return f'<span class="gns-c-{kind}">status: {html.escape(text)}</span>'


def error_html(msg: str) -> str:
    return f'<span class="gns-c-error">{html.escape(msg)}</span>'


def help_text(text: str) -> str:
    return ('<span style="display:block;line-height:1.35;font-size:var(--jp-ui-font-size0, 11px);'
            f'color:var(--jp-ui-font-color2, #616161)">{html.escape(text)}</span>')


def end_status(result: GNSResult | None, error: BaseException | None, advice: BatchAdvice | None, done: int,
               stop_reason: str | None) -> tuple[str, str]:
    "(text, kind) of the status line when a run ends: an error is red; keeping the batch size is a normal outcome."
    if error is not None:
        return f"error: {type(error).__name__}: {error}", "error"
    if result.stopped:
        why = stop_reason or "stopped"
        if done == 0:
            return f"{why} before the first estimate; model restored", "idle"
        return f"{why} after {done:,} iterations; model restored (partial result)", "idle"
    if advice is None or advice.kind == "uncertain":
        return "finished without a suggestion (the answer above says why)", "warn"
    return "finished", KIND_STATUS[advice.kind]


def headline_html(advice: BatchAdvice | None, result: GNSResult | None) -> str:
    "The one plain answer, big, in the colour of its kind (a change to make, keep as is, or not sure yet)."
    if advice is None:
        return ""
    kind = KIND_STATUS.get(advice.kind, "idle")
    sub = []
    if result is not None and advice.noise_scale:
        sub.append(f"noise scale {advice.noise_scale} examples, measured at batch size {advice.old_batch_size}")
    sub.append("details below")
    return (f'<div class="gns-answer gns-c-{kind}" style="font-size:1.3em;font-weight:600;line-height:1.35;'
            f'margin:6px 0 2px">{html.escape(plain(advice.headline))}</div>'
            f'<div style="color:var(--jp-ui-font-color2,#616161);font-size:0.95em">{html.escape(" · ".join(sub))}'
            "</div>")


def _optimizer_words(rule: str, opt_name: str) -> str:
    way = {"sgd": "in proportion to the gain of the bigger batch, as for plain SGD",
           "momentum": "by the square root of the gain of the bigger batch, as for SGD with momentum",
           "adam": "by the square root of the gain of the bigger batch, as for Adam-like optimizers"}[rule]
    return f"scaled {way}; the optimizer: {opt_name}"


def details_html(res: GNSResult, advice: BatchAdvice, shown: Shown, opt_name: str) -> str:
    "The collapsed details: noise scale, suggestion, memory, the advice's lr rule and text, trade-off, how measured."
    if res.interval is not None:
        ns = f"{res.interval} examples (90% interval in brackets)"
    else:
        ns = f"{res.noise_scale:.4g} examples" if math.isfinite(res.noise_scale) else "no estimate yet"
    rows = [f"<b>noise scale</b>: {html.escape(ns)}: the batch size beyond which bigger batches stop saving steps"]
    if res.reliable:
        partial = f", from a stopped run ({shown.done} of {shown.total} iterations)" if res.stopped else ""
        rows.append(f"<b>suggested batch size</b>: {res.suggested_bs} (measured at batch size {res.batch_size}"
                    f"{partial}): {html.escape(plain(res.reason))}")
        if res.memory_plan is not None:
            rows.append(f"<b>memory</b>: {html.escape(res.memory_plan.text)} (for the raw suggestion: the advice "
                        "gives only sizes that fit in one step)")
    elif res.stopped:
        rows.append(f"<b>no suggestion</b>: the run was stopped after {shown.done} of {shown.total} iterations, "
                    "before the estimate settled; run it to the end for a suggestion")
    else:
        rows.append(f"<b>no suggestion</b>: {html.escape(plain(res.reason))}")
    if advice.kind != "uncertain":  # the advice may act on an interval too wide for a raw suggestion
        rows.append(f"<b>learning rate</b>: {html.escape(_optimizer_words(advice.rule, opt_name))}")
        rows.append(f"<b>advice in full</b>: {html.escape(plain(advice.text))}")
    if res.noise_scale > 0 and math.isfinite(res.noise_scale):
        rows.append(tradeoff_html(res, advice))
    rows.append(_measured_html(res, shown))
    return '<div class="gns-result-text" style="line-height:1.5">' + "<br>".join(rows) + "</div>"


def _measured_html(res: GNSResult, shown: Shown) -> str:
    how = {"fixed": "n_batch small-batch gradients at the same weights, then one step with their average",
           "sequential": "a step after every small batch", "per_example": "each example's gradient in every step"}
    lr = "lr 0: at the current weights, without training" if not res.lr else f"training at lr {res.lr:.3g}"
    return (f"<b>how it was measured</b>: {shown.done:,} small batches of {res.batch_size} ({lr}; "
            f"{html.escape(how.get(res.method, res.method))}; smoothing beta {res.beta:g}). "
            "<span style='color:var(--jp-ui-font-color2,#616161)'>Gradient noise is tr(Σ), the per-example variance "
            "of the gradient summed over the weights; gradient signal is |G|², the squared length of the mean "
            "gradient; the noise scale is B_noise = tr(Σ)/|G|² (McCandlish et al. 2018, An Empirical Model of "
            "Large-Batch Training). At batch size B a run needs about 1 + B_noise/B times the fewest steps and "
            "1 + B/B_noise times the fewest examples; the lr scales as ε(B) ∝ 1/(1 + B_noise/B).</span>")


def tradeoff_sizes(batch_size: int | None, center: int, n_train: int | None) -> list[int]:
    """Consecutive powers of two around `center` and the run's `batch_size`, no bigger than the dataset allows.

    Two sizes below the smaller of them to two above the larger; at most the largest power of two that keeps
    `MIN_STEPS_PER_EPOCH` steps an epoch (the run's own size always stays, even above it).
    """
    sizes = [s for s in (batch_size, center) if s]
    lo = max(0, math.floor(math.log2(min(sizes))) - 2)
    hi = math.ceil(math.log2(max(sizes))) + 2
    top = max(1, n_train // MIN_STEPS_PER_EPOCH) if n_train else math.inf
    out = {2 ** k for k in range(lo, hi + 1) if 2 ** k <= top}
    return sorted(out | ({batch_size} if batch_size else set()))


def tradeoff_html(res: GNSResult, advice: BatchAdvice | None = None) -> str:
    "The paper's cost of each batch size, one row each (a narrow table that never widens the panel)."
    center = (advice.batch_size if advice is not None and advice.batch_size else
              res.suggested_bs or 2 ** max(0, round(math.log2(res.noise_scale))))
    t = res.tradeoff(tradeoff_sizes(res.batch_size, center, res.n_train))
    advised = advice.batch_size if advice is not None else None
    rows = []
    for b, steps, examples in zip(t.batch_size, t.steps, t.examples):
        note = ("advised" if b == advised else "") + (" · measured" if b == res.batch_size else "")
        cls = " class='gns-advised'" if b == advised else ""
        rows.append(f"<tr{cls}><td>{b}</td><td>×{steps:.2f}</td><td>×{examples:.2f}</td>"
                    f"<td style='text-align:left'>{note.strip(' ·')}</td></tr>")
    return ("<b>trade-off</b>: steps and examples each batch size needs to reach the same loss, relative to their "
            "fewest (predicted from the noise scale)"
            "<div style='overflow-x:auto;max-width:100%'><table class='gns-tradeoff'><tr><th>batch size</th>"
            f"<th>steps</th><th>examples</th><th></th></tr>{''.join(rows)}</table></div>")


def apply_tooltip(advice: BatchAdvice | None, applied: Applied | None = None, lr_too: bool | None = None) -> str:
    """Why Apply is enabled (what it will do) or disabled (why nothing to apply), for its tooltip.

    `lr_too`: the 'also set learn.lr' box of a Learner's panel (None: a torch model, no box)."""
    if applied is not None:
        return (f"applied: the train loader's batch size is {applied.new_bs} now; run again to measure at it "
                "(nothing more to apply)")
    if advice is None:
        return "nothing to apply yet: press Start and wait for the run to finish"
    if advice.kind == "keep":
        return (f"nothing to apply: the run was measured at batch size {advice.old_batch_size}, the size the advice "
                "keeps")
    if advice.kind not in ("grow", "shrink"):
        return f"nothing to apply: not sure yet ({plain(advice.text)})"
    lr = ("" if lr_too is None or advice.lr is None else f", and learn.lr → {format_lr(advice.lr)}" if lr_too
          else " (tick 'also set learn.lr' to set the lr too)")
    return f"{APPLY_TIP}: batch size {advice.old_batch_size} → {advice.batch_size}{lr}"


def auto_end(auto: AutoStop) -> str:
    "Why a num_it='auto' run that was not stopped ended (and how many small batches each estimate averaged)."
    widened = (f"; {auto.widened_to} small batches per estimate, as the noise scale outgrew n_batch"
               if auto.widened_to else "")
    if auto.interval is not None and auto.interval.rel_halfwidth <= auto.rel_halfwidth:
        return f"auto: the noise scale is within ±{auto.rel_halfwidth:.0%}{widened}"
    if auto.saturated:
        return f"auto: the interval stopped narrowing, as beta forgets older estimates{widened}"
    return f"auto: reached the cap of {auto.max_it:,} small batches{widened}"


def new_loader_note(old: int | None, new: int, loader_names: list[str], panel: str) -> str:
    "The copyable line that makes the user's own variable the new loader (a torch loader cannot be resized)."
    loader = loader_names[0] if loader_names else "train_dl"
    line = f"{loader} = {panel}.train_dl"
    return (f"A PyTorch DataLoader cannot change its batch size, so Apply built a new one with batch size {new} "
            f"in <code>{html.escape(panel)}.train_dl</code>. Loaders made before Apply still give batches of {old}. "
            f"Train with the new one: <code class='gns-copy' style='user-select:all'>{html.escape(line)}</code>")


def bs_text(bs: Any, applied: Applied | None, learner_dls: bool) -> str:
    "The batch-size label: the loader's size now, and after Apply which object has it."
    if applied is None:
        return f"batch size now: <b>{bs}</b>"
    if applied.in_place:
        where = "dls.train" if learner_dls else "train_dl"
        return f"batch size now: <b>{bs}</b> ({where}, changed in place by Apply)"
    return (f"batch size now: <b>{bs}</b> in <code>{html.escape(applied.panel_name)}.train_dl</code>, a new "
            f"DataLoader; loaders made before Apply still give {applied.old_bs}")
