"""What the adaptive batch size costs a training step where it keeps the batch: the loop's own bookkeeping.

`AdaptiveBatchSize` (fastai) and `AdaptiveLoader` (plain PyTorch) pay three things on every step: the
measurement, held by `MeasureDuty` to `max_overhead` of the run; fastai's dispatch of a callback's events (any
callback pays it); and their own bookkeeping (timing the step, the run's progress, the per-step record, the lr
factor). Only the last two are not budgeted, so they set the floor a run that never moves pays.

Each arm trains the same MLP for the same steps, interleaved with the others over `--repeats` rounds so a
busy machine slows all alike; the throughput is given as time-per-example, so no size is probed and the batch
never moves. Reported per arm: its fastest round's µs a step, and how many more than the plain loop's fastest
(a busy machine only ever adds time, so the fastest rounds are the least noisy comparison); what the duty says
measuring cost (its spent plain steps × the plain step, spread over the steps; median over rounds); and the
rest, which is dispatch and bookkeeping. For fastai, `in_callback_us` clocks the callback's events themselves
(fastai's dispatch, the hooks, the measuring; median over rounds): the same cost read without the noise of two
whole runs' difference. The empty callback, with the same four per-step hooks and nothing in them, is the
dispatch any fastai callback pays.
"""
from __future__ import annotations

import math
import time

import pandas as pd
import torch
from common import cli, markdown, out_path, save_fig
from fastai.basics import Callback, Learner
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.optimizer import Adam
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import AdaptiveBatchSize, AdaptiveLoader
from gns_widget.throughput import Throughput

BS, WIDTH, D_IN = 64, 256, 64
PER_EXAMPLE = Throughput({BS * 2 ** k: 1e-5 * BS * 2 ** k for k in range(8)}, device="time per example")


class EmptyCallback(Callback):
    "The per-step events `AdaptiveBatchSize` handles, doing nothing: fastai's dispatch alone."

    def before_batch(self): pass
    def before_step(self): pass
    def after_step(self): pass
    def after_batch(self): pass


def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D_IN, generator=g)
    return TensorDataset(x, (x[:, :4].sum(1) > 0).long())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))


def clocked(cls: type[Callback], clock: list[float]) -> type[Callback]:
    "`cls`, adding to `clock[0]` the seconds fastai spends in each of its events, dispatch included."
    class Clocked(cls):
        def __call__(self, event_name):
            start = time.perf_counter()
            try:
                return super().__call__(event_name)
            finally:
                clock[0] += time.perf_counter() - start

    Clocked.__name__ = cls.__name__  # the Learner's attribute for it stays the same
    return Clocked


def fastai_arm(cb_kind: str, ds: TensorDataset, epochs: int) -> tuple[float, float, float]:
    """Seconds per training step of `fit_one_cycle` with `cb_kind`'s callback, of them the seconds in the callback's
    events, and the duty's spent plain steps."""
    dls = DataLoaders.from_dsets(ds, TensorDataset(*ds[:BS]), bs=BS, device="cpu", num_workers=0)
    learn = Learner(dls, _model(), loss_func=nn.CrossEntropyLoss(), opt_func=Adam)
    clock = [0.0]
    cb = {"plain": None, "empty callback": lambda: clocked(EmptyCallback, clock)(),
          "AdaptiveBatchSize": lambda: clocked(AdaptiveBatchSize, clock)(throughput=PER_EXAMPLE)}[cb_kind]
    cbs = [] if cb is None else [cb()]
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 1e-3, cbs=cbs)
    steps = learn.train_iter
    spent = cbs[0].duty.spent if cb_kind == "AdaptiveBatchSize" else 0.0
    return (time.perf_counter() - start) / steps, clock[0] / steps, spent


def torch_arm(adaptive: bool, ds: TensorDataset, epochs: int) -> tuple[float, float, float]:
    """Seconds per step of a hand-written loop, plain or through `AdaptiveLoader`, nan (the loop has no events to
    clock), and the duty's spent plain steps."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_func = nn.functional.cross_entropy
    steps, start = 0, time.perf_counter()
    if adaptive:
        adapt = AdaptiveLoader(ds, BS, epochs=epochs, model=model, opt=opt, loss_func=loss_func,
                               throughput=PER_EXAMPLE)
        for xb, yb in adapt:
            loss = loss_func(model(xb), yb)
            loss.backward()
            adapt.step(loss)
            steps += 1
        return (time.perf_counter() - start) / steps, math.nan, adapt.duty.spent
    dl = DataLoader(ds, BS, shuffle=True, drop_last=True)
    for _ in range(epochs):
        for xb, yb in dl:
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps += 1
    return (time.perf_counter() - start) / steps, math.nan, 0.0


def plot(summary: pd.DataFrame, path) -> None:
    "µs a step over the plain loop, split into measuring and the rest, one bar per arm."
    import matplotlib.pyplot as plt

    rows = summary[summary.arm != "plain"]
    labels = [f"{lp}: {arm}" for lp, arm in zip(rows.loop, rows.arm)]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    rest = rows.dispatch_and_bookkeeping_us.clip(lower=0)  # below 0 is the machine's noise
    ax.barh(labels, rows.measuring_us, label="measuring (budgeted)")
    ax.barh(labels, rest, left=rows.measuring_us, label="dispatch and bookkeeping")
    ax.set_xlabel("µs a step more than the plain loop")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    save_fig(fig, path)


def main() -> None:
    args = cli(__doc__, lambda p: p.add_argument("--repeats", type=int, default=21, help="interleaved rounds"))
    repeats, epochs, n = (2, 2, 20 * BS) if args.quick else (args.repeats, 3, 200 * BS)
    ds = _data(n)
    arms = {"fastai": ["plain", "empty callback", "AdaptiveBatchSize"], "torch": ["plain", "AdaptiveLoader"]}
    runs = []
    for r in range(repeats):
        for loop, names in arms.items():
            for name in names:
                sec, inside, spent = (fastai_arm(name, ds, epochs) if loop == "fastai"
                                      else torch_arm(name == "AdaptiveLoader", ds, epochs))
                runs.append(dict(loop=loop, arm=name, round=r, us_per_step=sec * 1e6, in_callback_us=inside * 1e6,
                                 spent_plain_steps=spent, steps=epochs * (n // BS)))
    df = pd.DataFrame(runs)
    plain = df[df.arm == "plain"].set_index(["loop", "round"]).us_per_step
    df["measuring_us"] = df.spent_plain_steps / df.steps * [plain[(lp, r)] for lp, r in zip(df.loop, df["round"])]
    summary = (df.groupby(["loop", "arm"], sort=False)
                 .agg(us_per_step=("us_per_step", "min"), in_callback_us=("in_callback_us", "median"),
                      measuring_us=("measuring_us", "median"))
                 .reset_index())
    fastest_plain = summary[summary.arm == "plain"].set_index("loop").us_per_step
    summary["extra_us"] = summary.us_per_step - fastest_plain[summary.loop].to_numpy()
    summary["dispatch_and_bookkeeping_us"] = summary.extra_us - summary.measuring_us
    summary["extra_pct"] = 100 * summary.extra_us / fastest_plain[summary.loop].to_numpy()
    summary = summary[["loop", "arm", "us_per_step", "extra_us", "extra_pct", "measuring_us",
                       "dispatch_and_bookkeeping_us", "in_callback_us"]]
    df.to_csv(out_path(args, "loop_cost_runs", "csv"), index=False)
    summary.to_csv(out_path(args, "loop_cost", "csv"), index=False)
    plot(summary, out_path(args, "loop_cost", "png"))
    print(markdown(summary, "{:.1f}"))


if __name__ == "__main__":
    main()
