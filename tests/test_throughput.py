"""`measure_throughput`: real steps timed at each batch size, the loader included, and the user's state left exact."""
import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find
from gns_widget.advice import advise
from gns_widget.interval import Interval
from gns_widget.loaders import loader_at
from gns_widget.throughput import Throughput, measure_throughput

CE = nn.CrossEntropyLoss()


def _data(n=512):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 20, generator=g), torch.randint(0, 4, (n,), generator=g))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


def test_every_size_is_timed_with_its_loader_and_the_users_state_comes_back():
    "Weights, BatchNorm statistics, Adam's state, the loader's generator and every RNG are as before."
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dl = DataLoader(_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    for x, y in dl:  # Adam has state, the generator has moved
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
        break
    model.eval()
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    rngs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), dl.generator.get_state())
    tp = measure_throughput(model, dl, CE, batch_sizes=[64, 16, 32], opt=opt)
    assert tp.batch_sizes == [16, 32, 64] and all(s > 0 for s in tp.step_seconds.values())
    assert set(tp.load_seconds) == {16, 32, 64} and all(s > 0 for s in tp.load_seconds.values())
    assert tp.workers == 0 and tp.seconds_per_step(32) == tp.step_seconds[32] + tp.load_seconds[32]
    after = (model.state_dict(), opt.state_dict())
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())
    assert all(torch.equal(v, after[1]["state"][i][k]) for i, s in before[1]["state"].items() for k, v in s.items())
    assert not model.training
    assert torch.equal(rngs[0], torch.get_rng_state()) and (rngs[1] == np.random.get_state()[1]).all()
    assert rngs[2] == random.getstate() and torch.equal(rngs[3], dl.generator.get_state())


def test_worker_loaders_share_the_loading_beside_the_steps():
    tp = Throughput({32: 0.010, 64: 0.012}, load_seconds={32: 0.004, 64: 0.030}, workers=2)
    assert tp.seconds_per_step(32) == 0.010 and tp.seconds_per_step(64) == 0.015  # the workers fall behind at 64
    assert Throughput({32: 0.01}, load_seconds={32: 0.004}).seconds_per_step(32) == pytest.approx(0.014)


def test_a_copy_of_the_loader_at_another_size_leaves_the_users_alone():
    dl = DataLoader(_data(), batch_size=16, shuffle=True, num_workers=0, drop_last=True)
    copy_ = loader_at(dl, 64, in_process=True)
    assert (copy_.batch_size, copy_.drop_last, copy_.dataset) == (64, True, dl.dataset) and dl.batch_size == 16


def test_a_fastai_loader_is_copied_with_new():
    from fastai.data.core import TfmdDL

    dl = TfmdDL(_data(), bs=16, shuffle=True, num_workers=0)
    copy_ = loader_at(dl, 64, in_process=True)
    assert copy_.bs == 64 and dl.bs == 16 and len(next(iter(copy_))[0]) == 64


@pytest.mark.parametrize("kwargs, words", [({"batch_sizes": []}, "batch_sizes must name"),
                                           ({"batch_sizes": [0, 32]}, "batch_sizes must be a positive integer"),
                                           ({"batch_sizes": [16.5]}, "batch_sizes must be a positive integer")])
def test_bad_batch_sizes(kwargs, words):
    with pytest.raises(ValueError, match=words):
        measure_throughput(_model(), DataLoader(_data(), batch_size=16), CE, **kwargs)


def test_advice_refuses_what_is_not_a_throughput():
    with pytest.raises(ValueError, match="throughput must be"):
        advise(Interval(100.0, 90.0, 110.0), 32, throughput={32: 0.01})
    with pytest.raises(ValueError, match="must include the current batch size 32"):
        advise(Interval(100.0, 90.0, 110.0), 32, throughput=Throughput({64: 0.01}))


def test_bs_find_measure_speed_must_be_a_bool():
    with pytest.raises(ValueError, match="measure_speed must be True or False"):
        bs_find(_model(), DataLoader(_data(), batch_size=16), CE, lr=0, num_it=20, n_batch=2, measure_speed="yes")


def test_a_stopped_or_unusable_run_times_nothing():
    "Too few windows for an interval: nothing to decide, so no timing (and no seconds spent on it)."
    res = bs_find(_model(), DataLoader(_data(), batch_size=16), CE, lr=0, num_it=20, n_batch=5)
    assert res.throughput is None and res.advice().kind == "uncertain"


def test_the_users_optimizer_hooks_do_not_see_the_timings_steps():
    "The timing steps a rebuilt copy of the user's optimizer: a hook counting the user's steps counts none."
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    measure_throughput(model, DataLoader(_data(), batch_size=16), CE, batch_sizes=[16, 32], opt=opt)
    assert steps == [] and opt.state == {}
