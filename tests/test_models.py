"""bs_find's number on the models people train, against the exact per-example value, or a clear refusal.

1. Whole runs: frozen layers, parameters that some batches do not use, and datasets small enough that
   windows straddle epochs.
2. Model families through every method (embedding bags, encoders, checkpointing, experts, buffers, weight
   norm, compiled models): exact against every per-example gradient or refused clearly, and the user's state
   back exactly after the run.
3. method='per_example' on recurrent layers, tied and functional weights, position embeddings, bare
   parameters and a small GPT: its per-example norms exact, or refused.
"""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find
from gns_widget.per_example import PerExampleNorms, norm_layer_params
from tests.exact import exact_noise_scale, sq_norms_by_backward
from tests.gpt import TinyGPT, markov_tokens, next_token_loss
from tests.test_per_example import _Conv

# ---------------------------------------------------------------- 1. whole runs on the models people train
N = 20_000


def _loader(x, y, bs=50, seed=2):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _regression(n=N, d=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.tanh(x @ torch.randn(d, 1, generator=gen)) + 0.3 * torch.randn(n, 1, generator=gen)
    return x, y


@pytest.mark.slow
def test_frozen_first_layer_measures_the_trainable_parameters():
    "Fine-tuning: the frozen layer's weights are not gradients; the exact value is that of what trains."
    x, y = _regression()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 1))
    model[0].requires_grad_(False)
    _, _, exact = exact_noise_scale(model, nn.MSELoss(), x, y)
    frozen = [p.clone() for p in model[0].parameters()]
    res = bs_find(model, _loader(x, y), nn.MSELoss(), lr=0, num_it=2000, n_batch=10, device="cpu")
    assert res.noise_scale == pytest.approx(exact, rel=0.10)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))


@pytest.mark.slow
def test_frozen_weight_trainable_bias():
    x, y = _regression()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 1))
    model[0].weight.requires_grad_(False)
    _, _, exact = exact_noise_scale(model, nn.MSELoss(), x, y)
    res = bs_find(model, _loader(x, y), nn.MSELoss(), lr=0, num_it=2000, n_batch=10, device="cpu",
                  method="fixed")
    assert res.noise_scale == pytest.approx(exact, rel=0.10)


class _RareExpert(nn.Module):
    "A mixture-of-experts in miniature: the rare expert only runs for the few examples routed to it."

    def __init__(self):
        super().__init__()
        self.common, self.rare = nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, x):
        out = self.common(x)
        routed = x[:, 0] > 1.0  # ~16% of examples: many batches of 10 have none, and rare gets no gradient
        if routed.any():
            out = out.clone()
            out[routed] = out[routed] + self.rare(x[routed])
        return out


def _rare_expert_exact(model: _RareExpert, x, y) -> float:
    "Per-example gradients in closed form (MSE on linear experts): 2r·[x, 1] for each expert the example uses."
    with torch.no_grad():
        r = 2 * (model(x) - y)  # (N, 1)
    ones = torch.ones(len(x), 1)
    routed = (x[:, :1] > 1.0).double()
    g = torch.cat([r * x, r, routed * r * x, routed * r * ones], 1).double()
    G = g.mean(0)
    return ((g - G).square().sum(1).mean() / G.square().sum()).item()


@pytest.mark.slow
def test_parameters_unused_by_some_batches_count_as_zero_gradients():
    "Buffers are keyed by parameter: the set of parameters with a gradient changes from batch to batch."
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, 8, generator=gen)
    y = x[:, 1:2] + 3 * (x[:, :1] > 1.0) * x[:, 2:3] + 0.3 * torch.randn(N, 1, generator=gen)
    torch.manual_seed(3)
    model = _RareExpert()
    exact = _rare_expert_exact(model, x, y)
    rare_calls = []
    orig_forward = model.rare.forward
    model.rare.forward = lambda t: (rare_calls.append(len(t)), orig_forward(t))[1]
    dl = _loader(x, y, bs=10)
    res = bs_find(model, dl, nn.MSELoss(), lr=0, num_it=4000, n_batch=10, device="cpu")
    assert len(rare_calls) < 4000 * 0.9  # many batches did not use the rare expert at all
    assert res.noise_scale == pytest.approx(exact, rel=0.10)


def _near_optimum(n: int, seed: int = 0):
    "A linear problem near its optimum, where the noise scale is large compared with a small dataset."
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    w = torch.randn(5, 1, generator=gen)
    y = x @ w + 4 * torch.randn(n, 1, generator=gen)
    model = nn.Linear(5, 1)
    with torch.no_grad():
        model.weight.copy_(w.T + 0.25)
        model.bias.zero_()
    return model, x, y


@pytest.mark.slow
@pytest.mark.parametrize("n, bs, n_batch", [(500, 10, 20), (150, 10, 20)],
                         ids=["windows-straddle-epochs", "window-larger-than-dataset"])
def test_small_datasets_are_exact_across_epoch_boundaries(n, bs, n_batch):
    """Batches of one epoch are drawn without replacement, of different epochs independently: the estimator's
    finite-population terms follow each window's mix of epochs (−13% and −18..−38% before)."""
    model, x, y = _near_optimum(n)
    _, _, exact = exact_noise_scale(model, nn.MSELoss(), x, y)
    assert exact > 0.2 * n  # a regime where the correction matters
    res = bs_find(model, _loader(x, y, bs=bs, seed=0), nn.MSELoss(), lr=0, num_it=6000, n_batch=n_batch,
                  beta=0.995, device="cpu")
    assert res.noise_scale == pytest.approx(exact, rel=0.10)


# ---------------------------------------------------------------- 2. model families through every method
METHODS = ["fixed", "sequential", "per_example"]
N_FAMILY = 16


class _Bag(nn.Module):
    "Token ids → EmbeddingBag → Linear: bag-of-words text classification."

    def __init__(self, **bag):
        super().__init__()
        self.bag, self.fc = nn.EmbeddingBag(20, 8, **bag), nn.Linear(8, 3)

    def forward(self, idx):
        return self.fc(self.bag(idx))


class _FunctionalSparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.table, self.fc = nn.Parameter(torch.randn(20, 8)), nn.Linear(8, 3)

    def forward(self, idx):
        return self.fc(F.embedding(idx, self.table, sparse=True).mean(1))


def _tokens(n: int = N_FAMILY) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randint(0, 20, (n, 6), generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make, name", [
    (lambda: _Bag(sparse=True), "'bag.weight'"),
    (lambda: nn.Sequential(nn.Embedding(20, 8, sparse=True), nn.Flatten(), nn.Linear(48, 3)), ""),
    (_FunctionalSparse, "'table'"),
], ids=["embedding-bag", "embedding", "functional"])
def test_sparse_gradients_are_refused_clearly(make, name, method):
    "Every method refuses a sparse gradient with a ValueError saying sparse=False (per_example crashed inside vmap)."
    torch.manual_seed(0)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{name if method == 'per_example' else ''}.*sparse.*sparse=False"):
        bs_find(model, _tokens(), nn.CrossEntropyLoss(), lr=0.1, num_it=4, n_batch=2, method=method, device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- per-example norms against every example's own backward pass ----------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _one_step(model, x, y, norms=None):
    "A forward and backward as bs_find takes them (in norms' hooks if given); the state it leaves."
    model.zero_grad(set_to_none=True)
    if norms is None:
        F.cross_entropy(model(x), y).backward()
        return _state(model), None
    with norms:
        out = model(x)
        with norms.in_loss():
            loss = F.cross_entropy(out, y)
        loss.backward()
        return _state(model), norms.pop().double()


class _BilinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear = nn.Bilinear(5, 5, 3)

    def forward(self, x):
        return self.bilinear(x, x.tanh())


class _Flat(nn.Module):
    def __init__(self, body: nn.Module, n_features: int):
        super().__init__()
        self.body, self.fc = body, nn.Linear(n_features, 3)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


_img = lambda: torch.randn(N_FAMILY, 4, 6, 6)  # noqa: E731
_tok = lambda: torch.randint(0, 20, (N_FAMILY, 6))  # noqa: E731


class _Encoder(nn.Module):
    "Token ids → one nn.TransformerEncoderLayer → mean-pooled head, batch first or sequence first."

    def __init__(self, batch_first: bool, norm_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 3)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)

    def forward(self, idx):
        h = self.emb(idx) if self.batch_first else self.emb(idx).transpose(0, 1)
        h = self.layer(h)
        return self.fc((h if self.batch_first else h.transpose(0, 1)).mean(1))


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7)), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc(torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False))


class _TopOneExperts(nn.Module):
    "Mixture of experts, top-1 routing by masks: each expert's parameters get gradients from some examples only."

    def __init__(self):
        super().__init__()
        self.gate, self.fc = nn.Linear(5, 3), nn.Linear(4, 3)
        self.experts = nn.ModuleList(nn.Linear(5, 4) for _ in range(3))

    def forward(self, x):
        p = self.gate(x).softmax(-1)
        routed = F.one_hot(p.argmax(-1), 3) * p
        return self.fc(sum(e(x) * routed[:, i:i + 1] for i, e in enumerate(self.experts)))


class _Buffers(nn.Module):
    "An int step counter the forward updates and a bool feature mask."

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("mask", torch.tensor([True, False, True, True, True]))

    def forward(self, x):
        if self.training:
            self.steps += 1
        return self.fc(x * self.mask)


class _Lookups(nn.Module):
    "A parameter read through indexing, torch.where, gather and index_select."

    def __init__(self):
        super().__init__()
        self.table, self.w, self.fc = nn.Parameter(torch.randn(20, 4)), nn.Parameter(torch.randn(4)), nn.Linear(4, 3)

    def forward(self, idx):
        e = self.table[idx]
        e = torch.where(e > 0, e * self.w, e)
        g = self.table.unsqueeze(0).expand(len(idx), -1, -1).gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
        return self.fc((e + g).mean(1) + self.table.index_select(0, idx[:, 0]))


def _pruned():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)  # weight = weight_orig * weight_mask, in a pre-hook
    return model


_x = lambda: torch.randn(N_FAMILY, 5)  # noqa: E731
_par = nn.utils.parametrizations
FAMILIES = {  # name: (model, inputs)
    "instance-norm-running-stats": (lambda: _Flat(nn.Sequential(nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(
        4, affine=True, track_running_stats=True)), 64), _img),
    "embedding-bag-max-norm": (lambda: _Bag(mode="mean", max_norm=1.0), _tok),
    "embedding-bag-max": (lambda: _Bag(mode="max"), _tok),
    "weight-norm": (lambda: nn.Sequential(_par.weight_norm(nn.Linear(5, 7)), nn.Tanh(), nn.Linear(7, 3)), _x),
    "orthogonal": (lambda: nn.Sequential(_par.orthogonal(nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, 3)), _x),
    "pruned": (_pruned, _x),
    "grouped-conv-channels-last": (lambda: _Flat(nn.Conv2d(4, 8, 3, groups=2), 128).to(
        memory_format=torch.channels_last), lambda: _img().contiguous(memory_format=torch.channels_last)),
    "depthwise-conv-circular": (lambda: _Flat(nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="circular"),
                                              144), _img),
    "conv-transpose": (lambda: _Flat(nn.ConvTranspose2d(4, 2, 3, stride=2), 338), _img),
    "conv1d": (lambda: _Flat(nn.Sequential(nn.Conv1d(4, 5, 3), nn.ReLU(), nn.Conv1d(5, 2, 3, dilation=2)), 6),
               lambda: torch.randn(N_FAMILY, 4, 9)),
    "prelu-groupnorm": (lambda: _Flat(nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4), nn.PReLU(4)), 64),
                        _img),
    "bilinear": (lambda: nn.Sequential(nn.Linear(5, 5), _BilinearHead()), _x),
    "encoder-sequence-first-norm-first": (lambda: _Encoder(False, True), _tok),
    "encoder-batch-first": (lambda: _Encoder(True, False), _tok),
    "checkpoint-non-reentrant": (_Checkpointed, _x),
    "mixture-of-experts": (_TopOneExperts, _x),
    "int-and-bool-buffers": (_Buffers, _x),
    "index-where-gather": (_Lookups, _tok),
    "float64": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double(),
                lambda: torch.randn(N_FAMILY, 5, dtype=torch.float64)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_per_example_norms_equal_exact_and_leave_the_state_a_step_leaves(family):
    """Each example's |g|² as its own backward pass gives it; buffers and weights the forward changes in place
    (running statistics, max_norm renormalisation) change once, as in a plain step, not again in the replay."""
    from gns_widget.per_example import PerExampleNorms

    make_model, make_x = FAMILIES[family]
    torch.manual_seed(0)
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (N_FAMILY,))
    start = _state(model)
    expected = sq_norms_by_backward(model, nn.CrossEntropyLoss(), x, y)
    model.load_state_dict(start)
    plain, _ = _one_step(model, x, y)
    model.load_state_dict(start)
    measured, got = _one_step(model, x, y, PerExampleNorms(model))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for k, v in plain.items():
        assert torch.equal(measured[k], v), k


def test_embedding_bag_counting_tokens_over_the_batch_is_refused():
    "scale_grad_by_freq divides by counts over the whole batch: replayed alone, each example was off (-7% in |G|²)."
    with pytest.raises(ValueError, match=r"embedding_bag\(scale_grad_by_freq=True\).*examples interact"):
        bs_find(_Bag(scale_grad_by_freq=True), _tokens(), nn.CrossEntropyLoss(), lr=0, num_it=4, method="per_example",
                device="cpu")


# --- bs_find end to end: the exact value, and the state back ----------------------------------------------------------
def _exact_rows(model, x, y):
    "(N, P) per-example gradients of the trainable parameters, from one backward pass per example."
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        gs = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), ps, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten() for g, p in zip(gs, ps)]))
    return torch.stack(rows)


def _expected(method, g):
    """(noise, scale) bs_find must give at lr=0 (beta=1: the plain mean of its estimates), from the exact rows `g`.

    fixed/sequential: batches of 1 and a window of the whole (shuffled) dataset, so the small batches are every
    example once and the big batch is all of them: tr Σ and |G|² exactly. per_example: the two halves of the data as
    batches, each an estimate from its examples' |g_j|² and its own |mean g|² (no population size: a list of batches).
    """
    if method != "per_example":
        G = g.mean(0)
        return (g.square().sum(1).mean() - G.square().sum()).item(), G.square().sum().item()
    b = len(g) // 2
    ests = []
    for half in (g[:b], g[b:]):
        small, big = half.square().sum(1).mean().item(), half.mean(0).square().sum().item()
        ests.append(((small - big) / (1 - 1 / b), (big - small / b) / (1 - 1 / b)))
    return tuple(sum(e[i] for e in ests) / 2 for i in range(2))


def _family_loader(method, x, y):
    if method == "per_example":
        return [(x[:N_FAMILY // 2], y[:N_FAMILY // 2]), (x[N_FAMILY // 2:], y[N_FAMILY // 2:])]
    return DataLoader(TensorDataset(x, y), batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(0))


END_TO_END = ["instance-norm-running-stats", "embedding-bag-max-norm", "encoder-sequence-first-norm-first",
              "mixture-of-experts", "int-and-bool-buffers", "weight-norm"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", END_TO_END)
def test_bs_find_equals_exact(family, method):
    make_model, make_x = FAMILIES[family]
    torch.manual_seed(0)
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (N_FAMILY,))
    with torch.no_grad():
        model(x)  # max_norm renormalises the rows once: the weights then stay as they are
    noise, scale = _expected(method, _exact_rows(model, x, y))
    res = bs_find(model, _family_loader(method, x, y), nn.CrossEntropyLoss(), lr=0, method=method, device="cpu",
                  num_it=2 if method == "per_example" else N_FAMILY, n_batch=N_FAMILY)
    assert res.history.noise.iloc[-1] == pytest.approx(noise, rel=1e-5)
    assert res.history.scale.iloc[-1] == pytest.approx(scale, rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["instance-norm-running-stats", "embedding-bag-max-norm", "int-and-bool-buffers",
                                    "pruned", "weight-norm"])
def test_training_run_restores_weights_buffers_optimizer_and_rng(family, method):
    "Buffers the forward updates (running statistics, counters, renormalised rows) come back too."
    from tests.test_engine import _assert_same, _snapshot

    make_model, make_x = FAMILIES[family]
    torch.manual_seed(0)
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (N_FAMILY,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    before = _snapshot(model, opt)
    dl = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    res = bs_find(model, dl, nn.CrossEntropyLoss(), lr=0.05, num_it=8, n_batch=2, opt=opt, method=method,
                  device="cpu")
    assert len(res.history) == (8 if method == "per_example" else 4)
    _assert_same(before, _snapshot(model, opt))


@pytest.mark.slow
@pytest.mark.parametrize("compile_", [torch.compile, lambda m: m.compile() or m],
                         ids=["torch.compile", "Module.compile"])
def test_per_example_runs_a_compiled_model_eagerly_with_the_same_result(compile_):
    """The tracer must see every call: dynamo compiled it per call signature up to its recompile limit (warnings,
    2x the run's time on a small GPT) and then ran it eagerly anyway. Now nothing is compiled and nothing changes."""
    from torch._dynamo.utils import counters

    make_model, make_x = FAMILIES["encoder-batch-first"]
    torch.manual_seed(0)
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (N_FAMILY,))
    dl = lambda: DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True,  # noqa: E731
                            generator=torch.Generator().manual_seed(0))
    kw = dict(lr=0, num_it=8, method="per_example", device="cpu")
    eager = bs_find(model, dl(), nn.CrossEntropyLoss(), **kw)
    frames = counters["frames"]["total"]
    compiled = bs_find(compile_(model), dl(), nn.CrossEntropyLoss(), **kw)
    assert counters["frames"]["total"] == frames
    assert compiled.history.noise.tolist() == eager.history.noise.tolist()
    assert compiled.history.scale.tolist() == eager.history.scale.tolist()


# ---------------------------------------------------------------- 3. method='per_example' on the models people train
B = 6


def _trainable_grads(model, loss_func, x, y, chunk: int = 4096):
    "(N, P) per-example gradients of the trainable parameters only, by torch.func (frozen ones held fixed)."
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

    def loss_one(p, xi, yi):
        return loss_func(functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))
    rows = []
    for i in range(0, len(x), chunk):
        gs = g(trainable, x[i:i + chunk], y[i:i + chunk])
        rows.append(torch.cat([v.reshape(len(v), -1) for v in gs.values()], 1).double())
    return torch.cat(rows)


def _exact_sq_norms(model, loss_func, x, y, vmapped=True):
    "|g_j|² of the trainable parameters: torch.func, or one backward per example where vmap cannot batch (GRU)."
    if vmapped:
        return _trainable_grads(model, loss_func, x, y).square().sum(1)
    return sq_norms_by_backward(model, loss_func, x, y)


def _exact_noise_scale(model, loss_func, x, y) -> tuple[float, float]:
    "(tr Σ, |G|²) of the trainable parameters over the whole dataset."
    g = _trainable_grads(model, loss_func, x, y)
    G = g.mean(0)
    return (g.square().sum(1).mean() - G.square().sum()).item(), G.square().sum().item()


def _norms(model, loss_func, x, y):
    with PerExampleNorms(model) as norms:
        out = model(x)
        with norms.in_loss():
            loss = loss_func(out, y)
        loss.backward()
        return norms.pop().double()


class _Recurrent(nn.Module):
    "A recurrent layer and a Linear head that reads the outputs and the final states."

    def __init__(self, kind: str, batch_first: bool = True, **kw):
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.rnn = getattr(nn, kind)(4, 5, batch_first=batch_first, **kw)
        self.fc = nn.Linear(5 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        out, h = self.rnn(x if self.batch_first else x.transpose(0, 1))
        out = out if self.batch_first else out.transpose(0, 1)
        last = (h[0] + h[1] if self.kind == "LSTM" else h)[-1]
        return self.fc(out.mean(1)) + self.fc(torch.cat([last] * (out.shape[-1] // 5), 1))


class _CellLoop(nn.Module):
    "LSTMCell over time: one parameter used T times, initial states from torch.zeros(B, H)."

    def __init__(self):
        super().__init__()
        self.cell, self.fc = nn.LSTMCell(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = c = torch.zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.fc(h)


class _FunctionalTied(nn.Module):
    "An embedding whose table is also the output layer, through F.linear (no lm_head module)."

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(11, 6, padding_idx=0), nn.Linear(6, 6)

    def forward(self, idx):
        return F.linear(torch.tanh(self.lin(self.emb(idx))), self.emb.weight).mean(1)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _Attention(nn.Module):
    "nn.MultiheadAttention as people call it: need_weights=True (the default), the weights used too."

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.att, self.fc = nn.MultiheadAttention(4, 2, batch_first=batch_first), nn.Linear(4, 3)

    def forward(self, x):
        s = x if self.batch_first else x.transpose(0, 1)
        out, weights = self.att(s, s, s)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.fc(out.mean(1)) + weights.mean((1, 2)).unsqueeze(1)


class _PaddedEncoder(nn.Module):
    "A transformer encoder over padded token sequences: the padding mask is (B, T) while attention runs on (T, B, d)."

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, idx):
        return self.fc(self.enc(self.emb(idx), src_key_padding_mask=idx == 0).mean(1))


def _padded_tokens():
    idx = torch.randint(1, 11, (B, 5))
    idx[::2, -2:] = 0  # every other sequence is padded
    return idx


def _partly_frozen_mlp():
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].requires_grad_(False)  # a frozen layer
    model[1].weight.requires_grad_(False)  # LayerNorm: weight frozen, bias trains
    model[3].weight.requires_grad_(False)  # Linear: weight frozen, bias trains
    return model


def _partly_frozen_gpt():
    model = TinyGPT()
    model.wpe.requires_grad_(False)
    model.block.c_fc.weight.requires_grad_(False)
    model.block.ln_1.bias.requires_grad_(False)
    return model


def _frozen_lstm():
    model = _Recurrent("LSTM", num_layers=2)
    model.rnn.weight_hh_l0.requires_grad_(False)
    model.rnn.bias_ih_l1.requires_grad_(False)
    return model


_seq, _tok = (lambda: torch.randn(B, 7, 4), lambda: torch.randint(0, 3, (B,))), \
    (lambda: torch.randint(0, 11, (B, 5)), lambda: torch.randint(0, 11, (B,)))
_gpt = (lambda: markov_tokens(B, seed=3)[0], lambda: markov_tokens(B, seed=3)[1])
CASES = {  # name: (model, inputs, targets, loss, torch.func can vmap it)
    "frozen-layers-and-biases": (_partly_frozen_mlp, lambda: torch.randn(B, 5), _seq[1], nn.CrossEntropyLoss(), True),
    "lstm": (lambda: _Recurrent("LSTM"), *_seq, nn.CrossEntropyLoss(), False),
    "gru-2-layers-bidirectional-seq-first": (lambda: _Recurrent("GRU", False, num_layers=2, bidirectional=True),
                                             *_seq, nn.CrossEntropyLoss(), False),
    "rnn-relu": (lambda: _Recurrent("RNN", nonlinearity="relu"), *_seq, nn.CrossEntropyLoss(), False),
    "lstm-partly-frozen": (_frozen_lstm, *_seq, nn.CrossEntropyLoss(), False),
    "lstm-cell-loop": (_CellLoop, *_seq, nn.CrossEntropyLoss(), False),
    "functional-tied-embedding": (_FunctionalTied, *_tok, nn.CrossEntropyLoss(), True),
    "layer-called-twice": (_Twice, lambda: torch.randn(B, 4), lambda: torch.randint(0, 4, (B,)), nn.CrossEntropyLoss(),
                           True),
    "attention-weights": (lambda: _Attention(True), *_seq, nn.CrossEntropyLoss(), True),
    "attention-weights-seq-first": (lambda: _Attention(False), *_seq, nn.CrossEntropyLoss(), True),
    "transformer-padding-mask": (_PaddedEncoder, _padded_tokens, _seq[1], nn.CrossEntropyLoss(), True),
    "conv-groupnorm": (_Conv, lambda: torch.randn(B, 1, 8, 8), _seq[1], nn.CrossEntropyLoss(), True),
    "tiny-gpt": (TinyGPT, *_gpt, next_token_loss, True),
    "tiny-gpt-partly-frozen": (_partly_frozen_gpt, *_gpt, next_token_loss, True),
}


@pytest.mark.parametrize("case", CASES)
def test_per_example_norms_equal_exact(case):
    torch.manual_seed(0)
    make_model, make_x, make_y, loss_func, vmapped = CASES[case]
    model, x, y = make_model(), make_x(), make_y()
    expected = _exact_sq_norms(model, loss_func, x, y, vmapped)
    frozen = {k: p.clone() for k, p in model.named_parameters() if not p.requires_grad}
    got = _norms(model, loss_func, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert all(torch.equal(p, frozen[k]) for k, p in model.named_parameters() if k in frozen)


def test_frozen_parameters_are_not_measured():
    "Freezing a layer removes exactly its share of every example's norm."
    torch.manual_seed(0)
    model, x, y = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), torch.randn(B, 5), _seq[1]()
    full = _norms(model, nn.CrossEntropyLoss(), x, y)
    first = _trainable_grads(model, nn.CrossEntropyLoss(), x, y)[:, :5 * 7 + 7].square().sum(1)
    model[0].requires_grad_(False)
    torch.testing.assert_close(_norms(model, nn.CrossEntropyLoss(), x, y), full - first, rtol=1e-5, atol=0)


class _HeadInLoss(nn.Module):
    "The forward returns features; the loss applies the head (sampled softmax, a head shared with another task)."

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(5, 7), nn.Tanh()), nn.Linear(7, 3)

    def forward(self, x):
        return self.body(x)


def test_parameters_the_loss_uses_are_measured_or_refused():
    """A head applied in the loss counts per example (it was left out while p.grad held it: -84% end to end); a
    penalty added to the mean loss has no per-example gradient and is refused."""
    torch.manual_seed(0)
    model, x, y = _HeadInLoss(), torch.randn(B, 5), _seq[1]()
    head_loss = lambda h, t: F.cross_entropy(model.head(h), t)  # noqa: E731
    expected = _exact_sq_norms(nn.Sequential(model.body, model.head), nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(_norms(model, head_loss, x, y), expected, rtol=1e-5, atol=0)
    dl = DataLoader(TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,))), batch_size=8)
    penalised = lambda h, t: head_loss(h, t) + 1e-4 * model.head.weight.square().sum()  # noqa: E731
    with pytest.raises(ValueError, match="'head.weight' after the batch was reduced.*weight_decay"):
        bs_find(model, dl, penalised, lr=0, num_it=5, method="per_example")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow
def test_tiny_gpt_noise_scale_within_10_percent_of_exact():
    "The nanoGPT-style model end to end: bs_find(method='per_example', lr=0) against all 20k per-example gradients."
    torch.manual_seed(0)
    model, (x, y) = TinyGPT(), markov_tokens(20_000)
    tr_sigma, g_sq = _exact_noise_scale(model, next_token_loss, x, y)  # the tied lm_head counts once, as wte
    dl = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(2))
    res = bs_find(model, dl, next_token_loss, lr=0, num_it=300, beta=0.99, device="cpu", method="per_example")
    assert res.noise_scale == pytest.approx(tr_sigma / g_sq, rel=0.10)
    assert res.history.noise.iloc[-1] == pytest.approx(tr_sigma, rel=0.10)
    assert res.history.scale.iloc[-1] == pytest.approx(g_sq, rel=0.10)


@pytest.mark.slow
def test_frozen_first_layer_noise_scale_within_10_percent_of_exact():
    from tests.test_exactness import _mlp_problem

    model, loss_func, x, y = _mlp_problem()
    model[0].requires_grad_(False)
    tr_sigma, g_sq = _exact_noise_scale(model, loss_func, x, y)
    exact = tr_sigma / g_sq
    dl = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(2))
    res = bs_find(model, dl, loss_func, lr=0, num_it=1000, beta=0.99, device="cpu", method="per_example")
    assert res.noise_scale == pytest.approx(exact, rel=0.10)


class _Custom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


class _Net(nn.Module):
    "A Linear layer fed by whatever `body` does to the input."

    def __init__(self, body, **layers):
        super().__init__()
        self.body, self.fc = body, nn.Linear(4, 4)
        for k, v in layers.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fc(self.body(self, x))


def _refused(name):
    cases = {
        "merged-batch": (lambda m, x: m.fc(x.reshape(-1, 2)).reshape(x.shape[0], -1)[:, :4], {}, "batch dimension"),
        "custom-function": (lambda m, x: _Custom.apply(x, m.w), {"w": nn.Parameter(torch.ones(4))},
                            "gradients disabled"),
        "no-grad-use": (lambda m, x: x + _no_grad_copy(m.w), {"w": nn.Parameter(torch.ones(4))}, "gradients disabled"),
        "reduced-over-batch": (lambda m, x: x * (x * m.w).mean(0), {"w": nn.Parameter(torch.ones(4))},
                               "without the batch dimension|batch dimension was lost"),
        "scale-grad-by-freq": (lambda m, x: m.emb((x > 0).long()).sum(1),
                               {"emb": nn.Embedding(2, 4, scale_grad_by_freq=True)}, "scale_grad_by_freq"),
        "lstm-proj": (lambda m, x: m.rnn(x.unsqueeze(1))[0][:, 0],
                      {"rnn": nn.LSTM(4, 4, proj_size=2, batch_first=True)}, "proj_size"),
        "lstm-dropout": (lambda m, x: m.rnn(x.unsqueeze(1))[0][:, 0],
                         {"rnn": nn.LSTM(4, 4, num_layers=2, dropout=0.5, batch_first=True)}, "dropout"),
        "packed-sequence": (lambda m, x: nn.utils.rnn.pad_packed_sequence(m.rnn(nn.utils.rnn.pack_padded_sequence(
            x.unsqueeze(1), torch.ones(len(x), dtype=torch.long), batch_first=True))[0], batch_first=True)[0][:, 0],
            {"rnn": nn.LSTM(4, 4, batch_first=True)}, "PackedSequence"),
        "attention-dropout": (lambda m, x: m.mha(x.unsqueeze(1), x.unsqueeze(1), x.unsqueeze(1), need_weights=False)[
            0][:, 0], {"mha": nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)}, "random"),
        "batchnorm": (lambda m, x: m.bn(x), {"bn": nn.BatchNorm1d(4)}, "BatchNorm1d in training mode"),
        "gradient-hook": (lambda m, x: m.lin(x), {"lin": _grad_hooked(nn.Linear(4, 4))},
                          "'lin.weight' has a gradient hook"),
    }
    body, layers, match = cases[name]
    return (lambda: _Net(body, **layers)), match


def _grad_hooked(layer: nn.Linear) -> nn.Linear:
    "A gradient mask (train some rows only, as when fine-tuning new tokens): p.grad changes, per-example norms not."
    layer.weight.register_hook(lambda g: g * torch.tensor([1.0, 1.0, 0.0, 0.0]).unsqueeze(1))
    return layer


def _no_grad_copy(w):
    with torch.no_grad():
        return w * 2


class _ParamOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.temperature = nn.Linear(4, 4), nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fc(x), self.temperature.exp()


REFUSED = ["merged-batch", "custom-function", "no-grad-use", "reduced-over-batch", "scale-grad-by-freq", "lstm-proj",
           "lstm-dropout", "packed-sequence", "attention-dropout", "batchnorm", "gradient-hook"]


@pytest.mark.parametrize("name", REFUSED)
def test_refuses_what_it_cannot_measure_exactly(name):
    make, match = _refused(name)
    torch.manual_seed(0)
    model = make()
    dl = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 4)), batch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        bs_find(model, dl, nn.MSELoss(), lr=0.1, method="per_example", device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_refuses_an_output_computed_from_parameters_alone():
    dl = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 4)), batch_size=8)
    with pytest.raises(ValueError, match="'temperature'.* not on its input"):
        bs_find(_ParamOutput(), dl, lambda out, y: F.mse_loss(out[0] * out[1], y), lr=0, method="per_example",
                device="cpu")


def test_measuring_only_the_normalisation_layers_equals_freezing_the_rest():
    "The opt-in subset (Gray et al. 2024): exactly the norms of those parameters, the rest counted as frozen."
    torch.manual_seed(0)
    model, (x, y) = TinyGPT(), markov_tokens(B, seed=3)
    ln = norm_layer_params(model)
    assert len(ln) == 6  # ln_1, ln_2, ln_f: weight and bias
    with PerExampleNorms(model, ln) as norms:
        next_token_loss(model(x), y).backward()
        got = norms.pop().double()
    assert norms.params == ln
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in ln))
    torch.testing.assert_close(got, _exact_sq_norms(model, next_token_loss, x, y), rtol=1e-5, atol=0)
