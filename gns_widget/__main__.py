"""`python -m gns_widget demo`: find the batch size of a small MLP on the bundled digits, headless.

Shows the whole engine with no notebook and no download: a progress bar while it runs,
then the result, the learning-rate advice and where the plot was saved.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from . import bs_find
from .datasets import digits_loaders
from .engine import METHODS
from .result import GNSRecord


def _progress(record: GNSRecord, width: int = 30) -> None:
    done = record.iteration / record.total
    bar = "█" * int(width * done) + "·" * (width - int(width * done))
    eta = record.elapsed / done - record.elapsed
    sys.stderr.write(f"\r{bar} {record.iteration}/{record.total}  noise scale {record.noise_scale:8.1f}  "
                     f"loss {record.loss:.3f}  {record.elapsed:4.1f}s, eta {eta:4.1f}s")
    if record.iteration >= record.total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    train_dl, _ = digits_loaders(bs=args.bs, seed=args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    print(f"digits (scikit-learn, {len(train_dl.dataset)} training images), MLP 64-128-10, batch size {args.bs}, "
          f"lr={args.lr}, num_it={args.num_it}, n_batch={args.n_batch}, beta={args.beta}, method={args.method}")
    start = time.perf_counter()
    res = bs_find(model, train_dl, nn.CrossEntropyLoss(), lr=args.lr, num_it=args.num_it, n_batch=args.n_batch,
                  beta=args.beta, method=args.method, on_update=_progress)
    print(f"\n{res}\n({time.perf_counter() - start:.1f}s)")
    advice = res.lr_advice(rule="sgd") if args.lr > 0 else None
    if advice is not None:
        print(advice.text)
    res.plot().savefig(args.out, dpi=90)
    print(f"plot saved to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gns_widget", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="find the batch size on the bundled digits data")
    p.add_argument("--bs", type=int, default=32, help="starting batch size")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate while measuring (0: at fixed weights)")
    p.add_argument("--num-it", type=int, default=1000, help="small batches to run")
    p.add_argument("--n-batch", type=int, default=10, help="small batches per estimate")
    p.add_argument("--beta", type=float, default=0.99, help="EMA decay of the estimates")
    p.add_argument("--method", choices=METHODS, default="fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="gns_find.png", help="where to save the plot")
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
