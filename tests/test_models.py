"""The number is right on the models people train, against the exact per-example value: frozen layers,
parameters that some batches do not use, and datasets small enough that windows straddle epochs."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find
from tests.exact import exact_noise_scale

N = 20_000


def _loader(x, y, bs=50, seed=2):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _regression(n=N, d=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.tanh(x @ torch.randn(d, 1, generator=gen)) + 0.3 * torch.randn(n, 1, generator=gen)
    return x, y


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
