"""The per-example gradient of one operation, and squared norms of their sums (the math of `per_example.py`).

Each rule turns what one call saved in forward and its output gradients into a *part* per parameter:

- `Outer`: Σ_t left_t ⊗ right_t per example, for a (m, n) weight used as a matrix (`linear`, the
  recurrent layers' input and hidden weights) or as a table (`embedding`: left is a one-hot row,
  kept as its index). Never materialised when the Gram form Σ_ts (l_t·l_s)(r_t·r_s) is cheaper.
- `Dense`: the per-example gradient itself, (B, *shape), for everything else (biases, norms, and
  any other call replayed per example with `torch.func`).

A parameter used several times per forward (tied embeddings, a layer called twice) gets one part
per use; `sq_norms` adds them *before* norming, cross terms included, so the result is exact.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vjp, vmap

__all__ = ["Outer", "Dense", "sq_norms", "linear_parts", "embedding_parts", "layer_norm_parts", "rnn_parts",
           "replayed_parts"]


def _wide(t: Tensor) -> Tensor:
    "float32 at least (float64 stays float64), as a plain tensor."
    return t.detach().as_subclass(Tensor).to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class Outer:
    "Σ_t left_t ⊗ right_t for each example: a (m, n) weight's per-example gradient, not materialised."
    left: Tensor  # (B, T, m) float, or (B, T) int64: the rows of a table (one-hot, kept as indices)
    right: Tensor  # (B, T, n)
    m: int

    @property
    def indexed(self) -> bool:
        return not self.left.is_floating_point()

    def materialise(self) -> Tensor:
        "(B, m, n)."
        b, _, n = self.right.shape
        if self.indexed:
            out = self.right.new_zeros(b, self.m, n)
            return out.scatter_add_(1, self.left.unsqueeze(-1).expand(-1, -1, n), self.right)
        return torch.einsum("btm,btn->bmn", self.left, self.right)


@dataclass
class Dense:
    "Each example's gradient, materialised: (B, *parameter shape)."
    g: Tensor


Part = Outer | Dense


def sq_norms(parts: Sequence[Part]) -> Tensor:
    "|Σ parts|² per example, (B,): the squared norm of one parameter's per-example gradient."
    outers = [p for p in parts if isinstance(p, Outer)]
    dense = [p.g for p in parts if isinstance(p, Dense)]
    if outers:
        m, n = outers[0].m, outers[0].right.shape[2]
        t = sum(o.right.shape[1] for o in outers)
        if dense or t * t > m * n:  # materialised: cheaper than the (B, T, T) Gram matrices, or needed for the sum
            dense.append(sum(o.materialise() for o in outers).reshape(dense[0].shape if dense else (-1, m, n)))
        else:
            return _gram_sq_norms(outers)
    total = dense[0] if len(dense) == 1 else torch.stack(dense).sum(0)
    return total.reshape(total.shape[0], -1).square().sum(1)


def _gram_sq_norms(outers: list[Outer]) -> Tensor:
    "|Σ_u Σ_t l_ut ⊗ r_ut|² = Σ_uv Σ_ts (l_ut·l_vs)(r_ut·r_vs), one Gram block per pair of uses."
    groups = [_cat([o for o in outers if o.indexed]), _cat([o for o in outers if not o.indexed])]
    groups = [g for g in groups if g is not None]
    if len(groups) == 1 and groups[0].right.shape[1] == 1 and not groups[0].indexed:  # one row: |l|²·|r|²
        o = groups[0]
        return o.left[:, 0].square().sum(1) * o.right[:, 0].square().sum(1)
    sq = sum(_outer_dot(g, g) for g in groups)
    if len(groups) == 2:
        sq = sq + 2 * _outer_dot(groups[0], groups[1])
    return sq


def _cat(outers: list[Outer]) -> Outer | None:
    if not outers:
        return None
    if len(outers) == 1:
        return outers[0]
    return Outer(torch.cat([o.left for o in outers], 1), torch.cat([o.right for o in outers], 1), outers[0].m)


def _outer_dot(u: Outer, v: Outer) -> Tensor:
    "<Σ_t u_t, Σ_s v_s> per example, (B,)."
    rr = u.right @ v.right.transpose(1, 2)  # (B, Tu, Tv)
    if u.indexed and v.indexed:
        ll = (u.left.unsqueeze(2) == v.left.unsqueeze(1)).to(rr.dtype)
    elif u.indexed:  # one-hot row idx_t against a dense left factor: its entry at idx_t
        ll = v.left.gather(2, u.left.unsqueeze(1).expand(-1, v.left.shape[1], -1)).transpose(1, 2)
    elif v.indexed:
        ll = u.left.gather(2, v.left.unsqueeze(1).expand(-1, u.left.shape[1], -1))
    else:
        ll = u.left @ v.left.transpose(1, 2)
    return (ll * rr).sum((1, 2))


def _rows(t: Tensor, width: int | None = None) -> Tensor:
    "(B, T, width): every position of each example as a row (T = 1 for unbatched features)."
    return t.reshape(t.shape[0], -1, t.shape[-1] if width is None else width)


def linear_parts(a: Tensor, d: Tensor, weight: bool, bias: bool) -> dict[str, Part]:
    "y = a Wᵀ + b: ∂/∂W = Σ_t d_t ⊗ a_t, ∂/∂b = Σ_t d_t, per example."
    d = _rows(_wide(d))
    parts: dict[str, Part] = {}
    if weight:
        parts["weight"] = Outer(d, _rows(_wide(a)), d.shape[2])
    if bias:
        parts["bias"] = Dense(d.sum(1))
    return parts


def embedding_parts(idx: Tensor, d: Tensor, n_rows: int, padding_idx: int | None) -> dict[str, Part]:
    "Row idx_t of the table gets d_t (the padding row gets nothing)."
    idx, d = idx.reshape(idx.shape[0], -1).long(), _rows(_wide(d))
    if padding_idx is not None:
        d = d * (idx != padding_idx % n_rows).unsqueeze(-1)
    return {"weight": Outer(idx, d, n_rows)}


def layer_norm_parts(x: Tensor, d: Tensor, shape: Sequence[int], eps: float, rms: bool, weight: bool,
                     bias: bool) -> dict[str, Part]:
    "y = x̂·w + b over the last len(shape) dims: ∂/∂w = Σ_t d_t ⊙ x̂_t, ∂/∂b = Σ_t d_t, per example."
    x, d = _wide(x), _wide(d)
    lead = (x.shape[0], -1, *shape)
    parts: dict[str, Part] = {}
    if weight:
        xhat = F.rms_norm(x, shape, eps=eps) if rms else F.layer_norm(x, shape, eps=eps)
        parts["weight"] = Dense((d * xhat).reshape(lead).sum(1))
    if bias:
        parts["bias"] = Dense(d.reshape(lead).sum(1))
    return parts


_CELLS: dict[str, Callable] = {}


def _cell(kind: str):
    def register(fn):
        _CELLS[kind] = fn
        return fn
    return register


@_cell("lstm")
def _lstm_step(gi, gh, h, c):
    i, f, g, o = (gi + gh).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@_cell("gru")
def _gru_step(gi, gh, h, c):
    ir, iz, i_n = gi.chunk(3, 1)
    hr, hz, h_n = gh.chunk(3, 1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h, None


@_cell("rnn_tanh")
def _tanh_step(gi, gh, h, c):
    return torch.tanh(gi + gh), None


@_cell("rnn_relu")
def _relu_step(gi, gh, h, c):
    return torch.relu(gi + gh), None


def rnn_parts(kind: str, x: Tensor, hx: Sequence[Tensor], weights: Sequence[Tensor], trainable: Sequence[bool],
              has_biases: bool, num_layers: int, bidirectional: bool,
              grads: Sequence[Tensor | None]) -> dict[int, Part]:
    """Per-example parts of a recurrent layer (torch.lstm/gru/rnn_tanh/rnn_relu), keyed by index in `weights`.

    Replays the layer step by step with the input-to-hidden products gi = W_ih x_t + b_ih and the
    hidden-to-hidden ones gh_t = W_hh h_(t-1) + b_hh as separate tensors, and takes the output
    gradients back to them: ∂/∂W_ih = Σ_t δgi_t ⊗ x_t, ∂/∂W_hh = Σ_t δgh_t ⊗ h_(t-1), per example
    (a batched replay: the examples of a recurrent layer never interact, so no vmap is needed).
    `x` is (B, T, I); `hx` the initial states, (layers·directions, B, H) each; `grads` those of
    (output (B, T, D·H), h_n[, c_n]), None where unused. Only `trainable` weights get a part.
    """
    step, n_dir = _CELLS[kind], 2 if bidirectional else 1
    per = 4 if has_biases else 2
    dtype = torch.promote_types(weights[0].dtype, torch.float32)
    ws = [w.detach().to(dtype) for w in weights]
    with torch.enable_grad():
        layer_in = x.detach().to(dtype).requires_grad_()
        states = [s.detach().to(dtype).requires_grad_() for s in hx]
        t_len = layer_in.shape[1]
        h_n, c_n, factors = [], [], []
        for layer in range(num_layers):
            outs = []
            for d in range(n_dir):
                k = layer * n_dir + d
                w_ih, w_hh = ws[k * per], ws[k * per + 1]
                b_ih, b_hh = (ws[k * per + 2], ws[k * per + 3]) if has_biases else (None, None)
                gi = F.linear(layer_in, w_ih, b_ih)
                h = states[0][k]
                c = states[1][k] if kind == "lstm" else None
                hs, ghs, prev = [None] * t_len, [], []
                for t in (range(t_len) if d == 0 else reversed(range(t_len))):
                    gh = F.linear(h, w_hh, b_hh)
                    ghs.append(gh)
                    prev.append(h)
                    h, c = step(gi[:, t], gh, h, c)
                    hs[t] = h
                outs.append(torch.stack(hs, 1))
                h_n.append(h)
                c_n.append(c)
                factors.append((k, layer_in, gi, ghs, prev))
            layer_in = torch.cat(outs, 2) if n_dir == 2 else outs[0]
        replayed = [layer_in, torch.stack(h_n)] + ([torch.stack(c_n)] if kind == "lstm" else [])
        used = [(o, g) for o, g in zip(replayed, grads) if g is not None]
        wrt = [gi for _, _, gi, _, _ in factors] + [gh for *_, ghs, _ in factors for gh in ghs]
        got = torch.autograd.grad([o for o, _ in used], wrt, [g.to(dtype) for _, g in used], allow_unused=True)
    got = [torch.zeros_like(w) if g is None else g for g, w in zip(got, wrt)]
    d_gi, d_gh = got[:len(factors)], iter(got[len(factors):])
    parts: dict[int, Part] = {}
    for (k, inp, _, ghs, prev), dgi in zip(factors, d_gi):
        dgh = torch.stack([next(d_gh) for _ in ghs], 1)  # in the order of the replay's steps, as `prev`
        hp = torch.stack(prev, 1).detach()
        for j, part in enumerate((Outer(dgi, inp.detach(), dgi.shape[2]), Outer(dgh, hp, dgh.shape[2]),
                                  Dense(dgi.sum(1)), Dense(dgh.sum(1)))[:per]):
            if trainable[k * per + j]:
                parts[k * per + j] = part
    return parts


def replayed_parts(forward: Callable[[dict[str, Tensor], Sequence[Tensor]], Sequence[Tensor]],
                   params: dict[str, Tensor], batched: Sequence[Tensor], grads: Sequence[Tensor]) -> dict[str, Part]:
    """Per-example gradients of `params` for any call, by a vmapped vjp of it on one example.

    `forward(params, examples)` recomputes the call's differentiated outputs for one example (each
    `batched` tensor sliced to a batch of one), `grads` are those outputs' gradients. Costs B copies
    of the parameters, briefly.
    """
    def one_example(xs, gs):
        _, pullback = vjp(lambda p: tuple(forward(p, [x.unsqueeze(0) for x in xs])), params)
        return pullback(tuple(g.unsqueeze(0) for g in gs))[0]

    try:
        grads_of = vmap(one_example)(list(batched), list(grads))
    except RuntimeError as e:
        if "random" in str(e):
            raise ValueError("an operation on a parameter draws random numbers (dropout inside it?), so it cannot "
                             "be replayed per example: use method='fixed'") from e
        raise
    return {k: Dense(_wide(g)) for k, g in grads_of.items()}


def bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: Sequence[Any] = ()) -> list[Any]:
    "The values of `names` from a call's args and kwargs (the last len(defaults) names are optional)."
    n_req = len(names) - len(defaults)
    out = list(args[:len(names)]) + [None] * max(0, len(names) - len(args))
    for i, name in enumerate(names):
        if i >= len(args):
            out[i] = kwargs.get(name, defaults[i - n_req] if i >= n_req else None)
    return out
