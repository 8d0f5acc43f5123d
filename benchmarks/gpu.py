"""The finder on one GPU: exactness in fp32/bf16/fp16, step overhead and memory, bs_find's wall time, time to target.

One unattended run (about 5 minutes on an H100/H200), in four sections; a section that fails is
recorded (`gpu_status.csv`) and the next one runs, and every table is written as soon as it has rows:

- exactness: `bs_find(lr=0)` with `fixed`, `per_example` and `sequential` (at lr=0 the same
  measurement as fixed) under `amp` = fp32, bf16 and fp16, on two small problems, against the exact
  B_simple from every per-example gradient (`common.exact_noise_scale`, float64 sums). All runs see
  the same batches, so `vs_fp32_pct` is the effect of the precision alone, free of sampling noise.
- overhead: median time per step and peak memory of a plain training step against the same step
  plus `NoiseScaleEstimator.update` (fixed), per-example norms as `bs_find(method="per_example")`
  takes them (`per_example_ln`: of the normalisation layers' parameters only, the opt-in subset of Gray et
  al. 2024), the 2019 write-up's method (`original_method.py`), and, per micro-batch, a gradient
  accumulation cycle with `accumulated=True` updates against the plain cycle. Two models: a
  nanoGPT-style GPT-2 small (124M parameters, 16×512 tokens, bf16 autocast, fused AdamW) and an MLP
  of about 8M parameters at batch 64 (fp32, Adam), whose 2 ms steps are launch-bound. Blocks of
  n_batch steps are interleaved in rotating order and timed with `torch.cuda.synchronize`; peak
  memory is `torch.cuda.max_memory_allocated` over a few steps of each method with a fresh estimator
  (a whole window for the 2019 method, whose list of gradients peaks at the window's end).
- loop: `bs_find`'s wall time for 1,000 iterations (the MLP, AdamW, batches already on the GPU, no
  memory probe) against a plain loop over the same batches (forward, backward, AdamW step).
- speedup: a conv net on Fashion-MNIST (Debian's `dataset-fashion-mnist`; `--data DIR` elsewhere),
  data preloaded on the GPU, Adam with a one-cycle schedule. The finder runs after one warm-up epoch
  at batch 64 (lr=0, at those weights); its advice (batch size, lr by the square-root rule, epochs)
  is compared with batch 64 over several seeds, and with the advised batch at the batch-64 lr. The
  target is the test accuracy every batch-64 seed reaches (the lowest of their best); time to target
  counts training time only (evaluation after each epoch is left out).

`--quick` runs all four scaled down on the CPU (a tiny GPT, few steps, one seed) to prove the script.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from common import Problem, cli, exact_noise_scale, logreg_problem, markdown, out_path, save_fig
from original_method import OriginalGNS
from overhead import PeakBytes, mlp, width_for
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from gns_widget import NoiseScaleEstimator, bs_find, datasets
from gns_widget.estimator import gradients_of, squared_norm
from gns_widget.per_example import PerExampleNorms, norm_layer_params

SECTIONS = ("exactness", "overhead", "loop", "speedup")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("fixed", "per_example", "sequential")
KINDS = ("plain", "fixed", "per_example", "per_example_ln", "original", "accum_plain", "accumulated")
BETA = 0.99
MAX_KIND_SECONDS = 30  # overhead: stop timing a kind once its blocks took this long (the run must fit in 5 minutes)


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


FULL = Sizes(exact_n=20_000, exact_warm=100, exact_bs=64, exact_num_it=1500, exact_n_batch=20,
             gpt=dict(n_layer=12, n_head=12, d=768, vocab=50304, block=512, batch=16), gpt_rounds=4,
             mlp_params=8e6, mlp_rounds=30, n_batch=20, loop_it=1000, loop_reps=3,
             fm_train=None, fm_test=None, channels=(32, 64, 128), base_epochs=6, seeds=(0, 1, 2),
             finder_it=1000, finder_n_batch=20)
QUICK = Sizes(exact_n=1000, exact_warm=10, exact_bs=32, exact_num_it=30, exact_n_batch=5,
              gpt=dict(n_layer=2, n_head=2, d=32, vocab=64, block=16, batch=4), gpt_rounds=2,
              mlp_params=1e5, mlp_rounds=2, n_batch=3, loop_it=30, loop_reps=1,
              fm_train=1000, fm_test=500, channels=(4, 8, 32), base_epochs=1, seeds=(0,),
              finder_it=50, finder_n_batch=5)


# ---------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    "Wall time of `fn` with the device's queue drained before and after (kernels are asynchronous)."
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def free_memory(device: torch.device) -> None:
    "Give cached CUDA memory back, so peaks measured next start clean (a no-op elsewhere: gc is slow and not needed)."
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak bytes during the block.

    CUDA: `max_memory_allocated`, everything alive (parameters and optimizer state included).
    Elsewhere: the storages torch ops create inside the block (`overhead.PeakBytes`), so only
    differences between methods compare across devices.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        free_memory(self.device)
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = PeakBytes().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._mode.__exit__(*exc)
            self.peak = self._mode.peak


class GPUBatches:
    """Shuffled (x, y) batches sliced from tensors already on the device: no loader work per step.

    Re-iterable with a length, a `dataset` and its own `generator` (which bs_find restores).
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int = 0):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.dataset = TensorDataset(x, y)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
        for s in range(0, len(idx), self.batch_size):
            i = idx[s:s + self.batch_size]
            yield self.x[i], self.y[i]


def cycled(batches: GPUBatches, n: int) -> Iterator[tuple[Tensor, Tensor]]:
    "`n` batches, epoch after epoch."
    while n > 0:
        for b in batches:
            yield b
            n -= 1
            if n == 0:
                return


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


# ---------------------------------------------------------------- report
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
                "median_epochs_to_target", "median_best_acc", "speedup_vs_bs64", "speedup_incl_finder"],
}


# ---------------------------------------------------------------- 1. exactness
def synthetic_mlp_problem(n: int, seed: int = 1) -> Problem:
    "A tanh MLP classifying synthetic Gaussian inputs (test_exactness's second problem)."
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    y = (x[:, :4] @ torch.randn(4, 5, generator=gen) + torch.randn(n, 5, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))
    return Problem("mlp_synthetic", model, (x,), y, F.cross_entropy, f"synthetic N={n}, MLP 16-32-5, cross-entropy")


def exactness(rep: Report) -> None:
    s, dev, rows = rep.sizes, rep.device, []
    for problem in (logreg_problem(n=s.exact_n, d=50), synthetic_mlp_problem(s.exact_n)):
        problem.warm_up(s.exact_warm)  # on the CPU: a realistic early checkpoint rather than the initialisation
        problem.model.to(dev)
        exact = exact_noise_scale(problem.model, problem.loss_fn, [x.to(dev) for x in problem.inputs],
                                  problem.target.to(dev)).b_simple
        rep.note("exactness", f"{problem.name}: {problem.note}; exact B_simple {exact:.4g}")
        for precision, amp in PRECISIONS.items():
            for method in METHODS:
                t, note, est, skipped = time.perf_counter(), "", math.nan, 0
                try:
                    res = bs_find(problem.model, problem.loader(s.exact_bs, seed=0), problem.loss_fn, lr=0,
                                  num_it=s.exact_num_it, n_batch=s.exact_n_batch, beta=BETA, device=dev,
                                  method=method, batch_fn=problem.split, amp=amp, probe_memory=False)
                    est, skipped = res.noise_scale, res.n_skipped
                except Exception as e:
                    note = f"failed: {type(e).__name__}: {e}"
                rows.append(dict(problem=problem.name, exact=exact, precision=precision, method=method, estimate=est,
                                 rel_error_pct=100 * (est / exact - 1), n_skipped=skipped,
                                 seconds=time.perf_counter() - t, note=note))
            rep.save("exactness", with_vs_fp32(rows))
    df = rep.save("exactness", with_vs_fp32(rows))
    worst = df.groupby("precision").rel_error_pct.apply(lambda v: v.abs().max())
    rep.note("exactness", f"bs {s.exact_bs}, n_batch {s.exact_n_batch}, beta {BETA}, {s.exact_num_it} steps at lr=0; "
             "largest |error| vs exact: " + ", ".join(f"{k} {v:.2f}%" for k, v in worst.items()))


def with_vs_fp32(rows: list[dict]) -> pd.DataFrame:
    "Each estimate relative to the fp32 one of the same problem and method (same batches: the precision's effect)."
    df = pd.DataFrame(rows)
    ref = df[df.precision == "fp32"].set_index(["problem", "method"]).estimate
    key = pd.MultiIndex.from_frame(df[["problem", "method"]])
    df["vs_fp32_pct"] = 100 * (df.estimate.to_numpy() / ref.reindex(key).to_numpy() - 1)
    return df


# ---------------------------------------------------------------- 2. overhead
class SelfAttention(nn.Module):
    "Causal multi-head attention as nanoGPT writes it (fused qkv projection, scaled_dot_product_attention)."

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head, self.c_attn, self.c_proj = n_head, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), SelfAttention(d, n_head), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    "nanoGPT's GPT-2: token and position embeddings (`wpe(arange(T))`), pre-norm blocks, lm_head tied to wte."

    def __init__(self, n_layer: int, n_head: int, d: int, vocab: int, block: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # nanoGPT's init: residual projections scaled down by depth
            if p.dim() > 1:
                residual = name.endswith(("c_proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer) if residual else 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def token_loss(logits: Tensor, y: Tensor) -> Tensor:
    "Mean next-token cross-entropy: each sequence's mean, averaged over the batch."
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@dataclass
class Workload:
    "One model, one fixed batch on the device, its loss, optimizer and precision: what a step is timed on."
    name: str
    setup: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss_fn: Callable
    opt: torch.optim.Optimizer
    amp: torch.dtype | None
    device: torch.device

    @property
    def bs(self) -> int:
        return len(self.x)

    def loss(self) -> Tensor:
        with autocast(self.device, self.amp):
            return self.loss_fn(self.model(self.x), self.y)


def gpt_workload(cfg: dict, device: torch.device) -> Workload:
    torch.manual_seed(0)
    model = GPT(cfg["n_layer"], cfg["n_head"], cfg["d"], cfg["vocab"], cfg["block"]).to(device)
    tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["block"] + 1), device=device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **fused)
    setup = f"GPT {cfg['n_layer']}×{cfg['d']}, {cfg['batch']}×{cfg['block']} tokens, bf16, {type(opt).__name__}"
    setup += " (fused)" if fused else ""
    return Workload("gpt", setup, model, tokens[:, :-1], tokens[:, 1:], token_loss, opt, torch.bfloat16, device)


def mlp_workload(params: float, device: torch.device) -> Workload:
    torch.manual_seed(0)
    width = width_for(params)
    model = mlp(width).to(device)
    x, y = torch.randn(64, 784, device=device), torch.randint(0, 10, (64,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return Workload("mlp", f"MLP 784-{width}×3-10, batch 64, fp32, Adam", model, x, y, F.cross_entropy, opt, None,
                    device)


class Stepper:
    "A plain step, and the same step with each method attached (as overhead.py's, on any device and precision)."

    def __init__(self, w: Workload, n_batch: int):
        self.w, self.n_batch = w, n_batch
        self._norms: dict[str, PerExampleNorms] = {}

    def norms(self, kind: str) -> PerExampleNorms:
        """Per-example norms of every parameter, or of the normalisation layers' only (`per_example_ln`,
        Gray et al. 2024). Built on first use: a model per_example refuses fails that kind alone."""
        if kind not in self._norms:
            params = norm_layer_params(self.w.model) if kind == "per_example_ln" else None
            self._norms[kind] = PerExampleNorms(self.w.model, params)
        return self._norms[kind]

    def fresh(self, kind: str):
        "A new estimator for `kind` (None for the plain kinds)."
        nb = self.n_batch
        return {"fixed": lambda: NoiseScaleEstimator(nb, BETA),
                "per_example": lambda: NoiseScaleEstimator(nb, BETA ** (1 / nb)),
                "per_example_ln": lambda: NoiseScaleEstimator(nb, BETA ** (1 / nb)),
                "accumulated": lambda: NoiseScaleEstimator(nb, BETA, accumulated=True),
                "original": lambda: OriginalGNS(nb, BETA)}.get(kind, lambda: None)()

    def step(self, kind: str, est) -> Tensor:
        w = self.w
        w.opt.zero_grad(set_to_none=True)
        loss = w.loss()
        loss.backward()
        if kind in ("fixed", "original"):
            est.update(w.model, w.bs)
        elif kind.startswith("per_example"):  # as bs_find(method="per_example") does it
            norms = self.norms(kind)
            est.update_norms(norms.pop().mean(), squared_norm(gradients_of(norms.params)), 1, w.bs)
        w.opt.step()
        return loss

    def block(self, kind: str, est, steps: int | None = None) -> None:
        "n_batch steps (one window), or one accumulation cycle of n_batch micro-batches."
        w, steps = self.w, steps or self.n_batch
        if kind in ("accum_plain", "accumulated"):
            w.opt.zero_grad(set_to_none=True)
            for _ in range(steps):
                (w.loss() / steps).backward()
                if est is not None:
                    est.update(w.model, w.bs)
            w.opt.step()
            return
        with self.norms(kind) if kind.startswith("per_example") else nullcontext():
            loss = None
            for _ in range(steps):
                loss = self.step(kind, est)  # kept until the next step returns, as a training loop keeps it
            del loss


def measure_overhead(w: Workload, n_batch: int, rounds: int, log: Callable[[str], None]) -> list[dict]:
    "Median ms per step (per micro-batch for accumulation) and peak memory of every kind that runs on `w`."
    dev, st = w.device, Stepper(w, n_batch)
    param_bytes = sum(p.numel() * p.element_size() for p in w.model.parameters())
    notes: dict[str, str] = {}
    kinds = list(KINDS)
    if dev.type == "cuda" and (2 * n_batch + 1) * param_bytes > 0.8 * torch.cuda.mem_get_info(dev)[0]:
        kinds.remove("original")
        notes["original"] = f"skipped: its {2 * n_batch + 1}× parameter copies would not fit"
    if not norm_layer_params(w.model):
        kinds.remove("per_example_ln")
        notes["per_example_ln"] = "n/a: no normalisation layers"
    st.block("plain", None, 2)  # the optimizer's state, before anything is measured
    peaks: dict[str, int] = {}
    for kind in list(kinds):  # warm-up and memory, each kind with a fresh estimator
        try:
            st.block(kind, st.fresh(kind), min(n_batch, 3))
            with PeakMemory(dev) as m:  # the original's list peaks at a window's end; the others' at their first step
                st.block(kind, st.fresh(kind), n_batch if kind == "original" else min(n_batch, 3))
            peaks[kind] = m.peak
        except Exception as e:
            kinds.remove(kind)
            notes[kind] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            w.opt.zero_grad(set_to_none=True)
            free_memory(dev)
        log(f"{w.name} {kind}: {notes.get(kind, 'ran')}")
    ests = {k: st.fresh(k) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order
            if sum(times[kind]) * n_batch > MAX_KIND_SECONDS:  # a very slow kind keeps the blocks it has
                continue
            times[kind].append(seconds(partial(st.block, kind, ests[kind]), dev) / n_batch)
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    rows = []
    for kind in KINDS:
        base = "accum_plain" if kind.startswith("accum") else "plain"
        ok = kind in ms and base in ms
        rows.append(dict(model=w.name, params_M=param_bytes / 4e6, setup=w.setup, kind=kind, n_batch=n_batch,
                         rounds=rounds, ms_per_step=ms.get(kind, math.nan),
                         overhead_pct=100 * (ms[kind] / ms[base] - 1) if ok else math.nan,
                         peak_MB=peaks[kind] / 1e6 if kind in peaks else math.nan,
                         extra_peak_MB=(peaks[kind] - peaks[base]) / 1e6 if kind in peaks and base in peaks
                         else math.nan, note=notes.get(kind, "")))
        rows[-1]["extra_peak_pct"] = 100 * rows[-1]["extra_peak_MB"] / (peaks.get(base, math.nan) / 1e6)
    return rows


def overhead(rep: Report) -> None:
    s, dev, rows = rep.sizes, rep.device, []
    for name, make, rounds in (("gpt", lambda: gpt_workload(s.gpt, dev), s.gpt_rounds),
                               ("mlp", lambda: mlp_workload(s.mlp_params, dev), s.mlp_rounds)):
        try:
            w = make()
            rows += measure_overhead(w, s.n_batch, rounds, rep.log)
        except Exception as e:
            rep.note("overhead", f"{name} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
        w = None
        free_memory(dev)
        if rows:
            rep.save("overhead", rows)
    if not rows:
        raise RuntimeError("no model could be measured")
    rep.note("overhead", f"n_batch = accumulation k = {s.n_batch}; medians over {s.gpt_rounds} (GPT) and "
             f"{s.mlp_rounds} (MLP) interleaved blocks; accumulation kinds per micro-batch, against accum_plain; "
             f"peak memory {'max_memory_allocated' if dev.type == 'cuda' else 'of storages created in the block'}")


# ---------------------------------------------------------------- 3. bs_find against a plain loop
def loop(rep: Report) -> None:
    s, dev, lr = rep.sizes, rep.device, 1e-3
    torch.manual_seed(0)
    model = mlp(width_for(s.mlp_params)).to(dev)
    n = 256 * 64
    data = GPUBatches(torch.randn(n, 784, device=dev), torch.randint(0, 10, (n,), device=dev), 64)

    def adamw(params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr)

    def plain(num_it: int) -> None:
        opt = adamw(model.parameters())
        for x, y in cycled(data, num_it):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def finder(method: str) -> Callable[[int], object]:
        return lambda num_it: bs_find(model, data, F.cross_entropy, lr=lr, num_it=num_it, n_batch=s.n_batch,
                                      beta=BETA, opt=adamw, device=dev, method=method, probe_memory=False)

    variants = {"plain loop": plain, "bs_find fixed": finder("fixed"), "bs_find per_example": finder("per_example")}
    for fn in variants.values():  # warm-up
        fn(2 * s.n_batch)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(s.loop_reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(seconds(partial(variants[name], s.loop_it), dev))
    med = {k: float(np.median(v)) for k, v in times.items()}
    rep.save("loop", [dict(variant=k, iterations=s.loop_it, reps=s.loop_reps, seconds=v, ms_per_it=1e3 * v / s.loop_it,
                           x_plain=v / med["plain loop"], note="") for k, v in med.items()])
    rep.note("loop", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter MLP, batch 64, AdamW lr {lr}, "
             f"batches on the device; bs_find with n_batch {s.n_batch}, no memory probe (fixed steps once per "
             "window, the plain loop every batch); medians over reps")


# ---------------------------------------------------------------- 4. time to target accuracy
BASE_BS, BASE_LR = 64, 2e-3


def conv_net(c1: int, c2: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(c2 * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def fashion_on(device: torch.device, path: Path, n_train: int | None, n_test: int | None):
    "Normalised Fashion-MNIST train and test tensors on the device (a seeded subset when sizes are given)."
    try:
        (xt, yt), (xv, yv) = datasets.fashion_mnist(True, path), datasets.fashion_mnist(False, path)
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
            for e, secs, acc in train(model, GPUBatches(xt, yt, bs, seed), test, lr, epochs, dev):
                runs.append(dict(config=name, bs=bs, lr=lr, epoch_budget=epochs, seed=seed, epoch=e, seconds=secs,
                                 test_acc=acc))
            rep.log(f"speedup {name} seed {seed}: test accuracy {acc:.4f} after {secs:.1f} s")
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
                            epochs=hit.epoch.iloc[0] if len(hit) else math.nan, best_acc=d.test_acc.max()))
    g = pd.DataFrame(per_run).groupby("config", sort=False)
    out = g.agg(bs=("bs", "first"), lr=("lr", "first"), epoch_budget=("epoch_budget", "first"),
                seeds=("seed", "nunique"), reached=("reached", "sum"), median_seconds_to_target=("to_target", "median"),
                median_epochs_to_target=("epochs", "median"), median_best_acc=("best_acc", "median")).reset_index()
    base = out.median_seconds_to_target.iloc[0]
    out["speedup_vs_bs64"] = base / out.median_seconds_to_target
    out["speedup_incl_finder"] = base / (out.median_seconds_to_target + finder_s * (out.config != "bs64"))
    out.insert(1, "target_acc", target)
    out["noise_scale"], out["finder_seconds"] = noise_scale, finder_s
    return out


# ---------------------------------------------------------------- plot and main
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


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which sections to run")
    p.add_argument("--device", default=None, help="default: cuda (the CPU with --quick)")
    p.add_argument("--data", type=Path, default=datasets.FASHION_MNIST_DIR,
                   help="folder with Fashion-MNIST's IDX .gz files (default: Debian's)")


def main() -> None:
    args = cli(__doc__.splitlines()[0], add_args)
    device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the full run needs a GPU; `--quick` runs it scaled down on the CPU")
    rep = Report(args, device, QUICK if args.quick else FULL)
    rep.log(f"{rep.device_text()}; sections {', '.join(args.sections)}; writing to {args.out}")
    fns = {"exactness": exactness, "overhead": overhead, "loop": loop, "speedup": speedup}
    for name in args.sections:
        rep.section(name, fns[name])
    rep.write()
    print(rep.markdown())
    if any(s["status"] == "failed" for s in rep.status):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
