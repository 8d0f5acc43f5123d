"""Exact gradient-noise-scale quantities from every per-example gradient, independent of the estimator."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_example_grads(model: nn.Module, loss_func, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    "(N, P) matrix of flattened per-example gradients of the trainable parameters at the current weights."
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_one(p, xi, yi):
        return loss_func(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))
    rows = []
    for i in range(0, len(x), chunk):
        gs = g(params, x[i:i + chunk], y[i:i + chunk])
        rows.append(torch.cat([gs[k].reshape(len(gs[k]), -1) for k in params], 1).double())
    return torch.cat(rows)


@dataclass(frozen=True)
class Exact:
    """The exact noise-scale quantities of a dataset at fixed weights.

    tr(Σ) is the trace of the per-example gradient covariance of the population: Σ |g_j − G|² / N. That is
    what the estimator measures with its finite-population correction (`n_train` = N, which `bs_find` sets
    for shuffled epochs): E|g_B|² = |G|² + tr(Σ)·(N − B)/(B(N − 1)) for a batch of B drawn without
    replacement. (Without that correction the two-batch estimator is unbiased for the N − 1 version,
    larger by N/(N − 1).)
    """
    trace: float  # tr(Σ), divided by N
    g2: float  # |G|², G the mean per-example gradient over the whole set
    n: int

    @property
    def b_simple(self) -> float:
        return self.trace / self.g2


def exact(model: nn.Module, loss_fn: Callable, inputs: Sequence[torch.Tensor], target: torch.Tensor,
          chunk: int = 256) -> Exact:
    """tr(Σ), |G|² and B_simple from every per-example gradient at the model's current weights.

    Per-example gradients via `torch.func` (vmap of grad), a chunk at a time, sums in float64,
    so memory is one chunk of gradients. The model must have no BatchNorm or
    dropout, so that an example's gradient does not depend on its batch. Tests and benchmarks both judge
    estimates against this one function.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_one(p, *args):
        *xs, y = args
        out = functional_call(model, p, tuple(x.unsqueeze(0) for x in xs))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, *([0] * (len(inputs) + 1))))
    n = len(target)
    sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    sq = 0.0
    with torch.no_grad():
        for s in range(0, n, chunk):
            gs = per_example(params, *[x[s:s + chunk] for x in inputs], target[s:s + chunk])
            for k, g in gs.items():
                sums[k] += g.sum(0, dtype=torch.float64)
                sq += torch.linalg.vector_norm(g, dtype=torch.float64).square().item()
    g2 = sum((v / n).square().sum().item() for v in sums.values())
    return Exact(trace=(sq - n * g2) / n, g2=g2, n=n)


def exact_noise_scale(model, loss_func, x, y) -> tuple[float, float, float]:
    "(tr Σ, |G|², B_simple) over the whole dataset of inputs `x`, targets `y` (see `Exact`)."
    e = exact(model, loss_func, (x,), y, chunk=4096)
    return e.trace, e.g2, e.b_simple


def sq_norms_by_backward(model: nn.Module, loss_func, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    "(N,) |g_j|² of the trainable parameters, one backward pass per example: for models vmap cannot batch."
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        gs = torch.autograd.grad(loss_func(model(x[i:i + 1]), y[i:i + 1]), ps, allow_unused=True)
        rows.append(sum(g.double().square().sum() for g in gs if g is not None))
    return torch.stack(rows)
