"""Shared pieces of the benchmarks: the command line, the exact noise scale, the problems, tables and plots.

The exact B_simple = tr(Σ)/|G|² at fixed weights is what every estimate is judged against: it lives once,
in tests/exact.py, for the tests and the benchmarks (every per-example gradient via `torch.func`, summed in
float64).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent
if str(ROOT.parent) not in sys.path:  # `python benchmarks/NAME.py` from a checkout without an install
    sys.path.insert(0, str(ROOT.parent))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fashion_mnist import fashion_mnist  # noqa: E402

from gns_widget import datasets  # noqa: E402
from tests.exact import Exact, exact  # noqa: E402, F401  (Exact: the type exact_noise_scale returns)

RESULTS = ROOT / "results"
CAT_NAMES = ["season", "mnth", "hr", "holiday", "weekday", "workingday", "weathersit"]
CONT_NAMES = ["temp", "atemp", "hum", "windspeed"]


# ---------------------------------------------------------------- command line and output
def cli(description: str, add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`--quick` (tiny sizes, for tests) and `--out DIR`, plus whatever `add_args` adds to the parser.

    Quick results get a `_quick` suffix so they never overwrite the committed ones.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes (< 20 s), to check the script runs")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and PNG (default benchmarks/results)")
    if add_args is not None:
        add_args(p)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # 2 shared cores: one thread gives stable timings
    return args


def out_path(args: argparse.Namespace, name: str, ext: str) -> Path:
    return args.out / f"{name}{'_quick' if args.quick else ''}.{ext}"


def markdown(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    "A markdown table without the `tabulate` dependency."
    def fmt(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else floatfmt.format(v)
        return str(v)
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def save_fig(fig, path: Path) -> None:
    "Lay out, save as a small PNG (committed to the repo: low dpi) and free the figure."
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    import matplotlib.pyplot as plt
    plt.close(fig)


# ---------------------------------------------------------------- the exact noise scale
# One exact answer for tests and benchmarks, tests/exact.py: tr(Σ) over N (the population covariance, what the
# estimator measures with its finite-population correction), not N-1. Here it keeps its benchmark name.
exact_noise_scale = exact


# ---------------------------------------------------------------- problems
@dataclass
class Problem:
    "A model at fixed weights, its training tensors and a mean-reduced loss: what accuracy.py measures."
    name: str
    model: nn.Module
    inputs: tuple[Tensor, ...]
    target: Tensor
    loss_fn: Callable
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.target)

    def loader(self, bs: int, seed: int) -> DataLoader:
        "A shuffled loader whose order depends only on `seed` (paired runs see the same batches)."
        return DataLoader(TensorDataset(*self.inputs, self.target), batch_size=bs, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def split(batch) -> tuple[tuple, tuple]:
        return tuple(batch[:-1]), (batch[-1],)

    def warm_up(self, steps: int, lr: float = 1e-3, bs: int = 64, seed: int = 0) -> None:
        "A few Adam steps so the weights are a realistic early checkpoint rather than the initialisation."
        if steps <= 0:
            return
        opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        it = 0
        while it < steps:
            for b in self.loader(bs, seed + 1000):
                inputs, (y,) = self.split(b)
                opt.zero_grad()
                self.loss_fn(self.model(*inputs), y).backward()
                opt.step()
                it += 1
                if it >= steps:
                    break
        self.model.zero_grad(set_to_none=True)


def mlp(width: int, depth: int = 3, d_in: int = 784, d_out: int = 10) -> nn.Module:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def width_for(params: float, depth: int = 3) -> int:
    "Hidden width giving about `params` parameters for `mlp(width, depth)` on 784 inputs."
    a, b = depth - 1, 784 + 10 + depth  # a·w² + b·w ≈ params
    return int((-b + math.sqrt(b * b + 4 * a * params)) / (2 * a))


def mse_flat(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out.reshape(-1), y.reshape(-1))


def logreg_problem(n: int = 20_000, d: int = 50, seed: int = 0) -> Problem:
    "Binary logistic regression on synthetic Gaussian data (large N: no finite-population effects)."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g) / math.sqrt(d) * 2
    y = (torch.rand(n, generator=g) < torch.sigmoid(x @ w)).float()
    torch.manual_seed(seed)
    model = nn.Linear(d, 1)

    def loss(out: Tensor, t: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(out.reshape(-1), t.reshape(-1))
    return Problem("logreg_synthetic", model, (x,), y, loss, f"synthetic N={n}, d={d}, nn.Linear({d},1), BCE")


def fashion_subset(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    x, y = fashion_mnist(train=True)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def mlp_problem(n: int = 20_000, hidden: int = 128, seed: int = 0) -> Problem:
    "A ReLU MLP on flattened Fashion-MNIST (real images)."
    x, y = fashion_subset(n, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return Problem("mlp_fashion", model, (x.reshape(len(x), -1),), y, F.cross_entropy,
                   f"Fashion-MNIST subset N={n}, MLP 784-{hidden}-10, cross-entropy")


def conv_problem(n: int = 10_000, seed: int = 0) -> Problem:
    "A small conv net on Fashion-MNIST images."
    x, y = fashion_subset(n, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    return Problem("conv_fashion", model, (x,), y, F.cross_entropy,
                   f"Fashion-MNIST subset N={n}, conv(1-8,s2)-conv(8-16,s2)-linear, cross-entropy")


def bikeshare_df() -> pd.DataFrame:
    "Bikeshare with the target y = log1p(bikers); `casual`/`registered` dropped (they sum to the target)."
    df = datasets.bikeshare().drop(columns=["casual", "registered"])
    df["y"] = np.log1p(df.pop("bikers")).astype("float32")
    return df


def bikeshare_dls(bs: int = 64, seed: int = 0, df: pd.DataFrame | None = None):
    "fastai `TabularDataLoaders` over Bikeshare, 20% random validation split."
    from fastai.tabular.all import Categorify, FillMissing, Normalize, RandomSplitter, TabularDataLoaders

    df = bikeshare_df() if df is None else df
    splits = RandomSplitter(valid_pct=0.2, seed=seed)(range(len(df)))
    return TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=CAT_NAMES,
                                      cont_names=CONT_NAMES, y_names="y", valid_idx=list(splits[1]), bs=bs,
                                      seed=seed)


def tabular_problem(seed: int = 0) -> Problem:
    """fastai's TabularModel on Bikeshare, built with ps=0, use_bn=False, bn_cont=False.

    Without BatchNorm or dropout an example's gradient does not depend on the rest of its batch,
    so train mode (what the finder uses) and the per-example computation agree exactly.
    """
    from fastai.tabular.all import TabularModel, get_emb_sz

    dls = bikeshare_dls(64, seed)
    to = dls.train_ds
    cats = torch.tensor(to.cats.values, dtype=torch.long)
    conts = torch.tensor(to.conts.values, dtype=torch.float32)
    y = torch.tensor(to.ys.values, dtype=torch.float32).reshape(-1)
    torch.manual_seed(seed)
    model = TabularModel(get_emb_sz(to), len(CONT_NAMES), 1, layers=[200, 100], ps=0, embed_p=0.0,
                         use_bn=False, bn_final=False, bn_cont=False)
    return Problem("tabular_bikeshare", model, (cats, conts), y, mse_flat,
                   f"Bikeshare N={len(y)}, fastai TabularModel [200,100], ps=0, use_bn=False, bn_cont=False, MSE")
