"""Exact gradient-noise-scale quantities from every per-example gradient, independent of the estimator."""
from __future__ import annotations

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


def exact_noise_scale(model, loss_func, x, y) -> tuple[float, float, float]:
    "(tr Σ, |G|², B_simple) over the whole dataset."
    g = per_example_grads(model, loss_func, x, y)
    G = g.mean(0)
    tr_sigma = (g - G).square().sum(1).mean().item()
    g_sq = G.square().sum().item()
    return tr_sigma, g_sq, tr_sigma / g_sq


def sq_norms_by_backward(model: nn.Module, loss_func, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    "(N,) |g_j|² of the trainable parameters, one backward pass per example: for models vmap cannot batch."
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        gs = torch.autograd.grad(loss_func(model(x[i:i + 1]), y[i:i + 1]), ps, allow_unused=True)
        rows.append(sum(g.double().square().sum() for g in gs if g is not None))
    return torch.stack(rows)
