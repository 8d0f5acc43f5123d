"""The training problems of the advice and adaptive benchmarks: data, model, the user's settings, and how the
finder is called on each (after the user's first epoch, where a user calls it for a number to act on)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from common import bikeshare_df, bikeshare_dls, fashion_mnist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find, datasets
from gns_widget.interval import AutoStop

BS, N_BATCH = 32, 20  # beta is bs_find's default: 1 (a plain average) at lr=0, 0.99 while training


@dataclass
class Task:
    "A training problem: data, a model factory, the user's settings, and how the finder is called."
    name: str
    train: tuple[torch.Tensor, ...]
    valid: tuple[torch.Tensor, ...]
    make_model: Callable[[], nn.Module]
    opt: str  # "sgd", "momentum" (SGD, nesterov momentum 0.9) or "adam"
    bs: int
    lr: float
    epochs: int
    finder: dict  # bs_find keyword arguments
    metric: str = "accuracy"
    finder_after: int = 0  # epochs the user trained (their bs, lr) before calling the finder
    timing_repeats: int = 1  # trainings of well under a second are timed as the fastest of this many


def make_opt(task: Task, params, lr: float):
    if task.opt == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if task.opt == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(params, lr=lr)


def fit_torch(task: Task, bs: int, lr: float, epochs: int, seed: int, shuffle_seed: int | None = None,
              after_epoch: Callable[[nn.Module, int, float], Any] | None = None) -> tuple[nn.Module, float, int]:
    """Plain loop at constant lr: the model, seconds and steps. `shuffle_seed` (default `seed`) orders the batches.
    `after_epoch(model, steps, seconds)` is called at each epoch's end (an evaluation); its own time is not counted."""
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_opt(task, model.parameters(), lr)
    dl = DataLoader(TensorDataset(*task.train), batch_size=bs, shuffle=True,
                    generator=torch.Generator().manual_seed(seed if shuffle_seed is None else shuffle_seed))
    step, seconds, t0 = 0, 0.0, time.perf_counter()
    for _ in range(epochs):
        for x, y in dl:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
        if after_epoch is not None:
            seconds += time.perf_counter() - t0
            after_epoch(model, step, seconds)
            t0 = time.perf_counter()
    return model, seconds + time.perf_counter() - t0, step



@dataclass
class Tabular:
    "A fastai tabular problem: its data, its loaders at a batch size, its loss, and the user's settings."
    name: str
    df: pd.DataFrame
    dls: Callable[[int, pd.DataFrame], Any]  # (bs, df) -> DataLoaders, the same split every time
    loss: Callable[[], Any]
    bs: int
    lr: float
    epochs: int

    def learner(self, bs: int):
        from fastai.tabular.all import tabular_learner

        return tabular_learner(self.dls(bs, self.df), layers=[200, 100], loss_func=self.loss())


def bikeshare_task(quick: bool, bs: int = 64, lr: float = 1e-2, epochs: int = 8) -> Tabular:
    "Bikeshare (ISLP, 8,645 hourly rentals): regression of log1p(bikers), validation MSE."
    from fastai.tabular.all import MSELossFlat

    df = bikeshare_df()
    if quick:
        df = df.sample(1500, random_state=0).reset_index(drop=True)
    return Tabular("bikeshare_tabular_fastai", df, lambda b, d: bikeshare_dls(b, 0, d), MSELossFlat, bs, lr,
                   2 if quick else epochs)


def caravan_df() -> pd.DataFrame:
    "ISLP's Caravan (5,822 customers x 85 features; Purchase Yes/No, 6% Yes): read from the package's CSV."
    import ISLP

    return pd.read_csv(Path(ISLP.__file__).parent / "data" / "Caravan.csv")


def caravan_task(quick: bool, bs: int = 64, lr: float = 1e-2, epochs: int = 5) -> Tabular:
    "Caravan insurance (ISLP): a fastai tabular classification, validation cross-entropy."
    from fastai.tabular.all import CategoryBlock, CrossEntropyLossFlat, Normalize, RandomSplitter, TabularDataLoaders

    df = caravan_df()
    if quick:
        df = df.sample(1500, random_state=0).reset_index(drop=True)
    cont = [c for c in df.columns if c != "Purchase"]

    def dls(b: int, d: pd.DataFrame):
        valid = list(RandomSplitter(valid_pct=0.2, seed=0)(range(len(d)))[1])
        return TabularDataLoaders.from_df(d, procs=[Normalize], cont_names=cont, y_names="Purchase",
                                          y_block=CategoryBlock(), valid_idx=valid, bs=b, seed=0)
    return Tabular("caravan_tabular_fastai", df, dls, CrossEntropyLossFlat, bs, lr, 2 if quick else epochs)


def tabular_tasks(quick: bool, only: list[str] | None = None, **bikeshare: Any) -> list[Tabular]:
    "Bikeshare (regression; `bikeshare` overrides its settings) and Caravan (classification), where installed."
    tasks = []
    for make, kw in ((bikeshare_task, bikeshare), (caravan_task, {})):
        try:
            tasks.append(make(quick, **kw))
        except (FileNotFoundError, ImportError) as e:
            print(f"skipped a tabular problem: {e}")
    return [t for t in tasks if not only or any(o in t.name for o in only)]


def finder_fastai(task: Tabular, seed: int, finder: dict):
    "bs_find after one warm-up epoch on a throwaway Learner, where a user calls it (as speedup.py does)."
    from fastai.tabular.all import set_seed

    set_seed(seed, reproducible=True)
    learn = task.learner(task.bs)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, task.lr)
        return learn.bs_find(show_plot=False, **finder)  # at lr=0: measured at the weights the user has


def digits_task(num_it: int, quick: bool) -> Task:
    xt, yt, xv, yv = datasets.digits()
    return Task(f"digits_mlp_{'long' if num_it > 5000 else 'short'}_finder", (xt, yt), (xv, yv),
                lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), "sgd", 32, 0.1,
                2 if quick else 8, dict(lr=0.1, num_it=num_it, n_batch=10), timing_repeats=1 if quick else 5)


def shuffled_split(n_items: int, n: int, nv: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    "The first `n` and the next `nv` indices of a seeded shuffle of `n_items`: a fixed train/validation split."
    idx = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))
    return idx[:n], idx[n:n + nv]


def char_windows(text: bytes, seq: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    "`count` windows of `seq` ASCII characters at seeded random starts, and the same shifted by one (the targets)."
    data = torch.tensor(list(text), dtype=torch.long).clamp(max=127)
    starts = torch.randperm(len(data) - seq - 1, generator=torch.Generator().manual_seed(0))[:count]
    return torch.stack([data[i:i + seq] for i in starts]), torch.stack([data[i + 1:i + seq + 1] for i in starts])


def fashion_tasks(quick: bool) -> list[Task]:
    x, y = fashion_mnist(train=True)
    n, nv = (2000, 500) if quick else (10_000, 2000)
    tr, va = shuffled_split(len(x), n, nv, seed=0)

    def conv():
        return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 6 * 6, 10))

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    # measured where a user would: after one epoch of their own training, at those weights (lr=0)
    auto = dict(lr=0, num_it=AutoStop(max_it=500 if quick else 3000), n_batch=N_BATCH)
    epochs = 1 if quick else 4
    return [Task("fashion_conv", (x[tr], y[tr]), (x[va], y[va]), conv, "sgd", 32, 0.05, epochs, auto,
                 finder_after=1),
            Task("fashion_mlp_adam", (x[tr], y[tr]), (x[va], y[va]), mlp, "adam", 32, 1e-3, epochs, auto,
                 finder_after=1)]


def breast_cancer_task(quick: bool) -> Task:
    "A dataset under 1,000 rows (569): an MLP with Adam at bs 16 for 30 epochs, standardised features."
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    tr, va = shuffled_split(len(x), 400, len(x) - 400, seed=0)
    auto = dict(lr=0, num_it=AutoStop(max_it=300 if quick else 3000), n_batch=N_BATCH)
    return Task("breast_cancer_mlp_adam", (x[tr], y[tr]), (x[va], y[va]),
                lambda: nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 2)), "adam", 16, 1e-3,
                3 if quick else 30, auto, finder_after=1)


class CharGRU(nn.Module):
    "A character-level GRU language model; logits as (N, vocab, T) so cross_entropy takes (N, T) targets."

    def __init__(self, vocab: int, dim: int = 64):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, x):
        return self.head(self.gru(self.emb(x))[0]).transpose(1, 2)


def char_lm_task(quick: bool) -> Task:
    "A language model on Python's own standard-library source (ships with Python): next-character accuracy."
    import sysconfig
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    text = "".join(f.read_text(errors="ignore") for f in files).encode("ascii", "ignore")
    n, nv = (2000 if quick else 12_000), 2000
    x, y = char_windows(text, 32, n + nv)
    auto = dict(lr=0, num_it=AutoStop(max_it=300 if quick else 3000), n_batch=N_BATCH)
    return Task("char_gru_stdlib_adam", (x[:n], y[:n]), (x[n:], y[n:]), lambda: CharGRU(128), "adam", 32, 3e-3,
                1 if quick else 3, auto, finder_after=1)


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def bn_resnet_task(quick: bool) -> Task:
    "A BatchNorm ResNet on Fashion-MNIST with SGD and nesterov momentum 0.9 (the issue's −6.8-point case)."
    x, y = fashion_mnist(train=True)
    n, nv = (1500, 500) if quick else (6000, 2000)
    tr, va = shuffled_split(len(x), n, nv, seed=1)

    def model():
        return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             _Block(16), nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                             nn.ReLU(), _Block(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    auto = dict(lr=0, num_it=AutoStop(max_it=300 if quick else 2000), n_batch=N_BATCH)
    return Task("bn_resnet_fashion_momentum", (x[tr], y[tr]), (x[va], y[va]), model, "momentum", 64, 0.05,
                1 if quick else 3, auto, finder_after=1)


def torch_tasks(quick: bool, only: list[str] | None = None) -> list[Task]:
    tasks = [digits_task(300 if quick else 1000, quick), breast_cancer_task(quick), char_lm_task(quick)]
    try:
        tasks += fashion_tasks(quick)[:1 if quick else 2] + [bn_resnet_task(quick)]
    except FileNotFoundError as e:
        print(f"skipped the Fashion-MNIST problems: {e}")
    return [t for t in tasks if not only or any(o in t.name for o in only)]


def finder_torch(task: Task, seed: int, loader_seed: int):
    "The user's first epoch(s) on `seed` (or a fresh model), then the finder at those weights; its seconds."
    if task.finder_after:
        model = fit_torch(task, task.bs, task.lr, task.finder_after, seed)[0]
    else:
        torch.manual_seed(seed)
        model = task.make_model()
    dl = DataLoader(TensorDataset(*task.train), batch_size=task.bs, shuffle=True,
                    generator=torch.Generator().manual_seed(loader_seed))
    torch.manual_seed(loader_seed)
    t0 = time.perf_counter()
    res = bs_find(model, dl, nn.CrossEntropyLoss(), opt=lambda p: make_opt(task, p, task.lr), **task.finder)
    return res, time.perf_counter() - t0
