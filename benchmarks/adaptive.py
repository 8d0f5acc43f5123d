"""Adaptive batch size during training (issue 21): does following the noise scale train faster, and as well?

Each problem of the advice benchmark (advice.py: the user's batch size, lr and epochs) is trained, per seed, as:
- baseline: the user's settings;
- control: the baseline with another shuffle (same initial weights): the seed noise, measured;
- sweep ×2, ×4, ×8: a fixed bigger batch with the lr rule's factor (linear for plain SGD, square root otherwise),
  the same epochs; the best of baseline and sweep (fastest whose median metric stays within the control's
  worst) is the oracle, known only after the fact;
- advice: the one-shot `res.advice(lr, epochs)` after one epoch of the user's training (as advice.py);
- adaptive: `AdaptiveLoader` (torch) or `AdaptiveBatchSize` (fastai) with the user's batch size, lr and epochs;
- adaptdl: AdaptDL's goodput policy, ported below for comparison only.
The validation metric is read after every epoch (the clock paused), so "steps to the baseline's final metric"
is counted at epoch ends. Wall time is training only (the finder's and the adaptive timing are in it for
adaptive, since it times itself inside the run); differences are paired by seed. `--seeds 0 1 2 3 4`.
`--holdout` runs the same arms on the problems the adaptive batch size was never tuned on (holdout_problems.py),
into results/adaptive_holdout*.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from common import cli, markdown, out_path, save_fig
from holdout_problems import holdout_tabular_tasks, holdout_torch_tasks
from problems import (
    N_BATCH,
    Tabular,
    Task,
    finder_fastai,
    finder_torch,
    fit_torch,
    make_opt,
    tabular_tasks,
    torch_tasks,
)
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import AdaptiveBatchSize, AdaptiveLoader
from gns_widget.adaptive import BatchSizePolicy, Decision, candidate_sizes, step_gain
from gns_widget.interval import AutoStop
from gns_widget.throughput import measure_throughput

SWEEP = (2, 4, 8)
RULE_OF = {"sgd": "sgd", "momentum": "momentum", "adam": "adam"}


# ---------------------------------------------------------------- AdaptDL's policy, ported for comparison
class AdaptDLPolicy(BatchSizePolicy):
    """AdaptDL's batch-size rule (petuum/adaptdl: adaptdl/goodput.py at de25dcc90c35, `GoodputFunction.efficiency`
    and `optimize`; adaptdl/torch/scaling_rules.py at de5cad974bd0, `AdaScale`), for one process:
    - goodput(B) = throughput(B) × gain(B)/(B/B0), gain = (var + sqr)/(var/scale + sqr) from the *point* estimates
      (here var/sqr = B_noise/B0 from the smoothed noise scale), no interval, no gain threshold;
    - 50 candidate sizes geometric from B0 to the largest allowed (the same cap as ours: 64×, 10 steps per epoch);
    - step time from a line fitted to the measured step times (AdaptDL's alpha_c + beta_c × bsz);
    - lr × gain (AdaScale, its default for every optimizer); training runs the user's epochs (its
      `remaining_epochs_until`), with no progress-based end.
    Only the rule is ported: AdaptDL's own code is not used (it needs its scheduler and distributed runtime)."""

    def __init__(self, base_bs, throughput, *, n_train, max_bs):
        super().__init__(base_bs, throughput, n_train=n_train, rule="sgd")
        sizes = np.array(throughput.batch_sizes, dtype=float)
        times = np.array([throughput.seconds_per_step(int(b)) for b in sizes])
        beta, alpha = np.polyfit(sizes, times, 1) if len(sizes) > 1 else (0.0, times[0])
        self.alpha, self.beta = max(alpha, 1e-9), max(beta, 1e-12)
        self.cap = max_bs

    def _goodput(self, b: np.ndarray, ns: float) -> np.ndarray:
        scale = b / self.base_bs
        gain = (1 + ns / self.base_bs) / (1 + ns / b)
        return b / (self.alpha + self.beta * b) * gain / scale

    def decide(self, bs, interval, *, planned_at=math.nan, step=0, epoch=0, progress=0.0, untimed="") -> Decision:
        if interval is None or not interval.value > 0:
            return Decision(step, epoch, progress, bs, bs, math.nan, math.nan, math.nan, planned_at, 1.0,
                            self.lr_factor(bs, planned_at), "no estimate")
        ns = interval.value
        cands = np.unique(np.ceil(np.geomspace(self.base_bs, self.cap, 50)).astype(int))
        g = self._goodput(cands.astype(float), ns)
        best = int(cands[int(np.argmax(g))])
        gain = float(g.max() / self._goodput(np.array([float(bs)]), ns)[0])
        return Decision(step, epoch, progress, bs, best, ns, interval.lo, interval.hi, ns, gain,
                        self.lr_factor(best, ns), "AdaptDL goodput")

    def lr_factor(self, bs, noise_scale):  # AdaScale: lr × gain
        return step_gain(self.base_bs, bs, noise_scale)

    def to_time(self, bs, noise_scale):  # timed once before training (AdaptDL profiles as it trains: not charged)
        return []


def _cap(base_bs: int, n_train: int) -> int:
    return max(base_bs, min(base_bs * 64, n_train // 10))


# ---------------------------------------------------------------- torch problems
def _evaluate(model, task: Task) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        x, y = task.valid
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return 100 * acc


class _Clock:
    "Training seconds, paused while evaluating; a curve of (steps, seconds, metric) at each epoch end."

    def __init__(self):
        self.seconds, self.curve, self._t = 0.0, [], time.perf_counter()

    def pause(self) -> None:
        self.seconds += time.perf_counter() - self._t

    def resume(self) -> None:
        self._t = time.perf_counter()

    def mark(self, steps: int, metric_fn) -> None:
        self.seconds += time.perf_counter() - self._t
        self.curve.append((steps, self.seconds, metric_fn()))
        self._t = time.perf_counter()


def run_fixed(task: Task, bs: int, lr: float, epochs: int, seed: int, shuffle_seed: int) -> dict:
    clock = _Clock()

    def evaluate(model, steps: int, seconds: float) -> None:
        clock.curve.append((steps, seconds, _evaluate(model, task)))

    _, clock.seconds, steps = fit_torch(task, bs, lr, epochs, seed, shuffle_seed, after_epoch=evaluate)
    return _summary(clock, steps, bs)


def run_adaptive(task: Task, seed: int, shuffle_seed: int, adaptdl: bool = False) -> dict:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_opt(task, model.parameters(), task.lr)
    # the baseline's shuffle (fit_torch's generator): a run that never moves is the baseline, bit for bit
    adapt = AdaptiveLoader(TensorDataset(*task.train), task.bs, task.epochs, model=model, opt=opt,
                           loss_func=F.cross_entropy, generator=torch.Generator().manual_seed(shuffle_seed))
    if adaptdl:
        dl = DataLoader(TensorDataset(*task.train), batch_size=task.bs, shuffle=True)
        sizes = candidate_sizes(task.bs, adapt.n_train)
        tp = measure_throughput(model, dl, F.cross_entropy, batch_sizes=sizes, opt=opt)
        adapt.policy = AdaptDLPolicy(task.bs, tp, n_train=adapt.n_train, max_bs=_cap(task.bs, adapt.n_train))
        adapt.progress.planned, adapt.max_epochs = math.inf, task.epochs
    clock = _Clock()
    epoch = 0
    for x, y in adapt:
        if adapt.epoch != epoch:
            clock.mark(adapt.progress.steps_taken, lambda: _evaluate(model, task))
            epoch = adapt.epoch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        adapt.step(loss)
    clock.mark(adapt.progress.steps_taken, lambda: _evaluate(model, task))
    out = _summary(clock, adapt.progress.steps_taken, adapt.batch_size)
    out["decisions"] = " ".join(f"{d.old_bs}→{d.new_bs}@{d.epoch}" for d in adapt.record.changes)
    return out


def _summary(clock: _Clock, steps: int, bs) -> dict:
    return dict(metric=clock.curve[-1][2], seconds=clock.seconds, steps=steps, final_bs=bs,
                curve=";".join(f"{s}:{t:.4f}:{m!r}" for s, t, m in clock.curve))


def torch_rows(task: Task, seed: int) -> list[dict]:
    rule = RULE_OF[task.opt]
    arms = [("baseline", task.bs, task.lr, task.epochs, seed), ("control", task.bs, task.lr, task.epochs, seed + 1000)]
    for k in SWEEP:
        if len(task.train[0]) // (task.bs * k) >= 10:
            arms.append((f"sweep_x{k}", task.bs * k, task.lr * (k if rule == "sgd" else math.sqrt(k)), task.epochs,
                         seed))
    res, _ = finder_torch(task, seed, seed + 100)
    a = res.advice(lr=task.lr, epochs=task.epochs)
    arms.append(("advice", a.batch_size or task.bs, a.lr or task.lr, a.epochs or task.epochs, seed))
    rows = [dict(arm=arm, bs=bs, lr=lr, epochs=e, **run_fixed(task, bs, lr, e, seed, sh))
            for arm, bs, lr, e, sh in arms]
    rows.append(dict(arm="adaptive", bs=task.bs, lr=task.lr, epochs=task.epochs, **run_adaptive(task, seed, seed)))
    rows.append(dict(arm="adaptdl", bs=task.bs, lr=task.lr, epochs=task.epochs,
                     **run_adaptive(task, seed, seed, adaptdl=True)))
    return [dict(problem=task.name, seed=seed, **r) for r in rows]


# ---------------------------------------------------------------- fastai tabular: Bikeshare, Caravan
BIKESHARE = dict(bs=64, lr=3e-3, epochs=5)  # the write-up's case: fit_one_cycle(5, 3e-3) from bs 64


def _fastai_curve():
    from fastai.callback.core import Callback

    class Curve(Callback):
        "Training seconds (validation left out, as the torch loops leave out their evaluation) and the valid loss."
        order = 70  # after the Recorder has logged the epoch

        def before_fit(self):
            self.clock = _Clock()

        def before_validate(self):
            self.clock.pause()

        def after_validate(self):
            self.clock.resume()

        def after_epoch(self):
            self.clock.mark(self.train_iter, lambda: float(self.recorder.values[-1][-1]))

    return Curve()


class _AdaptDLCallback(AdaptiveBatchSize):
    "AdaptiveBatchSize with AdaptDL's policy; its schedule runs on epochs (fastai's own count), as AdaptDL's does."

    def before_fit(self):
        super().before_fit()
        tp = self._time_sizes(candidate_sizes(self.base_bs, self.n_train))  # inside the clock: a few tenths of a s
        self.policy = AdaptDLPolicy(self.base_bs, tp, n_train=self.n_train, max_bs=_cap(self.base_bs, self.n_train))
        self.run_progress.planned, self.learn.n_epoch = math.inf, self.planned_epochs

    def _follow_progress(self):
        pass


def fastai_run(task: Tabular, bs: int, lr: float, epochs: int, seed: int, shuffle_seed: int, cb=None) -> dict:
    from fastai.tabular.all import set_seed

    set_seed(seed, reproducible=True)
    learn = task.learner(bs)
    set_seed(shuffle_seed, reproducible=True)
    curve = _fastai_curve()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr, cbs=[curve] + ([cb] if cb is not None else []))
    out = _summary(curve.clock, curve.clock.curve[-1][0], bs)
    if cb is not None:
        out["decisions"] = " ".join(f"{d.old_bs}→{d.new_bs}@{d.epoch}" for d in cb.record.changes)
        out["final_bs"] = int(cb.record.steps.bs.iloc[-1])
    return out


def tabular_rows(task: Tabular, seed: int) -> list[dict]:
    bs, lr, epochs = task.bs, task.lr, task.epochs
    arms = [("baseline", bs, lr, epochs, seed), ("control", bs, lr, epochs, seed + 1000)]
    arms += [(f"sweep_x{k}", bs * k, lr * math.sqrt(k), epochs, seed) for k in SWEEP]  # Adam: the square root
    res = finder_fastai(task, seed, dict(lr=0, num_it=AutoStop(max_it=3000), n_batch=N_BATCH))
    a = res.advice(lr=lr, epochs=epochs)
    arms.append(("advice", a.batch_size or bs, a.lr or lr, a.epochs or epochs, seed))
    rows = [dict(arm=arm, bs=b, lr=r, epochs=e, **fastai_run(task, b, r, e, seed, sh)) for arm, b, r, e, sh in arms]
    for arm, cb in (("adaptive", AdaptiveBatchSize()), ("adaptdl", _AdaptDLCallback())):
        rows.append(dict(arm=arm, bs=bs, lr=lr, epochs=epochs, **fastai_run(task, bs, lr, epochs, seed, seed, cb)))
    return [dict(problem=task.name, seed=seed, **r) for r in rows]


# ---------------------------------------------------------------- summary
def _steps_to(curve: str, target: float, lower_is_better: bool) -> tuple[float, float]:
    "Steps and seconds at the first epoch end whose metric reaches `target` (nan if none does)."
    for point in curve.split(";"):
        s, t, m = (float(v) for v in point.split(":"))
        if (m <= target * (1 + 1e-9)) if lower_is_better else (m >= target - 1e-9):
            return s, t
    return math.nan, math.nan


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per problem and arm, medians over seeds of: the paired metric difference from the baseline, time and step
    ratios, and the steps and time to reach the baseline's final metric (as fractions of the baseline's)."""
    rows = []
    for (problem, seed), g in df.groupby(["problem", "seed"], sort=False):
        lower = problem.endswith("tabular_fastai")
        base = g[g.arm == "baseline"].iloc[0]
        b_steps, b_secs = _steps_to(base.curve, base.metric, lower)
        for _, r in g.iterrows():
            s, t = _steps_to(r.curve, base.metric, lower)
            delta = r.metric - base.metric
            rows.append(dict(problem=problem, seed=seed, arm=r.arm, bs=r.bs, final_bs=r.final_bs,
                             delta=100 * delta / base.metric if lower else delta,
                             time_ratio=r.seconds / base.seconds, steps_ratio=r.steps / base.steps,
                             steps_to_target=s / b_steps, time_to_target=t / b_secs))
    d = pd.DataFrame(rows)
    d["harm"] = [v if p.endswith("tabular_fastai") else -v for p, v in zip(d.problem, d.delta)]  # > 0: worse
    g = d.groupby(["problem", "arm"], sort=False).agg(
        bs=("final_bs", lambda s: "/".join(str(int(v)) for v in sorted(set(s)))),
        delta=("delta", "median"), worst_harm=("harm", "max"), time_ratio=("time_ratio", "median"),
        steps_ratio=("steps_ratio", "median"), steps_to_target=("steps_to_target", "median"),
        time_to_target=("time_to_target", "median"), reached=("steps_to_target", lambda s: int(s.notna().sum())),
        n=("seed", "count")).reset_index()
    return g


def oracle(summary: pd.DataFrame) -> pd.DataFrame:
    "Per problem: the fastest fixed size (baseline or sweep) whose median metric is within the control's worst."
    out = []
    for problem, g in summary.groupby("problem", sort=False):
        sign = 1 if problem.endswith("tabular_fastai") else -1
        control = g[g.arm == "control"].iloc[0]
        fixed = g[g.arm.isin(["baseline"] + [f"sweep_x{k}" for k in SWEEP])]
        ok = fixed[sign * fixed.delta <= control.worst_harm]
        best = ok.loc[ok.time_ratio.idxmin()] if len(ok) else g[g.arm == "baseline"].iloc[0]
        out.append(dict(problem=problem, oracle=best.arm, oracle_time_ratio=best.time_ratio))
    return pd.DataFrame(out)


def plot(summary: pd.DataFrame, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = list(dict.fromkeys(summary.problem))
    arms = ["control", "advice", "adaptive", "adaptdl"]
    fig, axs = plt.subplots(1, 3, figsize=(15, 3.6))
    for i, arm in enumerate(arms):
        d = summary[summary.arm == arm].set_index("problem").reindex(probs)
        x = np.arange(len(probs)) + (i - 1.5) * 0.2
        axs[0].bar(x, d.delta, width=0.2, label=arm)
        axs[1].bar(x, d.time_ratio, width=0.2, label=arm)
        axs[2].bar(x, d.steps_ratio, width=0.2, label=arm)
    for ax, t in zip(axs, ["paired Δ metric (accuracy points; loss % for the tabular problems)", "wall time / baseline",
                           "optimizer steps / baseline"]):
        ax.set_xticks(range(len(probs)), [p.replace("_", "\n", 2) for p in probs], fontsize=7)
        ax.set_title(t, fontsize=9)
        ax.legend(fontsize=7)
    axs[1].axhline(1, c="k", lw=0.6)
    axs[2].axhline(1 / 3, c="k", lw=0.6, ls="--")
    save_fig(fig, path)


def _add_args(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--problems", nargs="+", help="problems whose name contains one of these")
    p.add_argument("--holdout", action="store_true", help="the problems it was never tuned on (holdout_problems.py)")


def main() -> None:
    args = cli(__doc__.splitlines()[0], _add_args)
    t0 = time.perf_counter()
    if args.holdout:
        name, torch_list, tabular_list = ("adaptive_holdout", holdout_torch_tasks(args.quick),
                                          holdout_tabular_tasks(args.quick))
    else:
        name, torch_list, tabular_list = "adaptive", torch_tasks(args.quick), tabular_tasks(args.quick, **BIKESHARE)
    chosen = [t for t in torch_list + tabular_list if not args.problems or any(o in t.name for o in args.problems)]
    rows = []
    for task in (t for t in chosen if isinstance(t, Task)):
        for seed in args.seeds:
            rows += torch_rows(task, seed)
        print(f"{task.name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    for task in (t for t in chosen if isinstance(t, Tabular)):
        for seed in args.seeds:
            rows += tabular_rows(task, seed)
        print(f"{task.name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    runs = pd.DataFrame(rows)
    runs.to_csv(out_path(args, f"{name}_runs", "csv"), index=False)
    summary = summarize(runs)
    summary = summary.merge(oracle(summary), on="problem")
    summary.to_csv(out_path(args, name, "csv"), index=False)
    plot(summary, out_path(args, name, "png"))
    print(markdown(summary))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
