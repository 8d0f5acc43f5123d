"""The finder on one GPU: exactness in fp32/bf16/fp16, step overhead and memory, bs_find's wall time, time to target.

One unattended run (about 5 minutes on an H100/H200), in four sections; a section that fails is
recorded (`gpu_status.csv`) and the next one runs, and every table is written as soon as it has rows:

- exactness: `bs_find(lr=0)` with `fixed`, `per_example` and `sequential` (at lr=0 the same
  measurement as fixed) under `amp` = fp32, bf16 and fp16, on two small problems, against the exact
  B_simple from every per-example gradient (`tests/exact.py`, float64 sums). All runs see
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
  is compared with batch 64 over several seeds, and with the advised batch at the batch-64 lr; so is the
  adaptive batch size (`AdaptiveLoader` from batch 64, the one-cycle on its progress, issue 21). The
  target is the test accuracy every batch-64 seed reaches (the lowest of their best); time to target
  counts training time only (evaluation after each epoch is left out), and optimizer steps are counted too.

`--quick` runs all four scaled down on the CPU (a tiny GPT, few steps, one seed) to prove the script.

This script is the runner; each section is a module of its own (gpu_exactness, gpu_overhead, gpu_loop,
gpu_speedup), the report, sizes and plot are in gpu_report, the timing helpers in measure.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import cli
from fashion_mnist import FASHION_MNIST_DIR
from gpu_exactness import exactness
from gpu_loop import loop
from gpu_overhead import overhead
from gpu_report import SECTIONS, Report, Sizes
from gpu_speedup import speedup

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


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which sections to run")
    p.add_argument("--device", default=None, help="default: cuda (the CPU with --quick)")
    p.add_argument("--data", type=Path, default=FASHION_MNIST_DIR,
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
