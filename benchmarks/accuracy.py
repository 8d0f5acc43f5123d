"""Accuracy of the noise-scale finder against the exact B_simple: fixed windows, per-example norms and the 2019 method.

For each problem the weights are fixed (a short Adam warm-up from the initialisation, then
lr=0), the exact tr(Σ)/|G|² is computed from every per-example gradient, and every estimator
runs over the same shuffled batches for several seeds:

- fixed: `bs_find(method="fixed")`, one estimate per window of n_batch small batches;
- per_example: `bs_find(method="per_example")`, one estimate per step (each example a small
  batch of one, the batch the big one), smoothed by beta**(1/n_batch) per step as bs_find does,
  so it averages over as many steps as fixed (equal steps, equal smoothing: the comparison is fair);
- original: the 2019 write-up's method (`original_method.py`).

Reading the history at 100, 300 and 1,000 steps equals running that many steps: with lr=0 the
weights do not move, and the EMA's bias correction cancels in the ratio noise/scale. The spread
across seeds (std / exact, and the IQR / exact) is the estimator's own variance at equal steps.

Small batches drawn without replacement from N examples make the raw |G|² estimate low by
tr(Σ)/N; the engine adds that back (its finite-population correction), the original method
does not, which matters when the noise scale is a sizable fraction of the data set.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from common import (
    Problem,
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
from original_method import original_run
from torch import nn

from gns_widget import bs_find

BS, N_BATCH, BETA, WARM = 32, 20, 0.99, 200
METHODS = ["fixed", "per_example", "original"]
STYLE = {"fixed": ("C0", "o-"), "per_example": ("C2", "^-"), "original": ("C1", "s-")}


def at_steps(points: list[tuple[int, float]], steps: int) -> float:
    "The estimate available after `steps` small batches (the last window completed by then)."
    vals = [v for it, v in points if it <= steps]
    return vals[-1] if vals else np.nan


def per_example_points(problem: Problem, seed: int, num_it: int) -> tuple[list, str]:
    "bs_find(method='per_example')'s estimates as (iteration, noise scale); ([], why) if it refuses the model."
    try:
        res = bs_find(problem.model, problem.loader(BS, seed), problem.loss_fn, lr=0, num_it=num_it,
                      n_batch=N_BATCH, beta=BETA, batch_fn=problem.split, method="per_example")
    except ValueError as e:
        return [], f"n/a: {e}"
    return list(zip(res.history.iteration, res.history.noise_scale)), ""


def measure(problem: Problem, steps: list[int], seeds: list[int]) -> pd.DataFrame:
    problem.warm_up(WARM)
    exact = exact_noise_scale(problem.model, problem.loss_fn, problem.inputs, problem.target)
    rows = []
    for seed in seeds:
        res = bs_find(problem.model, problem.loader(BS, seed), problem.loss_fn, lr=0, num_it=max(steps),
                      n_batch=N_BATCH, beta=BETA, batch_fn=problem.split, method="fixed")
        points = {"fixed": list(zip(res.history.iteration, res.history.noise_scale))}
        pe, note = per_example_points(problem, seed, max(steps))
        if pe:
            points["per_example"] = pe
        points["original"] = original_run(problem.model, problem.loader(BS, seed), problem.loss_fn,
                                          num_it=max(steps), n_batch=N_BATCH, beta=BETA, split=problem.split)
        for s in steps:
            for method in METHODS:
                est = at_steps(points[method], s) if method in points else np.nan
                rows.append(dict(problem=problem.name, method=method, steps=s, seed=seed, estimate=est,
                                 exact=exact.b_simple, rel_error=abs(est - exact.b_simple) / exact.b_simple,
                                 note="" if method in points else note))
    return pd.DataFrame(rows)


def summarise(raw: pd.DataFrame) -> pd.DataFrame:
    """Per (problem, steps, method): median and range of the relative error, and the spread over seeds.

    The spread is std/exact and, robust to the single runs whose EMA(|G|²) came near zero, IQR/exact.
    """
    g = raw.groupby(["problem", "steps", "method"], sort=False)
    s = g.agg(exact=("exact", "first"), seeds=("seed", "nunique"), median_estimate=("estimate", "median"),
              median_err=("rel_error", "median"), min_err=("rel_error", "min"), max_err=("rel_error", "max"),
              std_estimate=("estimate", "std"), q25=("estimate", lambda v: v.quantile(0.25)),
              q75=("estimate", lambda v: v.quantile(0.75)), note=("note", "first")).reset_index()
    s.insert(s.columns.get_loc("std_estimate") + 1, "rel_std", s.std_estimate / s.exact)
    s.insert(s.columns.get_loc("q75") + 1, "rel_iqr", (s.q75 - s.q25) / s.exact)  # robust: a ratio has heavy tails
    return s


def refusal_note(model: nn.Module, loader, loss_fn, split) -> str:
    "What bs_find(method='per_example') says about `model` (a BatchNorm model: a ValueError), without crashing."
    try:
        bs_find(model, loader, loss_fn, lr=0, num_it=2, n_batch=N_BATCH, beta=BETA, batch_fn=split,
                method="per_example")
    except ValueError as e:
        return f"n/a: {e}"
    return "ran (not refused)"


def batchnorm_row(problems: list[Problem]) -> dict:
    """per_example on a model with BatchNorm in train mode: refused, reported as not applicable.

    With the tabular problem, fastai's default TabularModel for Bikeshare (use_bn=True, bn_cont=True, same
    embeddings and layers); otherwise (quick runs) a tiny Linear-BatchNorm1d MLP. There is no exact value to
    compare with (an example's gradient depends on its batch), only the refusal to show.
    """
    tab = next((p for p in problems if p.name == "tabular_bikeshare"), None)
    torch.manual_seed(0)
    if tab is not None:
        from fastai.tabular.all import TabularModel

        emb_szs = [(m.num_embeddings, m.embedding_dim) for m in tab.model.embeds]
        model = TabularModel(emb_szs, tab.inputs[1].shape[1], 1, layers=[200, 100])  # fastai defaults: BatchNorm
        p = Problem("tabular_bikeshare_bn", model, tab.inputs, tab.target, tab.loss_fn)
    else:
        x, y = torch.randn(256, 10), torch.randint(0, 2, (256,))
        model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        p = Problem("mlp_batchnorm", model, (x,), y, nn.functional.cross_entropy)
    note = refusal_note(p.model, p.loader(BS, 0), p.loss_fn, p.split)
    return dict(problem=p.name, steps=np.nan, method="per_example", note=note)


def plot(summary: pd.DataFrame, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary.dropna(subset=["steps"])
    problems = list(dict.fromkeys(summary.problem))
    fig, axs = plt.subplots(2, len(problems), figsize=(3.2 * len(problems), 5.6), squeeze=False, sharex=True)
    for j, name in enumerate(problems):
        top, bottom = axs[0][j], axs[1][j]
        for method in METHODS:
            c, style = STYLE[method]
            d = summary[(summary.problem == name) & (summary.method == method)].dropna(subset=["median_err"])
            if not len(d):
                continue
            top.plot(d.steps, 100 * d.median_err, style, c=c, label=method, ms=4)
            top.fill_between(d.steps, 100 * d.min_err, 100 * d.max_err, color=c, alpha=0.12)
            bottom.plot(d.steps, 100 * d.rel_iqr, style, c=c, label=method, ms=4)
        top.axhline(5, ls=":", c="gray")
        exact = summary[summary.problem == name].exact.iloc[0]
        top.set_title(f"{name}\nexact B_simple {exact:.0f}", fontsize=9)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_yscale("log")
        bottom.set_xlabel("steps (small batches)")
    axs[0][0].set_ylabel("rel. error, % (median, min–max)")
    axs[1][0].set_ylabel("spread over seeds: IQR / exact, %")
    axs[0][0].legend(fontsize=7)
    save_fig(fig, path)


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    t0 = time.perf_counter()
    if args.quick:
        problems = [logreg_problem(n=2000, d=10), mlp_problem(n=500, hidden=16)]
        steps, seeds = [20, 50], [0, 1]
    else:
        problems = [logreg_problem(), mlp_problem(n=10_000), tabular_problem(), conv_problem()]
        steps, seeds = [100, 300, 1000], list(range(10))
    raw = []
    for p in problems:
        raw.append(measure(p, steps, seeds))
        print(f"  {p.name} done at {time.perf_counter() - t0:.0f} s", flush=True)
    raw = pd.concat(raw, ignore_index=True)
    summary = pd.concat([summarise(raw), pd.DataFrame([batchnorm_row(problems)])], ignore_index=True)
    raw.to_csv(out_path(args, "accuracy_raw", "csv"), index=False)
    summary.to_csv(out_path(args, "accuracy", "csv"), index=False)
    plot(summary, out_path(args, "accuracy", "png"))
    print(f"settings: small batch {BS}, n_batch {N_BATCH}, beta {BETA} (per_example: {BETA ** (1 / N_BATCH):.5f} "
          f"per step), lr=0 after {WARM} Adam warm-up steps, "
          f"seeds {seeds} (shuffles), all methods on the same batches")
    for p in problems:
        print(f"- {p.name}: {p.note}")
    cols = ["problem", "steps", "method", "exact", "median_estimate", "median_err", "min_err", "max_err", "rel_std",
            "rel_iqr", "note"]
    print(markdown(summary[cols]))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
