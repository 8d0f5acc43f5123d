"""Advice followed blindly: what a user applies must be what the advice's lr and epochs were computed for.

Each test is a case where following the advice (or the README's recipe) hurt or misled before.
"""
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

from gns_widget import apply_batch_size, bs_find
from gns_widget.advice import MIN_STEPS_PER_EPOCH, advise
from gns_widget.datasets import digits_loaders
from gns_widget.interval import Interval
from gns_widget.loaders import current_batch_size
from gns_widget.suggest import MAX_LOSS_RISE, suggest_batch_size
from gns_widget.throughput import Throughput

DS = TensorDataset(torch.arange(100).float(), torch.arange(100))
SIZES = [2**k for k in range(13)]
STEP_COSTS_THE_SAME = Throughput({b: 0.01 for b in SIZES}, device="gpu-like")
TIME_PER_EXAMPLE = Throughput({b: 1e-4 * b for b in SIZES}, device="cpu-like")


@pytest.fixture(scope="module")
def digits_result():
    "A reliable finder run on digits at lr=0.05, like the README's (the lr the advice defaults to)."
    torch.manual_seed(0)
    train_dl, _ = digits_loaders(bs=32, seed=0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    res = bs_find(model, train_dl, nn.CrossEntropyLoss(), lr=0.05, num_it=600, n_batch=10)
    assert res.reliable, res.reason
    return res


def test_a_bigger_suggestion_never_shrinks_the_batch_of_a_small_dataset():
    "200 examples at bs 32, noise scale 300: the step cap (16) fell below the user's 32 and advised halving it."
    a = advise(Interval(300.0, 250.0, 350.0), 32, throughput=STEP_COSTS_THE_SAME, n_train=200, lr=0.1, epochs=10)
    assert a.batch_size == 32 and a.lr == 0.1 and a.lr_factor == 1 and a.epochs == 10
    assert "keep batch size 32" in a.text and "200 training examples" in a.text and "→ 16" not in a.text
    assert a.speedup == 1 and a.kind == "keep"


def test_a_kept_batch_size_says_keep():
    a = advise(Interval(450.0, 400.0, 500.0), 32, throughput=TIME_PER_EXAMPLE, n_train=5000, lr=0.1, epochs=10)
    assert (a.batch_size, a.lr, a.epochs, a.kind) == (32, 0.1, 10, "keep")
    assert a.text.startswith("keep batch size 32") and "32 → 32" not in a.text


def test_the_lr_text_names_the_batch_size_it_is_for(digits_result):
    "README applied res.suggested_bs and the lr of lr_advice, which is for the advice's batch size."
    res = digits_result
    a = res.advice(lr=0.05, throughput=STEP_COSTS_THE_SAME)
    assert a.kind == "grow" and f"at batch size {a.batch_size}" in a.lr_text


def test_the_run_lr_is_marked_as_the_finders():
    "advice() without lr= scales the finder run's lr: say so, a user training at another lr must pass theirs."
    iv = Interval(90.0, 85.0, 95.0)
    a = advise(iv, 32, throughput=STEP_COSTS_THE_SAME, n_train=5000, lr=1e-3, lr_from_run=True)
    assert "the finder run's lr" in a.text and "pass lr=" in a.text
    assert "finder run's" not in advise(iv, 32, throughput=STEP_COSTS_THE_SAME, n_train=5000, lr=1e-3).text


def test_epochs_text_gives_the_papers_ratio_and_the_rounding():
    "1 epoch at 32 → 64: the paper asks ×1.26 the examples; 1.26 epochs round up to 2, and the text says so."
    a = advise(Interval(90.0, 90.0, 95.0), 32, throughput=STEP_COSTS_THE_SAME, n_train=50_000, lr=0.1, epochs=1,
               rule="adam")
    ratio = (1 + a.batch_size / 90) / (1 + 32 / 90)
    assert a.epochs == 2 and f"×{ratio:.2g} the examples" in a.text and "rounded up" in a.text
    assert a.speedup == pytest.approx(a.batch_size / 32 / 2)  # the rounding is priced in


def test_the_advice_never_exceeds_what_fits_in_one_step():
    "Accumulating micro-batches is no faster per example than one micro-batch, and needs more examples."
    a = advise(Interval(900.0, 850.0, 950.0), 32, throughput=STEP_COSTS_THE_SAME, n_train=50_000, lr=0.1, epochs=8,
               max_fit=40, rule="adam")
    assert a.batch_size == 32 and a.kind == "keep" and "accumulat" not in a.text
    fits = advise(Interval(900.0, 850.0, 950.0), 32, throughput=STEP_COSTS_THE_SAME, n_train=50_000, lr=0.1,
                  max_fit=64, rule="adam")
    assert fits.batch_size == 64


@pytest.mark.filterwarnings(r"ignore:bs=\d+ leaves:UserWarning")
def test_apply_rebuilds_a_plain_batch_sampler():
    "DataLoader(batch_sampler=BatchSampler(...)) is an ordinary batched loader: rebuild it, sampler and drop_last kept."
    sampler = RandomSampler(DS, generator=torch.Generator().manual_seed(0))
    dl = DataLoader(DS, batch_sampler=BatchSampler(sampler, 10, drop_last=True))
    new = apply_batch_size(dl, 32)
    assert current_batch_size(new) == 32 and new.batch_sampler.sampler is sampler and new.batch_sampler.drop_last
    assert len(new) == 3 and len(next(iter(new))[0]) == 32


@pytest.mark.filterwarnings(r"ignore:bs=\d+ leaves:UserWarning")
def test_apply_keeps_a_weighted_sampler_and_worker_settings():
    weights = torch.ones(100)
    sampler = WeightedRandomSampler(weights, 100)
    dl = DataLoader(DS, batch_size=8, sampler=sampler, num_workers=1, persistent_workers=True, prefetch_factor=3,
                    worker_init_fn=_init)
    new = apply_batch_size(dl, 16)
    assert new.sampler is sampler and new.num_workers == 1 and new.persistent_workers and new.prefetch_factor == 3
    assert new.worker_init_fn is _init


def _init(_worker_id):
    pass


def test_apply_warns_when_an_epoch_keeps_too_few_steps():
    "res.suggested_bs on 100 examples: 64 gives 2 steps an epoch (1 with drop_last): say so, and what advice() does."
    dl = DataLoader(DS, batch_size=8, shuffle=True, drop_last=True)
    with pytest.warns(UserWarning, match="1 optimizer step per epoch.*advice"):
        apply_batch_size(dl, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_batch_size(dl, 100 // MIN_STEPS_PER_EPOCH)  # exactly the advice's minimum: no warning
        apply_batch_size(DataLoader(DS, batch_size=32), 32)  # as few steps as before: not the change's doing


def _losses_history(losses, noise_scale=5.0):
    n = len(losses)
    return pd.DataFrame({"iteration": [10 * (i + 1) for i in range(n)], "noise_scale": [noise_scale] * n,
                         "noise": [1.0] * n, "scale": [1 / noise_scale] * n, "loss": losses})


def test_a_run_whose_loss_rose_gives_no_suggestion():
    "Trained at an lr the model cannot take, the loss doubles and stays up: bouncing weights have no noise scale."
    rose = _losses_history([2.3, 2.2, 2.4, 2.3, 4.1, 5.2, 6.0, 5.5, 5.8, 6.1, 5.9, 6.2])
    s = suggest_batch_size(rose, n_train=1438, trained=True)
    assert s.bs is None and "loss rose" in s.reason and "lower lr" in s.reason and "lr=0" in s.reason
    assert suggest_batch_size(rose, n_train=1438).bs == 4  # at lr=0 the loss is the windows' noise, not a trend
    fell = _losses_history([2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2])
    flat = _losses_history([0.30, 0.31, 0.29, 0.32, 0.30, 0.31, 0.30, 0.32, 0.31, 0.30, 0.31, 0.32])  # converged
    spike = _losses_history([2.3, 2.2, 6.0, 2.1, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2])  # one bad window, recovered
    for ok in (fell, flat, spike):
        assert suggest_batch_size(ok, n_train=1438, trained=True).bs == 4


def test_a_converged_models_noisy_batch_losses_are_not_a_rise():
    """per_example records one small batch each: on digits trained 30 epochs, its batch losses went from a lucky 0.05
    to 0.30 around a flat 0.075, and each record compared alone said 'the loss rose' for a reliable run."""
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 0.075 / 2, 1000)
    losses[0] = 0.05
    assert losses.max() > 2 * MAX_LOSS_RISE * losses[0]  # what the record-by-record rule fired on
    s = suggest_batch_size(_losses_history(list(losses), noise_scale=500.0), n_train=1438, trained=True)
    assert "loss rose" not in s.reason


