"""Measure the gradient noise scale while training with DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp.py

Each rank's gradient is a small batch and DDP's all-reduced gradient the big one, so every step
gives an estimate for the cost of a two-scalar all_reduce. Runs on CPU (gloo) or one GPU per
rank (nccl), on scikit-learn's bundled 8x8 digits, in well under a minute.
"""
import os

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gns_widget.datasets import digits
from gns_widget.ddp import DDPNoiseScale
from gns_widget.suggest import suggest_batch_size

PER_RANK_BS, EPOCHS, PRINT_EVERY = 32, 8, 25


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    x, y, _, _ = digits()
    train = TensorDataset(x, y)
    sampler = DistributedSampler(train, shuffle=True, seed=0)  # disjoint shards: the ranks' batches differ
    dl = DataLoader(train, batch_size=PER_RANK_BS, sampler=sampler)
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device),
                device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_func = nn.CrossEntropyLoss()
    # beta 0.95: a short run whose noise scale grows as the loss falls; n_train: each epoch samples without
    # replacement. Register before the first backward (DDP allows one comm hook per model).
    gns = DDPNoiseScale(model, beta=0.95, n_train=len(train))

    history, step = [], 0
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for xb, yb in dl:
            xb, yb = xb.to(device), yb.to(device)
            loss = loss_func(model(xb), yb)
            loss.backward()
            gns.update(len(xb))  # this rank's examples; after backward, before clipping or the step
            opt.step()
            opt.zero_grad()
            step += 1
            history.append({"iteration": step, "noise": gns.noise, "scale": gns.scale,
                            "noise_scale": gns.noise_scale})
            if rank == 0 and step % PRINT_EVERY == 0:
                print(f"step {step:4d}  epoch {epoch}  loss {loss.item():.3f}  noise scale {gns.noise_scale:7.1f}")

    if rank == 0:  # every rank holds the same estimate
        s = suggest_batch_size(pd.DataFrame(history), n_train=len(train))
        if s.bs is None:
            print(f"no suggestion: {s.reason}")
        else:
            print(f"suggested global batch size {s.bs} ({max(1, s.bs // world)} per rank on {world} ranks; "
                  f"now {PER_RANK_BS * world}): {s.reason}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
