"""GPU benchmark, section 2: time per step and peak memory of each way to measure, on GPT-2 small and an MLP.

The GPT is tests/gpt.py's, the one the tests use too.
"""
from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from common import mlp, width_for
from gpu_report import BETA, Report
from measure import PeakMemory, autocast, free_memory, seconds
from original_method import OriginalGNS
from torch import Tensor, nn

from gns_widget import NoiseScaleEstimator
from gns_widget.estimator import gradients_of
from gns_widget.norms import squared_norm
from gns_widget.per_example import PerExampleNorms, norm_layer_params
from tests.gpt import GPT, next_token_loss

KINDS = ("plain", "fixed", "per_example", "per_example_ln", "original", "accum_plain", "accumulated")
MAX_KIND_SECONDS = 30  # stop timing a kind once its blocks took this long (the whole run must fit in 5 minutes)


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
    return Workload("gpt", setup, model, tokens[:, :-1], tokens[:, 1:], next_token_loss, opt, torch.bfloat16, device)


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
