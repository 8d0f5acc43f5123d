"""GPU benchmark, section 1: `bs_find(lr=0)` per method and precision against the exact B_simple."""
from __future__ import annotations

import math
import time

import pandas as pd
import torch
import torch.nn.functional as F
from common import Problem, exact_noise_scale, logreg_problem
from gpu_report import BETA, PRECISIONS, Report
from torch import nn

from gns_widget import bs_find

METHODS = ("fixed", "per_example", "sequential")


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
