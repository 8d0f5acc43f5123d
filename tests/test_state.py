"""The user's model is sacred: everything a run may touch comes back, and one run at a time trains a model."""
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from gns_widget import FinderBusyError, bs_find
from gns_widget.guard import active_run

CE = nn.CrossEntropyLoss()


class _TemperedLoss(nn.Module):
    "A loss with a learnable temperature (as in contrastive training): a parameter outside the model."

    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, pred, y):
        self.calls += 1
        return nn.functional.cross_entropy(pred * self.log_t.exp(), y)


class _CountingNet(nn.Sequential):
    "A model with a non-persistent buffer that its forward changes (state_dict leaves it out)."

    def __init__(self):
        super().__init__(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.seen += len(x)
        return super().forward(x)


class _NumpySampler(RandomSampler):
    "A sampler that shuffles with a numpy Generator of its own."

    def __init__(self, data, seed):
        super().__init__(data)
        self.np_gen = np.random.default_rng(seed)

    def __iter__(self):
        return iter(self.np_gen.permutation(len(self.data_source)).tolist())


def _tensors(*mods):
    return [t.detach().clone() for m in mods for t in (*m.parameters(), *m.buffers())]


def test_loss_parameters_buffers_and_sampler_generators_come_back(digits_dl):
    torch.manual_seed(0)
    model, loss = _CountingNet(), _TemperedLoss()
    opt = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=1e-2)
    ds = digits_dl.dataset
    sampler = _NumpySampler(ds, seed=0)
    dl = DataLoader(ds, batch_size=32, sampler=sampler)
    before = _tensors(model, loss)
    gen_state = sampler.np_gen.bit_generator.state
    moved = []
    bs_find(model, dl, loss, lr=0.1, num_it=40, n_batch=5, opt=opt,
            on_update=lambda r: moved.append(loss.log_t.item() != 0 and model.seen.item() > 0))
    assert moved and all(moved)  # the run did change all of them, so the restore below is real
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(model, loss)))
    assert sampler.np_gen.bit_generator.state == gen_state
    assert loss.log_t.grad is None


class _Augmented(torch.utils.data.Dataset):
    "Random noise drawn in the worker, as an augmentation is: from the RNG each worker seeds when it starts."

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1:]), self.y[i]


def test_persistent_workers_the_run_started_do_not_shift_the_users_first_epoch(digits_dl):
    "Each worker seeds its RNG when it starts: kept alive after the run, it gave the first epoch other noise."
    x, y = digits_dl.dataset.tensors

    def first_epoch(find: bool):
        torch.manual_seed(0)
        dl = DataLoader(_Augmented(x[:256], y[:256]), batch_size=32, shuffle=True, num_workers=2,
                        persistent_workers=True)
        model = nn.Linear(64, 10)
        if find:
            bs_find(model, dl, nn.CrossEntropyLoss(), lr=0.01, num_it=20, n_batch=5, device="cpu")
        return torch.cat([xb for xb, _ in dl])

    assert torch.equal(first_epoch(False), first_epoch(True))


def _slow_loader(x, y, started: threading.Event):
    class Slow:
        def __iter__(self):
            for xb, yb in DataLoader(TensorDataset(x, y), batch_size=16):
                started.set()
                yield xb, yb

        def __len__(self):
            return len(x) // 16
    return Slow()


def _background_run(model, started, stop, result):
    x, y = torch.randn(320, 64), torch.randint(0, 10, (320,))

    def work():
        try:
            result.append(bs_find(model, _slow_loader(x, y, started), CE, lr=0.1, num_it=10**6, n_batch=5,
                                  stop_event=stop))
        except Exception as e:  # surfaced by the test
            result.append(e)

    t = threading.Thread(target=work, name="first run")
    t.start()
    assert started.wait(30)
    return t


def test_a_second_run_on_the_same_model_is_refused_and_names_the_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    before = _tensors(model)
    started, stop, result = threading.Event(), threading.Event(), []
    t = _background_run(model, started, stop, result)
    try:
        assert active_run(model).owner == "bs_find"
        with pytest.raises(FinderBusyError, match="already using this model.*'first run'.*Stop it first"):
            bs_find(model, [(torch.randn(8, 64), torch.randint(0, 10, (8,)))] * 10, CE, num_it=10, n_batch=5)
    finally:
        stop.set()
        t.join(30)
    assert result and result[0].stopped
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(model)))
    assert active_run(model) is None
    bs_find(model, [(torch.randn(8, 64), torch.randint(0, 10, (8,)))] * 10, CE, num_it=10, n_batch=5)  # free again


def test_training_the_model_during_a_run_is_detected(digits_dl):
    "Another cell stepping the same weights: the run stops and says so instead of silently reverting it."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    before = _tensors(model)
    user_opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def user_trains_meanwhile(record):
        user_opt.zero_grad()
        CE(model(torch.randn(4, 64)), torch.randint(0, 10, (4,))).backward()
        user_opt.step()

    with pytest.raises(RuntimeError, match="changed by something other than the finder.*undone"):
        bs_find(model, digits_dl, CE, lr=0.1, num_it=20, n_batch=5, on_update=user_trains_meanwhile)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(model)))


@pytest.mark.parametrize("method", ["fixed", "per_example"])
def test_a_forward_that_changes_its_own_weights_is_not_taken_for_another_training(method):
    "nn.Embedding(max_norm=...) renormalises rows in place in its forward: the model's own doing, so measured."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, max_norm=0.5), nn.Flatten(), nn.Linear(48, 10))
    before = _tensors(model)
    dl = DataLoader(TensorDataset(torch.randint(0, 50, (200, 6)), torch.randint(0, 10, (200,))), batch_size=10)
    res = bs_find(model, dl, CE, lr=0.1, num_it=20, n_batch=5, method=method)
    assert len(res.history) == (4 if method == "fixed" else 20)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(model)))


def test_fit_is_refused_while_a_run_trains_a_learner():
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    torch.manual_seed(0)
    x, y = torch.randn(320, 64), torch.randint(0, 10, (320,))
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x[:32], y[:32]), bs=16)
    learn = Learner(dls, nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), loss_func=CE)
    stop, fits = threading.Event(), []

    def try_to_fit(record):
        if not fits:
            try:
                learn.fit(1)
                fits.append("ran")
            except FinderBusyError as e:
                fits.append(str(e))

    res = bs_find(learn, lr=0.1, num_it=20, n_batch=5, on_update=try_to_fit, stop_event=stop)
    assert "finder run is training this Learner's model" in fits[0]
    assert len(res.history) == 4
    assert not any(type(cb).__name__ == "_FinderRunning" for cb in learn.cbs)  # and fit works again after


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_optimizer_state_follows_the_model_to_the_gpu(digits_dl):
    "A warm Adam built on the CPU: its state moves with the model for the run, and comes back to the CPU."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in list(digits_dl)[:3]:
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    before = _tensors(model)
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    for method in ("fixed", "per_example"):
        bs_find(model, digits_dl, CE, lr=0.01, num_it=20, n_batch=5, opt=opt, device="cuda", method=method)
    assert all(t.device.type == "cpu" for t in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(model)))
    for k, v in opt.state[model[0].weight].items():
        assert v.device.type == "cpu" and torch.equal(v, state[k]), k
