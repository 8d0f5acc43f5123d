"""Real data that ships inside installed packages, so demos and tests need no download.

- `digits`: scikit-learn's bundled UCI 8x8 handwritten digits (1,797 images), always present.
- `bikeshare`: hourly bike rentals, Washington DC 2011, from the ISLP package's CSV (the fastai tabular notebook).

Fashion-MNIST, which only the benchmarks use, is read by `benchmarks/fashion_mnist.py`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, TensorDataset

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["digits", "digits_loaders", "bikeshare"]


def _split(x: torch.Tensor, y: torch.Tensor, valid_pct: float, seed: int):
    if not 0 <= valid_pct < 1:
        raise ValueError(f"valid_pct must be in [0, 1), got {valid_pct!r}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_valid = int(len(x) * valid_pct)
    valid, train = perm[:n_valid], perm[n_valid:]
    return x[train], y[train], x[valid], y[valid]


def digits(valid_pct: float = 0.2, seed: int = 0):
    "(x_train, y_train, x_valid, y_valid): 8x8 digits flattened to 64 floats in [0, 1], labels 0–9."
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x, y, valid_pct, seed)


def digits_loaders(bs: int = 64, valid_pct: float = 0.2, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    "Shuffled training and plain validation `DataLoader`s over `digits`."
    xt, yt, xv, yv = digits(valid_pct, seed)
    return (DataLoader(TensorDataset(xt, yt), batch_size=bs, shuffle=True),
            DataLoader(TensorDataset(xv, yv), batch_size=bs * 2))


def bikeshare() -> pd.DataFrame:
    "Hourly bike rentals (8,645 rows): weather, calendar and the `bikers` count to predict."
    import pandas as pd

    spec = importlib.util.find_spec("ISLP")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "Bikeshare.csv" if spec else None
    if csv is None or not csv.exists():
        raise FileNotFoundError("Bikeshare data not found: install it with `pip install --no-deps islp==0.6.0` "
                                "(--no-deps avoids its heavy extras)")
    return pd.read_csv(csv)
