"""GPU benchmark, section 4: time to a target test accuracy on Fashion-MNIST: the finder's advice and the adaptive
batch size (`AdaptiveLoader`, issue 21) against batch 64."""
from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from fashion_mnist import fashion_mnist
from gpu_report import BETA, Report, SkipSection
from measure import GPUBatches, seconds, sync
from torch import Tensor, nn
from torch.utils.data import Dataset

from gns_widget import AdaptiveLoader, bs_find

BASE_BS, BASE_LR = 64, 2e-3


def conv_net(c1: int, c2: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(c2 * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def fashion_on(device: torch.device, path: Path, n_train: int | None, n_test: int | None):
    "Normalised Fashion-MNIST train and test tensors on the device (a seeded subset when sizes are given)."
    try:
        (xt, yt), (xv, yv) = fashion_mnist(True, path), fashion_mnist(False, path)
    except FileNotFoundError as e:
        raise SkipSection(f"{e}; or copy its four .gz files to a folder and pass --data DIR") from None

    def take(x: Tensor, y: Tensor, n: int | None):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n] if n else slice(None)
        return ((x[idx] - 0.2860) / 0.3530).to(device), y[idx].to(device)
    return take(xt, yt, n_train), take(xv, yv, n_test)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum().item() for i in range(0, len(x), 2000))
    model.train()
    return correct / len(x)


def train(model: nn.Module, batches: GPUBatches, test: tuple[Tensor, Tensor], lr: float, epochs: int,
          device: torch.device) -> list[tuple[int, float, float]]:
    "Adam with a one-cycle schedule; (epoch, training seconds so far, test accuracy) after each epoch."
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(batches))

    def epoch() -> None:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    log, total = [], 0.0
    for e in range(epochs):
        total += seconds(epoch, device)
        log.append((e + 1, total, accuracy(model, *test)))
    return log


def one_cycle(pct: float, lr: float, pct_start: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    "torch's OneCycleLR (cosine, two phases) as a function of the run's progress, for a run whose steps vary."
    lo, end = lr / div, lr / div / final_div
    if pct < pct_start:
        return lo + (lr - lo) * (1 - math.cos(math.pi * pct / pct_start)) / 2
    return end + (lr - end) * (1 + math.cos(math.pi * (pct - pct_start) / (1 - pct_start))) / 2


class OnDevice(Dataset):
    "Tensors already on the device, fetched a batch at a time (DataLoader calls `__getitems__`), as GPUBatches."

    def __init__(self, x: Tensor, y: Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        i = torch.as_tensor(idx, device=self.x.device)
        return self.x[i], self.y[i]


def train_adaptive(model: nn.Module, data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], lr: float, epochs: int,
                   seed: int, device: torch.device) -> tuple[list[tuple[int, float, float, int]], AdaptiveLoader]:
    """`train` with the batch size following the noise scale from BASE_BS: the one-cycle on the run's progress;
    (epoch, training seconds so far, test accuracy, optimizer steps so far) at each of the loader's epoch ends,
    and the loader."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    adapt = AdaptiveLoader(OnDevice(*data), BASE_BS, epochs, model=model, opt=opt, loss_func=F.cross_entropy,
                           collate_fn=_as_is)
    torch.manual_seed(seed)  # the loader shuffles with torch's generator
    log, total, epoch = [], 0.0, 0
    sync(device)
    t = time.perf_counter()
    for x, y in adapt:
        if adapt.epoch != epoch:  # an epoch ended: evaluate outside the clock
            sync(device)
            total += time.perf_counter() - t
            log.append((epoch + 1, total, accuracy(model, *test), adapt.progress.steps_taken))
            epoch = adapt.epoch
            t = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = one_cycle(adapt.pct, lr)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        adapt.step(loss)
    sync(device)
    log.append((epoch + 1, total + time.perf_counter() - t, accuracy(model, *test), adapt.progress.steps_taken))
    return log, adapt


def _as_is(batch):
    return batch


def follow_finder(res, lr: float, epochs: int) -> tuple[int, float, int, str] | None:
    """(batch size, lr, epochs, why) to train with after the finder, or None when it has no reliable suggestion.

    `res.advice` where this gns_widget has it; otherwise `suggested_bs`, `lr_advice`'s square-root rule and
    the paper's growth of the examples needed, (1 + B/B_noise)/(1 + 64/B_noise), capped at 4×.
    """
    if hasattr(res, "advice"):
        a = res.advice(lr, epochs=epochs, rule="adam")
        return None if a.batch_size is None else (a.batch_size, a.lr or lr, a.epochs or epochs, a.text)
    if not res.reliable or res.suggested_bs is None:
        return None
    bs, ns = res.suggested_bs, res.noise_scale
    adv = res.lr_advice(lr, rule="adam")
    growth = (1 + bs / ns) / (1 + BASE_BS / ns)
    return bs, adv.lr, min(4 * epochs, math.ceil(epochs * growth)), adv.text


def speedup(rep: Report) -> None:
    s, dev = rep.sizes, rep.device
    (xt, yt), test = fashion_on(dev, rep.args.data, s.fm_train, s.fm_test)
    torch.manual_seed(0)
    model = conv_net(*s.channels).to(dev)
    warm = train(model, GPUBatches(xt, yt, BASE_BS, 0), test, BASE_LR, 1, dev)[-1][1]
    t = time.perf_counter()
    find = partial(bs_find, model, GPUBatches(xt, yt, BASE_BS, 0), F.cross_entropy, lr=0, num_it=s.finder_it,
                   n_batch=s.finder_n_batch, beta=BETA, device=dev)
    try:
        res = find()  # with the memory probe on CUDA, as a user's call runs
    except Exception as e:
        rep.note("speedup", f"the finder failed ({type(e).__name__}: {e}); again without the memory probe")
        t = time.perf_counter()
        res = find(probe_memory=False)
    sync(dev)
    finder_s = time.perf_counter() - t
    rep.note("speedup", f"finder after one warm-up epoch at bs {BASE_BS} ({warm:.1f} s): {res!r} in {finder_s:.1f} s")
    advice = follow_finder(res, BASE_LR, s.base_epochs)
    if rep.args.quick and (advice is None or advice[0] == BASE_BS):  # tiny runs: still compare two batch sizes
        advice = (4 * BASE_BS, BASE_LR * 2, s.base_epochs, "quick run, the finder advised no bigger batch: 4× the "
                  "batch and lr × √4, to run the comparison")
    if advice is None:
        raise RuntimeError(f"the finder gave no reliable suggestion ({res.reason}): nothing to compare")
    big, big_lr, big_epochs, why = advice
    rep.note("speedup", f"advice: bs {big}, lr {big_lr:.3g}, {big_epochs} epochs ({why})")
    configs = [("bs64", BASE_BS, BASE_LR, s.base_epochs), ("advice", big, big_lr, big_epochs),
               ("advice_same_lr", big, BASE_LR, big_epochs)]
    runs = []
    for seed in s.seeds:  # interleaved, so a slower moment of the machine hits every config alike
        for name, bs, lr, epochs in configs:
            torch.manual_seed(seed)
            model = conv_net(*s.channels).to(dev)
            batches = GPUBatches(xt, yt, bs, seed)
            for e, secs, acc in train(model, batches, test, lr, epochs, dev):
                runs.append(dict(config=name, bs=bs, lr=lr, epoch_budget=epochs, seed=seed, epoch=e, seconds=secs,
                                 test_acc=acc, steps=e * len(batches)))
            rep.log(f"speedup {name} seed {seed}: test accuracy {acc:.4f} after {secs:.1f} s")
            rep.save("speedup_runs", runs)
        torch.manual_seed(seed)
        model = conv_net(*s.channels).to(dev)
        log, adapt = train_adaptive(model, (xt, yt), test, BASE_LR, s.base_epochs, seed, dev)
        for e, secs, acc, steps in log:
            runs.append(dict(config="adaptive", bs=BASE_BS, lr=BASE_LR, epoch_budget=s.base_epochs, seed=seed,
                             epoch=e, seconds=secs, test_acc=acc, steps=steps))
        rep.log(f"speedup adaptive seed {seed}: test accuracy {acc:.4f} after {secs:.1f} s; {adapt.record.summary()}; "
                f"{adapt.duty!r}")
        rep.save("speedup_runs", runs)
    rep.save("speedup", summarise_speedup(pd.DataFrame(runs), finder_s, res.noise_scale))


def summarise_speedup(runs: pd.DataFrame, finder_s: float, noise_scale: float) -> pd.DataFrame:
    "Median time to the target (the lowest best test accuracy over the bs-64 seeds) per config; inf if missed."
    target = runs[runs.config == "bs64"].groupby("seed").test_acc.max().min()
    per_run = []
    for (config, seed), d in runs.groupby(["config", "seed"], sort=False):
        hit = d[d.test_acc >= target]
        per_run.append(dict(config=config, bs=d.bs.iloc[0], lr=d.lr.iloc[0], epoch_budget=d.epoch_budget.iloc[0],
                            seed=seed, reached=len(hit) > 0, to_target=hit.seconds.iloc[0] if len(hit) else math.inf,
                            epochs=hit.epoch.iloc[0] if len(hit) else math.nan,
                            steps=hit.steps.iloc[0] if len(hit) else math.nan, best_acc=d.test_acc.max()))
    g = pd.DataFrame(per_run).groupby("config", sort=False)
    out = g.agg(bs=("bs", "first"), lr=("lr", "first"), epoch_budget=("epoch_budget", "first"),
                seeds=("seed", "nunique"), reached=("reached", "sum"), median_seconds_to_target=("to_target", "median"),
                median_epochs_to_target=("epochs", "median"), median_steps_to_target=("steps", "median"),
                median_best_acc=("best_acc", "median")).reset_index()
    base = out.median_seconds_to_target.iloc[0]
    out["speedup_vs_bs64"] = base / out.median_seconds_to_target
    out["steps_vs_bs64"] = out.median_steps_to_target / out.median_steps_to_target.iloc[0]
    out["speedup_incl_finder"] = base / (out.median_seconds_to_target + finder_s * out.config.str.startswith("advice"))
    out.insert(1, "target_acc", target)
    out["noise_scale"], out["finder_seconds"] = noise_scale, finder_s
    return out
