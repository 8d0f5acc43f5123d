"fastai habits around learn.bs_find: training after it is unchanged, and what it does not run is said."
import warnings

import pytest
import torch
from fastai.basics import L, Learner, set_seed
from fastai.callback.core import Callback
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
from gns_widget import GNSCallback
from gns_widget.datasets import digits
from gns_widget.memory import max_batch_size


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
