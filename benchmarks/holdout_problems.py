"""Problems the adaptive batch size was never developed or tuned on: its held-out check (`adaptive.py --holdout`).

The user's settings (batch size, lr, epochs) are what a user would pick for each, fixed before any adaptive run
on them. New data and model families against the eight of `problems.py`: a causal transformer on Debian's
license texts, softmax regression on Fashion-MNIST (convex), and two more ISLP tables with fastai (Default:
classification, 3 % positives; Wage: regression of the log wage).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from common import fashion_mnist
from problems import N_BATCH, Tabular, Task, char_windows, shuffled_split
from torch import nn

from gns_widget.interval import AutoStop

LICENSES = Path("/usr/share/common-licenses")  # Debian's base-files: on every Debian machine


class CharTransformer(nn.Module):
    "A two-layer causal transformer language model (pre-norm, no dropout); logits as (N, vocab, T)."

    def __init__(self, vocab: int = 128, dim: int = 64, heads: int = 4, layers: int = 2, seq: int = 32):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        h = self.body(self.emb(x) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True)
        return self.head(h).transpose(1, 2)


def char_transformer_task(quick: bool) -> Task:
    "Next-character accuracy on the license texts: 8,000 windows of 32 characters, Adam 1e-3 at bs 32, 3 epochs."
    text = "".join(f.read_text(errors="ignore") for f in sorted(LICENSES.glob("*")) if f.is_file())
    n, nv = (1500 if quick else 8000), 1500
    x, y = char_windows(text.encode("ascii", "ignore"), 32, n + nv)
    auto = dict(lr=0, num_it=AutoStop(max_it=300 if quick else 2000), n_batch=N_BATCH)
    return Task("char_transformer_licenses_adam", (x[:n], y[:n]), (x[n:], y[n:]), CharTransformer, "adam", 32,
                1e-3, 1 if quick else 3, auto, finder_after=1)


def fashion_softmax_task(quick: bool) -> Task:
    "Softmax regression (one linear layer) on 10,000 Fashion-MNIST images: plain SGD 0.1 at bs 16, 3 epochs."
    x, y = fashion_mnist(train=True)
    n, nv = (2000, 500) if quick else (10_000, 2000)
    tr, va = shuffled_split(len(x), n, nv, seed=2)
    auto = dict(lr=0, num_it=AutoStop(max_it=300 if quick else 3000), n_batch=N_BATCH)
    return Task("fashion_softmax_sgd", (x[tr], y[tr]), (x[va], y[va]),
                lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), "sgd", 16, 0.1, 1 if quick else 3, auto,
                finder_after=1)


def _islp(name: str) -> pd.DataFrame:
    import ISLP

    return pd.read_csv(Path(ISLP.__file__).parent / "data" / f"{name}.csv")


def _tabular(name: str, df: pd.DataFrame, y: str, cats: list[str], classify: bool, bs: int, lr: float,
             epochs: int, quick: bool) -> Tabular:
    from fastai.tabular.all import (
        Categorify,
        CategoryBlock,
        CrossEntropyLossFlat,
        MSELossFlat,
        Normalize,
        RandomSplitter,
        RegressionBlock,
        TabularDataLoaders,
    )

    if quick:
        df = df.sample(1500, random_state=0).reset_index(drop=True)
    conts = [c for c in df.columns if c != y and c not in cats]

    def dls(b: int, d: pd.DataFrame):
        valid = list(RandomSplitter(valid_pct=0.2, seed=0)(range(len(d)))[1])
        return TabularDataLoaders.from_df(d, procs=[Categorify, Normalize], cat_names=cats, cont_names=conts,
                                          y_names=y, y_block=CategoryBlock() if classify else RegressionBlock(),
                                          valid_idx=valid, bs=b, seed=0)
    return Tabular(name, df, dls, CrossEntropyLossFlat if classify else MSELossFlat, bs, lr, 2 if quick else epochs)


def holdout_torch_tasks(quick: bool) -> list[Task]:
    tasks = []
    for make in (char_transformer_task, fashion_softmax_task):
        try:
            tasks.append(make(quick))
        except FileNotFoundError as e:
            print(f"skipped a held-out problem: {e}")
    return tasks


def holdout_tabular_tasks(quick: bool) -> list[Tabular]:
    "Default (10,000 card holders: default Yes/No) and Wage (3,000 workers: log wage), fit_one_cycle(5, 1e-2)."
    wage = _islp("Wage").drop(columns=["wage"]).astype({"logwage": "float32"})
    wage_cats = ["maritl", "race", "education", "region", "jobclass", "health", "health_ins"]
    return [_tabular("default_tabular_fastai", _islp("Default"), "default", ["student"], True, 64, 1e-2, 5, quick),
            _tabular("wage_tabular_fastai", wage, "logwage", wage_cats, False, 64, 1e-2, 5, quick)]
