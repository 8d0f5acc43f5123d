"The estimator's math against closed-form values, without any training loop."
import math

import pytest
import torch

from gns_widget import NoiseScaleEstimator
from gns_widget.estimator import piece_norms, squared_norm


def _synthetic_grads(G: torch.Tensor, sigma: float, b: int, gen: torch.Generator) -> torch.Tensor:
    "A mean gradient of b examples whose per-example gradients are G + N(0, sigma² I)."
    return G + sigma * torch.randn(b, G.numel(), generator=gen).mean(0)


def test_one_window_matches_the_papers_formulas():
    est = NoiseScaleEstimator(n_batch=3, beta=0.5)
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 1.0])]
    b = 4
    for g in grads[:-1]:
        assert est.update([g], b) is None
    out = est.update([grads[-1]], b)
    small_sq = sum(g.square().sum().item() for g in grads) / 3  # mean over ALL small batches
    big_sq = (sum(grads) / 3).square().sum().item()
    B_small, B_big = 4, 12
    assert out.scale == pytest.approx((B_big * big_sq - B_small * small_sq) / (B_big - B_small))
    assert out.noise == pytest.approx((small_sq - big_sq) / (1 / B_small - 1 / B_big))
    # one estimate: the bias-corrected EMAs equal the raw values
    assert est.noise == pytest.approx(out.noise) and est.scale == pytest.approx(out.scale)
    assert est.noise_scale == pytest.approx(out.noise / out.scale)


@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [8, 32, 5, 64]])
def test_unbiased_for_equal_and_unequal_batch_sizes(sizes):
    "Averaged over many windows, raw noise → tr(Σ) and scale → |G|², also with unequal (short) batches."
    gen = torch.Generator().manual_seed(0)
    dim, sigma = 50, 2.0
    G = torch.randn(dim, generator=gen) * 0.5
    est = NoiseScaleEstimator(n_batch=len(sizes), beta=0.0)
    noises, scales = [], []
    for _ in range(3000):
        for b in sizes:
            out = est.update([_synthetic_grads(G, sigma, b, gen)], b)
        noises.append(out.noise)
        scales.append(out.scale)
    tr_sigma, g_sq = dim * sigma**2, G.square().sum().item()
    assert sum(noises) / len(noises) == pytest.approx(tr_sigma, rel=0.03)
    assert sum(scales) / len(scales) == pytest.approx(g_sq, rel=0.05)


def test_bias_corrected_ema_and_ratio_of_averages():
    est = NoiseScaleEstimator(n_batch=2, beta=0.9)
    raws = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for _ in range(2):
            out = est.update([torch.randn(10, generator=gen)], 3)
        raws.append((out.noise, out.scale))
    w = [0.9 ** (4 - i) * 0.1 for i in range(5)]
    norm = 1 - 0.9**5
    noise = sum(wi * n for wi, (n, _) in zip(w, raws)) / norm
    scale = sum(wi * s for wi, (_, s) in zip(w, raws)) / norm
    assert est.noise == pytest.approx(noise) and est.scale == pytest.approx(scale)
    assert est.noise_scale == pytest.approx(noise / scale)


def test_one_buffer_whatever_n_batch():
    model = torch.nn.Linear(100, 10)
    sizes = []
    for n in (2, 50):
        est = NoiseScaleEstimator(n_batch=n)
        for _ in range(n):
            model.zero_grad()
            model(torch.randn(4, 100)).sum().backward()
            est.update(model, 4)
        sizes.append(sum(t.numel() for t in est._acc))
    assert sizes[0] == sizes[1] == sum(p.numel() for p in model.parameters())


def test_reads_params_grads_or_module_alike():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(5, 3)).sum().backward()
    outs = []
    for source in (model, list(model.parameters()), [p.grad for p in model.parameters()]):
        est = NoiseScaleEstimator(n_batch=2)
        est.update(source, 5)
        outs.append(est.update(source, 5))
    assert outs[0] == outs[1] == outs[2]


def test_reset_and_nan_before_first_window():
    est = NoiseScaleEstimator(n_batch=2)
    assert math.isnan(est.noise_scale)
    est.update([torch.ones(3)], 2)
    est.update([torch.zeros(3)], 2)
    assert est.n_estimates == 1
    est.reset()
    assert est.n_estimates == 0 and math.isnan(est.noise)


@pytest.mark.parametrize("kwargs, match", [({"n_batch": 1}, "n_batch"), ({"n_batch": 2.5}, "n_batch"),
                                           ({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseScaleEstimator(**kwargs)


def test_update_without_gradients_says_so():
    with pytest.raises(ValueError, match="backward"):
        NoiseScaleEstimator().update(torch.nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="batch_size"):
        NoiseScaleEstimator().update([torch.ones(2)], 0)


def _accumulated_run(grads: list[torch.Tensor], sizes: list[int], weights: list[float]) -> list:
    "Feed `grads` as one gradient-accumulation cycle: each update sees the running sum Σ w_i g_i."
    est = NoiseScaleEstimator(n_batch=len(grads), beta=0.0, accumulated=True)
    running = torch.zeros_like(grads[0])
    for g, b, w in zip(grads, sizes, weights):
        running = running + w * g
        out = est.update([running.clone()], b, weight=w)
    return [out.noise, out.scale, out.b_big]


@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [8, 32, 5, 64]])
def test_accumulated_cycle_equals_separate_small_batches(sizes):
    "With weights ∝ batch size (fastai's GradientAccumulation), accumulation gives the very same estimate."
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(30, generator=gen) for _ in sizes]
    plain = NoiseScaleEstimator(n_batch=len(sizes), beta=0.0)
    for g, b in zip(grads, sizes):
        out = plain.update([g], b)
    weights = [b / sum(sizes) for b in sizes]
    assert _accumulated_run(grads, sizes, weights) == pytest.approx([out.noise, out.scale, out.b_big], rel=1e-4)


def test_accumulated_with_equal_weights_is_unbiased_for_unequal_micro_batches():
    "loss / k on micro-batches of unequal size: the big batch is an unweighted mean, and that is accounted for."
    gen = torch.Generator().manual_seed(4)
    sizes, dim, sigma = [8, 32, 5, 64], 50, 2.0
    G = torch.randn(dim, generator=gen) * 0.5
    runs = [_accumulated_run([_synthetic_grads(G, sigma, b, gen) for b in sizes], sizes, [0.25] * 4)
            for _ in range(3000)]
    assert sum(r[0] for r in runs) / len(runs) == pytest.approx(dim * sigma**2, rel=0.03)
    assert sum(r[1] for r in runs) / len(runs) == pytest.approx(G.square().sum().item(), rel=0.05)


def test_weight_needs_accumulation():
    with pytest.raises(ValueError, match="accumulated=True"):
        NoiseScaleEstimator(n_batch=2).update([torch.ones(2)], 4, weight=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_norm_of_long_tensors_is_accurate(dtype):
    "A flat float32 CPU norm of 10M elements is ~7e-4 off; the pieces keep the sum at float32 rounding."
    gen = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(n, generator=gen) * 1e-3).to(dtype) for n in (6_000_000, 4_000_000, 7)]
    exact = sum(t.double().square().sum() for t in tensors).item()
    assert squared_norm(tensors).item() == pytest.approx(exact, rel=1e-5)
    assert piece_norms(tensors).dtype == torch.float32
    mixed = piece_norms([tensors[2].double(), tensors[2].half()])
    assert mixed.dtype == torch.float64 and len(mixed) == 2
