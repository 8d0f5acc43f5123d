"""Wall-clock time to a target validation loss: fastai tabular on Bikeshare at bs 64 vs the suggested batch size.

The noise scale grows as training proceeds (at initialisation it is ~16 here, which would suggest
shrinking the batch), so the finder runs on a throwaway Learner after one warm-up epoch at bs 64,
the moment a user would call it, like `lr_find`; its cost is reported. The target is fixed before the
comparison from a pilot bs=64 run (another seed): its final validation loss after a full
one-cycle schedule, plus 2% slack so that seed-to-seed noise does not decide the outcome.
Each run then trains with `fit_one_cycle` and stops at the first epoch whose validation loss
reaches the target. The suggested batch size gets the epoch budget the paper predicts it
needs (examples grow by (1 + B/B_noise)/(1 + 64/B_noise)), and its learning rate is scaled by
`res.lr_advice(lr, rule="adam")`; it is also run with twice that budget, a second, looser
protocol. A run that never reaches the target counts as infinite time; medians are over seeds.
"""
from __future__ import annotations

import math
import time

import pandas as pd
from common import bikeshare_df, bikeshare_dls, cli, markdown, out_path, save_fig
from fastai.callback.core import Callback, CancelFitException
from fastai.tabular.all import MSELossFlat, set_seed, tabular_learner

BASE_BS, LR, LAYERS, SLACK = 64, 1e-2, [200, 100], 1.02


class StopAtTarget(Callback):
    "Record (epoch, seconds, valid loss) per epoch; stop the fit once the validation loss reaches `target`."
    order = 60  # after the Recorder (50) has written this epoch's validation loss

    def __init__(self, target: float = -math.inf):
        self.target = target

    def before_fit(self) -> None:
        self.t0, self.log, self.hit = time.perf_counter(), [], None

    def after_epoch(self) -> None:
        vl = float(self.recorder.values[-1][1])
        self.log.append((self.epoch + 1, time.perf_counter() - self.t0, vl))
        if self.hit is None and vl <= self.target:
            self.hit = self.log[-1]
            raise CancelFitException()


def learner(df: pd.DataFrame, bs: int, seed: int):
    set_seed(seed, reproducible=True)
    learn = tabular_learner(bikeshare_dls(bs, 0, df), layers=LAYERS, loss_func=MSELossFlat())
    learn.no_bar()  # context managers below; these just silence output
    return learn


def train(df: pd.DataFrame, bs: int, lr: float, epochs: int, seed: int, target: float) -> dict:
    learn = learner(df, bs, seed)
    cb = StopAtTarget(target)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr, cbs=cb)
    ep, secs, vl = cb.hit if cb.hit else cb.log[-1]
    return dict(bs=bs, lr=lr, seed=seed, epoch_budget=epochs, reached=cb.hit is not None, epochs=ep,
                seconds=secs, seconds_to_target=secs if cb.hit else math.inf, valid_loss=vl,
                steps=ep * math.ceil(len(learn.dls.train_ds) / bs))


def plot(runs: pd.DataFrame, target: float, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, ((bs, budget), d) in enumerate(runs.groupby(["bs", "epoch_budget"])):
        ax.scatter(d.seconds, d.valid_loss, c=f"C{i}", marker="o" if i == 0 else "s",
                   label=f"bs {bs}, {budget} epochs: reached {int(d.reached.sum())}/{len(d)}")
    ax.axhline(target, ls=":", c="gray", label=f"target {target:.4f}")
    ax.set(xlabel="wall-clock seconds (to target, or to the end)", ylabel="validation loss at stop",
           title="Bikeshare, fastai tabular")
    ax.legend(fontsize=8)
    save_fig(fig, path)


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    t0 = time.perf_counter()
    df = bikeshare_df()
    if args.quick:
        df = df.sample(1500, random_state=0).reset_index(drop=True)
        base_epochs, seeds, num_it, n_batch = 2, [0], 100, 10
    else:
        base_epochs, seeds, num_it, n_batch = 8, [0, 1, 2], 1000, 20

    learn = learner(df, BASE_BS, seed=0)
    t_find = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, LR)
        res = learn.bs_find(lr=1e-3, num_it=num_it, n_batch=n_batch, beta=0.99, show_plot=False)
    t_find = time.perf_counter() - t_find
    print(f"finder (after 1 warm-up epoch; warm-up + finder took {t_find:.1f} s): {res!r}")
    big = res.suggested_bs or BASE_BS
    advice = res.lr_advice(LR, rule="adam") if res.reliable else None
    big_lr = advice.lr if advice else LR
    ns = res.noise_scale
    growth = (1 + big / ns) / (1 + BASE_BS / ns) if ns > 0 else 1.0
    big_epochs = min(4 * base_epochs, math.ceil(base_epochs * growth))
    if advice:
        print(advice.text)

    pilot = train(df, BASE_BS, LR, base_epochs, seed=100, target=-math.inf)
    target = pilot["valid_loss"] * SLACK
    print(f"target valid loss {target:.4f} = {SLACK} x pilot bs={BASE_BS} loss after {base_epochs} epochs")

    runs = []
    for seed in seeds:  # interleave the two batch sizes so machine load hits both alike
        runs.append(train(df, BASE_BS, LR, base_epochs, seed, target))
        runs.append(train(df, big, big_lr, big_epochs, seed, target))
        runs.append(train(df, big, big_lr, 2 * big_epochs, seed, target))
    runs = pd.DataFrame(runs)
    summary = runs.groupby(["bs", "epoch_budget"], sort=False).agg(
        lr=("lr", "first"), reached=("reached", "sum"), median_seconds_to_target=("seconds_to_target", "median"),
        median_seconds_run=("seconds", "median"),
                                                 median_epochs=("epochs", "median"), median_steps=("steps", "median"),
                                                 median_valid_loss=("valid_loss", "median")).reset_index()
    summary["speedup_vs_bs64"] = summary.median_seconds_to_target.iloc[0] / summary.median_seconds_to_target
    summary.insert(0, "noise_scale", ns)
    summary.insert(1, "target", target)
    summary["finder_seconds"] = t_find
    runs.to_csv(out_path(args, "speedup_runs", "csv"), index=False)
    summary.to_csv(out_path(args, "speedup", "csv"), index=False)
    plot(runs, target, out_path(args, "speedup", "png"))
    print(markdown(summary))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
