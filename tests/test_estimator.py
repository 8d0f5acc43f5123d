"The estimator's math against closed-form values, without any training loop."
import math

import numpy as np
import pytest
import torch

from gns_widget import NoiseScaleEstimator
from gns_widget.norms import piece_norms, squared_norm


def _synthetic_grads(G: torch.Tensor, sigma: float, b: int, gen: torch.Generator) -> torch.Tensor:
    "A mean gradient of b examples whose per-example gradients are G + N(0, sigma² I)."
    return G + sigma * torch.randn(b, G.numel(), generator=gen).mean(0)


def test_one_window_matches_the_papers_formulas():
    est = NoiseScaleEstimator(n_batch=3, beta=0.5)
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 1.0])]
    b = 4
    for g in grads[:-1]:
        assert est.update(grads=[g], batch_size=b) is None
    out = est.update(grads=[grads[-1]], batch_size=b)
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
            out = est.update(grads=[_synthetic_grads(G, sigma, b, gen)], batch_size=b)
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
            out = est.update(grads=[torch.randn(10, generator=gen)], batch_size=3)
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
    for source in (model, list(model.parameters())):
        est = NoiseScaleEstimator(n_batch=2)
        est.update(source, 5)
        outs.append(est.update(source, 5))
    est = NoiseScaleEstimator(n_batch=2)
    est.update(grads=[p.grad for p in model.parameters()], batch_size=5)
    outs.append(est.update(grads=[p.grad for p in model.parameters()], batch_size=5))
    assert outs[0] == outs[1] == outs[2]


def test_raw_gradients_are_never_guessed_from_requires_grad():
    "A plain tensor among the params is refused with a pointer to grads=, and exactly one source is required."
    model = torch.nn.Linear(3, 2)
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(ValueError, match="grads="):
        NoiseScaleEstimator().update([p.grad for p in model.parameters()], 5)
    with pytest.raises(ValueError, match="exactly one"):
        NoiseScaleEstimator().update(model, 5, grads=[model.weight.grad])


def test_reset_and_nan_before_first_window():
    est = NoiseScaleEstimator(n_batch=2)
    assert math.isnan(est.noise_scale)
    est.update(grads=[torch.ones(3)], batch_size=2)
    est.update(grads=[torch.zeros(3)], batch_size=2)
    assert est.n_estimates == 1
    est.reset()
    assert est.n_estimates == 0 and math.isnan(est.noise)


@pytest.mark.parametrize("kwargs, match", [({"n_batch": 1}, "n_batch"), ({"n_batch": 2.5}, "n_batch"),
                                           ({"beta": 1.01}, "beta"), ({"beta": -0.1}, "beta")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseScaleEstimator(**kwargs)


def test_update_without_gradients_says_so():
    with pytest.raises(ValueError, match="backward"):
        NoiseScaleEstimator().update(torch.nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="batch_size"):
        NoiseScaleEstimator().update(grads=[torch.ones(2)], batch_size=0)


def _accumulated_run(grads: list[torch.Tensor], sizes: list[int], weights: list[float]) -> list:
    "Feed `grads` as one gradient-accumulation cycle: each update sees the running sum Σ w_i g_i."
    est = NoiseScaleEstimator(n_batch=len(grads), beta=0.0, accumulated=True)
    running = torch.zeros_like(grads[0])
    for g, b, w in zip(grads, sizes, weights):
        running = running + w * g
        out = est.update(grads=[running.clone()], batch_size=b, weight=w)
    return [out.noise, out.scale, out.b_big]


@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [8, 32, 5, 64]])
def test_accumulated_cycle_equals_separate_small_batches(sizes):
    "With weights ∝ batch size (fastai's GradientAccumulation), accumulation gives the very same estimate."
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(30, generator=gen) for _ in sizes]
    plain = NoiseScaleEstimator(n_batch=len(sizes), beta=0.0)
    for g, b in zip(grads, sizes):
        out = plain.update(grads=[g], batch_size=b)
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
        NoiseScaleEstimator(n_batch=2).update(grads=[torch.ones(2)], batch_size=4, weight=0.5)


@pytest.mark.slow
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


def _population(n: int, dim: int = 6, seed: int = 0) -> torch.Tensor:
    "n per-example gradients: a finite training set whose exact tr(Σ) and |G|² are known."
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen).double() * 2 + torch.linspace(-0.5, 0.5, dim).double()


def _exact(pop: torch.Tensor) -> tuple[float, float]:
    G = pop.mean(0)
    return (pop - G).square().sum(1).mean().item(), G.square().sum().item()


def _shuffled_epoch_windows(pop: torch.Tensor, sizes: list[int], label_epochs: bool) -> tuple[list, list]:
    "Raw (noise, scale) of 4,000 windows of batches drawn from shuffled epochs (drop_last), epochs labelled or not."
    n = len(pop)
    est = NoiseScaleEstimator(n_batch=len(sizes), beta=0.0, n_train=n)
    gen = torch.Generator().manual_seed(1)
    perm, pos, epoch = torch.randperm(n, generator=gen), 0, 0
    noises, scales = [], []
    for _ in range(4000):
        for b in sizes:
            if pos + b > n:  # drop_last, then a new epoch
                perm, pos, epoch = torch.randperm(n, generator=gen), 0, epoch + 1
            out = est.update(grads=[pop[perm[pos:pos + b]].mean(0)], batch_size=b,
                             epoch=epoch if label_epochs else None)
            pos += b
        noises.append(out.noise)
        scales.append(out.scale)
    return noises, scales


@pytest.mark.parametrize("n, sizes", [(60, [8] * 5), (30, [8, 8, 8, 8, 8, 8, 8]), (45, [10, 7, 10, 3, 10, 10])],
                         ids=["straddles", "window-larger-than-epoch", "unequal-sizes"])
def test_finite_population_is_unbiased_for_any_mix_of_epochs(n, sizes):
    """Shuffled epochs over n examples, windows that straddle them: with each batch's epoch, the raw estimates
    average to the exact tr(Σ) (over n, not n−1) and |G|² of the population."""
    pop = _population(n)
    tr_sigma, g_sq = _exact(pop)
    noises, scales = _shuffled_epoch_windows(pop, sizes, label_epochs=True)
    assert sum(noises) / len(noises) == pytest.approx(tr_sigma, rel=0.03)
    assert sum(scales) / len(scales) == pytest.approx(g_sq, rel=0.05)


def test_without_epochs_a_straddling_window_is_biased():
    "The test above can fail: ignoring the epoch labels (the old assumption) biases |G|² on the same draws."
    pop = _population(30)
    _, g_sq = _exact(pop)
    _, scales = _shuffled_epoch_windows(pop, [8] * 7, label_epochs=False)
    assert sum(scales) / len(scales) / g_sq - 1 > 0.1  # 16% high here


def test_per_example_norms_with_a_finite_population():
    "update_norms: single examples as the small batches, the batch (one epoch) as the big one."
    n, b = 40, 8
    pop = _population(n, seed=2)
    tr_sigma, g_sq = _exact(pop)
    est = NoiseScaleEstimator(n_batch=2, beta=0.0, n_train=n)
    gen = torch.Generator().manual_seed(3)
    noises, scales = [], []
    for _ in range(20000):
        batch = pop[torch.randperm(n, generator=gen)[:b]]
        out = est.update_norms(batch.square().sum(1).mean(), batch.mean(0).square().sum(), 1, b)
        noises.append(out.noise)
        scales.append(out.scale)
    assert sum(noises) / len(noises) == pytest.approx(tr_sigma, rel=0.03)
    assert sum(scales) / len(scales) == pytest.approx(g_sq, rel=0.05)


def test_whole_dataset_batches_give_no_estimate():
    "Every batch is the full dataset: no sampling noise, so no number (not a confident 1)."
    pop = _population(16)
    est = NoiseScaleEstimator(n_batch=2, beta=0.0, n_train=16)
    for epoch in range(4):
        est.update(grads=[pop.mean(0)], batch_size=16, epoch=epoch)
    assert est.n_estimates == 0 and math.isnan(est.noise_scale)


def test_parameters_are_keyed_by_identity_and_missing_gradients_are_zero():
    "A parameter without a gradient in a batch counts as zero, exactly as if its zero gradient were passed."
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    gen = torch.Generator().manual_seed(0)
    by_params, by_grads = NoiseScaleEstimator(n_batch=4, beta=0.5), NoiseScaleEstimator(n_batch=4, beta=0.5)
    for step in range(40):
        ga, gb = torch.randn(3, generator=gen), torch.randn(2, generator=gen)
        a.grad = ga if step % 3 else None  # a and b are used by different batches, in a changing set
        b.grad = gb if step % 2 else None
        used = [p for p in (b, a) if p.grad is not None]  # and in a changing order
        if used:
            out_p = by_params.update(used, 8)
            out_g = by_grads.update(grads=[a.grad if a.grad is not None else torch.zeros(3),
                                           b.grad if b.grad is not None else torch.zeros(2)], batch_size=8)
            assert (out_p is None) == (out_g is None)
            if out_p is not None:
                assert (out_p.noise, out_p.scale) == pytest.approx((out_g.noise, out_g.scale), rel=1e-6)
                big, ref = by_params.big_batch_grads(), by_grads.big_batch_grads()
                assert set(map(id, big)) <= {id(a), id(b)}
                for p, i in ((a, 0), (b, 1)):
                    assert torch.allclose(big[p], ref[i]) if p in big else not ref[i].any()
    assert by_params.n_estimates == by_grads.n_estimates > 5


def test_frozen_parameters_are_not_measured():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    model(torch.randn(8, 4)).sum().backward()
    est = NoiseScaleEstimator(n_batch=2)
    est.update(model, 8)
    assert sum(t.numel() for t in est._acc) == 5


def test_a_non_finite_small_batch_is_skipped_alone_when_each_is_checked():
    est, ref = NoiseScaleEstimator(n_batch=3, beta=0.0, check_each=True), NoiseScaleEstimator(n_batch=3, beta=0.0)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(4, generator=gen) for _ in range(3)]
    est.update(grads=[grads[0]], batch_size=4)
    assert est.last_finite == (True,)
    assert est.update(grads=[torch.full((4,), math.nan)], batch_size=4) is None
    assert est.last_finite == (False,) and est.n_skipped == 1  # known at once
    est.update(grads=[grads[1]], batch_size=4)
    out = est.update(grads=[grads[2]], batch_size=4)
    for g in grads:
        expected = ref.update(grads=[g], batch_size=4)
    assert est.n_skipped == 1 and est.n_dropped == 0
    assert (out.noise, out.scale) == pytest.approx((expected.noise, expected.scale))


def test_a_non_finite_small_batch_drops_its_window_at_its_end():
    """Without a host sync per update, a NaN or inf batch is found when its window ends, after it joined the big
    batch: that window is dropped whole (no estimate, no big batch), the next one is exact, no gradient is touched."""
    est, ref = NoiseScaleEstimator(n_batch=3, beta=0.0), NoiseScaleEstimator(n_batch=3, beta=0.0)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(4, generator=gen) for _ in range(4)]
    bad = [torch.full((4,), math.nan), torch.tensor([1.0, math.inf, 0.0, 2.0])]
    fed = [t.clone() for t in grads + bad]
    assert est.update(grads=[grads[0]], batch_size=4) is None and est.last_finite == ()
    assert est.update(grads=[bad[0]], batch_size=4) is None
    assert est.n_skipped == 0 and est.last_finite == ()  # not known yet: nothing was read from the device
    assert est.update(grads=[bad[1]], batch_size=4) is None  # the window ends: both found, the window dropped
    assert est.last_finite == (True, False, False) and (est.n_skipped, est.n_dropped, est.n_estimates) == (2, 1, 0)
    with pytest.raises(RuntimeError, match="big_batch_grads"):
        est.big_batch_grads()
    for g in grads[1:]:
        out, expected = est.update(grads=[g], batch_size=4), ref.update(grads=[g], batch_size=4)
    assert est.last_finite == (True, True, True) and est.n_estimates == 1 and est.n_dropped == 1
    assert (out.noise, out.scale) == pytest.approx((expected.noise, expected.scale), rel=1e-6)
    assert torch.allclose(est.big_batch_grads()[0], sum(grads[1:]) / 3)
    for a, b in zip(grads + bad, fed):  # the caller's tensors are as they were
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [2.5, True, "8", 0, None])
def test_update_batch_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        NoiseScaleEstimator().update(grads=[torch.ones(2)], batch_size=bad)


def test_numpy_integers_are_accepted():
    import numpy as np

    est = NoiseScaleEstimator(n_batch=np.int64(2), n_train=np.int32(100))
    est.update(grads=[torch.ones(2)], batch_size=np.int64(4))
    assert est.n_batch == 2 and isinstance(est.n_batch, int)


def test_changing_gradient_shapes_are_refused():
    est = NoiseScaleEstimator(n_batch=3)
    est.update(grads=[torch.ones(2)], batch_size=4)
    with pytest.raises(ValueError, match="shape changed"):
        est.update(grads=[torch.ones(3)], batch_size=4)
    with pytest.raises(ValueError, match="same gradient tensors"):
        est.update(grads=[torch.ones(2), torch.ones(2)], batch_size=4)


def test_sparse_gradients_are_refused_clearly():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        NoiseScaleEstimator().update(emb, 2)


def test_beta_one_is_the_plain_mean_of_the_window_estimates():
    "beta=1 (the lr=0 default) weights every window equally; beta<1 is the bias-corrected EMA."
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(50, generator=g) + 0.3 for _ in range(40)]
    flat, ema = NoiseScaleEstimator(n_batch=4, beta=1.0), NoiseScaleEstimator(n_batch=4, beta=0.5)
    raw = []
    for grad in grads:
        for est in (flat, ema):
            out = est.update(grads=[grad], batch_size=8)
        if out is not None:
            raw.append((out.noise, out.scale))
    noise, scale = np.array(raw).T
    assert flat.noise == pytest.approx(noise.mean(), rel=1e-12)
    assert flat.noise_scale == pytest.approx(noise.sum() / scale.sum(), rel=1e-12)
    w = 0.5 ** np.arange(len(noise) - 1, -1, -1)
    assert ema.noise == pytest.approx(w @ noise / w.sum(), rel=1e-12)
    assert ema.noise_scale == pytest.approx((w @ noise) / (w @ scale), rel=1e-12)
    assert flat.noise_scale != pytest.approx(ema.noise_scale, rel=1e-3)  # the two weightings differ here


def test_set_window_changes_the_window_between_windows_only():
    "num_it='auto' widens the windows through set_window: the next window has the new size, a begun one keeps its."
    est = NoiseScaleEstimator(n_batch=2, beta=1.0)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, generator=gen) for _ in range(6)]
    est.update(grads=[grads[0]], batch_size=4)
    with pytest.raises(RuntimeError, match="between windows"):
        est.set_window(3)
    assert est.update(grads=[grads[1]], batch_size=4) is not None
    with pytest.raises(ValueError, match="n_batch must be an integer >= 2"):
        est.set_window(1)
    est.set_window(4)
    assert [est.update(grads=[g], batch_size=4) is not None for g in grads[2:]] == [False, False, False, True]
    assert est.n_batch == 4 and est.last.n_small == 4
