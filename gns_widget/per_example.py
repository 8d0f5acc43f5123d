"""Per-example squared gradient norms from one ordinary backward pass.

With the per-example gradients g_j of a batch of B, mean_j |g_j|² is a "small batch" of size 1
and the batch gradient a big batch of size B, so every step gives a noise-scale estimate. Only
the norms are needed, never the per-example gradients themselves.

How: during the model's forward a `TorchFunctionMode` sees every torch call, and so every use of
every trainable parameter (`requires_grad=True`; frozen ones are constants and not measured).
It tracks which tensors carry the batch (those computed from the model's inputs, and where their
batch dimension is) and which are computed from parameters alone. A call where a parameter meets
the batch gets a gradient hook whose rule turns the call's output gradient into that parameter's
per-example gradient, as factors (`per_example_rules.py`):

- `linear`: Σ_t δ_t ⊗ a_t, normed through (T, T) Gram matrices or materialised, whichever is cheaper;
- `embedding`: the same with one-hot rows kept as indices (so a tied input/output embedding, used
  by `embedding` and `linear`, is exact, cross term included, without any V×d per example);
- `layer_norm`, `rms_norm`: Σ_t δ_t ⊙ x̂_t and Σ_t δ_t;
- LSTM, GRU and RNN layers (`nn.LSTM`, `nn.GRU`, `nn.RNN`, any number of layers, bidirectional):
  replayed step by step to get each example's gate gradients;
- any other call (convolutions, group norm, attention projections through `@`, ...): replayed per
  example with `torch.func` (a vmapped vjp), which costs B copies of its parameters, briefly; each
  input keeps the batch where it has it (`multi_head_attention_forward`: (L, B, E) and a (B, S) padding mask);
- tensors computed from parameters alone (`wpe(arange(T))`, a bare `nn.Parameter`, `pos_emb[:, :T]`,
  `cls_token.expand(B, -1, -1)`, weight normalisation) are followed until they meet the batch, and
  that call is replayed per example through them.
A parameter used several times (tied weights, a layer called twice) is exact: its uses' parts are
added before norming.
The loss is followed too (`in_loss`): a parameter it uses (a head applied there) is measured the same way.
A replay leaves out what the call does in place besides its output (InstanceNorm's running statistics,
EmbeddingBag's max_norm renormalisation): the forward did it once. torch.compile'd models run eagerly while
measured (`torch.compiler.set_stance('force_eager')` inside the `with` block): the tracer must see every call.

Supported: every model whose examples do not interact and whose parameters are used only by torch
operations run with gradients enabled, on tensors whose batch dimension is tracked (the first
dimension, or moved by transpose/permute/unsqueeze/indexing).
Refused with a ValueError naming the problem (use method='fixed' instead):
- BatchNorm in training mode (examples interact), `embedding`/`embedding_bag(scale_grad_by_freq=True)`;
- `sparse=True` embeddings (no method measures sparse gradients: use sparse=False);
- a parameter meeting a tensor whose batch dimension was lost or merged (`x.view(-1, d)` before a
  layer, a reduction over the batch) or a call whose output has no batch dimension;
- a parameter used with gradients disabled inside the forward (a custom `autograd.Function`, a
  `torch.no_grad` block, reentrant checkpointing), or a model output computed from parameters alone;
- PackedSequence inputs, LSTM projections (`proj_size`), dropout between recurrent layers in training;
- random operations inside a replayed call (dropout inside `nn.MultiheadAttention`);
- a gradient hook on a parameter (`p.register_hook`), which may change `p.grad` but not these norms;
- a parameter the loss uses after the batch was reduced (a penalty added to the mean loss).
Examples interacting in ways that keep every shape (a softmax over the batch dimension) are not detected.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import register_multi_grad_hook
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .per_example_rules import (
    Part,
    bind,
    embedding_parts,
    layer_norm_parts,
    linear_parts,
    replayed_parts,
    rnn_parts,
    sq_norms,
)

__all__ = ["PerExampleNorms", "norm_layer_params"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
_RNNS = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "rnn_tanh", torch.rnn_relu: "rnn_relu"}
_UNKNOWN = None  # batched, but where the batch dimension went is not known
_FIXED = "use method='fixed'"


class PerExampleNorms:
    """Hooks that sum every example's squared gradient norm during backward.

    Use as a context manager around the steps to measure (the hooks are removed on exit):

        with PerExampleNorms(model) as norms:
            out = model(x)
            with norms.in_loss():               # parameters the loss uses (a head, a regularizer) count too
                loss = loss_func(out, y)        # a mean over the batch
            loss.backward()
            sq = norms.pop()                    # (B,) tensor of |g_j|², on the device

    The loss must be the batch mean of per-example losses (the PyTorch default). The batch is the
    first dimension of the model's first tensor input (other inputs of that size are batched too).

    `params` restricts the measurement to some trainable parameters (the others count as frozen),
    e.g. `norm_layer_params(model)`: Gray et al. 2024 find the noise scale of the normalisation
    layers' parameters predicts the whole transformer's, at a fraction of the cost. The big-batch
    norm must then be taken over `self.params` as well.
    """

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter] | None = None):
        self.model = model
        only = None if params is None else {id(p) for p in params}
        self.names = {id(p): name for name, p in model.named_parameters()
                      if p.requires_grad and (only is None or id(p) in only)}
        if not self.names:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to measure")
        self._params = {id(p): p for p in model.parameters() if id(p) in self.names}
        self.params = list(self._params.values())  # what is measured: the big-batch norm must be of these too
        self._handles: list[Any] = []
        self._mode: _Tracer | None = None
        self._stance: Any = None
        self._reset()

    def __enter__(self) -> PerExampleNorms:
        self._refuse_gradient_hooks()
        # torch.compile'd code runs eagerly inside the block: the tracer must see every call, and dynamo would
        # otherwise compile it for each call's signature until its recompile limit (warnings, minutes), then run
        # it eagerly all the same (`model.compile()` compiles the forward hooks, so this holds for the whole block)
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        self._stance = set_stance("force_eager") if set_stance is not None else None
        self._handles = [self.model.register_forward_pre_hook(self._start, with_kwargs=True),
                         self.model.register_forward_hook(self._stop, always_call=True)]
        self._handles += [m.register_forward_pre_hook(self._refuse_batch_norm) for m in self.model.modules()
                          if isinstance(m, _BATCH_NORMS)]
        return self

    def __exit__(self, *exc) -> None:
        self._stop()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._stance is not None:
            self._stance.__exit__(None, None, None)  # the stance the block started with
            self._stance = None
        self._reset()

    @contextmanager
    def in_loss(self) -> Iterator[None]:
        """Follow the loss computation too, after the model's forward.

        A parameter the loss uses (a head applied there, `logits @ model.emb.weight.T`) is measured per example
        like one in the forward; one used after the batch was reduced (a regularizer `w.square().sum()` added to the
        mean loss) has no per-example gradient and is refused. Both must be seen: `p.grad` holds such a parameter's
        gradient, so per-example norms that left it out would measure another gradient than the one that trains
        (a head applied in the loss can be most of it).
        """
        if self._mode is not None or self._batch is None or not torch.is_grad_enabled():
            yield
            return
        self._in_loss = True
        self._mode = _Tracer(self)
        self._mode.__enter__()
        try:
            yield
        finally:
            self._stop()

    def pop(self) -> Tensor:
        "|g_j|² for each example of the last backward pass (gradients of the per-example losses); then reset."
        for pid in list(self._pending):
            self._finish(pid)
        sq = self._sq
        if sq is None and self._batch is None:
            raise RuntimeError("no per-example norms: call pop() after loss.backward() inside the `with` block")
        b = len(sq) if sq is not None else self._batch
        if sq is None:  # no parameter got a gradient
            sq = torch.zeros(b, device=next(iter(self._params.values())).device)
        self._reset()
        # The loss is a batch mean: its gradient carries 1/B, the per-example losses' gradients do not.
        return sq.float() * b**2

    def _reset(self) -> None:
        self._in_loss = False  # the tracer follows the loss (`in_loss`), not the model's forward
        self._sq: Tensor | None = None
        self._batch: int | None = None
        self._uses: dict[int, int] = {}  # uses of each parameter in this step's forward passes
        self._pending: dict[int, list[Part]] = {}  # parts of parameters used several times, until all are in
        self._batched = WeakIdKeyDictionary()  # tensor -> position of its batch dimension (_UNKNOWN: lost)
        self._derived = WeakIdKeyDictionary()  # tensor computed from parameters alone -> _Ref to replay it

    # --- the forward pass -------------------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._mode is not None or not torch.is_grad_enabled():
            return
        leaves = [t for t in _tensors((args, kwargs)) if t.ndim > 0]
        if not leaves:
            raise ValueError("per-example norms need the model's input to be a tensor with the batch as its first "
                             f"dimension; got none: {_FIXED}")
        b = leaves[0].shape[0]
        if self._batch is not None and b != self._batch:
            raise ValueError(f"the model was called on batches of {self._batch} and {b} examples in one step: "
                             f"per-example norms need one batch per step; {_FIXED}")
        self._batch = b
        for t in leaves:
            if t.shape[0] == b:
                self._batched[t] = 0
        self._mode = _Tracer(self)
        self._mode.__enter__()

    def _stop(self, module: nn.Module | None = None, args: Any = None, output: Any = None) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self._mode, self._in_loss = None, False
        derived = [t for t in _tensors(output) if t.requires_grad and t in self._derived]
        if derived:
            raise ValueError(f"an output of the model depends on parameters ({self._named(derived[0])}) but not on "
                             f"its input, so it has no per-example gradient: {_FIXED}")

    def _refuse_gradient_hooks(self) -> None:
        """A hook on a parameter's gradient (`p.register_hook(lambda g: g * mask)`, clipping) may change `p.grad`, which
        the big-batch norm is read from, while the norms here are of the unchanged per-example gradients: mixed, the
        estimate is silently wrong (-76% with one weight's gradient doubled). Which hooks only look cannot be told."""
        hooked = [name for pid, name in self.names.items()
                  if self._params[pid]._backward_hooks or getattr(self._params[pid], "_post_accumulate_grad_hooks", 0)]
        if hooked:
            listed = ", ".join(repr(n) for n in hooked[:3]) + (f" and {len(hooked) - 3} more" * (len(hooked) > 3))
            raise ValueError(f"the parameter {listed} has a gradient hook (Tensor.register_hook or "
                             "register_post_accumulate_grad_hook) that may change its gradient, which per-example "
                             "norms cannot see, so the estimate would mix changed and unchanged gradients: "
                             f"{_FIXED} (it measures the gradients your hooks leave), or remove the hook for the run")

    def _refuse_batch_norm(self, module: nn.Module, args: tuple) -> None:
        if module.training and self._mode is not None:
            raise ValueError(f"{type(module).__name__} in training mode mixes the examples of a batch, so "
                             f"per-example gradients do not exist: {_FIXED}. A BatchNorm frozen in eval mode is "
                             "measured, but bs_find trains in model.train(): to keep one frozen, override your model's "
                             "train() to leave it in eval, as frozen-BatchNorm fine-tuning does")

    def call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        "One torch call in the forward (from the mode): run it, track the batch, hook parameter uses."
        bdims, has_params, has_tensors = [], False, False
        for t in _tensors((args, kwargs)):
            has_tensors = True
            if id(t) in self._params or t in self._derived:
                has_params = True
            elif t in self._batched:
                bdims.append(self._batched[t])
        if not has_params:
            out = func(*args, **kwargs)
            if bdims:
                self._track(func, args, kwargs, bdims, out)
            elif not has_tensors and _name(func) in _FACTORIES and isinstance(out, Tensor) and out.ndim \
                    and out.shape[0] == self._batch:
                self._batched[out] = 0  # torch.zeros(B, H): the same row for every example, or one's own noise
            return out
        if func is F.batch_norm and bind(args, kwargs, _BN_ARGS)[5]:
            raise ValueError(f"batch_norm in training mode mixes the examples of a batch: {_FIXED}")
        if func in _EMBEDDINGS:
            self._refuse_embedding_flags(func, args, kwargs)
        if not torch.is_grad_enabled():
            return self._without_grad(func, args, kwargs)
        if not bdims:
            one = _one_example_sizes(func, args, self._batch)
            if one is None:
                out = func(*args, **kwargs)
                self._mark_derived(func, args, kwargs, out)
                return out
            return self._replayed(func, args, kwargs, [], (one, kwargs))
        if func in _RNNS:
            return self._rnn(func, args, kwargs, bdims)
        if func is F.multi_head_attention_forward:
            return self._attention(args, kwargs)
        k = bdims[0]
        if self._in_loss and k is _UNKNOWN:
            raise ValueError(f"the loss uses the parameter {self._named_in(args, kwargs)} after the batch was reduced "
                             f"({_name(func)}: a regularizer such as w.square().sum(), or an auxiliary loss?), so its "
                             "gradient is the same for every example and per-example norms would leave it out: "
                             f"{_FIXED}, or move the penalty into the optimizer (weight_decay)")
        if k is _UNKNOWN or any(bd != k for bd in bdims):
            shapes = [tuple(t.shape) for t in _tensors((args, kwargs)) if t in self._batched]
            raise ValueError(f"{_name(func)} uses the parameter {self._named_in(args, kwargs)} on a tensor whose batch "
                             f"dimension was lost, merged or moved inconsistently (shapes {shapes}); per-example "
                             "norms need each example's rows kept apart (no x.view(-1, d) before a layer, no "
                             f"reduction over the batch): {_FIXED}")
        rule = _RULES.get(func)
        if rule is not None and k == 0:
            out = rule(self, args, kwargs)
            if out is not _NO_RULE:
                return out
        return self._replayed(func, args, kwargs, bdims, _replay_args(func, args, kwargs))

    def _refuse_embedding_flags(self, func: Callable, args: tuple, kwargs: dict) -> None:
        "`sparse=True` and `scale_grad_by_freq=True` of `embedding` and `embedding_bag`, refused before they run."
        names, defaults = _EMBEDDINGS[func]
        got = dict(zip(names, bind(args, kwargs, names, defaults)))
        if got["sparse"]:  # p.grad would be sparse: crashed inside the replay's vmap, or when norming p.grad
            raise ValueError(f"{_name(func)}(sparse=True) gives the parameter {self._named_in(args, kwargs)} a sparse "
                             "gradient, which no method can measure: use dense gradients (sparse=False) to measure it")
        if got["scale_grad_by_freq"]:
            raise ValueError(f"{_name(func)}(scale_grad_by_freq=True) scales each gradient by token counts over the "
                             f"whole batch, so examples interact: {_FIXED}")

    def _without_grad(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        computed = [t for t in _tensors(out) if t.is_floating_point()]
        if computed and _name(func) not in ("__get__", "detach", "detach_", "size", "dim"):
            raise ValueError(f"{_name(func)} uses the parameter {self._named_in(args, kwargs)} with gradients disabled "
                             "inside the forward (a custom autograd.Function, a torch.no_grad block, reentrant "
                             f"checkpointing?): its gradient cannot be followed per example; {_FIXED}")
        return out

    def _track(self, func: Callable, args: tuple, kwargs: dict, bdims: list, out: Any) -> None:
        "Where the batch dimension of each output went."
        first = args[0] if args and isinstance(args[0], Tensor) else None
        moved = _moved_bdim(func, args, kwargs, self._batched.get(first, _UNKNOWN) if first is not None else _UNKNOWN)
        common = bdims[0] if all(bd == bdims[0] for bd in bdims) else _UNKNOWN
        outs = list(_tensors(out)) or ([first] if first is not None and _inplace(func) else [])
        for t in outs:
            bd = common if moved is _KEEP else moved
            self._batched[t] = bd if bd is not _UNKNOWN and t.ndim > bd and t.shape[bd] == self._batch else _UNKNOWN

    def _mark_derived(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        "Outputs computed from parameters alone: remember how to recompute them from the parameters."
        call = _Call(func, self._template(args, {}), self._template(kwargs, {}))
        if isinstance(out, Tensor):
            if out.requires_grad:
                self._derived[out] = _Ref(call, None)
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, Tensor) and t.requires_grad:
                    self._derived[t] = _Ref(call, i)

    def _template(self, obj: Any, slots: dict) -> Any:
        "`obj` with parameters as _Param, parameter-derived tensors as _Ref and batched ones (in `slots`) as _Slot."
        if isinstance(obj, Tensor):
            if id(obj) in self._params:
                return _Param(id(obj))
            if obj in self._derived:
                return self._derived[obj]
            if id(obj) in slots:
                return slots[id(obj)]
            return obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._template(o, slots) for o in obj) if type(obj) in (tuple, list) else obj
        if isinstance(obj, dict):
            return {k: self._template(v, slots) for k, v in obj.items()}
        return obj

    def _hook(self, outs: list[Tensor], bdim: int | list[int], pids: set[int],
              parts_of: Callable[[list], dict[int, Part]]) -> None:
        """Mark `outs` batched (at `bdim`, or each at its own), count the uses, and hand the output gradients to
        `parts_of` during backward."""
        for t, d in zip(outs, bdim if isinstance(bdim, list) else [bdim] * len(outs)):
            self._batched[t] = d
        for pid in pids:
            self._uses[pid] = self._uses.get(pid, 0) + 1
        if len(outs) == 1:
            outs[0].register_hook(lambda grad: self._on_grads(parts_of, [grad]))
        else:  # once, with every output's gradient (None where the loss does not use it)
            register_multi_grad_hook(outs, lambda grads: self._on_grads(parts_of, list(grads)), mode="all")

    def _check_outputs(self, func: Callable, outs: list[Tensor], bdims: list[int], args: tuple, kwargs: dict) -> None:
        for t, bdim in zip(outs, bdims):
            if t.ndim <= bdim or t.shape[bdim] != self._batch:
                raise ValueError(f"{_name(func)} uses the parameter {self._named_in(args, kwargs)} and returns a "
                                 f"tensor of shape {tuple(t.shape)} without the batch dimension: the examples are "
                                 f"mixed, so per-example gradients do not exist; {_FIXED}")

    # --- rules --------------------------------------------------------------------------------------------------
    def _replayed(self, func: Callable, args: tuple, kwargs: dict, bdims: list, replay: tuple[tuple, dict] | None,
                  out_bdims: tuple[int, ...] | None = None) -> Any:
        """Any call: replay it on each example with torch.func, through the parameter-derived tensors it uses.

        Each batched input keeps the batch where it has it; the outputs have it where the inputs do, or at
        `out_bdims` (one for each output, for calls that know where theirs go). `replay` is (args, kwargs) for the
        replay when they differ from the call's (one example's sizes, no side effects)."""
        bdim = bdims[0] if bdims else 0
        slots: dict[int, _Slot] = {}
        batched, in_bdims = [], []
        for t in _tensors((args, kwargs)):
            if t in self._batched and id(t) not in slots:
                slots[id(t)] = _Slot(len(batched))
                batched.append(_plain(t.detach().clone() if _inplace(func) else t.detach()))
                in_bdims.append(self._batched[t])
        t_args, t_kwargs = self._template(replay if replay is not None else (args, kwargs), slots)
        pids = set(_params_in((t_args, t_kwargs)))
        out = func(*args, **kwargs)
        flat = list(_flat_out(out))
        idx = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
        if not idx:
            return out
        out, outs = _outside(out, idx)
        o_bdims = [bdim if out_bdims is None else out_bdims[i] for i in idx]
        self._check_outputs(func, outs, o_bdims, args, kwargs)
        zeros = [(t.shape, t.dtype, t.device) for t in outs]  # the gradient of an output the loss does not use
        inplace = _inplace(func)

        def forward(theta: dict, xs: list[Tensor]) -> list[Tensor]:
            "The call on one example (batch dimension of size 1, where each input has it), through the parameters."
            cache: dict = {}
            xs = [x.movedim(0, d) for x, d in zip(xs, in_bdims)]
            a = _evaluate(t_args, theta, xs, cache)
            if inplace:  # the per-example slice is a view of vmap's input: write into a copy
                a = (a[0].clone(), *a[1:])
            o = list(_flat_out(func(*a, **_evaluate(t_kwargs, theta, xs, cache))))
            return [o[i].movedim(d, 0) for i, d in zip(idx, o_bdims)]

        def parts_of(grads: list) -> dict[int, Part]:
            grads = [torch.zeros(s, dtype=dt, device=dev) if g is None else g for g, (s, dt, dev) in zip(grads, zeros)]
            theta = {pid: self._params[pid].detach() for pid in pids}
            return replayed_parts(forward, theta, [x.movedim(d, 0) for x, d in zip(batched, in_bdims)],
                                  [g.movedim(d, 0) for g, d in zip(grads, o_bdims)])

        self._hook(outs, o_bdims, pids, parts_of)
        return out

    def _attention(self, args: tuple, kwargs: dict) -> Any:
        """`F.multi_head_attention_forward`, replayed per example. Its query, key and value are (L, B, E)
        (nn.MultiheadAttention transposes batch_first inputs), a key_padding_mask (B, S); it returns (L, B, E) and
        the weights (B, L, S) or (B, heads, L, S)."""
        names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
                 "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
                 "key_padding_mask", "need_weights", "attn_mask")
        got = dict(zip(names, bind(args, kwargs, names, (True, None, True, None))))
        at = {n: self._batched.get(got[n], "constant") if isinstance(got[n], Tensor) else "constant"
              for n in ("query", "key", "value", "key_padding_mask", "attn_mask")}
        if any(at[n] != 1 for n in ("query", "key", "value")) or at["key_padding_mask"] not in ("constant", 0) \
                or at["attn_mask"] != "constant":
            shapes = {n: tuple(got[n].shape) for n in at if isinstance(got[n], Tensor)}
            raise ValueError(f"attention uses the parameter {self._named_in(args, kwargs)} on tensors whose batch "
                             f"dimension per-example norms cannot follow ({shapes}; an attn_mask per example merges "
                             f"the batch with the heads: use key_padding_mask): {_FIXED}")
        return self._replayed(F.multi_head_attention_forward, args, kwargs, [1], None, out_bdims=(1, 0))

    def _linear(self, args: tuple, kwargs: dict) -> Any:
        x, w, b = bind(args, kwargs, ("input", "weight", "bias"), (None,))
        use = self._direct(w, b)
        if use is None or x not in self._batched:
            return _NO_RULE
        out = F.linear(x, w, b)
        a = _plain(x.detach())
        self._hook([out], 0, {id(p) for p in use.values()},
                   lambda g: self._keyed(linear_parts(a, g[0], "weight" in use, "bias" in use), use))
        return out

    def _embedding(self, args: tuple, kwargs: dict) -> Any:
        idx, w, padding_idx = bind(args, kwargs, *_EMBEDDINGS[F.embedding])[:3]
        use = self._direct(w)
        if use is None or idx not in self._batched:
            return _NO_RULE
        out = F.embedding(*args, **kwargs)
        saved = _plain(idx.detach())
        self._hook([out], 0, {id(w)},
                   lambda g: self._keyed(embedding_parts(saved, g[0], w.shape[0], padding_idx), use))
        return out

    def _norm(self, args: tuple, kwargs: dict, rms: bool) -> Any:
        names = ("input", "normalized_shape", "weight", "eps") if rms else \
            ("input", "normalized_shape", "weight", "bias", "eps")
        got = bind(args, kwargs, names, (None, None) if rms else (None, None, 1e-5))
        x, shape, w, b, eps = (*got[:3], None, got[3]) if rms else got
        use = self._direct(w, b)
        if use is None or x not in self._batched:
            return _NO_RULE
        out = (F.rms_norm if rms else F.layer_norm)(*args, **kwargs)
        saved = _plain(x.detach())
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self._hook([out], 0, {id(p) for p in use.values()}, lambda g: self._keyed(
            layer_norm_parts(saved, g[0], shape, eps, rms, "weight" in use, "bias" in use), use))
        return out

    def _rnn(self, func: Callable, args: tuple, kwargs: dict, bdims: list) -> Any:
        kind = _RNNS[func]
        if kwargs or len(args) != 9 or not isinstance(args[3], bool):
            raise ValueError(f"{kind} on a PackedSequence is not supported by per-example norms: pad the sequences "
                             f"instead, or {_FIXED}")
        x, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
        bdim = 0 if batch_first else 1
        if self._batched.get(x, _UNKNOWN) != bdim:
            raise ValueError(f"the input of {kind} does not have the batch at dimension {bdim} (batch_first="
                             f"{batch_first}), shape {tuple(x.shape)}: {_FIXED}")
        n_dir = 2 if bidirectional else 1
        if len(weights) != num_layers * n_dir * (4 if has_biases else 2):
            raise ValueError(f"{kind} with projections (proj_size > 0) is not supported by per-example norms: {_FIXED}")
        if dropout > 0 and train and num_layers > 1:
            raise ValueError(f"{kind} with dropout between its layers in training draws random masks that cannot be "
                             f"replayed per example: set dropout=0 or {_FIXED}")
        if any(w in self._derived for w in weights):
            raise ValueError(f"{kind} with weights computed from parameters (weight_norm?) is not supported by "
                             f"per-example norms: {_FIXED}")
        trainable = [id(w) in self._params for w in weights]
        xs = _plain(x.detach() if batch_first else x.detach().transpose(0, 1))
        states = [_plain(h.detach()) for h in (hx if isinstance(hx, (tuple, list)) else (hx,))]
        ws = [_plain(w.detach()) for w in weights]
        out = func(*args)
        idx = [i for i, t in enumerate(out) if t.requires_grad]
        if not idx:
            return out
        out, outs = _outside(out, idx)
        pids = {id(w) for w, tr in zip(weights, trainable) if tr}

        def parts_of(grads: list) -> dict[int, Part]:
            full = [None] * len(out)
            for i, g in zip(idx, grads):
                full[i] = g
            if full[0] is not None and not batch_first:
                full[0] = full[0].transpose(0, 1)
            parts = rnn_parts(kind, xs, states, ws, trainable, has_biases, num_layers, bidirectional, full)
            return {id(weights[i]): p for i, p in parts.items()}

        self._hook(outs, bdim, pids, parts_of)
        for i, t in zip(idx, outs):
            self._batched[t] = bdim if i == 0 else 1  # h_n (and c_n): (layers·directions, B, H)
        return out

    def _direct(self, *params: Tensor | None) -> dict[str, Tensor] | None:
        "{'weight': w, 'bias': b} for the trainable ones when all are parameters or constants; None if one is derived."
        if any(p is not None and p in self._derived for p in params):
            return None
        names = ("weight", "bias")[:len(params)]
        use = {n: p for n, p in zip(names, params) if p is not None and id(p) in self._params}
        return use or None

    @staticmethod
    def _keyed(parts: dict[str, Part], use: dict[str, Tensor]) -> dict[int, Part]:
        return {id(use[k]): p for k, p in parts.items()}

    # --- the backward pass ----------------------------------------------------------------------------------
    def _on_grads(self, parts_of: Callable[[list], dict[int, Part]], grads: list) -> None:
        "All the work of one call's hook: its rule on the output gradients, and the norms."
        self._add(parts_of(grads))

    def _add(self, parts: dict[int, Part]) -> None:
        for pid, part in parts.items():
            if self._uses.get(pid, 1) == 1:
                self._accumulate(sq_norms([part]))
                continue
            pending = self._pending.setdefault(pid, [])
            pending.append(part)
            if len(pending) == self._uses[pid]:
                self._finish(pid)

    def _finish(self, pid: int) -> None:
        self._accumulate(sq_norms(self._pending.pop(pid)))

    def _accumulate(self, sq: Tensor) -> None:
        self._sq = sq if self._sq is None else self._sq + sq

    def _named(self, t: Tensor) -> str:
        pids = _params_in(self._template(t, {}))
        return ", ".join(f"'{self.names[p]}'" for p in dict.fromkeys(pids)) or "?"

    def _named_in(self, args: tuple, kwargs: dict) -> str:
        pids = _params_in(self._template((args, kwargs), {}))
        return ", ".join(f"'{self.names[p]}'" for p in dict.fromkeys(pids)) or "?"


_NORMS = (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm), nn.GroupNorm, nn.modules.batchnorm._NormBase)


def norm_layer_params(model: nn.Module) -> list[nn.Parameter]:
    "The trainable parameters of the model's normalisation layers (LayerNorm, RMSNorm, GroupNorm, ...)."
    return [p for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)
            if p.requires_grad]


class _Tracer(TorchFunctionMode):
    "Sends every torch call of the forward to `PerExampleNorms.call` (the mode is off inside it)."

    def __init__(self, norms: PerExampleNorms):
        super().__init__()
        self.norms = norms

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.norms.call(func, args, kwargs or {})


# --- recomputing parameter-derived tensors -------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Call:
    func: Callable
    args: Any
    kwargs: Any


@dataclass(frozen=True)
class _Ref:
    "Output `index` (None: the only one) of a call on parameters alone."
    call: _Call
    index: int | None


@dataclass(frozen=True)
class _Param:
    pid: int


@dataclass(frozen=True)
class _Slot:
    "The i-th batched tensor of a replayed call."
    i: int


def _evaluate(obj: Any, theta: dict[int, Tensor], xs: list[Tensor], cache: dict) -> Any:
    if isinstance(obj, _Param):
        return theta[obj.pid]
    if isinstance(obj, _Slot):
        return xs[obj.i]
    if isinstance(obj, _Ref):
        call = obj.call
        if call not in cache:
            cache[call] = call.func(*_evaluate(call.args, theta, xs, cache), **_evaluate(call.kwargs, theta, xs, cache))
        return cache[call] if obj.index is None else cache[call][obj.index]
    if type(obj) in (tuple, list):
        return type(obj)(_evaluate(o, theta, xs, cache) for o in obj)
    if isinstance(obj, dict):
        return {k: _evaluate(v, theta, xs, cache) for k, v in obj.items()}
    return obj


def _params_in(obj: Any) -> Iterator[int]:
    for leaf in _leaves(obj):
        if isinstance(leaf, _Param):
            yield leaf.pid
        elif isinstance(leaf, _Ref):
            yield from _params_in((leaf.call.args, leaf.call.kwargs))


# --- small helpers ------------------------------------------------------------------------------------------------
_NO_RULE = object()
_KEEP = object()
_IN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_RULES: dict[Callable, Callable] = {
    F.linear: PerExampleNorms._linear,
    F.embedding: PerExampleNorms._embedding,
    F.layer_norm: lambda self, a, k: self._norm(a, k, rms=False),
}
if hasattr(F, "rms_norm"):
    _RULES[F.rms_norm] = lambda self, a, k: self._norm(a, k, rms=True)
_EMBEDDINGS = {  # argument names and the defaults of the optional ones
    F.embedding: (("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
                  (None, None, 2.0, False, False)),
    F.embedding_bag: (("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
                       "per_sample_weights", "include_last_offset", "padding_idx"),
                      (None, None, 2, False, "mean", False, None, False, None)),
}
_FACTORIES = {"zeros", "ones", "full", "empty", "randn", "rand", "randint", "normal"}
_EXPANDS = {torch.Tensor.expand, torch.Tensor.repeat, torch.broadcast_to, torch.Tensor.broadcast_to}


def _leaves(obj: Any) -> Iterator[Any]:
    "What nested tuples, lists and dicts hold (a call's arguments or outputs)."
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)
    else:
        yield obj


def _tensors(obj: Any) -> Iterator[Tensor]:
    "The tensors in a call's arguments or outputs."
    return (t for t in _leaves(obj) if isinstance(t, Tensor))


def _flat_out(out: Any) -> Iterator[Any]:
    if isinstance(out, (tuple, list)):
        yield from out
    else:
        yield out


def _outside(out: Any, idx: list[int]) -> tuple[Any, list[Tensor]]:
    """`out` with its differentiated outputs `idx` as identity views, and those views.

    A hook on an output of a composite call sees every gradient reaching it, including the one
    from another output computed from it (LSTMCell's h from c); a hook on a view sees only what
    the rest of the model sends back, which is what a replay of the call needs."""
    if isinstance(out, Tensor):
        return out, [out]
    items = list(out)
    for i in idx:
        items[i] = items[i].view_as(items[i])
    new = items if isinstance(out, list) else tuple(items) if type(out) is tuple else type(out)(items)
    return new, [items[i] for i in idx]


def _plain(t: Tensor) -> Tensor:
    "A plain torch.Tensor (fastai's tensor subclasses do not go through vmap)."
    return t.as_subclass(Tensor) if type(t) is not Tensor and not isinstance(t, nn.Parameter) else t


def _name(func: Callable) -> str:
    return getattr(func, "__name__", repr(func))


def _inplace(func: Callable) -> bool:
    name = _name(func)
    return (name.endswith("_") and not name.startswith("__")) or name in (
        "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__")


def _one_example_sizes(func: Callable, args: tuple, batch: int | None) -> tuple | None:
    """For `p.expand(B, ...)`, `p.repeat(B, ...)`, `broadcast_to(p, (B, ...))` on parameter-derived p: the same
    arguments with B replaced by 1 (one example's copy). None for any other call."""
    if func not in _EXPANDS or len(args) < 2:
        return None
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
    if not sizes or sizes[0] != batch:
        return None
    one = (1, *sizes[1:])
    return (args[0], one) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else (args[0], *one)


def _replay_args(func: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The arguments of a call's replay, without what the call does in place besides computing its output (None: the
    call's own). The replay runs again in backward: `embedding_bag(max_norm=...)` would renormalise the table again
    (vmap refuses it), `instance_norm` with running statistics would update them again (vmap refuses that too)."""
    if func is F.embedding_bag:
        got = bind(args, kwargs, *_EMBEDDINGS[func])
        got[3] = None  # max_norm: the forward renormalised the rows it used, the replay reads them as they are
        return tuple(got), {}
    if func is F.instance_norm:
        got = bind(args, kwargs, _IN_ARGS, (None, None, None, None, True, 0.1, 1e-5))
        if got[5]:  # use_input_stats: the output does not read the running statistics, it only updates them
            got[1] = got[2] = None
        return tuple(got), {}
    return None


def _moved_bdim(func: Callable, args: tuple, kwargs: dict, bd: int | None) -> Any:
    "Where the batch dimension `bd` of args[0] goes for view-like calls; _KEEP for other calls."
    name = _name(func)
    if bd is _UNKNOWN or not args or not isinstance(args[0], Tensor):
        return _KEEP
    nd = args[0].ndim
    try:
        if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
            d0, d1 = (int(args[1]) % nd, int(args[2]) % nd) if len(args) >= 3 else (kwargs["dim0"] % nd,
                                                                                  kwargs["dim1"] % nd)
            return d1 if bd == d0 else d0 if bd == d1 else bd
        if name == "t":
            return 1 - bd if nd == 2 else bd
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return [int(d) % nd for d in dims].index(bd)
        if name in ("unsqueeze", "unsqueeze_"):
            d = int(args[1] if len(args) > 1 else kwargs["dim"])
            d = d % (nd + 1)
            return bd + 1 if d <= bd else bd
        if name in ("unbind", "select"):
            d = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % nd
            return _UNKNOWN if d == bd else bd - 1 if d < bd else bd
        if name == "__getitem__":
            return _indexed_bdim(args[1], bd)
    except (KeyError, ValueError, TypeError, IndexError):
        return _UNKNOWN
    return _KEEP


def _indexed_bdim(index: Any, bd: int) -> Any:
    index = index if isinstance(index, tuple) else (index,)
    if any(e is None or e is Ellipsis or isinstance(e, (Tensor, list, bool)) for e in index):
        return _KEEP
    if bd < len(index) and isinstance(index[bd], int):
        return _UNKNOWN  # one example picked out
    return bd - sum(isinstance(e, int) for e in index[:bd])
