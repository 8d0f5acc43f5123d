"fastai: learn.bs_find, GNSCallback during ordinary fit, and the Learner left as it was."
import numpy as np
import pytest
import torch
from fastai.basics import L, Learner
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.optimizer import Adam
from torch import nn
from torch.utils.data import TensorDataset

import gns_widget  # noqa: F401  (patches Learner.bs_find)
from gns_widget import GNSCallback, apply_batch_size
from gns_widget.datasets import bikeshare, digits


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
