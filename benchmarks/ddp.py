"""Per-step cost of measuring the noise scale under DistributedDataParallel, on 2 gloo ranks.

Three ways to take the same training step (forward, backward, all-reduce, Adam step) on
identical model copies, timed in interleaved blocks so a busy machine slows all alike:
- plain: DDP as usual;
- hook: DDP with `DDPNoiseScale` (a comm hook squares each bucket's local norm, then one
  all-reduce of two scalars and one host sync per step in `update`);
- finder: what `bs_find` does under DDP, backward under `no_sync()` then `allreduce_measured`
  (its own coalesced all-reduce instead of DDP's overlapped buckets).
Adam runs at lr=0 (all of its work, weights unchanged), so the hook's and the finder's estimates
come from the same gradients and must agree (`hook_vs_finder_rel_diff`). The script starts its
two ranks itself (no torchrun needed); each uses one thread.
"""
from __future__ import annotations

import itertools
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import cli, markdown, mlp, out_path, save_fig, width_for
from torch.nn.parallel import DistributedDataParallel as DDP

from gns_widget import NoiseScaleEstimator
from gns_widget.ddp import DDPNoiseScale, allreduce_measured

BS = 64  # per rank
POOL = 8  # batches per rank, cycled
KINDS = ("plain", "hook", "finder")


def _worker(rank: int, port: int, out: str, sizes: list[float], rounds: int, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    rows = []
    try:
        for params in sizes:
            rows.append(_time_size(rank, params, rounds, steps))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        pd.DataFrame(rows).to_csv(out, index=False)


def _time_size(rank: int, params: float, rounds: int, steps: int) -> dict:
    width = width_for(params)
    models = {}
    for kind in KINDS:  # identical copies, so the three kinds do the same arithmetic
        torch.manual_seed(0)
        models[kind] = DDP(mlp(width))
    # lr=0: Adam does all its work but the weights stay put, so hook and finder measure the same gradients
    opts = {k: torch.optim.Adam(m.parameters(), lr=0.0) for k, m in models.items()}
    gns = DDPNoiseScale(models["hook"], beta=0.99)
    finder_est = NoiseScaleEstimator(2, 0.99)
    gen = torch.Generator().manual_seed(rank)
    xs = torch.randn(POOL, BS, 784, generator=gen)
    ys = xs[..., :10].argmax(-1)  # learnable labels: a true gradient that stands out of the noise
    # a different batch every step, and the same sequence for every kind
    batches = {kind: itertools.cycle(list(zip(xs, ys))) for kind in KINDS}

    def step(kind: str) -> None:
        model, opt = models[kind], opts[kind]
        x, y = next(batches[kind])
        opt.zero_grad(set_to_none=True)
        if kind == "finder":
            with model.no_sync():
                F.cross_entropy(model(x), y).backward()
            finder_est.update_norms(*allreduce_measured(model, BS))
        else:
            F.cross_entropy(model(x), y).backward()
            if kind == "hook":
                gns.update(BS)
        opt.step()

    for kind in KINDS:  # warm-up: buffers, DDP's bucket rebuild after the first iteration
        for _ in range(3):
            step(kind)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(rounds):
        for kind in KINDS[r % 3:] + KINDS[:r % 3]:  # rotate the order; both ranks rotate alike
            dist.barrier()
            t = time.perf_counter()
            for _ in range(steps):
                step(kind)
            times[kind].append((time.perf_counter() - t) / steps)
    med = {k: float(pd.Series(v).median()) for k, v in times.items()}
    n_params = sum(p.numel() for p in models["plain"].parameters())
    return dict(params_M=n_params / 1e6, width=width, rounds=rounds, plain_s=med["plain"], hook_s=med["hook"],
                hook_overhead_pct=100 * (med["hook"] / med["plain"] - 1), finder_s=med["finder"],
                finder_overhead_pct=100 * (med["finder"] / med["plain"] - 1),
                noise_scale=finder_est.noise_scale,
                hook_vs_finder_rel_diff=abs(gns.noise_scale / finder_est.noise_scale - 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    sizes, rounds, steps = ([1e5], 3, 5) if args.quick else ([1e5, 1e6, 1e7], 7, 20)
    csv = out_path(args, "ddp", "csv")
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_worker, args=(_free_port(), str(csv), sizes, rounds, steps), nprocs=2, start_method=method)
    df = pd.read_csv(csv)
    print(markdown(df.drop(columns=["width"])))
    _plot(df, out_path(args, "ddp", "png"))


def _plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(df.params_M, df.hook_overhead_pct, "o-", label="DDPNoiseScale (comm hook)")
    ax.plot(df.params_M, df.finder_overhead_pct, "s-", label="bs_find under DDP (no_sync + all-reduce)")
    ax.axhline(0, c="gray", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("step time vs plain DDP (%)")
    ax.set_title(f"2 gloo ranks on CPU, batch {BS} per rank")
    ax.legend(fontsize=8)
    save_fig(fig, path)


if __name__ == "__main__":
    main()
