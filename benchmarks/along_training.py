"""The noise scale along training against the one at fixed weights: what the adaptive batch size acts on.

`AdaptiveBatchSize` and `AdaptiveLoader` read the noise scale from consecutive training batches, so the weights
move within a window; `bs_find(lr=0)` reads it at fixed weights. Per problem of the adaptive benchmark and seed:
the user's first epoch with the adaptive loader or callback held at the user's batch size (`max_bs`) and measuring
every step, its interval after that epoch, then `bs_find(lr=0)` at the same weights. Whether the two differ, and
on which side, says what moving to fixed-weight windows would change (and the sweep of `adaptive.py` says whether
the bigger batches either one allows train as well). `--seeds 0 1 2`.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from adaptive import BIKESHARE
from common import cli, markdown, out_path, save_fig
from problems import Tabular, Task, make_opt, tabular_tasks, torch_tasks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import AdaptiveBatchSize, AdaptiveLoader, bs_find
from gns_widget.interval import AutoStop, Interval

FINDER = dict(lr=0, num_it=AutoStop(max_it=3000), n_batch=10)


def _row(task, seed: int, bs: int, along: Interval | None, fixed: Interval | None) -> dict:
    def ends(iv: Interval | None) -> tuple[float, float, float]:
        return (iv.value, iv.lo, iv.hi) if iv is not None else (math.nan,) * 3
    (a, a_lo, a_hi), (f, f_lo, f_hi) = ends(along), ends(fixed)
    return dict(problem=task.name, seed=seed, bs=bs, along=a, along_lo=a_lo, along_hi=a_hi, fixed=f, fixed_lo=f_lo,
                fixed_hi=f_hi, ratio=a / f if a > 0 and f > 0 else math.nan)


def torch_row(task: Task, seed: int, quick: bool) -> dict:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_opt(task, model.parameters(), task.lr)
    adapt = AdaptiveLoader(TensorDataset(*task.train), task.bs, task.epochs, model=model, opt=opt,
                           loss_func=F.cross_entropy, max_bs=task.bs, max_overhead=1)
    torch.manual_seed(seed)
    for x, y in adapt:
        if adapt.epoch == 1:  # the user's first epoch is done
            break
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        adapt.step(loss)
    dl = DataLoader(TensorDataset(*task.train), batch_size=task.bs, shuffle=True,
                    generator=torch.Generator().manual_seed(seed))
    finder = dict(FINDER, num_it=300) if quick else FINDER
    res = bs_find(model, dl, nn.CrossEntropyLoss(), **finder)
    return _row(task, seed, task.bs, adapt.recorder.interval(), res.interval)


def tabular_row(task: Tabular, seed: int, quick: bool) -> dict:
    from fastai.callback.core import Callback, CancelFitException
    from fastai.tabular.all import set_seed

    class FirstEpoch(Callback):
        order = 70

        def after_epoch(self):
            raise CancelFitException()

    set_seed(seed, reproducible=True)
    learn = task.learner(task.bs)
    cb = AdaptiveBatchSize(max_bs=task.bs, max_overhead=1)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(task.epochs, task.lr, cbs=[cb, FirstEpoch()])
        along = cb.recorder_.interval()
        finder = dict(FINDER, num_it=300) if quick else FINDER
        res = learn.bs_find(show_plot=False, **finder)
    return _row(task, seed, task.bs, along, res.interval)


def plot(runs: pd.DataFrame, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    positive = runs.along > 0
    floor = runs.along[positive].min() / 2 if positive.any() else 1.0  # where a negative reading is drawn
    for i, (name, d) in enumerate(runs.groupby("problem", sort=False)):
        up = d.along > 0
        ax.scatter(d.fixed[up], d.along[up], label=name, color=f"C{i}")
        if (~up).any():
            ax.scatter(d.fixed[~up], np.full((~up).sum(), floor), marker="v", color=f"C{i}",
                       label=f"{name}: not positive along training")
    lo, hi = (runs.fixed.min(), runs.fixed.max()) if runs.fixed.notna().any() else (1.0, 10.0)
    ax.plot([lo / 2, hi * 2], [lo / 2, hi * 2], "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="bs_find(lr=0) at the same weights", ylabel="along training",
           title="Noise scale after the first epoch")
    ax.legend(fontsize=6)
    save_fig(fig, path)


def _add_args(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])


def main() -> None:
    args = cli(__doc__.splitlines()[0], _add_args)
    t0 = time.perf_counter()
    seeds = args.seeds[:1] if args.quick else args.seeds
    rows = [torch_row(task, seed, args.quick) for task in torch_tasks(args.quick) for seed in seeds]
    rows += [tabular_row(task, seed, args.quick) for task in tabular_tasks(args.quick, **BIKESHARE) for seed in seeds]
    runs = pd.DataFrame(rows)
    runs.to_csv(out_path(args, "along_training", "csv"), index=False)
    plot(runs, out_path(args, "along_training", "png"))
    print(markdown(runs))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
