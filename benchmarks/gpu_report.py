"""benchmarks/gpu.py's frame: its sizes, the report its four sections write into, and its plot."""
from __future__ import annotations

import argparse
import datetime
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import markdown, out_path, save_fig
from measure import free_memory

SECTIONS = ("exactness", "overhead", "loop", "speedup")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BETA = 0.99


@dataclass(frozen=True)
class Sizes:
    "Everything that differs between the full GPU run and `--quick`."
    exact_n: int
    exact_warm: int  # Adam steps before the weights are fixed
    exact_bs: int
    exact_num_it: int
    exact_n_batch: int
    gpt: dict
    gpt_rounds: int
    mlp_params: float
    mlp_rounds: int
    n_batch: int
    loop_it: int
    loop_reps: int
    fm_train: int | None  # Fashion-MNIST subset sizes (None: all)
    fm_test: int | None
    channels: tuple[int, int, int]
    base_epochs: int
    seeds: tuple[int, ...]
    finder_it: int
    finder_n_batch: int


class SkipSection(Exception):
    "A section that cannot run here (data absent): reported as skipped, not failed."


class Report:
    "Each section's tables and status; the CSVs, the markdown and the PNG are rewritten after every change."

    def __init__(self, args: argparse.Namespace, device: torch.device, sizes: Sizes):
        self.args, self.device, self.sizes = args, device, sizes
        self.tables: dict[str, pd.DataFrame] = {}
        self.notes: dict[str, list[str]] = {s: [] for s in SECTIONS}
        self.status: list[dict] = []
        self.t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", flush=True)

    def note(self, section: str, text: str) -> None:
        self.notes[section].append(text)
        self.log(f"{section}: {text}")

    def save(self, name: str, rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
        df = pd.DataFrame(rows)
        self.tables[name] = df
        df.to_csv(out_path(self.args, f"gpu_{name}", "csv"), index=False)
        return df

    def section(self, name: str, fn: Callable[[Report], None]) -> None:
        self.log(f"{name}: start")
        t, status, message = time.perf_counter(), "ok", ""
        try:
            fn(self)
        except SkipSection as e:
            status, message = "skipped", str(e)
        except Exception as e:  # recorded; the next section still runs
            status, message = "failed", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        free_memory(self.device)
        self.status.append(dict(section=name, status=status, seconds=round(time.perf_counter() - t, 1),
                                message=message[:500]))
        self.log(f"{name}: {status} {message}")
        self.save("status", self.status)
        self.write(plot=not self.args.quick)  # quick runs plot once, at the end

    def device_text(self) -> str:
        if self.device.type != "cuda":
            return f"{self.device.type} (torch {torch.__version__})"
        p = torch.cuda.get_device_properties(self.device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB (torch {torch.__version__}, CUDA {torch.version.cuda})"

    def markdown(self) -> str:
        "Device, section status, then each section's tables and notes."
        lines = [f"# GPU benchmark{' (--quick)' if self.args.quick else ''}", "",
                 f"{self.device_text()}; {datetime.date.today()}; {time.perf_counter() - self.t0:.0f} s in all.", ""]
        if self.status:
            lines += [markdown(pd.DataFrame(self.status)), ""]
        for section in SECTIONS:
            for name, cols in TABLES.items():
                df = self.tables.get(name)
                if name.startswith(section) and df is not None and len(df):
                    lines += [f"## {name}", "", markdown(df[[c for c in cols if c in df]]), ""]
            if self.notes[section]:
                lines += [f"- {section}: {n}" for n in self.notes[section]] + [""]
        return "\n".join(lines)

    def write(self, plot: bool = True) -> None:
        "The markdown file and, with `plot`, the PNG (from every table so far)."
        out_path(self.args, "gpu", "md").write_text(self.markdown() + "\n")
        if not plot:
            return
        try:
            plot_tables(self.tables, out_path(self.args, "gpu", "png"))
        except Exception as e:  # a plot must not cost the numbers
            self.log(f"plot failed: {type(e).__name__}: {e}")


TABLES = {
    "exactness": ["problem", "exact", "precision", "method", "estimate", "rel_error_pct", "vs_fp32_pct", "n_skipped",
                  "seconds", "note"],
    "overhead": ["model", "params_M", "setup", "kind", "ms_per_step", "overhead_pct", "peak_MB", "extra_peak_MB",
                 "extra_peak_pct", "note"],
    "loop": ["variant", "iterations", "seconds", "ms_per_it", "x_plain", "note"],
    "speedup": ["config", "bs", "lr", "epoch_budget", "seeds", "reached", "median_seconds_to_target",
                "median_epochs_to_target", "median_steps_to_target", "median_best_acc", "speedup_vs_bs64",
                "steps_vs_bs64", "speedup_incl_finder"],
}


def plot_tables(tables: dict[str, pd.DataFrame], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 4, figsize=(18, 3.6))
    ex = tables.get("exactness")
    if ex is not None and len(ex):
        labels = [f"{p[:6]}\n{m[:6]}" for p, m in ex[["problem", "method"]].drop_duplicates().itertuples(index=False)]
        for i, prec in enumerate(PRECISIONS):
            d = ex[ex.precision == prec]
            axs[0].bar(np.arange(len(d)) + 0.27 * (i - 1), d.rel_error_pct, 0.27, label=prec)
        axs[0].set_xticks(range(len(labels)), labels, fontsize=6)
        axs[0].axhline(0, c="gray", lw=0.5)
        axs[0].set(ylabel="error vs exact B_simple, %", title="exactness, lr=0")
        axs[0].legend(fontsize=7)
    ov = tables.get("overhead")
    if ov is not None and len(ov):
        d = ov[~ov.kind.isin(["plain", "accum_plain"])]
        models = list(dict.fromkeys(d.model))
        kinds = list(dict.fromkeys(d.kind))
        for i, model in enumerate(models):
            m = d[d.model == model].set_index("kind").reindex(kinds)
            axs[1].bar(np.arange(len(kinds)) + 0.4 * i, m.overhead_pct, 0.4, label=model)
            axs[2].bar(np.arange(len(kinds)) + 0.4 * i, m.extra_peak_pct, 0.4, label=model)
        for ax in axs[1:3]:
            ax.set_xticks(np.arange(len(kinds)) + 0.2, kinds, fontsize=7)
            ax.axhline(0, c="gray", lw=0.5)
            ax.legend(fontsize=7)
        axs[1].axhline(5, ls=":", c="gray")
        axs[1].set(ylabel="time per step over plain, %", title="step overhead")
        axs[2].set(ylabel="extra peak memory, % of the plain peak", title="peak memory")
    runs = tables.get("speedup_runs")
    if runs is not None and len(runs):
        for i, (config, d) in enumerate(runs.groupby("config", sort=False)):
            for j, (_, r) in enumerate(d.groupby("seed")):
                axs[3].plot(r.seconds, r.test_acc, "o-", c=f"C{i}", ms=3, label=config if j == 0 else None)
        sp = tables.get("speedup")
        if sp is not None and len(sp):
            axs[3].axhline(sp.target_acc.iloc[0], ls=":", c="gray", label="target")
        axs[3].set(xlabel="training seconds", ylabel="test accuracy", title="Fashion-MNIST conv net")
        axs[3].legend(fontsize=7)
    save_fig(fig, path)
