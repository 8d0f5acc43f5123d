"""Mixed precision: bfloat16 autocast on the CPU with a `GradScaler` whose scale changes every step,
and `bs_find(amp=...)` in bfloat16 and in float16 with its own dynamic loss scale.

The scaler doubles the loss scale after every 2 good steps, and every 10th batch (30th with
accumulation) overflows (its loss is multiplied by inf, so its gradients are inf/NaN): the scaler
skips that step and divides the scale by 8. So the run sees a scale that keeps changing and
overflows, which the estimator must divide out and skip exactly when the scaler does.
"""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import NoiseScaleEstimator, bs_find
from gns_widget.memory import max_batch_size
from gns_widget.precision import resolve_amp
from tests.exact import exact_noise_scale

N = 20_000


def _problem():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, 16, generator=gen)
    y = (x[:, :4] @ torch.randn(4, 5, generator=gen) + torch.randn(N, 5, generator=gen)).argmax(1)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))
    dl = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(4))
    return model, nn.CrossEntropyLoss(), x, y, dl


def _overflowing(n_batches: int, every: int) -> list[int]:
    return [i for i in range(n_batches) if i % every == 7]


def _scaled_run(model, loss_func, dl, accumulate: int = 0, epochs: int = 1, overflow_every: int = 10):
    """A bf16 autocast + GradScaler loop at lr=0; returns (estimator fed scaled grads, reference fed the
    unscaled grads of the steps the scaler took, number of skipped steps)."""
    n_batch = accumulate or 10
    est = NoiseScaleEstimator(n_batch, beta=0.99, accumulated=bool(accumulate))
    ref = NoiseScaleEstimator(n_batch, beta=0.99, accumulated=bool(accumulate))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2, backoff_factor=2.0**-3)
    skipped, cycle, scales = 0, [], set()
    for _ in range(epochs):
        for i, (xb, yb) in enumerate(dl):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_func(model(xb), yb) / (accumulate or 1) * (math.inf if i % overflow_every == 7 else 1)
            scaler.scale(loss).backward()
            est.update(model, len(xb), grad_scale=scaler.get_scale())
            cycle.append((len(xb), [p.grad.clone() for p in model.parameters()]))
            if accumulate and (i + 1) % accumulate:
                continue
            scale = scaler.get_scale()
            scales.add(scale)
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale:  # the scaler found inf/NaN and skipped this step
                skipped += 1
            else:  # the same gradients, unscaled by hand, feed the reference
                for bs, grads in cycle:
                    ref.update(grads=[g / scale for g in grads], batch_size=bs)
            cycle = []
            opt.zero_grad()
    assert len(scales) >= 4  # the loss scale really kept changing
    return est, ref, skipped


@pytest.mark.slow
def test_scaled_bf16_matches_unscaled_and_skips_overflows():
    model, loss_func, _, _, dl = _problem()
    est, ref, skipped = _scaled_run(model, loss_func, dl)
    assert skipped == len(_overflowing(len(dl), 10))  # every overflowing batch, and only those
    assert est.n_skipped == skipped
    assert est.n_estimates == ref.n_estimates > 20
    assert est.noise_scale == pytest.approx(ref.noise_scale, rel=1e-4)
    assert est.noise == pytest.approx(ref.noise, rel=1e-4)


def test_scaled_bf16_accumulation_drops_overflowed_cycles():
    model, loss_func, _, _, dl = _problem()
    est, ref, skipped = _scaled_run(model, loss_func, dl, accumulate=4, overflow_every=30)
    assert skipped == len({i // 4 for i in _overflowing(len(dl), 30)})  # the cycles with an overflow
    assert est.n_skipped == skipped
    assert est.n_estimates == ref.n_estimates == len(dl) // 4 - skipped
    assert est.noise_scale == pytest.approx(ref.noise_scale, rel=1e-4)


@pytest.mark.slow
def test_scaled_bf16_estimate_matches_exact_noise_scale():
    "bf16 autocast changes the gradients a little; the noise scale must still be within 10% of exact fp32."
    model, loss_func, x, y, dl = _problem()
    _, _, exact = exact_noise_scale(model, loss_func, x, y)
    est, _, _ = _scaled_run(model, loss_func, dl, epochs=3)
    assert est.noise_scale == pytest.approx(exact, rel=0.10)


@pytest.mark.slow
def test_ignoring_the_loss_scale_would_be_wrong():
    "Guard on the test above: reading scaled gradients as if unscaled gives a wildly different number."
    model, loss_func, _, _, dl = _problem()
    est = NoiseScaleEstimator(10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ref, _, _ = _scaled_run(model, loss_func, dl)
    for xb, yb in dl:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_func(model(xb), yb)
        scaler.scale(loss).backward()
        est.update(model, len(xb))  # grad_scale left out
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert est.noise_scale != pytest.approx(ref.noise_scale, rel=0.5)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan")])
def test_bad_grad_scale(bad):
    model = nn.Linear(3, 1)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="grad_scale"):
        NoiseScaleEstimator(2).update(model, 4, grad_scale=bad)


# ---- bs_find(amp=...): the finder itself runs in mixed precision --------------------------------------------


class _RecordingLoss:
    "A loss that remembers the dtype of the model outputs it saw (autocast on or off), times `factor`."

    def __init__(self, factor: float = 1.0):
        self.factor, self.dtypes = factor, set()

    def __call__(self, out, y):
        self.dtypes.add(out.dtype)
        return self.factor * nn.functional.cross_entropy(out, y)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixed", "per_example"])
def test_bs_find_bf16_estimate_matches_exact(method):
    model, loss_func, x, y, dl = _problem()
    _, _, exact = exact_noise_scale(model, loss_func, x, y)
    loss = _RecordingLoss()
    res = bs_find(model, dl, loss, lr=0, num_it=1200, n_batch=10, amp=torch.bfloat16, method=method)
    assert loss.dtypes == {torch.bfloat16}
    assert res.n_skipped == 0
    assert res.noise_scale == pytest.approx(exact, rel=0.10)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixed", "per_example"])
def test_bs_find_fp16_loss_scale_skips_overflows_and_divides_the_scale_out(method):
    """A loss ×1000 overflows float16 at GradScaler's initial scale 2**16: the finder halves the scale and skips
    those batches, and the estimate (a ratio, so the factor cancels) still matches the exact fp32 value."""
    model, loss_func, x, y, dl = _problem()
    _, _, exact = exact_noise_scale(model, loss_func, x, y)
    loss = _RecordingLoss(factor=1000.0)
    res = bs_find(model, dl, loss, lr=0, num_it=1200, n_batch=10, amp=torch.float16, method=method)
    assert loss.dtypes == {torch.float16}
    assert 1 <= res.n_skipped <= 20  # a few halvings from 2**16, then none
    assert "batches with non-finite gradients skipped" in repr(res)
    assert res.noise_scale == pytest.approx(exact, rel=0.10)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixed", "sequential", "per_example"])
def test_bs_find_fp16_trains_on_unscaled_gradients(method):
    "Steps taken with the loss scale still in the gradients (×65,536) would blow the loss up; fp16 tracks fp32."
    def losses(amp):
        model, loss_func, _, _, dl = _problem()
        res = bs_find(model, dl, loss_func, lr=0.2, num_it=200, n_batch=10, amp=amp, method=method)
        return res.history.loss.to_numpy()

    full, half = losses(torch.float32), losses(torch.float16)
    assert half[-1] < 0.9 * half[0]  # it trained
    assert half[-1] == pytest.approx(full[-1], rel=0.05)


@pytest.mark.slow
def test_bs_find_follows_a_learners_mixed_precision():
    from fastai.basics import Learner
    from fastai.data.core import DataLoaders

    model, _, x, y, _ = _problem()
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x[:100], y[:100]), bs=50, device="cpu")
    for to_mixed, expected in ((Learner.to_bf16, torch.bfloat16), (Learner.to_fp16, torch.float16)):
        loss = _RecordingLoss()
        learn = to_mixed(Learner(dls, model, loss_func=loss))
        assert resolve_amp(learn, None) == expected
        learn.bs_find(lr=0, num_it=20, n_batch=10, show_plot=False)
        assert loss.dtypes == {expected}
        loss.dtypes.clear()
        learn.bs_find(lr=0, num_it=20, n_batch=10, show_plot=False, amp=torch.float32)  # forced full precision
        assert loss.dtypes == {torch.float32}


def test_memory_probe_runs_in_the_runs_precision():
    model, _, _, _, dl = _problem()
    loss = _RecordingLoss()
    assert max_batch_size(model, dl, loss, limit=64, amp=torch.bfloat16) == 64
    assert loss.dtypes == {torch.bfloat16}


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "fp16"])
def test_bad_amp(bad):
    model, loss_func, _, _, dl = _problem()
    with pytest.raises(ValueError, match="amp must be"):
        bs_find(model, dl, loss_func, lr=0, num_it=20, n_batch=10, amp=bad)
