"""Accuracy of the noise-scale finder against the exact B_simple, next to the 2019 write-up's method.

For each problem the weights are fixed (a short Adam warm-up from the initialisation, then
lr=0), the exact tr(Σ)/|G|² is computed from every per-example gradient, and both estimators
run over the same shuffled batches for several seeds. Reading the history at 100, 300 and
1,000 steps equals running that many steps: with lr=0 the weights do not move, and the EMA's
bias correction cancels in the ratio noise/scale.

Small batches drawn without replacement from N examples make the raw |G|² estimate low by
tr(Σ)/N; the engine adds that back (its finite-population correction), the original method
does not, which matters when the noise scale is a sizable fraction of the data set.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
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

from gns_widget import bs_find

BS, N_BATCH, BETA, WARM = 32, 20, 0.99, 200


def at_steps(points: list[tuple[int, float]], steps: int) -> float:
    "The estimate available after `steps` small batches (the last window completed by then)."
    vals = [v for it, v in points if it <= steps]
    return vals[-1] if vals else np.nan


def measure(problem: Problem, steps: list[int], seeds: list[int]) -> pd.DataFrame:
    problem.warm_up(WARM)
    exact = exact_noise_scale(problem.model, problem.loss_fn, problem.inputs, problem.target)
    rows = []
    for seed in seeds:
        res = bs_find(problem.model, problem.loader(BS, seed), problem.loss_fn, lr=0, num_it=max(steps),
                      n_batch=N_BATCH, beta=BETA, batch_fn=problem.split)
        h = res.history
        ours = list(zip(h.iteration, h.noise_scale))
        orig = original_run(problem.model, problem.loader(BS, seed), problem.loss_fn, num_it=max(steps),
                            n_batch=N_BATCH, beta=BETA, split=problem.split)
        for s in steps:
            for method, pts in (("ours", ours), ("original", orig)):
                est = at_steps(pts, s)
                rows.append(dict(problem=problem.name, method=method, steps=s, seed=seed, estimate=est,
                                 exact=exact.b_simple, rel_error=abs(est - exact.b_simple) / exact.b_simple))
    return pd.DataFrame(rows)


def summarise(raw: pd.DataFrame) -> pd.DataFrame:
    g = raw.groupby(["problem", "steps", "method"], sort=False)
    s = g.agg(exact=("exact", "first"), median_estimate=("estimate", "median"), median_err=("rel_error", "median"),
              min_err=("rel_error", "min"), max_err=("rel_error", "max")).reset_index()
    return s


def plot(summary: pd.DataFrame, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(summary.problem))
    fig, axs = plt.subplots(1, len(problems), figsize=(3.2 * len(problems), 3), squeeze=False)
    for ax, name in zip(axs[0], problems):
        for method, c in (("ours", "C0"), ("original", "C1")):
            d = summary[(summary.problem == name) & (summary.method == method)]
            ax.plot(d.steps, 100 * d.median_err, "o-", c=c, label=method)
            ax.fill_between(d.steps, 100 * d.min_err, 100 * d.max_err, color=c, alpha=0.15)
        ax.axhline(5, ls=":", c="gray")
        ax.set_xscale("log")
        ax.set_title(f"{name}\nexact B_simple {d.exact.iloc[0]:.0f}", fontsize=9)
        ax.set_xlabel("steps (small batches)")
    axs[0][0].set_ylabel("relative error, % (median, min–max)")
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
        steps, seeds = [100, 300, 1000], [0, 1, 2, 3, 4]
    raw = pd.concat([measure(p, steps, seeds) for p in problems], ignore_index=True)
    summary = summarise(raw)
    raw.to_csv(out_path(args, "accuracy_raw", "csv"), index=False)
    summary.to_csv(out_path(args, "accuracy", "csv"), index=False)
    plot(summary, out_path(args, "accuracy", "png"))
    print(f"settings: small batch {BS}, n_batch {N_BATCH}, beta {BETA}, lr=0 after {WARM} Adam warm-up steps, "
          f"seeds {seeds} (shuffles), both methods on the same batches")
    for p in problems:
        print(f"- {p.name}: {p.note}")
    print(markdown(summary))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
