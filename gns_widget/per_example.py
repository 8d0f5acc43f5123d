"""Per-example squared gradient norms from one ordinary backward pass.

With the per-example gradients g_j of a batch of B, mean_j |g_j|² is a "small batch" of size 1
and the batch gradient a big batch of size B, so every step gives a noise-scale estimate.
Only the norms are needed, never the per-example gradients themselves:

- `nn.Linear` is exact and cheap: its per-example weight gradient is the outer product of the
  gradient at its output and its input, so |g_j|² = |δ_j|²·|a_j|² (for inputs with extra
  dimensions, Σ_ts (a_t·a_s)(δ_t·δ_s), or the materialised sum when that is cheaper).
- Any other layer with parameters of its own (convolutions, norms, embeddings, ...) replays its
  forward per example with `torch.func` (vmap of a vjp), from the input and output gradient
  saved by hooks, which costs B copies of that layer's parameters, briefly.

Per-example gradients only exist when examples do not interact: BatchNorm in training mode
and parameters used more than once per forward are refused with a clear error.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

__all__ = ["PerExampleNorms"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


class PerExampleNorms:
    """Hooks that sum every example's squared gradient norm during backward.

    Use as a context manager around the steps to measure (the hooks are removed on exit):

        with PerExampleNorms(model) as norms:
            loss_func(model(x), y).backward()   # a mean over the batch
            sq = norms.pop()                    # (B,) tensor of |g_j|², on the device

    The loss must be the batch mean of per-example losses (the PyTorch default).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = _layers_with_parameters(model)
        self._handles: list[Any] = []
        self._sq: Tensor | None = None
        self._calls: dict[nn.Module, int] = {}
        self._replaying = False

    def __enter__(self) -> PerExampleNorms:
        for m in self.layers:
            self._handles.append(m.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._sq, self._calls = None, {}

    def pop(self) -> Tensor:
        "|g_j|² for each example of the last backward pass (gradients of the per-example losses); then reset."
        if self._sq is None:
            raise RuntimeError("no per-example norms: call pop() after loss.backward() inside the `with` block")
        sq, self._sq, self._calls = self._sq, None, {}
        return sq

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self._replaying or not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if module.training and isinstance(module, _BATCH_NORMS):
            raise ValueError(f"{type(module).__name__} in training mode mixes the examples of a batch, so per-example "
                             "gradients do not exist: use method='fixed', or put it in eval mode")
        self._calls[module] = self._calls.get(module, 0) + 1
        if self._calls[module] > 1:
            raise ValueError(f"{type(module).__name__} is called more than once per forward pass; per-example norms "
                             "need each parameter used once: use method='fixed'")
        saved = tuple(x.detach() if isinstance(x, Tensor) else x for x in inputs)
        output.register_hook(lambda grad: self._add(module, saved, grad.detach()))

    def _add(self, module: nn.Module, inputs: tuple, grad_out: Tensor) -> None:
        n = grad_out.shape[0]
        if isinstance(module, nn.Linear):
            sq = _linear_sq_norms(module, inputs[0], grad_out)
        else:
            self._replaying = True
            try:
                sq = _replayed_sq_norms(module, inputs, grad_out)
            finally:
                self._replaying = False
        # The loss is a batch mean: its gradient carries 1/n, the per-example losses' gradients do not.
        sq = sq.float() * n**2
        self._sq = sq if self._sq is None else self._sq + sq


def _layers_with_parameters(model: nn.Module) -> list[nn.Module]:
    "The modules that own trainable parameters directly; each parameter must belong to exactly one."
    layers, owner = [], {}
    for name, m in model.named_modules(remove_duplicate=False):
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        for p in own:
            if id(p) in owner and owner[id(p)] is not m:
                raise ValueError(f"a parameter of {name or 'the model'} is shared with another module; per-example "
                                 "norms need each parameter used once: use method='fixed'")
            owner[id(p)] = m
        if any(True for _ in m.children()):
            raise ValueError(f"{name or 'the model'} ({type(m).__name__}) has parameters of its own and submodules; "
                             "per-example norms support layers without submodules: use method='fixed'")
        if m not in layers:
            layers.append(m)
    if not layers:
        raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to measure")
    return layers


def _linear_sq_norms(layer: nn.Linear, a: Tensor, d: Tensor) -> Tensor:
    "Exact per-example |∂L/∂W|² + |∂L/∂b|² of a Linear layer from its input a and output gradient d."
    a, d = a.reshape(a.shape[0], -1, a.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])  # (B, T, in/out)
    sq = torch.zeros(a.shape[0], device=d.device, dtype=torch.float32)
    if layer.weight.requires_grad:
        t, n_in, n_out = a.shape[1], a.shape[2], d.shape[2]
        if t == 1:
            sq = sq + a[:, 0].float().square().sum(1) * d[:, 0].float().square().sum(1)
        elif t * t <= n_in * n_out:  # Σ_ts (a_t·a_s)(d_t·d_s): two (B, T, T) Gram matrices
            sq = sq + ((a.float() @ a.float().transpose(1, 2)) * (d.float() @ d.float().transpose(1, 2))).sum((1, 2))
        else:
            sq = sq + torch.einsum("bto,bti->boi", d.float(), a.float()).square().sum((1, 2))
    if layer.bias is not None and layer.bias.requires_grad:
        sq = sq + d.float().sum(1).square().sum(1)
    return sq


def _replayed_sq_norms(layer: nn.Module, inputs: tuple, grad_out: Tensor) -> Tensor:
    "Per-example |∂L/∂θ|² of any layer without submodules, by a vmapped vjp of its forward on one example."
    params = {k: p.detach() for k, p in layer.named_parameters(recurse=False) if p.requires_grad}
    batched = [isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == grad_out.shape[0] for x in inputs]

    def one_example(*args) -> dict[str, Tensor]:
        *xs, g = args
        it = iter(xs)
        full = tuple(next(it).unsqueeze(0) if b else x for x, b in zip(inputs, batched))
        forward: Callable = lambda p: functional_call(layer, p, full)  # noqa: E731
        _, pullback = vjp(forward, params)
        return pullback(g.unsqueeze(0))[0]

    grads = vmap(one_example)(*(x for x, b in zip(inputs, batched) if b), grad_out)
    return sum(g.reshape(g.shape[0], -1).float().square().sum(1) for g in grads.values())
