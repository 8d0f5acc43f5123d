"""Advice that is safe to follow (issue 11): error bars against the exact noise scale, num_it="auto", and training.

Part 1, **interval** (fixed weights, exact B_simple from every per-example gradient, the four
problems of accuracy.py): for each seed, `bs_find(lr=0, num_it=1000)` and its 90% interval
(does it cover the exact value? its half-width), and `bs_find(lr=0, num_it="auto")` (its error
and the steps it took).

Part 2, **training** (issue 18): each problem is trained three ways per seed, and judged on a held-out set:
- baseline: the user's batch size, lr and epochs;
- control: the baseline again with another shuffle (same initial weights), so the seed noise is
  measured, not guessed;
- advice: `res.advice(lr, epochs)` followed exactly (batch size, lr, epochs; the lr rule detected
  from the optimizer), from a finder run on the same seed that also timed this CPU at the sizes worth
  it: digits as in the quickstart (while training from the start, lr 0.1); the others where a user
  would call it for a number to act on: after one epoch of their own training, at those weights
  (lr=0, num_it="auto").
Differences are paired by seed; wall time (training only: the finder is reported on its own) and
optimizer steps are both counted. `--seeds 0 1 2 3 4` for five seeds.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch
from common import (
    cli,
    conv_problem,
    exact_noise_scale,
    logreg_problem,
    markdown,
    mlp_problem,
    out_path,
    save_fig,
    tabular_problem,
)
from problems import BS, N_BATCH, Tabular, Task, finder_fastai, finder_torch, fit_torch, tabular_tasks, torch_tasks

from gns_widget import bs_find
from gns_widget.goodput import examples_ratio, round_epochs
from gns_widget.interval import AutoStop
from gns_widget.lr_rules import lr_factor


# ---------------------------------------------------------------- part 1: interval and auto
def interval_part(quick: bool) -> pd.DataFrame:
    makers = {"logreg_synthetic": logreg_problem, "mlp_fashion": lambda: mlp_problem(10_000),
              "tabular_bikeshare": tabular_problem, "conv_fashion": conv_problem}
    seeds, auto_seeds, steps, cap = (range(3), range(2), 300, 2000) if quick else (range(20), range(5), 1000, 20_000)
    if quick:
        makers = {"logreg_synthetic": lambda: logreg_problem(4000)}
    rows = []
    for name, make in makers.items():
        try:
            p = make()
        except FileNotFoundError as e:
            print(f"skipped {name}: {e}")
            continue
        p.warm_up(200)
        exact = exact_noise_scale(p.model, p.loss_fn, p.inputs, p.target).b_simple
        for seed in seeds:
            t0 = time.perf_counter()
            res = bs_find(p.model, p.loader(BS, seed), p.loss_fn, lr=0, num_it=steps, n_batch=N_BATCH,
                          batch_fn=p.split)
            lo, hi = res.noise_scale_interval
            row = dict(problem=name, seed=seed, exact=exact, steps=steps, value=res.noise_scale, lo=lo, hi=hi,
                       covered=lo <= exact <= hi, rel_halfwidth=res.interval.rel_halfwidth,
                       rel_error=abs(res.noise_scale / exact - 1), seconds=time.perf_counter() - t0)
            if seed in auto_seeds:
                t0 = time.perf_counter()
                auto = bs_find(p.model, p.loader(BS, seed), p.loss_fn, lr=0, num_it=AutoStop(max_it=cap),
                               n_batch=N_BATCH, batch_fn=p.split)
                row.update(auto_steps=int(auto.history.iteration.iloc[-1]), auto_value=auto.noise_scale,
                           auto_rel_error=abs(auto.noise_scale / exact - 1),
                           auto_rel_halfwidth=auto.interval.rel_halfwidth, auto_seconds=time.perf_counter() - t0)
            rows.append(row)
        print(f"interval: {name} done (exact {exact:.4g})", flush=True)
    return pd.DataFrame(rows)


def interval_summary(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby("problem", sort=False)
    return pd.DataFrame({
        "exact B_simple": g.exact.first(), "runs": g.size(), "coverage": g.covered.mean(),
        "median half-width": g.rel_halfwidth.median(), "median error (1,000 steps)": g.rel_error.median(),
        "auto runs": g.auto_steps.count(), "auto median steps": g.auto_steps.median(),
        "auto median error": g.auto_rel_error.median(), "auto max error": g.auto_rel_error.max(),
    }).reset_index()


# ---------------------------------------------------------------- part 2: training
def train_torch(task: Task, bs: int, lr: float, epochs: int, seed: int, shuffle_seed: int | None = None) -> dict:
    "`fit_torch` (the fastest of `task.timing_repeats` identical runs), then the validation accuracy at the end."
    model, seconds, steps = fit_torch(task, bs, lr, epochs, seed, shuffle_seed)
    for _ in range(task.timing_repeats - 1):  # the same seed trains the same model: only the clock differs
        seconds = min(seconds, fit_torch(task, bs, lr, epochs, seed, shuffle_seed)[1])
    with torch.no_grad():
        x, y = task.valid
        acc = (model(x).argmax(1) == y).float().mean().item()
    return dict(metric=100 * acc, seconds=seconds, steps=steps)


def train_fastai(task: Tabular, bs: int, lr: float, epochs: int, seed: int, shuffle_seed: int) -> dict:
    "fastai tabular_learner, fit_one_cycle (its own warm-up); the validation loss."
    from fastai.tabular.all import set_seed

    set_seed(seed, reproducible=True)
    learn = task.learner(bs)
    # the same initial weights; the batches' order (TabWeightedDL samples with numpy) and dropout from shuffle_seed
    set_seed(shuffle_seed, reproducible=True)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr)
        seconds = time.perf_counter() - t0
        loss = float(learn.validate()[0])
    return dict(metric=loss, seconds=seconds, steps=epochs * len(learn.dls.train))


def training_part(quick: bool, seeds: list[int] | None = None, only: list[str] | None = None) -> pd.DataFrame:
    seeds = seeds or ([0] if quick else [0, 1, 2])
    rows = []
    for task in torch_tasks(quick, only):
        for seed in seeds:
            res, find_s = finder_torch(task, seed, seed + 100)
            a = res.advice(lr=task.lr, epochs=task.epochs)  # the rule is detected from the optimizer
            common = _common(task.name, seed, res, a, find_s)
            arms = [("baseline", task.bs, task.lr, task.epochs, None),
                    ("control", task.bs, task.lr, task.epochs, seed + 1000),  # another shuffle: the seed noise
                    ("advice", a.batch_size or task.bs, a.lr or task.lr, a.epochs or task.epochs, None)]
            for arm, bs, lr, epochs, shuffle in arms:
                out = train_torch(task, bs, lr, epochs, seed, shuffle)
                rows.append(dict(common, arm=arm, bs=bs, lr=lr, epochs=epochs, **out,
                                 text=a.text if arm == "advice" else ""))
        print(f"training: {task.name} done", flush=True)
    for task in tabular_tasks(quick, only):
        rows += tabular_rows(task, seeds, quick)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- part 3: the same weights, the same advice?
def stability_part(quick: bool, repeats: int, only: list[str] | None = None) -> pd.DataFrame:
    """Per problem, `repeats` finder runs at the same weights (seed 0's first epoch), each with another batch order
    and its own timing of this CPU: how often the advice (kind, batch size, epochs) is the most common one."""
    rows = []
    for task in torch_tasks(quick, only):
        for k in range(repeats):
            res, _ = finder_torch(task, 0, 500 + k)
            a = res.advice(lr=task.lr, epochs=task.epochs)
            rows.append(dict(problem=task.name, repeat=k, kind=a.kind, bs=a.batch_size, epochs=a.epochs,
                             noise_scale=str(res.interval), speedup=a.speedup))
        print(f"stability: {task.name} done", flush=True)
    return pd.DataFrame(rows)


def stability_summary(df: pd.DataFrame) -> pd.DataFrame:
    def modal(g: pd.DataFrame) -> pd.Series:
        keys = list(zip(g.kind, g.bs.fillna(0).astype(int), g.epochs.fillna(0).astype(int)))
        top = max(set(keys), key=keys.count)
        return pd.Series({"runs": len(keys), "most common": f"{top[0]} {top[1]} × {top[2]} epochs",
                          "agree": keys.count(top) / len(keys), "uncertain": (g.kind == "uncertain").mean()})
    return df.groupby("problem", sort=False)[["kind", "bs", "epochs"]].apply(modal).reset_index()


# ---------------------------------------------------------------- part 5: a snapshot or a span?
def protocol_part(quick: bool, seeds: list[int], only: list[str] | None = None) -> pd.DataFrame:
    """Per problem and seed, after the user's first epoch: the advice from a snapshot (lr=0, num_it="auto", the
    README's protocol) and from a span (the finder training 400 more small batches at the user's lr and optimizer,
    20 windows of estimates taken along the way: 1–4 epochs of these problems). Do they agree, and how much did
    the noise scale move over the span?"""
    rows = []
    for task in torch_tasks(quick, only):
        for seed in seeds:
            snap, _ = finder_torch(task, seed, seed + 100)
            span_task = Task(**{**task.__dict__, "finder": dict(lr=task.lr, num_it=20 * N_BATCH, n_batch=N_BATCH)})
            span, _ = finder_torch(span_task, seed, seed + 100)
            a, b = (r.advice(lr=task.lr, epochs=task.epochs) for r in (snap, span))
            rows.append(dict(problem=task.name, seed=seed, snapshot=str(snap.interval), span=str(span.interval),
                             span_growth=span.growth, snapshot_advice=f"{a.kind} {a.batch_size}",
                             span_advice=f"{b.kind} {b.batch_size}", agree=(a.kind, a.batch_size) == (b.kind,
                                                                                                     b.batch_size)))
        print(f"protocol: {task.name} done", flush=True)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- part 4: which lr rule is safe?
LR_RULES = {"none": lambda f: 1.0, "sqrt": math.sqrt, "linear": lambda f: f}


def lr_rule_part(quick: bool, seeds: list[int], only: list[str] | None = None) -> pd.DataFrame:
    """Each problem at twice its batch size, its epochs scaled by the paper's examples ratio, with the lr unchanged,
    scaled by the square root of AdaScale's gain, or by the gain itself (the measured noise scale's), per seed;
    paired with the baseline on the same seed."""
    rows = []
    for task in torch_tasks(quick, only):
        for seed in seeds:
            res, _ = finder_torch(task, seed, seed + 100)
            ns, bs = res.noise_scale, 2 * task.bs
            gain = lr_factor(task.bs, bs, ns, "sgd")  # AdaScale's gain (1 + B_noise/B0)/(1 + B_noise/B)
            epochs = round_epochs(task.epochs * examples_ratio(task.bs, bs, ns))
            base = train_torch(task, task.bs, task.lr, task.epochs, seed)
            for rule, f in LR_RULES.items():
                out = train_torch(task, bs, task.lr * f(gain), epochs, seed)
                rows.append(dict(problem=task.name, opt=task.opt, seed=seed, noise_scale=ns, rule=rule,
                                 lr_factor=f(gain), epochs=epochs, delta=out["metric"] - base["metric"]))
        print(f"lr rule: {task.name} done", flush=True)
    return pd.DataFrame(rows)


def _common(problem: str, seed: int, res, a, find_s: float) -> dict:
    "What every arm of one seed shares: the finder's measurement and the advice's decision and prediction."
    return dict(problem=problem, seed=seed, noise_scale=str(res.interval), finder_seconds=find_s,
                finder_steps=int(res.history.iteration.iloc[-1]), kind=a.kind, rule=a.rule,
                predicted_speedup=a.speedup, timed_sizes=" ".join(map(str, res.throughput.batch_sizes))
                if res.throughput is not None else "")


def tabular_rows(task: Tabular, seeds: list[int], quick: bool) -> list[dict]:
    finder = dict(lr=0, num_it=AutoStop(max_it=300 if quick else 3000), n_batch=N_BATCH)
    rows = []
    for seed in seeds:
        t0 = time.perf_counter()
        res = finder_fastai(task, seed, finder)
        find_s = time.perf_counter() - t0
        a = res.advice(lr=task.lr, epochs=task.epochs)  # the Learner's opt_func (Adam) gives the rule
        common = _common(task.name, seed, res, a, find_s)
        arms = [("baseline", task.bs, task.lr, task.epochs, seed),
                ("control", task.bs, task.lr, task.epochs, seed + 1000),
                ("advice", a.batch_size or task.bs, a.lr or task.lr, a.epochs or task.epochs, seed)]
        for arm, b, r, e, shuffle in arms:
            out = train_fastai(task, b, r, e, seed, shuffle)
            rows.append(dict(common, arm=arm, bs=b, lr=r, epochs=e, **out,
                             text=a.text if arm == "advice" else ""))
    print(f"training: {task.name} done", flush=True)
    return rows


def training_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per problem and arm, medians over seeds of the paired differences from the baseline (same seed): the metric,
    the wall-time and optimizer-step ratios; the control arm's spread of metric differences is the seed noise."""
    base = df[df.arm == "baseline"].set_index(["problem", "seed"])
    d = df.copy()
    key = list(zip(d.problem, d.seed))
    d["delta"] = d.metric.to_numpy() - base.metric.reindex(key).to_numpy()
    d["time_ratio"] = d.seconds.to_numpy() / base.seconds.reindex(key).to_numpy()
    d["steps_ratio"] = d.steps.to_numpy() / base.steps.reindex(key).to_numpy()
    g = d.groupby(["problem", "arm"], sort=False).agg(
        bs=("bs", lambda s: "/".join(str(v) for v in sorted(set(s)))),
        kind=("kind", lambda s: "/".join(sorted(set(s)))),
        epochs=("epochs", "median"), metric=("metric", "median"), vs_baseline=("delta", "median"),
        worst=("delta", "min"), best=("delta", "max"), time_ratio=("time_ratio", "median"),
        steps_ratio=("steps_ratio", "median"), predicted_speedup=("predicted_speedup", "median")).reset_index()
    g["measured_speedup"] = 1 / g.time_ratio
    return g


def plot(summary: pd.DataFrame, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = list(dict.fromkeys(summary.problem))
    fig, axs = plt.subplots(1, 2, figsize=(11, 3.4))
    for i, arm in enumerate(["baseline", "control", "advice"]):
        d = summary[summary.arm == arm].set_index("problem").reindex(probs)
        x = np.arange(len(probs)) + (i - 1) * 0.27
        axs[0].bar(x, d.vs_baseline, width=0.27, label=arm)
        axs[1].bar(x, d.time_ratio, width=0.27, label=arm)
    for ax, t in zip(axs, ["paired Δ validation metric (accuracy points; loss for the tabular problems)",
                           "training time / baseline"]):
        ax.set_xticks(range(len(probs)), [p.replace("_", "\n", 2) for p in probs], fontsize=7)
        ax.set_title(t, fontsize=9)
        ax.legend(fontsize=7)
    save_fig(fig, path)


def _add_args(p) -> None:
    p.add_argument("--part", choices=["all", "interval", "training", "stability", "lr_rule", "protocol"],
                   default="all")
    p.add_argument("--repeats", type=int, default=10, help="finder runs per problem for --part stability")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2)")
    p.add_argument("--problems", nargs="+", help="training problems whose name contains one of these")


def main() -> None:
    args = cli(__doc__.splitlines()[0], _add_args)
    t0 = time.perf_counter()
    if args.part in ("all", "interval"):
        intervals = interval_part(args.quick)
        intervals.to_csv(out_path(args, "advice_interval", "csv"), index=False)
        isum = interval_summary(intervals)
        isum.to_csv(out_path(args, "advice_interval_summary", "csv"), index=False)
        print(markdown(isum))
    if args.part in ("all", "training"):
        runs = training_part(args.quick, args.seeds, args.problems)
        runs.to_csv(out_path(args, "advice_runs", "csv"), index=False)
        summary = training_summary(runs)
        summary.to_csv(out_path(args, "advice", "csv"), index=False)
        plot(summary, out_path(args, "advice", "png"))
        print(markdown(summary))
        for text in runs[runs.arm == "advice"].drop_duplicates("problem").text:
            print("advice:", text)
    if args.part == "stability":
        runs = stability_part(args.quick, 3 if args.quick else args.repeats, args.problems)
        runs.to_csv(out_path(args, "advice_stability_runs", "csv"), index=False)
        summary = stability_summary(runs)
        summary.to_csv(out_path(args, "advice_stability", "csv"), index=False)
        print(markdown(summary))
    if args.part == "protocol":
        runs = protocol_part(args.quick, args.seeds or [0, 1, 2], args.problems)
        runs.to_csv(out_path(args, "advice_protocol", "csv"), index=False)
        print(markdown(runs))
    if args.part == "lr_rule":
        runs = lr_rule_part(args.quick, args.seeds or [0, 1, 2], args.problems)
        runs.to_csv(out_path(args, "advice_lr_rule_runs", "csv"), index=False)
        summary = runs.groupby(["problem", "opt", "rule"], sort=False).agg(
            lr_factor=("lr_factor", "median"), epochs=("epochs", "median"), median_delta=("delta", "median"),
            worst=("delta", "min")).reset_index()
        summary.to_csv(out_path(args, "advice_lr_rule", "csv"), index=False)
        print(markdown(summary))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
