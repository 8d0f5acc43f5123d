"method='per_example': per-example norms from hooks against torch.func, and the estimate against the exact value."
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find
from gns_widget.per_example import PerExampleNorms
from tests.exact import exact_noise_scale, per_example_grads
from tests.test_engine import _assert_same, _snapshot, _warm_adam
from tests.test_exactness import _linear_problem, _mlp_problem


class _Tokens(nn.Module):
    "Embedding → Linear on (B, T, d) → LayerNorm → mean over T: the generic path and both Linear sequence paths."

    def __init__(self, d_hidden: int):
        super().__init__()
        self.emb, self.lin, self.norm, self.out = nn.Embedding(20, 8), nn.Linear(8, d_hidden), nn.LayerNorm(d_hidden), \
            nn.Linear(d_hidden, 3)

    def forward(self, x):
        return self.out(self.norm(torch.relu(self.lin(self.emb(x))))).mean(1)


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).relu().flatten(1))


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), lambda: torch.randn(16, 5)),
    "tokens-gram": (lambda: _Tokens(6), lambda: torch.randint(0, 20, (16, 4))),  # T²=16 ≤ 8·6: Gram matrices
    "tokens-outer": (lambda: _Tokens(1), lambda: torch.randint(0, 20, (16, 4))),  # T²=16 > 8·1: outer products
    "conv-groupnorm": (_Conv, lambda: torch.randn(16, 1, 8, 8)),
}


@pytest.mark.parametrize("case", CASES)
def test_per_example_norms_equal_torch_func(case):
    torch.manual_seed(0)
    make_model, make_x = CASES[case]
    model, x, y = make_model(), make_x(), torch.randint(0, 3, (16,))
    expected = per_example_grads(model, nn.CrossEntropyLoss(), x, y).square().sum(1)
    with PerExampleNorms(model) as norms:
        nn.functional.cross_entropy(model(x), y).backward()
        got = norms.pop()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("make", [_linear_problem, _mlp_problem], ids=["linear-mse", "mlp-cross-entropy"])
def test_per_example_estimate_matches_exact_within_10_percent(make):
    model, loss_func, x, y = make()
    tr_sigma, g_sq, exact = exact_noise_scale(model, loss_func, x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(2))
    res = bs_find(model, dl, loss_func, lr=0, num_it=1000, beta=0.99, device="cpu", method="per_example")
    assert len(res.history) == 1000  # one estimate per step
    assert res.noise_scale == pytest.approx(exact, rel=0.10)
    assert res.history.noise.iloc[-1] == pytest.approx(tr_sigma, rel=0.10)
    assert res.history.scale.iloc[-1] == pytest.approx(g_sq, rel=0.10)


def test_per_example_training_run_restores_everything_exactly(digits_dl):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))
    opt = _warm_adam(model, digits_dl)
    before = _snapshot(model, opt)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    res = bs_find(model, digits_dl, nn.CrossEntropyLoss(), lr=0.05, num_it=30, opt=opt, method="per_example")
    assert len(res.history) == len(steps) == 30  # a step and an estimate per batch
    _assert_same(before, _snapshot(model, opt))
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone


def _tied():
    "Two Linear modules sharing one weight: exact, cross term included (no longer refused)."
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    return nn.Sequential(a, nn.ReLU(), b)


def test_tied_linear_modules_are_exact():
    torch.manual_seed(0)
    model, x, y = _tied(), torch.randn(16, 4), torch.randint(0, 4, (16,))
    expected = per_example_grads(model, nn.CrossEntropyLoss(), x, y).square().sum(1)
    with PerExampleNorms(model) as norms:
        nn.functional.cross_entropy(model(x), y).backward()
        got = norms.pop()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


class _FrozenBN(nn.Sequential):
    "Frozen-BatchNorm fine-tuning: train() leaves the BatchNorm in eval mode."

    def train(self, mode: bool = True):
        super().train(mode)
        self[1].eval()
        return self


def test_refuses_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].eval()  # what the error once advised: the run's model.train() undoes it, so the error says how to
    dl = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 4)), batch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="BatchNorm1d in training mode.*override your model's train"):
        bs_find(model, dl, nn.MSELoss(), lr=0.1, method="per_example")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model[1].training
    assert len(bs_find(_FrozenBN(*model), dl, nn.MSELoss(), lr=0, num_it=10, method="per_example").history) == 10


def test_per_example_refuses_batches_of_one():
    dl = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=1)
    with pytest.raises(ValueError, match="at least 2 examples, got 1.*batch_size >= 2"):
        bs_find(nn.Linear(4, 1), dl, nn.MSELoss(), lr=0, method="per_example")


def test_beta_is_the_decay_per_n_batch_steps_for_every_method():
    "One estimate per step decays by beta**(1/n_batch) per step, so per_example averages as many steps as fixed."
    model, loss_func, x, y = _linear_problem()
    dl = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(2))
    res = bs_find(model, dl, loss_func, lr=0, num_it=200, n_batch=10, beta=0.9, method="per_example")
    assert res.beta == 0.9
    h, decay = res.history, 0.9 ** (1 / 10)
    weights = decay ** torch.arange(len(h) - 1, -1, -1, dtype=torch.float64)
    noise, scale = (torch.tensor(h[c].to_numpy()) for c in ("noise_raw", "scale_raw"))
    assert res.noise_scale == pytest.approx(float((weights * noise).sum() / (weights * scale).sum()), rel=1e-9)
