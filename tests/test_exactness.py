"bs_find(lr=0) against the exact noise scale from every per-example gradient of a 50k-example dataset."
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find
from tests.exact import exact_noise_scale

pytestmark = pytest.mark.slow  # statistical: every estimate against the exact value

N = 50_000


def _linear_problem(n: int = N):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=gen)
    y = x @ torch.randn(20, 1, generator=gen) + 0.5 * torch.randn(n, 1, generator=gen)
    torch.manual_seed(0)
    return nn.Linear(20, 1), nn.MSELoss(), x, y


def _mlp_problem():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 16, generator=gen)
    y = (x[:, :4] @ torch.randn(4, 5, generator=gen) + torch.randn(N, 5, generator=gen)).argmax(1)
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5)), nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("make", [_linear_problem, _mlp_problem], ids=["linear-mse", "mlp-cross-entropy"])
def test_matches_exact_noise_scale_within_10_percent(make):
    model, loss_func, x, y = make()
    tr_sigma, g_sq, exact = exact_noise_scale(model, loss_func, x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(2))
    res = bs_find(model, dl, loss_func, lr=0, num_it=2000, n_batch=10, beta=0.99, device="cpu")
    assert res.noise_scale == pytest.approx(exact, rel=0.10)
    last = res.history.iloc[-1]
    assert last.noise == pytest.approx(tr_sigma, rel=0.10)
    assert last.scale == pytest.approx(g_sq, rel=0.10)


def test_small_dataset_finite_population_correction():
    """Batches of a shuffled epoch are drawn without replacement: the scale estimate is then low by tr(Σ)/N.

    With N=1,000 and B_simple ≈ 210 the uncorrected estimate is ~20% high; the engine corrects it.
    """
    n = 1000
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen)
    w = torch.randn(5, 1, generator=gen)
    y = x @ w + 4 * torch.randn(n, 1, generator=gen)
    model = nn.Linear(5, 1)
    with torch.no_grad():  # near the optimum, where the noise scale is large
        model.weight.copy_(w.T + 0.25)
        model.bias.zero_()
    _, _, exact = exact_noise_scale(model, nn.MSELoss(), x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0))
    res = bs_find(model, dl, nn.MSELoss(), lr=0, num_it=3000, n_batch=20, beta=0.995, device="cpu")
    assert res.noise_scale == pytest.approx(exact, rel=0.10)
    last = res.history.iloc[-1]
    uncorrected = last.noise / (last.scale - last.noise / n)
    assert uncorrected / exact - 1 > 0.15


def test_gradient_accumulation_loop_matches_exact_noise_scale():
    "A plain training loop with 10 accumulated micro-batches per step: micro-batches small, accumulated big."
    from gns_widget import NoiseScaleEstimator

    model, loss_func, x, y = _linear_problem()
    _, _, exact = exact_noise_scale(model, loss_func, x, y)
    accum = 10
    est = NoiseScaleEstimator(n_batch=accum, beta=0.99, accumulated=True)
    dl = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(2))
    for i, (xb, yb) in enumerate(dl):
        (loss_func(model(xb), yb) / accum).backward()
        est.update(model, len(xb))
        if (i + 1) % accum == 0:
            model.zero_grad()  # lr=0: the step itself is left out, the weights stay where exact was computed
    assert est.n_estimates == len(dl) // accum
    assert est.noise_scale == pytest.approx(exact, rel=0.10)
