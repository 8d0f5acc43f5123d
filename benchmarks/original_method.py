"""A faithful re-implementation of the 2019 fastai write-up's noise-scale estimator, to compare against.

That method kept the n_batch flat gradients of consecutive small batches in a Python list
(memory n_batch × parameters), took G_big as their mean and |G_small|² from ONLY the last
small batch, applied the paper's two formulas, and smoothed noise and scale with plain EMAs
(no bias correction; the ratio noise/scale is unaffected by that). Using one small batch
instead of all n_batch is what makes it noisier than `gns_widget.NoiseScaleEstimator`;
keeping every gradient is what makes its memory grow with n_batch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["OriginalGNS", "original_run"]


class OriginalGNS:
    "The write-up's estimator: a list of n_batch flat gradients, the last one as the small batch."

    def __init__(self, n_batch: int = 20, beta: float = 0.99):
        self.n_batch, self.beta = n_batch, beta
        self.grads: list[Tensor] = []
        self.ema_noise = self.ema_scale = 0.0
        self.n_estimates = 0

    def update(self, model: nn.Module, batch_size: int) -> bool:
        "Store this step's flat gradient; estimate when n_batch are stored. Returns True when it estimated."
        flat = torch.cat([p.grad.detach().reshape(-1) for p in model.parameters() if p.grad is not None])
        self.grads.append(flat)  # torch.cat already copied: this is the n_batch × params list
        if len(self.grads) < self.n_batch:
            return False
        b_small, b_big = batch_size, batch_size * self.n_batch
        g_big = torch.stack(self.grads).mean(0)
        g_small_sq = self.grads[-1].double().square().sum().item()  # only the last small batch
        g_big_sq = g_big.double().square().sum().item()
        scale = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
        noise = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
        self.ema_noise = self.beta * self.ema_noise + (1 - self.beta) * noise
        self.ema_scale = self.beta * self.ema_scale + (1 - self.beta) * scale
        self.n_estimates += 1
        self.grads = []
        return True

    @property
    def noise_scale(self) -> float:
        return self.ema_noise / self.ema_scale if self.n_estimates and self.ema_scale else math.nan

    def buffer_bytes(self) -> int:
        "Bytes held by the stored gradients right now (peaks at n_batch × parameter bytes)."
        return sum(g.numel() * g.element_size() for g in self.grads)


def original_run(model: nn.Module, loader, loss_fn, *, num_it: int, n_batch: int, beta: float,
                 split=None) -> list[tuple[int, float]]:
    """Measure at fixed weights (lr=0) as the finder does; return (iteration, noise_scale) per estimate.

    `split(batch) -> (inputs, targets)`; default: (x, y) pairs. The loader is cycled.
    """
    split = split or (lambda b: ((b[0],), (b[1],)))
    est, out, it = OriginalGNS(n_batch, beta), [], 0
    model.train()
    while it < num_it:
        for batch in loader:
            inputs, targets = split(batch)
            model.zero_grad(set_to_none=True)
            loss_fn(model(*inputs), *targets).backward()
            it += 1
            if est.update(model, len(targets[0])):
                out.append((it, est.noise_scale))
            if it >= num_it:
                break
    model.zero_grad(set_to_none=True)
    return out
