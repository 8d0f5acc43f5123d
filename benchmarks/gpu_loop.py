"""GPU benchmark, section 3: bs_find's wall time against a plain training loop over the same batches."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from common import mlp, width_for
from gpu_report import BETA, Report
from measure import GPUBatches, cycled, seconds

from gns_widget import bs_find


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
