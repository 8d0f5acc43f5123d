"""Model families users train, through every method: exact against every per-example gradient, or refused clearly,
and the user's state back exactly after the run."""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find
from tests.exact import sq_norms_by_backward

METHODS = ["fixed", "sequential", "per_example"]
N = 16


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


def _tokens(n: int = N) -> DataLoader:
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


_img = lambda: torch.randn(N, 4, 6, 6)  # noqa: E731
_tok = lambda: torch.randint(0, 20, (N, 6))  # noqa: E731


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


_x = lambda: torch.randn(N, 5)  # noqa: E731
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
               lambda: torch.randn(N, 4, 9)),
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
                lambda: torch.randn(N, 5, dtype=torch.float64)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_per_example_norms_equal_exact_and_leave_the_state_a_step_leaves(family):
    """Each example's |g|² as its own backward pass gives it; buffers and weights the forward changes in place
    (running statistics, max_norm renormalisation) change once, as in a plain step, not again in the replay."""
    from gns_widget.per_example import PerExampleNorms

    make_model, make_x = FAMILIES[family]
    torch.manual_seed(0)
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (N,))
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


def _loader(method, x, y):
    if method == "per_example":
        return [(x[:N // 2], y[:N // 2]), (x[N // 2:], y[N // 2:])]
    return DataLoader(TensorDataset(x, y), batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(0))


END_TO_END = ["instance-norm-running-stats", "embedding-bag-max-norm", "encoder-sequence-first-norm-first",
              "mixture-of-experts", "int-and-bool-buffers", "weight-norm"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", END_TO_END)
def test_bs_find_equals_exact(family, method):
    make_model, make_x = FAMILIES[family]
    torch.manual_seed(0)
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (N,))
    with torch.no_grad():
        model(x)  # max_norm renormalises the rows once: the weights then stay as they are
    noise, scale = _expected(method, _exact_rows(model, x, y))
    res = bs_find(model, _loader(method, x, y), nn.CrossEntropyLoss(), lr=0, method=method, device="cpu",
                  num_it=2 if method == "per_example" else N, n_batch=N)
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
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (N,))
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


@pytest.mark.parametrize("compile_", [torch.compile, lambda m: m.compile() or m],
                         ids=["torch.compile", "Module.compile"])
def test_per_example_runs_a_compiled_model_eagerly_with_the_same_result(compile_):
    """The tracer must see every call: dynamo compiled it per call signature up to its recompile limit (warnings,
    2x the run's time on a small GPT) and then ran it eagerly anyway. Now nothing is compiled and nothing changes."""
    from torch._dynamo.utils import counters

    make_model, make_x = FAMILIES["encoder-batch-first"]
    torch.manual_seed(0)
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (N,))
    dl = lambda: DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True,  # noqa: E731
                            generator=torch.Generator().manual_seed(0))
    kw = dict(lr=0, num_it=8, method="per_example", device="cpu")
    eager = bs_find(model, dl(), nn.CrossEntropyLoss(), **kw)
    frames = counters["frames"]["total"]
    compiled = bs_find(compile_(model), dl(), nn.CrossEntropyLoss(), **kw)
    assert counters["frames"]["total"] == frames
    assert compiled.history.noise.tolist() == eager.history.noise.tolist()
    assert compiled.history.scale.tolist() == eager.history.scale.tolist()
