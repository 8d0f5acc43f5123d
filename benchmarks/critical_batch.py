"""The paper's test: the critical batch size from steps-vs-examples, compared with the measured noise scale.

Softmax regression on Fashion-MNIST (60k real images, CPU-cheap), on its top 64 principal
components whitened to unit variance, is trained with
plain SGD to a fixed training loss at batch sizes 16…4096, each with a learning-rate grid
(the best = fewest steps). Whitening matters: B_simple equals the paper's B_noise only when the
Hessian is close to a multiple of the identity; on raw pixels the learning rate is capped by one
stiff direction and the measured B_crit falls far below B_simple.
McCandlish et al. predict (S/S_min - 1)(E/E_min - 1) = 1 with
E = B·S, i.e. S = S_min (1 + B_crit/B); we fit S_min and B_crit by least squares in log S.
The finder then measures B_simple (lr=0) on a checkpoint trained to that target loss, next
to the exact value from every per-example gradient.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from common import cli, exact_noise_scale, markdown, out_path, save_fig
from fashion_mnist import fashion_mnist
from scipy.optimize import least_squares
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find

LR_GRID = [0.025 * 2**k for k in range(13)]  # 0.025 … 102.4


def data(n: int | None, dims: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    "Flattened images projected on their top `dims` principal components, each scaled to unit variance."
    x, y = fashion_mnist(train=True)
    if n is not None:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
        x, y = x[idx], y[idx]
    x = x.reshape(len(x), -1)
    x = x - x.mean(0)
    torch.manual_seed(0)
    _, _, v = torch.pca_lowrank(x[:20_000], q=dims, center=False)
    z = x @ v
    return z / z.std(0), y


def steps_to_target(x, y, x_eval, y_eval, bs: int, lr: float, target: float, max_steps: int, seed: int,
                    model: nn.Module | None = None) -> int | None:
    """SGD steps (batches drawn with replacement) until the eval loss is at or below `target`; None if never.

    The loss is checked every step at first, then every ~3% of the steps so far (cheap, 3% resolution).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model if model is not None else nn.Linear(x.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    next_check = 1
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step >= next_check:
            with torch.no_grad():
                loss = F.cross_entropy(model(x_eval), y_eval).item()
            if not math.isfinite(loss) or loss > 10:
                return None
            if loss <= target:
                return step
            next_check = step + max(1, int(0.03 * step))
    return None


def best_steps(x, y, xe, ye, bs: int, target: float, max_steps: int, seed: int,
               start_lr: float = LR_GRID[0]) -> tuple[int | None, float]:
    """Fewest steps over the lr grid, scanning up from `start_lr` and stopping once larger rates stop helping.

    The best rate grows with the batch size, so each size starts one grid point below the previous best.
    """
    best, best_lr, worse = None, math.nan, 0
    for lr in [r for r in LR_GRID if r >= start_lr * 0.99]:
        s = steps_to_target(x, y, xe, ye, bs, lr, target, max_steps, seed)
        if s is not None and (best is None or s < best):
            best, best_lr, worse = s, lr, 0
        elif best is not None:
            worse += 1
            if worse >= 2:
                break
    return best, best_lr


def fit_hyperbola(bs: np.ndarray, steps: np.ndarray) -> tuple[float, float]:
    "S_min and B_crit from log S = log S_min + log(1 + B_crit/B)."
    def resid(p):
        return p[0] + np.log1p(np.exp(p[1]) / bs) - np.log(steps)
    p = least_squares(resid, x0=[np.log(steps.min()), np.log(np.median(bs))]).x
    return float(np.exp(p[0])), float(np.exp(p[1]))


def plot(df: pd.DataFrame, s_min: float, b_crit: float, b_finder: float, b_exact: float, target: float, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(df.examples, df.steps, "o", label="measured (best lr per batch size)")
    for b, s, e in zip(df.bs, df.steps, df.examples):
        ax.annotate(str(b), (e, s), fontsize=7, xytext=(3, 3), textcoords="offset points")
    bb = np.geomspace(df.bs.min() / 2, df.bs.max() * 2, 200)
    ss = s_min * (1 + b_crit / bb)
    ax.plot(bb * ss, ss, "-", c="C1", label=f"fit (S/S_min-1)(E/E_min-1)=1, B_crit={b_crit:.0f}")
    marks = ((b_crit, "C1", "B_crit"), (b_finder, "C2", "finder B_simple"), (b_exact, "C3", "exact B_simple"))
    for b, c, name in marks:
        s = s_min * (1 + b_crit / b)
        ax.plot(b * s, s, "*", ms=14, c=c, label=f"{name} = {b:.0f}")
    ax.set(xscale="log", yscale="log", xlabel="examples E", ylabel="steps S")
    ax.set_title(f"softmax regression, Fashion-MNIST PCA-64, to loss {target}", fontsize=9)
    ax.legend(fontsize=7)
    save_fig(fig, path)


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    t0 = time.perf_counter()
    if args.quick:
        n, n_eval, batch_sizes, target, max_steps, num_it = 3000, 1000, [16, 64, 256], 1.0, 400, 200
    else:
        n, n_eval, batch_sizes, target, max_steps, num_it = None, 5000, [2**k for k in range(4, 13)], 0.5, 5000, 2000
    x, y = data(n)
    xe, ye = x[:n_eval], y[:n_eval]  # the training loss, estimated on a fixed subset of the training set
    rows, start = [], LR_GRID[0]
    for bs in batch_sizes:
        s, lr = best_steps(x, y, xe, ye, bs, target, max_steps, seed=0, start_lr=start)
        start = lr / 2 if s is not None else start
        rows.append(dict(bs=bs, best_lr=lr, steps=s, examples=None if s is None else s * bs))
        print(f"bs {bs}: {s} steps at lr {lr}")
    df = pd.DataFrame(rows).dropna(subset=["steps"])
    s_min, b_crit = fit_hyperbola(df.bs.to_numpy(float), df.steps.to_numpy(float))

    # A checkpoint at the target loss, trained at bs 64 with its best lr; then measure there.
    lr64 = float(df.set_index("bs").best_lr.get(64, 0.4))
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 10)
    steps_to_target(x, y, xe, ye, 64, lr64, target, max_steps, seed=1, model=model)
    res = bs_find(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                                    generator=torch.Generator().manual_seed(0)),
                  F.cross_entropy, lr=0, num_it=num_it, n_batch=10, beta=0.99)
    exact = exact_noise_scale(model, F.cross_entropy, (x,), y, chunk=2048)
    df["s_min_fit"], df["b_crit_fit"], df["e_min_fit"] = s_min, b_crit, s_min * b_crit
    df["finder_b_simple"], df["exact_b_simple"] = res.noise_scale, exact.b_simple
    df.to_csv(out_path(args, "critical_batch", "csv"), index=False)
    plot(df, s_min, b_crit, res.noise_scale, exact.b_simple, target, out_path(args, "critical_batch", "png"))
    print(f"target training loss {target}; SGD, lr grid {LR_GRID}; finder: lr=0, bs 32, n_batch 10, beta 0.99, "
          f"{num_it} steps at the bs-64 checkpoint")
    print(markdown(df[["bs", "best_lr", "steps", "examples"]]))
    summary = pd.DataFrame([dict(S_min=s_min, E_min=s_min * b_crit, B_crit=b_crit, finder_B_simple=res.noise_scale,
                                 exact_B_simple=exact.b_simple, ratio_finder_to_B_crit=res.noise_scale / b_crit)])
    print(markdown(summary))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
