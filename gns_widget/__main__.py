"""`python -m gns_widget demo`: find the batch size of a small MLP on the bundled digits, headless.

Shows the whole engine with no notebook and no download: fastprogress's bar while it runs,
then the result, the learning-rate advice and where the plot was saved.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from fastprogress.fastprogress import ConsoleProgressBar
from torch import nn

from . import bs_find
from .datasets import digits_loaders
from .result import GNSRecord
from .settings import METHODS


class _Progress:
    "fastprogress's console bar (what fastai users see in `fit`), moved by the finder's `on_update`."

    def __init__(self):
        self.bar: ConsoleProgressBar | None = None

    def __call__(self, record: GNSRecord) -> None:
        if self.bar is None:
            self.bar = ConsoleProgressBar(range(record.total), total=record.total)
            self.bar.update(0)
        self.bar.comment = f"noise scale {record.noise_scale:.1f}, loss {record.loss:.3f}"
        self.bar.update(record.iteration)

    def close(self) -> None:
        "End the bar's line (a stopped or short run never reaches its total)."
        if self.bar is not None:
            print()


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    train_dl, _ = digits_loaders(bs=args.bs, seed=args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    print(f"digits (scikit-learn, {len(train_dl.dataset)} training images), MLP 64-128-10, batch size {args.bs}, "
          f"lr={args.lr}, num_it={args.num_it}, n_batch={args.n_batch}, beta={args.beta}, method={args.method}")
    start = time.perf_counter()
    progress = _Progress()
    res = bs_find(model, train_dl, nn.CrossEntropyLoss(), lr=args.lr, num_it=args.num_it, n_batch=args.n_batch,
                  beta=args.beta, method=args.method, on_update=progress)
    progress.close()
    print(f"{res}\n({time.perf_counter() - start:.1f}s)")
    advice = res.advice(args.lr if args.lr > 0 else None, rule="sgd")  # the demo's model trains with plain SGD
    print(f"\n{advice.headline}\n  {advice.text}")
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
