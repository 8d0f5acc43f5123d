"""`advice()`: the batch size, lr and epochs that reach the same loss soonest on the measured device, and what a user
who follows it trains with.

Sections: the lr rules (`lr_rules.lr_factor`, `advice.detect_rule`); goodput decisions (`advise` with
`goodput.py`: grow, keep, shrink or uncertain); nothing to decide on (no usable measurement, bad arguments);
following the advice (the lr, the epochs and the loader as a user applies them: `BatchAdvice.apply`,
`apply_batch_size`); and the advice of a real `bs_find` run. The raw suggestion is in test_suggest.py.

Synthetic devices make each decision checkable: on a GPU-like one a step costs the same at every size,
on a CPU-like one time is per example. The numbers follow from E(B) ∝ 1 + B/B_noise and the timings.
"""
import functools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

from gns_widget import apply_batch_size, bs_find
from gns_widget.advice import KINDS, MAX_LR_FACTOR, MIN_STEPS_PER_EPOCH, advise, detect_rule
from gns_widget.datasets import digits_loaders
from gns_widget.goodput import EPOCH_SLACK, GAIN_NEEDED, examples_ratio, round_epochs, sizes_worth_timing, speedup
from gns_widget.interval import Interval
from gns_widget.loaders import current_batch_size
from gns_widget.lr_rules import lr_factor
from gns_widget.throughput import Throughput

SIZES = [2**k for k in range(0, 13)]
DS = TensorDataset(torch.arange(100).float(), torch.arange(100))


def gpu_like(sizes=SIZES) -> Throughput:
    "A step costs 10 ms at every size: examples per second grow with the batch."
    return Throughput({b: 0.01 for b in sizes}, device="gpu-like")


def cpu_like(sizes=SIZES) -> Throughput:
    "Time is per example: every size gets through the same examples per second."
    return Throughput({b: 1e-4 * b for b in sizes}, device="cpu-like")


def _digits(hidden: int | None = None):
    "Seed 0, digits at batch size 32, and a fresh model: an MLP with `hidden` units, or a linear one."
    torch.manual_seed(0)
    train_dl, _ = digits_loaders(bs=32, seed=0)
    layers = [nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)] if hidden else [nn.Linear(64, 10)]
    return nn.Sequential(*layers), train_dl


@pytest.fixture(scope="module")
def digits_run():
    "bs_find on digits at lr=0 with num_it='auto' and the user's Adam: the device timed, the rule known."
    model, train_dl = _digits(hidden=128)
    res = bs_find(model, train_dl, nn.CrossEntropyLoss(), lr=0, num_it="auto", n_batch=10,
                  opt=lambda p: torch.optim.Adam(p, lr=1e-3))
    return model, train_dl, res


@pytest.fixture(scope="module")
def digits_result():
    "A reliable finder run on digits at lr=0.05, like the README's (the lr the advice defaults to)."
    model, train_dl = _digits(hidden=128)
    res = bs_find(model, train_dl, nn.CrossEntropyLoss(), lr=0.05, num_it=600, n_batch=10)
    assert res.reliable, res.reason
    return res


# --- The lr rules: the factor for a new batch size, and which rule an optimizer follows ---------------------------


def test_lr_factor_linear_below_noise_scale_and_saturating_above():
    assert lr_factor(32, 64, noise_scale=1e6, rule="sgd") == pytest.approx(2, rel=1e-3)
    assert lr_factor(32, 64, noise_scale=1e6, rule="adam") == pytest.approx(math.sqrt(2), rel=1e-3)
    assert lr_factor(32, 64, noise_scale=1e6, rule="momentum") == pytest.approx(math.sqrt(2), rel=1e-3)
    assert lr_factor(4096, 8192, noise_scale=100, rule="sgd") < 1.03  # past the noise scale: almost no step size
    with pytest.raises(ValueError, match="rule"):
        lr_factor(32, 64, 100, rule="rmsprop")


@pytest.mark.parametrize("opt, rule", [
    (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), "sgd"),
    (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, nesterov=True), "momentum"),
    (torch.optim.AdamW([nn.Parameter(torch.zeros(1))]), "adam"),
    (torch.optim.RMSprop, "adam"), (torch.optim.Adam, "adam"),
    (functools.partial(torch.optim.SGD, momentum=0.9), "momentum"),
    (lambda params: torch.optim.Adam(params), None),  # "<lambda>" is not LAMB
    (None, None),
])
def test_detect_rule(opt, rule):
    assert detect_rule(opt) == rule


def test_detect_rule_for_fastai_optimizers():
    from fastai.optimizer import SGD, Adam, RAdam

    assert (detect_rule(Adam), detect_rule(RAdam), detect_rule(SGD)) == ("adam", "adam", "sgd")
    assert detect_rule(functools.partial(SGD, mom=0.9)) == "momentum"
    assert detect_rule(Adam([nn.Parameter(torch.zeros(1))], lr=1e-3)) == "adam"


def test_an_unknown_optimizer_gets_the_square_root_rule():
    "bs_find's own SGD (opt=None) says nothing of the user's optimizer: the safer square root, said in the text."
    model, train_dl = _digits()
    res = bs_find(model, train_dl, nn.CrossEntropyLoss(), lr=0, num_it=300, n_batch=10, measure_speed=False)
    assert res.rule is None and res.throughput is None
    a = res.advice(lr=0.1, epochs=4, throughput=gpu_like())
    assert a.rule == "momentum"


# --- Goodput decisions: grow, keep, shrink or uncertain ------------------------------------------------------------


def test_gpu_like_device_grows_as_far_as_the_lr_follows():
    "Steps cost the same: 64 halves the steps; 128 would need lr ×3.6 (linear rule), above the ×2 cap."
    iv = Interval(1000.0, 900.0, 1100.0)
    a = advise(iv, 32, throughput=gpu_like(), n_train=100_000, lr=0.1, epochs=8, rule="sgd")
    assert a.kind == "grow" and a.batch_size == 64
    assert lr_factor(32, 128, 900.0) > MAX_LR_FACTOR >= lr_factor(32, 64, 900.0)
    # planned at the interval's low end: the lr factor, the epochs and the predicted gain
    assert a.lr_factor == pytest.approx((1 + 900 / 32) / (1 + 900 / 64)) and a.lr == pytest.approx(0.1 * a.lr_factor)
    exact = 8 * examples_ratio(32, 64, 900.0)
    assert a.epochs == round_epochs(exact) == 9
    assert a.speedup == pytest.approx(2 * 8 / 9)  # twice the examples per second, 9/8 the epochs
    assert a.speedup_range[0] == pytest.approx(a.speedup) and a.speedup_range[1] >= a.speedup
    assert a.total_steps == math.ceil(exact * 100_000 / 64)
    assert a.headline == f"Train with batch size 64 · lr {a.lr:.3g} · 9 epochs — about {a.speedup:.2g}× faster " \
                         "on this machine"
    assert "above ×2 training can break" in a.text and "low end 900" in a.text


def test_cpu_like_device_keeps_the_batch():
    "Time per example: a bigger batch needs more examples at the same speed, never faster."
    a = advise(Interval(1000.0, 900.0, 1100.0), 32, throughput=cpu_like(), n_train=100_000, lr=0.1, epochs=8)
    assert a.kind == "keep" and (a.batch_size, a.lr, a.epochs, a.speedup) == (32, 0.1, 8, 1.0)
    assert a.headline.startswith("Keep batch size 32") and "×1.1 needed" in a.text


def test_a_kept_batch_size_says_keep_not_a_change_to_itself():
    a = advise(Interval(450.0, 400.0, 500.0), 32, throughput=cpu_like(), n_train=5000, lr=0.1, epochs=10)
    assert (a.batch_size, a.lr, a.epochs, a.kind) == (32, 0.1, 10, "keep")
    assert a.text.startswith("keep batch size 32") and "32 → 32" not in a.text


def test_a_small_noise_scale_on_a_cpu_like_device_shrinks():
    "B_noise 10 at batch 64: a batch of 8 needs a quarter of the examples, at the same speed per example."
    a = advise(Interval(10.0, 8.0, 12.0), 64, throughput=cpu_like(), n_train=10_000, lr=0.1, epochs=10, rule="sgd")
    assert a.kind == "shrink" and a.batch_size < 64 and a.lr < 0.1 and a.epochs < 10
    # planned at the high end, where shrinking gains least
    assert a.speedup == pytest.approx(speedup(64, a.batch_size, 12.0, cpu_like(), 10))
    assert a.speedup >= GAIN_NEEDED and "high end 12" in a.text


def test_the_lr_changes_at_most_twofold_either_way():
    "B_noise 10 at batch 64 on a per-example device: 8 would gain more, but lr ÷3.5 is another training; 32 is not."
    a = advise(Interval(10.0, 8.0, 12.0), 64, throughput=cpu_like(), n_train=10_000, lr=0.1, epochs=10, rule="sgd")
    assert a.kind == "shrink" and 1 / MAX_LR_FACTOR <= a.lr_factor < 1
    assert lr_factor(64, a.batch_size // 2, 12.0, "sgd") < 1 / MAX_LR_FACTOR


def test_uncertain_only_when_the_interval_straddles_the_decision():
    "A gain at the measured value but none at the low end, with a wide interval: keep and measure longer."
    tp = Throughput({32: 0.010, 64: 0.01538}, device="d")  # ×1.3 the examples per second at 64
    wide = advise(Interval(200.0, 30.0, 2000.0), 32, throughput=tp, n_train=100_000, lr=1e-3, epochs=8, rule="adam")
    assert wide.kind == "uncertain" and wide.batch_size is None
    assert "num_it='auto'" in wide.headline and "too wide" in wide.text
    narrow = advise(Interval(200.0, 190.0, 210.0), 32, throughput=tp, n_train=100_000, lr=1e-3, epochs=8, rule="adam")
    assert narrow.kind == "grow" and narrow.batch_size == 64


def test_a_lower_bound_above_every_size_is_a_confident_answer():
    "An unbounded interval whose low end exceeds every size the data allows: as large as the data allows."
    a = advise(Interval(5000.0, 4000.0, math.inf), 32, throughput=gpu_like(), n_train=1438, lr=1e-3, epochs=5,
               rule="adam")
    assert a.kind == "grow" and a.batch_size == 128 and MIN_STEPS_PER_EPOCH <= 1438 // 128
    assert "as large as the data allows" in a.text and a.speedup_range[1] == pytest.approx(4.0)


def test_a_small_dataset_keeps_its_batch_size():
    """200 examples at bs 32, noise scale 300: nothing bigger keeps 10 steps an epoch, and that step cap (16) is no
    reason to halve the batch either: keep, lr and epochs unchanged, and say why."""
    iv = Interval(300.0, 250.0, 350.0)
    assert sizes_worth_timing(32, iv, 200, MIN_STEPS_PER_EPOCH) == [32]
    a = advise(iv, 32, throughput=gpu_like([32]), n_train=200, lr=0.1, epochs=10)
    assert a.kind == "keep" and a.batch_size == 32 and "200 training examples" in a.text
    # every size timed, smaller ones included
    a = advise(iv, 32, throughput=gpu_like(), n_train=200, lr=0.1, epochs=10)
    assert a.batch_size == 32 and a.lr == 0.1 and a.lr_factor == 1 and a.epochs == 10
    assert "keep batch size 32" in a.text and "200 training examples" in a.text and "→ 16" not in a.text
    assert a.speedup == 1 and a.kind == "keep"


def test_sizes_worth_timing_skip_what_cannot_gain():
    "Doublings that could not gain ×1.1 even with free steps are not timed, nor halvings with an unbounded interval."
    assert sizes_worth_timing(32, Interval(1000.0, 900.0, 1100.0), 10**6, 10) == [32, 64, 128, 256, 512]
    assert sizes_worth_timing(32, Interval(3.0, 2.0, 4.0), 10**6, 10) == [4, 8, 16, 32]
    assert sizes_worth_timing(32, Interval(30.0, 20.0, math.inf), 10**6, 10) == [32, 64]  # 128 needs ×2.8 the examples


def test_a_bigger_batch_at_most_doubles_the_examples():
    "Steps that cost the same at every size would favour 4,096 at ×57 the epochs; past ×2 the examples, no bigger."
    a = advise(Interval(40.0, 40.0, 42.0), 32, throughput=gpu_like(), n_train=10**6, epochs=3, rule="adam")
    assert a.batch_size == 64 and examples_ratio(32, 64, 40.0) <= 2 < examples_ratio(32, 128, 40.0)
    assert "×2 the examples" in a.text or "past the noise scale" in a.text


def test_the_advice_never_exceeds_what_fits_in_one_step():
    "Accumulating micro-batches is no faster per example than one micro-batch, and needs more examples."
    a = advise(Interval(900.0, 850.0, 950.0), 32, throughput=gpu_like(), n_train=50_000, lr=0.1, epochs=8,
               max_fit=40, rule="adam")
    assert a.batch_size == 32 and a.kind == "keep" and "accumulat" not in a.text
    fits = advise(Interval(900.0, 850.0, 950.0), 32, throughput=gpu_like(), n_train=50_000, lr=0.1,
                  max_fit=64, rule="adam")
    assert fits.batch_size == 64


def test_a_gain_within_the_timing_noise_keeps_the_batch():
    "×1.25 predicted, but the rounds of the timing disagreed by 20%: ×1.32 is needed, so keep (and say why)."
    steady = Throughput({32: 0.010, 64: 0.016}, device="d")
    noisy = Throughput({32: 0.010, 64: 0.016}, device="d", spread={32: 0.02, 64: 0.2})
    iv = Interval(1000.0, 1000.0, 1050.0)
    assert advise(iv, 32, throughput=steady, n_train=10**5, rule="adam").kind == "grow"
    a = advise(iv, 32, throughput=noisy, n_train=10**5, rule="adam")
    assert a.kind == "keep" and "beyond the timing noise, ±20% here" in a.text


def test_epochs_change_smoothly_with_the_noise_scale():
    """3 epochs at noise scales from 40 to 100: the epochs are at most EPOCH_SLACK of an epoch short of the exact need
    and less than one over, and move by at most one between neighbouring noise scales (no ×1.34 rounded up to ×1.67)."""
    assert round_epochs(4.02) == 4 and round_epochs(4.3) == 5 and round_epochs(0.4) == 1
    prev = None
    for ns in [40 + i * 0.5 for i in range(120)]:
        a = advise(Interval(ns, ns, ns * 1.05), 32, throughput=gpu_like(), n_train=100_000, epochs=3, rule="adam")
        exact = 3 * examples_ratio(32, a.batch_size, ns)
        assert exact - EPOCH_SLACK <= a.epochs < exact + 1 - EPOCH_SLACK
        if prev is not None and prev[0] == a.batch_size:
            assert abs(a.epochs - prev[1]) <= 1
        prev = (a.batch_size, a.epochs)


# --- Nothing to decide on: no usable measurement, no timing, bad arguments -----------------------------------------


def test_unusable_measurement_is_uncertain_and_says_why():
    a = advise(None, 32, throughput=gpu_like(), n_train=1000, lr=0.1, epochs=5, reason="only 3 estimate(s): increase "
               "num_it to at least 100")
    assert a.kind == "uncertain" and a.batch_size is None and a.lr == 0.1
    assert "keep batch size 32 for now" in a.text and a.headline == "Not sure yet: keep batch size 32; increase " \
                                                                     "num_it to at least 100"


def test_an_unknown_batch_size_is_uncertain_not_a_crash():
    a = advise(Interval(100.0, 90.0, 110.0), None, throughput=gpu_like(), n_train=1000)
    assert a.kind == "uncertain" and "batch size is unknown" in a.text


def test_without_a_timing_the_advice_names_what_to_measure():
    a = advise(Interval(100.0, 90.0, 110.0), 32, n_train=1000, lr=0.1)
    assert a.kind == "uncertain" and "measure_throughput" in a.text


@pytest.mark.parametrize("kwargs, words", [
    ({"rule": "rmsprop"}, "rule must be"), ({"epochs": 0}, "epochs must be"), ({"epochs": 2.5}, "epochs must be"),
    ({"lr": -1.0}, "lr must be"), ({"lr": math.inf}, "lr must be"), ({"lr": slice(1e-5, -1.0)}, "lr must be"),
    ({"lr": slice(0, 1e-3)}, "lr must be"), ({"lr": slice(1e-5, 1e-3, 2)}, "lr must be"),
    ({"lr": "1e-3"}, "lr must be"),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        advise(Interval(100.0, 90.0, 110.0), 32, throughput=gpu_like(), **kwargs)


# --- Following the advice: the lr, the epochs and the loader as a user applies them -------------------------------


def test_a_slice_of_discriminative_lrs_is_scaled_at_both_ends():
    "fastai's fit_one_cycle(n, slice(body, head)): the advice's lr goes straight back into it."
    iv = Interval(90.0, 90.0, 95.0)
    a = advise(iv, 32, throughput=gpu_like(), n_train=10_000, lr=slice(1e-5, 1e-3), epochs=8, rule="adam")
    f = a.lr_factor
    assert a.batch_size > 32 and f == pytest.approx(math.sqrt((1 + 90 / 32) / (1 + 90 / a.batch_size)))
    assert isinstance(a.lr, slice) and (a.lr.start, a.lr.stop) == (pytest.approx(1e-5 * f), pytest.approx(1e-3 * f))
    assert f"lr slice(1e-05, 0.001) → slice({1e-5 * f:.3g}, {1e-3 * f:.3g}) at batch size {a.batch_size}" in a.text
    top_only = advise(iv, 32, throughput=gpu_like(), n_train=10_000, lr=slice(1e-3), rule="adam")
    assert top_only.lr.start is None and top_only.lr.stop == pytest.approx(1e-3 * f)
    keep = advise(Interval(1000.0, 900.0, 1100.0), 32, throughput=cpu_like(), n_train=10_000, lr=slice(1e-5, 1e-3))
    assert keep.text.count("lr slice(1e-05, 0.001) unchanged") == 1


def test_the_lr_text_names_the_batch_size_it_is_for(digits_result):
    "The lr is for the advice's batch size (not the raw res.suggested_bs): the lr text names it."
    res = digits_result
    a = res.advice(lr=0.05, throughput=gpu_like())
    assert a.kind == "grow" and f"at batch size {a.batch_size}" in a.lr_text


def test_the_run_lr_is_marked_as_the_finders():
    "advice() without lr= scales the finder run's lr: say so, a user training at another lr must pass theirs."
    iv = Interval(90.0, 85.0, 95.0)
    a = advise(iv, 32, throughput=gpu_like(), n_train=5000, lr=1e-3, lr_from_run=True)
    assert "the finder run's lr" in a.text and "pass lr=" in a.text
    assert "finder run's" not in advise(iv, 32, throughput=gpu_like(), n_train=5000, lr=1e-3).text


def test_epochs_text_gives_the_papers_ratio_and_the_rounding():
    "1 epoch at 32 → 64: the paper asks ×1.26 the examples; 1.26 epochs round up to 2, and the text says so."
    a = advise(Interval(90.0, 90.0, 95.0), 32, throughput=gpu_like(), n_train=50_000, lr=0.1, epochs=1, rule="adam")
    ratio = (1 + a.batch_size / 90) / (1 + 32 / 90)
    assert a.epochs == 2 and f"×{ratio:.2g} the examples" in a.text and "rounded up" in a.text
    assert a.speedup == pytest.approx(a.batch_size / 32 / 2)  # the rounding is priced in


def test_advice_apply_changes_the_loader_only_when_it_grows_or_shrinks():
    "`train_dl = a.apply(train_dl)`: a rebuilt loader for grow or shrink, the same one otherwise; a Learner's lr too."
    dl = DataLoader(TensorDataset(torch.zeros(4096, 2)), batch_size=32, shuffle=True)
    grow = advise(Interval(1000.0, 900.0, 1100.0), 32, throughput=gpu_like(), n_train=4096, lr=0.1, rule="sgd")
    keep = advise(Interval(1000.0, 900.0, 1100.0), 32, throughput=cpu_like(), n_train=4096, lr=0.1)
    assert keep.apply(dl) is dl and dl.batch_size == 32
    learn = type("Learner", (), {"lr": 0.1})()
    new = grow.apply(dl, learn)
    assert new is not dl and new.batch_size == grow.batch_size == 64 and learn.lr == grow.lr != 0.1


@pytest.mark.filterwarnings(r"ignore:bs=\d+ leaves:UserWarning")
def test_apply_rebuilds_a_plain_batch_sampler():
    "DataLoader(batch_sampler=BatchSampler(...)) is an ordinary batched loader: rebuild it, sampler and drop_last kept."
    sampler = RandomSampler(DS, generator=torch.Generator().manual_seed(0))
    dl = DataLoader(DS, batch_sampler=BatchSampler(sampler, 10, drop_last=True))
    new = apply_batch_size(dl, 32)
    assert current_batch_size(new) == 32 and new.batch_sampler.sampler is sampler and new.batch_sampler.drop_last
    assert len(new) == 3 and len(next(iter(new))[0]) == 32


def _init(_worker_id):
    pass


@pytest.mark.filterwarnings(r"ignore:bs=\d+ leaves:UserWarning")
def test_apply_keeps_a_weighted_sampler_and_worker_settings():
    weights = torch.ones(100)
    sampler = WeightedRandomSampler(weights, 100)
    dl = DataLoader(DS, batch_size=8, sampler=sampler, num_workers=1, persistent_workers=True, prefetch_factor=3,
                    worker_init_fn=_init)
    new = apply_batch_size(dl, 16)
    assert new.sampler is sampler and new.num_workers == 1 and new.persistent_workers and new.prefetch_factor == 3
    assert new.worker_init_fn is _init


def test_apply_warns_when_an_epoch_keeps_too_few_steps():
    "res.suggested_bs on 100 examples: 64 gives 2 steps an epoch (1 with drop_last): say so, and what advice() does."
    dl = DataLoader(DS, batch_size=8, shuffle=True, drop_last=True)
    with pytest.warns(UserWarning, match="1 optimizer step per epoch.*advice"):
        apply_batch_size(dl, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_batch_size(dl, 100 // MIN_STEPS_PER_EPOCH)  # exactly the advice's minimum: no warning
        apply_batch_size(DataLoader(DS, batch_size=32), 32)  # as few steps as before: not the change's doing


# --- The advice of a real bs_find run ------------------------------------------------------------------------------


def test_bs_find_times_the_device_and_the_advice_uses_it(digits_run):
    "The result carries this device's speed at the user's size and the sizes worth timing, and the rule it ran with."
    _, _, res = digits_run
    tp = res.throughput
    assert tp is not None and 32 in tp.step_seconds and len(tp.batch_sizes) >= 2
    assert all(s > 0 for s in tp.step_seconds.values()) and all(tp.load_seconds[b] > 0 for b in tp.batch_sizes)
    assert res.rule == "adam"
    a = res.advice(lr=1e-3, epochs=8)
    assert a.kind in KINDS and a.kind != "uncertain" and a.rule == "adam" and a.speedup is not None
    assert str(res.interval) in a.text and "measured on cpu" in a.text and "one point of training" in a.text


@pytest.mark.slow
def test_same_weights_give_the_same_advice():
    "The issue's bar: the same weights give the same advice in at least 9 runs of 10 (timing noise included)."
    model, train_dl = _digits()  # a linear model: per-step cost dominates on a CPU, growing clearly pays
    kinds = []
    for seed in range(10):
        torch.manual_seed(seed)
        res = bs_find(model, train_dl, nn.CrossEntropyLoss(), lr=0, num_it="auto", n_batch=10,
                      opt=lambda p: torch.optim.Adam(p, lr=1e-3))
        a = res.advice(lr=1e-3, epochs=8)
        kinds.append((a.kind, a.batch_size, a.epochs))
    most = max(set(kinds), key=kinds.count)
    assert kinds.count(most) >= 9, kinds
