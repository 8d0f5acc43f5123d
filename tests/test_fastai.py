"""fastai: learn.bs_find, GNSCallback during ordinary fit, and the Learner left as it was.

The second part is the habits around learn.bs_find: training after it is unchanged, and what it does not run
(a Learner's callbacks, a loader that does not shuffle) is said.
"""
import warnings

import numpy as np
import pytest
import torch
from fastai.basics import L, Learner, set_seed
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from torch import nn
from torch.utils.data import TensorDataset

import gns_widget  # noqa: F401  (patches Learner.bs_find)
from gns_widget import GNSCallback, apply_batch_size
from gns_widget.datasets import bikeshare, digits
from gns_widget.memory import max_batch_size


@pytest.fixture
def learn():
    xt, yt, xv, yv = digits()
    dls = DataLoaders.from_dsets(TensorDataset(xt, yt), TensorDataset(xv, yv), bs=32, device="cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=Adam)


def test_learner_bs_find_leaves_learner_untouched(learn):
    learn.fit(1, 1e-3)  # a real optimizer with state
    opt_state = {k: v.clone() for k, v in learn.opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng = learn.dls.train.rng.getstate()
    res = learn.bs_find(lr=1e-2, num_it=60, n_batch=5, show_plot=False)
    assert len(res.history) == 12 and res.batch_size == 32 and res.n_train == len(learn.dls.train_ds)
    for k, v in weights.items():
        assert torch.equal(v, learn.model.state_dict()[k])
    for k, v in opt_state.items():
        assert torch.equal(v, learn.opt.state_dict()["state"][0][k])
    assert learn.dls.train.rng.getstate() == rng and learn.dls.train.bs == 32


def test_callback_monitors_fit_without_changing_it(learn):
    dl_rng = learn.dls.train.rng
    rng_state = dl_rng.getstate()  # the shuffling: fastai replaces dl.rng every epoch
    torch.manual_seed(0)
    w0 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(2, 1e-3)
    plain = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.model.load_state_dict(w0)
    learn.opt = None
    learn.dls.train.rng = dl_rng
    dl_rng.setstate(rng_state)
    torch.manual_seed(0)
    cb = GNSCallback(n_batch=5, beta=0.9)
    learn.fit(2, 1e-3, cbs=cb)
    for k, v in plain.items():
        assert torch.equal(v, learn.model.state_dict()[k]), "the callback changed the training"
    steps = 2 * len(learn.dls.train)
    assert len(cb.result.history) == steps // 5 and cb.result.noise_scale > 0


def test_apply_batch_size_in_place(learn):
    dls = apply_batch_size(learn.dls, 128)
    assert dls is learn.dls and learn.dls.train.bs == 128 and len(learn.dls.train) == len(learn.dls.train_ds) // 128


def test_tabular_learner_on_bikeshare():
    from fastai.tabular.all import Categorify, Normalize, TabularDataLoaders, tabular_learner

    df = bikeshare()
    df["bikers"] = df.bikers.astype("float32")
    dls = TabularDataLoaders.from_df(df.drop(columns=["casual", "registered"]), y_names="bikers",
                                     cat_names=["season", "mnth", "hr", "weathersit"],
                                     cont_names=["temp", "hum", "windspeed"], procs=[Categorify, Normalize],
                                     bs=64, device="cpu")
    learn = tabular_learner(dls, layers=[64, 32])
    res = learn.bs_find(lr=1e-3, num_it=100, n_batch=5, show_plot=False)
    assert len(res.history) == 20 and res.n_train == len(dls.train_ds)
    assert res.history.noise.iloc[-1] > 0


def _fit_at_fixed_weights(learn, cbs):
    "One epoch at lr=0 (weights stay put) over the same shuffle, so two monitors see the very same batches."
    rng = learn.dls.train.rng
    state = rng.getstate()
    learn.fit(1, 0.0, cbs=cbs)
    learn.dls.train.rng = rng
    rng.setstate(state)


def test_callback_with_gradient_accumulation_matches_separate_small_batches(learn):
    "Under GradientAccumulation each cycle of 4 micro-batches is a window, and the estimates equal plain windows of 4."
    from fastai.callback.training import GradientAccumulation

    plain, accumulated = GNSCallback(n_batch=4, beta=0.9), GNSCallback(n_batch=20, beta=0.9)
    _fit_at_fixed_weights(learn, [plain])
    _fit_at_fixed_weights(learn, [accumulated, GradientAccumulation(n_acc=4 * 32)])
    assert accumulated.estimator.accumulated and accumulated.estimator.n_batch == 4
    a, b = plain.result.history, accumulated.result.history
    assert len(a) == len(b) == len(learn.dls.train) // 4
    np.testing.assert_allclose(b.noise_raw, a.noise_raw, rtol=1e-3)
    np.testing.assert_allclose(b.scale_raw, a.scale_raw, rtol=1e-3)


def test_callback_refuses_accumulation_that_is_not_a_multiple_of_bs(learn):
    from fastai.callback.training import GradientAccumulation

    with pytest.raises(ValueError, match="multiple of the batch size"):
        learn.fit(1, 0.0, cbs=[GNSCallback(), GradientAccumulation(n_acc=100)])


class _CPUMixedPrecision(MixedPrecision):
    "fastai's MixedPrecision hard-codes CUDA: the same callback on the CPU, bf16 autocast and a GradScaler."

    def __init__(self, scaled: bool):
        super().__init__()
        self.scaled = scaled

    def before_fit(self):
        self.autocast, self.scales = torch.autocast("cpu", dtype=torch.bfloat16), L()
        self.learn.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2, enabled=self.scaled)

    def after_fit(self):
        self.final_scale = self.scaler.get_scale()
        super().after_fit()


@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulation"])
def test_callback_under_mixed_precision_reads_unscaled_gradients(learn, accumulate):
    "With a GradScaler whose scale keeps growing, the estimates equal those of the same bf16 run without one."
    from fastai.callback.training import GradientAccumulation

    extra = [GradientAccumulation(n_acc=4 * 32)] if accumulate else []
    unscaled, scaled = GNSCallback(n_batch=4, beta=0.9), GNSCallback(n_batch=4, beta=0.9)
    _fit_at_fixed_weights(learn, [unscaled, _CPUMixedPrecision(scaled=False), *extra])
    mp = _CPUMixedPrecision(scaled=True)
    _fit_at_fixed_weights(learn, [scaled, mp, *extra])
    assert mp.final_scale >= 2.0**20  # the loss scale grew during the fit
    a, b = unscaled.result.history, scaled.result.history
    assert len(a) == len(b) == len(learn.dls.train) // 4
    np.testing.assert_allclose(b.noise_raw, a.noise_raw, rtol=1e-4)
    np.testing.assert_allclose(b.scale_raw, a.scale_raw, rtol=1e-4)


def _frozen_body_learner():
    "learn.freeze() in miniature: the body frozen, the head trains, on 20k examples with an exact noise scale."
    from fastai.optimizer import SGD

    from tests.test_models import _regression

    x, y = _regression()
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x[:500], y[:500]), bs=50, device="cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 1))
    learn = Learner(dls, model, loss_func=nn.MSELoss(), opt_func=SGD,
                    splitter=lambda m: L(m[0], m[2]).map(lambda g: list(g.parameters())))
    learn.freeze()
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    return learn, x, y


@pytest.mark.slow
def test_frozen_learner_bs_find_and_callback_match_exact():
    "The fine-tuning setup: bs_find and GNSCallback measure what trains (12% and 21% off before)."
    from tests.exact import exact_noise_scale

    learn, x, y = _frozen_body_learner()
    _, _, exact = exact_noise_scale(learn.model, nn.MSELoss(), x, y)
    res = learn.bs_find(lr=0, num_it=2000, n_batch=10, show_plot=False)
    assert res.noise_scale == pytest.approx(exact, rel=0.10)
    cb = GNSCallback(n_batch=10, beta=0.99)
    with learn.no_bar(), learn.no_logging():
        learn.fit(5, lr=0, cbs=cb)  # lr=0: the weights stay where the exact value was computed
    assert cb.result.noise_scale == pytest.approx(exact, rel=0.10)


# ---------------------------------------------------------------- fastai habits around learn.bs_find
def _learner(n_train: int = 320, **kwargs) -> Learner:
    "A small digits MLP; `set_seed` first so two calls give the same weights and the same shuffling."
    set_seed(0)
    xt, yt, xv, yv = digits()
    dls = DataLoaders.from_dsets(TensorDataset(xt[:n_train], yt[:n_train]), TensorDataset(xv[:64], yv[:64]), bs=32,
                                 device="cpu")
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Linear(32, 10))
    splitter = lambda m: L(m[0], m[2:]).map(lambda g: list(g.parameters()))  # noqa: E731
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, splitter=splitter, **kwargs)


def _fine_tune(finder: bool) -> tuple[list[torch.Tensor], list[float]]:
    "Train, freeze, (find), unfreeze, train again with discriminative lrs: the weights and every loss recorded."
    learn = _learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)  # Adam with state
        learn.freeze()
        if finder:
            for method in ("fixed", "sequential"):
                learn.bs_find(lr=1e-2, num_it=20, n_batch=5, method=method, show_plot=False)
            learn.unfreeze()
            learn.bs_find(lr=0, num_it=10, n_batch=5, show_plot=False)
        learn.unfreeze()
        learn.fit_one_cycle(1, slice(1e-4, 1e-2))
    return [t.detach().clone() for t in learn.model.state_dict().values()], [float(v) for v in learn.recorder.losses]


@pytest.mark.slow
def test_fine_tuning_after_bs_find_trains_bit_identically():
    "The strongest check that a run leaves nothing behind: the same seeded fine-tuning, with and without finders."
    plain_weights, plain_losses = _fine_tune(finder=False)
    weights, losses = _fine_tune(finder=True)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, weights))


class _Flatten(Callback):
    "A user's callback that reshapes the inputs in before_batch (images stored 8x8, an MLP that wants 64)."

    def before_batch(self):
        self.learn.xb = (self.xb[0].flatten(1),)


def test_callbacks_that_bs_find_does_not_run_are_named(tmp_path):
    "MixUp-like, accumulation and a user's before_batch would be left out of the measurement without a word."
    from fastai.callback.mixup import MixUp

    learn = _learner(path=tmp_path, cbs=[_Flatten(), MixUp(), GradientAccumulation(n_acc=128)])
    with pytest.warns(UserWarning, match=r"take no part.*: _Flatten, MixUp, GradientAccumulation\..*once per 128 "
                                         r"examples.*batch size 32") as caught:
        learn.bs_find(lr=0, num_it=10, n_batch=5, show_plot=False)
    assert caught[0].filename == __file__  # points at the user's call, not into gns_widget
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user matched the step: no warning
        learn.bs_find(lr=0, num_it=10, n_batch=5, show_plot=False, loss_func=learn.loss_func)


def test_callbacks_that_change_nothing_measured_stay_quiet(tmp_path):
    "Logging, tracking, clipping, precision and GNSCallback itself: no warning, and no file written by a run."
    learn = _learner(path=tmp_path, cbs=[GradientClip(), EarlyStoppingCallback(), SaveModelCallback(), CSVLogger(),
                                         GNSCallback(n_batch=5)])
    learn.to_bf16()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        learn.bs_find(lr=1e-2, num_it=10, n_batch=5, show_plot=False)
    assert not list(tmp_path.rglob("*"))


def test_a_loader_that_does_not_shuffle_is_named():
    "fastai's DataLoader and torch's both default to shuffle=False: fixed batches bias the estimate (+19% on digits)."
    from fastai.data.load import DataLoader as FastaiDataLoader
    from torch.utils.data import DataLoader

    learn = _learner(n_train=100)
    ds = learn.dls.train_ds
    learn.dls = DataLoaders(FastaiDataLoader(ds, bs=16), learn.dls.valid)
    with pytest.warns(UserWarning, match="does not shuffle") as caught:
        learn.bs_find(lr=0, num_it=10, n_batch=5, show_plot=False)
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match="does not shuffle"):
        gns_widget.bs_find(learn.model, DataLoader(ds, batch_size=16), nn.CrossEntropyLoss(), lr=0, num_it=10,
                           n_batch=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the memory probe does not care about the order
        max_batch_size(learn, limit=32)


def test_a_learner_with_a_summed_loss_is_refused_as_a_module_is():
    learn = _learner(n_train=100)
    learn.loss_func = CrossEntropyLossFlat(reduction="sum")
    with pytest.raises(ValueError, match="reduction='mean'"):
        learn.bs_find(lr=0, num_it=10, n_batch=5, show_plot=False)


def test_callback_result_advises_with_a_timing_of_the_learner(learn):
    "A GNSCallback's result has no timing: measure_throughput(learn) gives one, and the Learner is left as it was."
    from gns_widget import measure_throughput

    cb = GNSCallback(n_batch=5, beta=0.9)
    learn.fit(3, 1e-3, cbs=cb)
    assert cb.result.advice(lr=1e-3).kind == "uncertain" and "measure_throughput" in cb.result.advice().text
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng = learn.dls.train.rng.getstate()
    tp = measure_throughput(learn, batch_sizes=[32, 64, 128])
    assert tp.batch_sizes == [32, 64, 128] and set(tp.load_seconds) == {32, 64, 128}
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in weights.items())
    assert learn.dls.train.rng.getstate() == rng and learn.dls.train.bs == 32
    a = cb.result.advice(lr=1e-3, epochs=3, throughput=tp)
    assert a.rule == "adam"  # fastai's Adam, read from the Learner's opt_func
    assert "measure_throughput" not in a.text and (a.kind == "uncertain") == (a.speedup is None)


def test_learner_bs_find_reads_the_rule_and_times_the_learner(learn):
    res = learn.bs_find(lr=0, num_it=300, n_batch=5, show_plot=False)
    assert res.rule == "adam" and res.throughput is not None and 32 in res.throughput.step_seconds
    assert res.advice(lr=1e-3, epochs=3).rule == "adam"
