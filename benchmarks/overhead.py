"""Per-step time and memory cost of attaching the noise-scale estimator to training.

Plain training steps (forward, backward, Adam step) are timed in blocks interleaved with the
same steps plus `NoiseScaleEstimator.update` and plus the 2019 write-up's method, so a busy
shared machine slows all three alike; each block is one window of n_batch steps (window-end
work included) and the median over blocks is reported. Memory is counted from the buffers
each method holds: ours one running sum the size of the parameters, the original a list of
n_batch flat gradients (plus a stacked copy of them while it takes their mean).

On a shared CPU the difference of two step times is noisy (a few %), so the update's own
cost is also timed alone on one backward pass's gradients (`*_update_pct` = its share of a
plain step): the extra work per step without the noise of timing the whole step twice.
"""
from __future__ import annotations

import math
import time

import pandas as pd
import torch
import torch.nn.functional as F
from common import cli, markdown, out_path, save_fig
from original_method import OriginalGNS
from torch import nn

from gns_widget import NoiseScaleEstimator

BS = 64
MAX_ORIGINAL_BYTES = 3e9  # skip the original method where its gradient list alone would exceed this


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


def time_config(width: int, n_batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = mlp(width)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(BS, 784), torch.randint(0, 10, (BS,))
    ours, orig = NoiseScaleEstimator(n_batch, 0.99), OriginalGNS(n_batch, 0.99)
    run_orig = n_batch * param_bytes <= MAX_ORIGINAL_BYTES

    def step(kind: str) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if kind == "ours":
            ours.update(model, BS)
        elif kind == "original":
            orig.update(model, BS)
        opt.step()

    kinds = ["plain", "ours"] + (["original"] if run_orig else [])
    for k in kinds:  # warm-up: allocations (the buffers are created on the first update)
        for _ in range(min(n_batch, 10)):
            step(k)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order
            t = time.perf_counter()
            for _ in range(n_batch):
                step(k)
            times[k].append((time.perf_counter() - t) / n_batch)
    med = {k: float(pd.Series(v).median()) for k, v in times.items()}
    # The extra work alone, on the gradients of one backward pass: far less noisy than a difference of step times.
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    upd: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    for _ in range(max(3, rounds)):
        for k, est in (("ours", ours), ("original", orig))[:len(kinds) - 1]:
            t = time.perf_counter()
            for _ in range(n_batch):
                est.update(model, BS)
            upd[k].append((time.perf_counter() - t) / n_batch)
    upd_med = {k: float(pd.Series(v).median()) for k, v in upd.items()}
    ours_bytes = sum(a.numel() * a.element_size() for a in ours._acc) + ours._sq.element_size()
    row = dict(params_M=n_params / 1e6, width=width, n_batch=n_batch, rounds=rounds,
               plain_s=med["plain"], ours_s=med["ours"], ours_overhead_pct=100 * (med["ours"] / med["plain"] - 1),
               ours_update_s=upd_med["ours"], ours_update_pct=100 * upd_med["ours"] / med["plain"],
               original_s=med.get("original", math.nan),
               original_update_pct=100 * upd_med["original"] / med["plain"] if run_orig else math.nan,
               original_overhead_pct=100 * (med["original"] / med["plain"] - 1) if run_orig else math.nan,
               param_MB=param_bytes / 1e6, ours_mem_x_params=ours_bytes / param_bytes,
               original_held_x_params=n_batch if run_orig else math.nan,
               original_peak_x_params=2 * n_batch + 1 if run_orig else math.nan)
    return row


def plot(df: pd.DataFrame, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(12, 3.2))
    sz = df[df.sweep == "size"]
    axs[0].plot(sz.params_M, sz.ours_overhead_pct, "o-", label="ours (step-time ratio)")
    axs[0].plot(sz.params_M, sz.ours_update_pct, "o--", c="C0", alpha=0.6, label="ours (update alone)")
    axs[0].plot(sz.params_M, sz.original_overhead_pct, "s-", label="original (2019)")
    axs[0].axhline(5, ls=":", c="gray")
    axs[0].set(xscale="log", xlabel="parameters (M)", ylabel="time overhead per step, %",
               title=f"n_batch=20, batch {BS}, Adam")
    nb = df[df.sweep == "n_batch"]
    axs[1].plot(nb.n_batch, nb.ours_overhead_pct, "o-", label="ours (step-time ratio)")
    axs[1].plot(nb.n_batch, nb.ours_update_pct, "o--", c="C0", alpha=0.6, label="ours (update alone)")
    axs[1].plot(nb.n_batch, nb.original_overhead_pct, "s-", label="original (2019)")
    axs[1].set(xscale="log", xlabel="n_batch", title=f"{nb.params_M.iloc[0]:.1f}M parameters")
    axs[2].plot(nb.n_batch, nb.ours_mem_x_params, "o-", label="ours")
    axs[2].plot(nb.n_batch, nb.original_peak_x_params, "s-", label="original (peak)")
    axs[2].axhline(2, ls=":", c="gray")
    axs[2].set(xscale="log", yscale="log", xlabel="n_batch", ylabel="extra memory / parameter memory",
               title="estimator buffers")
    for ax in axs:
        ax.legend(fontsize=8)
    save_fig(fig, path)


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    t0 = time.perf_counter()
    if args.quick:
        size_cfg = [(width_for(1e5), 5, 3)]
        nb_cfg = [(width_for(1e5), nb, 3) for nb in (5, 10)]
    else:
        size_cfg = [(width_for(p), 20, r) for p, r in ((1e5, 9), (1e6, 5), (10e6, 3), (25e6, 2))]
        nb_cfg = [(width_for(10e6), nb, r) for nb, r in ((5, 6), (100, 1))]
    rows = []
    for c in size_cfg:
        rows.append(dict(sweep="size", **time_config(*c)))
        print(f"  size {rows[-1]['params_M']:.1f}M done at {time.perf_counter() - t0:.0f} s", flush=True)
    for c in nb_cfg:
        rows.append(dict(sweep="n_batch", **time_config(*c)))
        print(f"  n_batch {c[1]} done at {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.quick:  # n_batch 20 at 10M is the size sweep's row: reuse it rather than time it twice
        rows.append(dict(rows[2], sweep="n_batch"))
    df = pd.DataFrame(rows).sort_values(["sweep", "params_M", "n_batch"], ascending=[False, True, True])
    df.to_csv(out_path(args, "overhead", "csv"), index=False)
    plot(df, out_path(args, "overhead", "png"))
    print(f"median seconds per training step (batch {BS}, Adam, 1 thread), blocks of n_batch steps interleaved")
    cols = ["sweep", "params_M", "n_batch", "plain_s", "ours_s", "ours_overhead_pct", "ours_update_pct", "original_s",
            "original_overhead_pct", "original_update_pct", "param_MB", "ours_mem_x_params", "original_held_x_params",
            "original_peak_x_params"]
    print(markdown(df[cols]))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
