"`advice()`: batch size capped by steps per epoch and by how far the lr follows, lr by ε(B), epochs by the trade-off."
import math

import pytest
import torch
from torch import nn

from gns_widget import bs_find
from gns_widget.advice import MAX_LR_FACTOR, MIN_STEPS_PER_EPOCH, advise
from gns_widget.datasets import digits_loaders
from gns_widget.interval import Interval
from gns_widget.suggest import lr_factor


def test_issue_11_digits_case_is_capped_in_batch_size_and_lr():
    "The 30,000-iteration quickstart run: noise scale ~1,000 suggested bs 1024 for 1,438 images and lr ×20."
    a = advise(1000.0, 1024, 32, n_train=1438, lr=0.1, epochs=8, rule="sgd")
    assert MIN_STEPS_PER_EPOCH <= 1438 // 128 and "capped at 128" in a.text and "1,438 training examples" in a.text
    # 128 would need lr ×3.7: the batch grows only as far as an lr ×2 follows
    assert lr_factor(32, 128, 1000.0) > MAX_LR_FACTOR >= lr_factor(32, 64, 1000.0)
    assert a.batch_size == 64 and "64 for now" in a.text and "run the finder again at batch size 64" in a.text
    assert a.lr_factor == pytest.approx((1 + 1000 / 32) / (1 + 1000 / 64)) and a.lr == pytest.approx(0.1 * a.lr_factor)
    # epochs: E(B)/E(B0) = (1 + B/B_noise)/(1 + B0/B_noise), rounded up
    assert a.epochs == math.ceil(8 * (1 + 64 / 1000) / (1 + 32 / 1000))
    assert a.steps_per_epoch == math.ceil(1438 / 64)
    lo, hi = a.time_factor
    assert lo == pytest.approx(a.epochs / 8 * 32 / 64) and hi == pytest.approx(a.epochs / 8)


def test_the_batch_grows_only_as_far_as_the_lr_can_follow():
    "SGD's linear factor allows about a doubling, Adam's square root about ×4, whatever the noise scale suggests."
    sgd = advise(1000.0, 1024, 32, n_train=100_000, lr=0.1, epochs=8, rule="sgd")
    adam = advise(1000.0, 1024, 32, n_train=100_000, lr=1e-3, epochs=8, rule="adam")
    assert (sgd.batch_size, adam.batch_size) == (64, 128)
    for a, old in ((sgd, 0.1), (adam, 1e-3)):
        assert a.suggested_bs == 1024 and a.lr_factor <= MAX_LR_FACTOR and a.lr == pytest.approx(old * a.lr_factor)
        assert lr_factor(32, 2 * a.batch_size, 1000.0, a.rule) > MAX_LR_FACTOR  # the next power of two would not
        assert f"above ×{MAX_LR_FACTOR:g} training can break" in a.text


def test_moderate_move_follows_the_paper_exactly():
    a = advise(90.0, 64, 32, n_train=1438, lr=0.1, epochs=8, rule="sgd")
    factor = (1 + 90 / 32) / (1 + 90 / 64)
    assert a.batch_size == 64 and a.lr == pytest.approx(0.1 * factor) and "for now" not in a.text
    assert a.epochs == math.ceil(8 * (1 + 64 / 90) / (1 + 32 / 90))
    adam = advise(90.0, 64, 32, n_train=1438, lr=1e-3, rule="adam")
    assert adam.lr_factor == pytest.approx(math.sqrt(factor)) and "square-root" in adam.text
    assert adam.epochs is None and "pass epochs=" in adam.text


def test_smaller_suggestion_lowers_lr_and_epochs():
    a = advise(20.0, 16, 64, n_train=10_000, lr=0.1, epochs=10)
    assert a.batch_size == 16 and a.lr < 0.1 and a.epochs < 10


def test_unreliable_keeps_the_batch_size_and_says_why():
    a = advise(math.nan, None, 32, n_train=1000, lr=0.1, epochs=5, reason="still moving: ...")
    assert a.batch_size is None and a.lr == 0.1 and "keep batch size 32: still moving" in a.text


@pytest.mark.parametrize("kwargs, words", [
    ({"rule": "rmsprop"}, "rule must be"), ({"epochs": 0}, "epochs must be"), ({"epochs": 2.5}, "epochs must be"),
    ({"lr": -1.0}, "lr must be"), ({"lr": math.inf}, "lr must be"), ({"lr": slice(1e-5, -1.0)}, "lr must be"),
    ({"lr": slice(0, 1e-3)}, "lr must be"), ({"lr": slice(1e-5, 1e-3, 2)}, "lr must be"),
    ({"lr": "1e-3"}, "lr must be"),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        advise(100.0, 128, 32, **kwargs)


def test_a_slice_of_discriminative_lrs_is_scaled_at_both_ends():
    "fastai's fit_one_cycle(n, slice(body, head)): the advice's lr goes straight back into it."
    a = advise(90.0, 64, 32, n_train=1438, lr=slice(1e-5, 1e-3), epochs=8, rule="adam")
    f = a.lr_factor
    assert f == pytest.approx(math.sqrt((1 + 90 / 32) / (1 + 90 / 64)))
    assert isinstance(a.lr, slice) and (a.lr.start, a.lr.stop) == (pytest.approx(1e-5 * f), pytest.approx(1e-3 * f))
    assert f"lr slice(1e-05, 0.001) → slice({1e-5 * f:.3g}, {1e-3 * f:.3g}) at batch size 64" in a.text
    top_only = advise(90.0, 64, 32, n_train=1438, lr=slice(1e-3), rule="adam")  # fastai: the others at stop/10
    assert top_only.lr.start is None and top_only.lr.stop == pytest.approx(1e-3 * f)
    assert advise(90.0, 32, 32, n_train=1438, lr=slice(1e-5, 1e-3)).text.count("lr slice(1e-05, 0.001) unchanged") == 1


def test_text_shows_the_interval():
    a = advise(91.2, 64, 32, n_train=5000, interval=Interval(91.2, 80.4, 104.3))
    assert "noise scale 91 (80–104)" in a.text


def test_result_advice_and_lr_advice_agree():
    "GNSResult.advice is the one place: lr_advice is its learning-rate part."
    torch.manual_seed(0)
    train_dl, _ = digits_loaders(bs=32, seed=0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    res = bs_find(model, train_dl, nn.CrossEntropyLoss(), lr=0, num_it=600, n_batch=10, beta=0.99)
    assert res.reliable, res.reason
    a = res.advice(lr=0.1, epochs=8)
    assert a.batch_size is not None and a.batch_size <= res.suggested_bs
    lr_adv = res.lr_advice(0.1)
    assert lr_adv.lr == pytest.approx(a.lr) and lr_adv.factor == a.lr_factor and lr_adv.text == a.lr_text
    assert str(res.interval) in a.text
