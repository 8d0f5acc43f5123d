"""Model families users train, through every method: exact against every per-example gradient, or refused clearly,
and the user's state back exactly after the run."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find

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
def _exact_sq_norms(model, loss_func, x, y):
    "|g_j|² of the trainable parameters, from one backward pass per example (works for any model)."
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        gs = torch.autograd.grad(loss_func(model(x[i:i + 1]), y[i:i + 1]), ps, allow_unused=True)
        rows.append(sum(g.double().square().sum() for g in gs if g is not None))
    return torch.stack(rows)


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


class _Flat(nn.Module):
    def __init__(self, body: nn.Module, n_features: int):
        super().__init__()
        self.body, self.fc = body, nn.Linear(n_features, 3)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


_img = lambda: torch.randn(N, 4, 6, 6)  # noqa: E731
_tok = lambda: torch.randint(0, 20, (N, 6))  # noqa: E731
FAMILIES = {  # name: (model, inputs)
    "instance-norm-running-stats": (lambda: _Flat(nn.Sequential(nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(
        4, affine=True, track_running_stats=True)), 64), _img),
    "embedding-bag-max-norm": (lambda: _Bag(mode="mean", max_norm=1.0), _tok),
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
    expected = _exact_sq_norms(model, nn.CrossEntropyLoss(), x, y)
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
