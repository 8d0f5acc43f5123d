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

Two more ways to measure are timed in the same rotation:
- per_example: the step `bs_find(method="per_example")` takes: `PerExampleNorms` hooks during the
  backward pass, then `norms.pop().mean()`, the squared norm of the gradients and
  `update_norms(small, big, 1, batch)`, with the loss kept until the next step as bs_find keeps it.
  `per_example_norms_pct` times the norm work alone (the hooks' computations replayed on one
  backward pass's saved inputs and output gradients, plus the update).
- accumulation: one block is one gradient-accumulation cycle of k = n_batch micro-batches (loss / k,
  backward, no zeroing, one Adam step at the end), plain against the same cycle with
  `NoiseScaleEstimator(k, accumulated=True).update` after every micro-batch's backward; times are
  per micro-batch.

Their memory is measured, not counted: a `TorchDispatchMode` sees every tensor torch ops create
inside a block and tracks the bytes of those storages still alive after each op; the extra memory
is the difference of the peaks (per-example steps against plain steps; an accumulation cycle with a
fresh estimator, whose buffer is then created inside the block, against a plain cycle). Tensors
alive before the block (parameters, Adam state) are in neither peak.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import pandas as pd
import torch
import torch.nn.functional as F
from common import cli, markdown, mlp, out_path, save_fig, width_for
from measure import PeakBytes
from original_method import OriginalGNS
from torch import Tensor, nn

from gns_widget import NoiseScaleEstimator
from gns_widget.estimator import gradients_of
from gns_widget.norms import squared_norm
from gns_widget.per_example import PerExampleNorms

BS = 64
MAX_ORIGINAL_BYTES = 3e9  # skip the original method where its gradient list alone would exceed this


class _RecordingNorms(PerExampleNorms):
    "PerExampleNorms that also keeps what its hooks computed from, to time that work alone."

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.calls: list[tuple] = []

    def _on_grads(self, parts_of, grads):
        self.calls.append((parts_of, grads))
        super()._on_grads(parts_of, grads)


def linear_input_bytes(model: nn.Module, batch: int) -> int:
    "Bytes of every nn.Linear's input at this batch size (what the per-example hooks keep a reference to)."
    return sum(batch * m.in_features * 4 for m in model.modules() if isinstance(m, nn.Linear))


def time_config(width: int, n_batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = mlp(width)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(BS, 784), torch.randint(0, 10, (BS,))
    ours, orig = NoiseScaleEstimator(n_batch, 0.99), OriginalGNS(n_batch, 0.99)
    per_ex, accum = NoiseScaleEstimator(n_batch, 0.99), NoiseScaleEstimator(n_batch, 0.99, accumulated=True)
    norms = PerExampleNorms(model)
    run_orig = n_batch * param_bytes <= MAX_ORIGINAL_BYTES

    def step(kind: str, est=None) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if kind == "ours":
            ours.update(model, BS)
        elif kind == "original":
            orig.update(model, BS)
        elif kind == "per_example":  # as bs_find(method="per_example") does it
            (est or per_ex).update_norms(norms.pop().mean(), squared_norm(gradients_of(model)), 1, BS)
        opt.step()
        return loss

    def cycle(kind: str, k: int = n_batch, est=None) -> None:
        "One gradient-accumulation cycle of k micro-batches and one optimizer step."
        opt.zero_grad(set_to_none=True)
        for _ in range(k):
            (F.cross_entropy(model(x), y) / k).backward()
            if kind == "accum_ours":
                (est or accum).update(model, BS)
        opt.step()

    def block(kind: str, steps: int = n_batch) -> None:
        if kind.startswith("accum"):
            cycle(kind)
            return
        with norms if kind == "per_example" else nullcontext():
            loss = None
            for _ in range(steps):
                loss = step(kind)  # kept until the next step returns, as bs_find's loop keeps it
            del loss

    kinds = ["plain", "ours"] + (["original"] if run_orig else []) + ["per_example", "accum_plain", "accum_ours"]
    for k in kinds:  # warm-up: allocations (the buffers are created on the first update)
        block(k, min(n_batch, 10))
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order
            t = time.perf_counter()
            block(k)
            times[k].append((time.perf_counter() - t) / n_batch)
    med = {k: float(pd.Series(v).median()) for k, v in times.items()}

    # The extra work alone, on the gradients of one backward pass: far less noisy than a difference of step times.
    rec = _RecordingNorms(model)
    with rec:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        rec.pop()

    def norms_alone() -> None:
        for call in rec.calls:
            PerExampleNorms._on_grads(rec, *call)  # the hooks' work, without recording it again
        per_ex.update_norms(rec.pop().mean(), squared_norm(gradients_of(model)), 1, BS)

    alone = {"ours": lambda: ours.update(model, BS), "accum_ours": lambda: accum.update(model, BS),
             "per_example": norms_alone}
    if run_orig:
        alone["original"] = lambda: orig.update(model, BS)
    upd: dict[str, list[float]] = {k: [] for k in alone}
    for _ in range(max(3, rounds)):
        for k, fn in alone.items():
            t = time.perf_counter()
            for _ in range(n_batch):
                fn()
            upd[k].append((time.perf_counter() - t) / n_batch)
    upd_med = {k: float(pd.Series(v).median()) for k, v in upd.items()}
    window_sqs = 4 * n_batch  # the window's squared norms, float32 scalars kept on the device until its end
    ours_bytes = sum(a.numel() * a.element_size() for a in ours._acc) + window_sqs
    accum_bytes = sum(a.numel() * a.element_size() for a in accum._acc) + window_sqs
    mem = measure_memory(step, cycle, norms, n_batch)
    row = dict(params_M=n_params / 1e6, width=width, n_batch=n_batch, rounds=rounds,
               plain_s=med["plain"], ours_s=med["ours"], ours_overhead_pct=100 * (med["ours"] / med["plain"] - 1),
               ours_update_s=upd_med["ours"], ours_update_pct=100 * upd_med["ours"] / med["plain"],
               original_s=med.get("original", math.nan),
               original_update_pct=100 * upd_med["original"] / med["plain"] if run_orig else math.nan,
               original_overhead_pct=100 * (med["original"] / med["plain"] - 1) if run_orig else math.nan,
               param_MB=param_bytes / 1e6, ours_mem_x_params=ours_bytes / param_bytes,
               original_held_x_params=n_batch if run_orig else math.nan,
               original_peak_x_params=2 * n_batch + 1 if run_orig else math.nan,
               per_example_s=med["per_example"],
               per_example_overhead_pct=100 * (med["per_example"] / med["plain"] - 1),
               per_example_norms_pct=100 * upd_med["per_example"] / med["plain"],
               linear_inputs_MB=linear_input_bytes(model, BS) / 1e6,
               per_example_extra_MB=mem["per_example"] / 1e6,
               per_example_extra_released_MB=mem["per_example_released"] / 1e6,
               per_example_extra_x_params=mem["per_example"] / param_bytes,
               accum_plain_s=med["accum_plain"], accum_ours_s=med["accum_ours"],
               accum_overhead_pct=100 * (med["accum_ours"] / med["accum_plain"] - 1),
               accum_update_pct=100 * upd_med["accum_ours"] / med["accum_plain"],
               accum_buffer_x_params=accum_bytes / param_bytes,
               accum_extra_x_params=mem["accum"] / param_bytes)
    return row


def measure_memory(step, cycle, norms: PerExampleNorms, n_batch: int) -> dict[str, int]:
    """Extra peak bytes over plain training: per-example steps and an accumulation cycle (see the module docstring).

    Per-example: 3 steps each, with the loss kept until the next step returns (as bs_find keeps it) and with
    it released right after the step. Accumulation: a cycle of min(n_batch, 5) micro-batches (the buffer does
    not depend on the cycle length) with a fresh estimator, so its buffer is created inside the measurement.
    """
    def steps(kind: str, keep: bool) -> int:
        with PeakBytes() as m, norms if kind == "per_example" else nullcontext():
            loss = None
            for _ in range(3):
                loss = step(kind, NoiseScaleEstimator(n_batch, 0.99))
                if not keep:
                    loss = None
            del loss
        return m.peak

    def cycle_peak(kind: str) -> int:
        k = min(n_batch, 5)
        with PeakBytes() as m:
            cycle(kind, k, NoiseScaleEstimator(k, 0.99, accumulated=True))
        return m.peak

    plain = steps("plain", keep=True)
    return {"per_example": steps("per_example", keep=True) - plain,
            "per_example_released": steps("per_example", keep=False) - steps("plain", keep=False),
            "accum": cycle_peak("accum_ours") - cycle_peak("accum_plain")}


def plot(df: pd.DataFrame, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 4, figsize=(16, 3.4))
    sz, nb = df[df.sweep == "size"], df[df.sweep == "n_batch"]
    for ax, d, x in ((axs[0], sz, "params_M"), (axs[1], nb, "n_batch")):
        ax.plot(d[x], d.ours_overhead_pct, "o-", c="C0", label="fixed (step-time ratio)")
        ax.plot(d[x], d.ours_update_pct, "o--", c="C0", alpha=0.6, label="fixed (update alone)")
        ax.plot(d[x], d.original_overhead_pct, "s-", c="C1", label="original (2019)")
        ax.plot(d[x], d.per_example_overhead_pct, "^-", c="C2", label="per_example (step-time ratio)")
        ax.plot(d[x], d.per_example_norms_pct, "^--", c="C2", alpha=0.6, label="per_example (norms alone)")
        ax.plot(d[x], d.accum_overhead_pct, "D-", c="C3", label="accumulated (micro-batch ratio)")
        ax.plot(d[x], d.accum_update_pct, "D--", c="C3", alpha=0.6, label="accumulated (update alone)")
        ax.axhline(5, ls=":", c="gray")
        ax.axhline(0, ls="-", c="gray", lw=0.5)
        ax.set(xscale="log", ylabel="time overhead per step, %")
    axs[0].set(xlabel="parameters (M)", title=f"n_batch = k = 20, batch {BS}, Adam")
    axs[1].set(xlabel="n_batch (= accumulation k)", title=f"{nb.params_M.iloc[0]:.1f}M parameters")
    axs[2].plot(nb.n_batch, nb.ours_mem_x_params, "o-", c="C0", label="fixed (counted)")
    axs[2].plot(nb.n_batch, nb.original_peak_x_params, "s-", c="C1", label="original (peak, counted)")
    axs[2].plot(nb.n_batch, nb.accum_extra_x_params, "D--", c="C3", label="accumulated (measured peak)")
    axs[2].axhline(2, ls=":", c="gray")
    axs[2].set(xscale="log", yscale="log", xlabel="n_batch", ylabel="extra memory / parameter memory",
               title="estimator buffers")
    axs[3].plot(sz.params_M, sz.per_example_extra_MB, "^-", c="C2", label="per_example, loss kept (as bs_find)")
    axs[3].plot(sz.params_M, sz.per_example_extra_released_MB, "^--", c="C2", alpha=0.6,
                label="per_example, loss released")
    axs[3].plot(sz.params_M, sz.linear_inputs_MB, "k:", label="inputs of the Linear layers")
    axs[3].plot(sz.params_M, sz.param_MB, "k-", lw=0.5, label="parameters")
    axs[3].set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="MB",
               title=f"per-example extra peak memory, batch {BS}")
    for ax in axs:
        ax.legend(fontsize=6)
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
    print("per_example steps and gradient accumulation (k = n_batch micro-batches; times per micro-batch)")
    cols = ["sweep", "params_M", "n_batch", "plain_s", "per_example_s", "per_example_overhead_pct",
            "per_example_norms_pct", "linear_inputs_MB", "per_example_extra_MB", "per_example_extra_released_MB",
            "per_example_extra_x_params", "accum_plain_s", "accum_ours_s", "accum_overhead_pct", "accum_update_pct",
            "accum_buffer_x_params", "accum_extra_x_params"]
    print(markdown(df[cols]))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
