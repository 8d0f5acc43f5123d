"max_batch_size finds what fits by simulated out-of-memory errors and leaves everything as it was; plan_batch."
import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find, memory
from gns_widget.memory import MemoryPlan, is_oom_error, max_batch_size, plan_batch

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: torch >= 2.5


class OOMAbove(nn.Module):
    "Runs `inner`, then fails like a full device when the batch is bigger than `threshold` (after BN/dropout moved)."

    def __init__(self, inner: nn.Module, threshold: int, error=lambda: OOM("CUDA out of memory.")):
        super().__init__()
        self.inner, self.threshold, self.error = inner, threshold, error
        self.sizes: list[int] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.inputs.append(x.detach().clone())
        out = self.inner(x)
        if x.shape[0] > self.threshold:
            raise self.error()
        return out


def _mlp(bn: bool = True):
    "With BatchNorm (statistics to restore) or without (BatchNorm cannot train on a batch of 1)."
    norm = nn.BatchNorm1d(32) if bn else nn.Identity()
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), norm, nn.Linear(32, 10))


def _max_probes(limit: int) -> int:
    "Doubling up to limit, then bisecting the last gap: about 2·log2(limit) probes."
    return 2 * math.ceil(math.log2(limit)) + 2


@pytest.mark.parametrize("threshold", [1, 37, 64, 100, 255])
@pytest.mark.parametrize("start", [None, 1, 200])
def test_finds_exactly_the_threshold(digits_dl, threshold, start):
    torch.manual_seed(0)
    model = OOMAbove(_mlp(bn=False), threshold)
    bs = max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=256, start=start)
    assert bs == threshold
    assert len(model.sizes) <= _max_probes(256), model.sizes
    assert max(model.sizes) <= 256 and len(set(model.sizes)) == len(model.sizes), "a size probed twice"


def test_capped_by_limit_and_never_above_it(digits_dl):
    model = OOMAbove(_mlp(), 10_000)
    assert max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=200) == 200
    assert model.sizes == [32, 64, 128, 200]  # from the loader's batch size, doubling, then the limit itself
    model = OOMAbove(_mlp(), 10_000)
    assert max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=20) == 20
    assert model.sizes == [20]  # the loader's 32 is above the limit: start there


def test_probes_are_logarithmic(digits_dl):
    model = OOMAbove(_mlp(bn=False), 37)
    assert max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=4096, start=1) == 37
    assert len(model.sizes) <= _max_probes(4096)
    assert model.sizes == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]


def test_runtime_error_out_of_memory_counts(digits_dl):
    err = lambda: RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB, other allocations: 0 bytes)")  # noqa: E731
    model = OOMAbove(_mlp(), 50, err)
    assert max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=256) == 50


def test_real_cpu_allocator_failure(digits_dl):
    "A real failed allocation (a petabyte) from torch's CPU allocator counts as out of memory."
    model = OOMAbove(_mlp(), 45, lambda: torch.empty(2**50, dtype=torch.uint8))
    assert max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=256) == 45


def test_is_oom_error():
    assert is_oom_error(OOM("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom_error(torch.cuda.OutOfMemoryError("x"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_oom_error(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 64x32)"))
    assert not is_oom_error(ValueError("out of memory"))


def test_other_errors_propagate_and_state_is_restored(digits_dl):
    torch.manual_seed(0)
    model = OOMAbove(_mlp(), 40, lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=256)
    for k, v in weights.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_nothing_fits(digits_dl):
    model = OOMAbove(_mlp(bn=False), 0)
    with pytest.raises(RuntimeError, match="not even a batch of 1 fits"):
        max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=256)
    assert model.sizes == [32, 16, 8, 4, 2, 1]


def test_model_itself_does_not_fit(digits_dl):
    class Huge(nn.Sequential):
        def to(self, *args, **kwargs):
            raise OOM("CUDA out of memory. Tried to allocate 80.00 GiB")

    model = Huge(nn.Linear(64, 10))
    w = model[0].weight.clone()
    with pytest.raises(RuntimeError, match="the model itself does not fit"):
        max_batch_size(model, digits_dl, nn.CrossEntropyLoss(), limit=64)
    assert torch.equal(model[0].weight, w)


def test_memory_is_freed_on_accelerators(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(memory.gc, "collect", lambda: calls.append("collect"))
    memory.free_memory(torch.device("cuda", 0))
    assert calls == ["collect", "empty_cache"]
    calls.clear()
    memory.free_memory("cpu")  # reference counting already freed the tensors: no costly full collection
    assert calls == []


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64", None])
def test_bad_limit(digits_dl, bad):
    with pytest.raises(ValueError, match="limit"):
        max_batch_size(_mlp(), digits_dl, nn.CrossEntropyLoss(), limit=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, False])
def test_bad_start(digits_dl, bad):
    with pytest.raises(ValueError, match="start"):
        max_batch_size(_mlp(), digits_dl, nn.CrossEntropyLoss(), limit=64, start=bad)


def test_everything_restored_exactly(digits_dl):
    torch.manual_seed(0)
    model = OOMAbove(_mlp(), 70)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-2)
    x, y = next(iter(digits_dl))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # Adam state to restore, and gradients left in .grad
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = {(i, k): v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    seed_loader = DataLoader(digits_dl.dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), seed_loader.generator.get_state()
    expected_first = next(iter(digits_dl))[1]  # the shuffling a fresh epoch will give, from the global RNG
    torch.set_rng_state(rngs[0])
    model.sizes.clear()

    assert max_batch_size(model, seed_loader, nn.CrossEntropyLoss(), limit=512, opt=opt) == 70
    assert len(model.sizes) > 3  # it did train (BN statistics, Adam state and weights moved) before restoring

    for k, v in weights.items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert {(i, k): v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}.keys() == opt_state.keys()
    for (i, k), v in opt_state.items():
        assert torch.equal(v, opt.state_dict()["state"][i][k]), (i, k)
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["weight_decay"] == 1e-2
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rngs[0]) and random.getstate() == rngs[1]
    assert np.array_equal(np.random.get_state()[1], rngs[2])
    assert torch.equal(seed_loader.generator.get_state(), rngs[3])
    assert torch.equal(next(iter(digits_dl))[1], expected_first)


def test_probe_batches_are_real_examples_repeated():
    "10 examples in batches of 4: a probe of 25 repeats them, inputs and targets kept together."
    x = torch.arange(10.0)[:, None].repeat(1, 64)
    dl = DataLoader(TensorDataset(x, torch.arange(10)), batch_size=4, shuffle=True)
    seen = []

    def loss(pred, y):
        seen.append(y.clone())
        return nn.functional.cross_entropy(pred, y)

    model = OOMAbove(_mlp(), 10_000)
    assert max_batch_size(model, dl, loss, limit=25) == 25
    assert model.sizes == [4, 8, 16, 25]
    for xs, ys in zip(model.inputs, seen):
        assert torch.equal(xs[:, 0].long(), ys)
    assert sorted(seen[-1].tolist()) == sorted(list(range(10)) * 2 + seen[-1][20:].tolist())


class TwoInputs(nn.Module):
    def __init__(self, threshold):
        super().__init__()
        self.a, self.b, self.threshold = nn.Linear(3, 2), nn.Linear(5, 2), threshold

    def forward(self, x1, x2):
        if x1.shape[0] > self.threshold:
            raise OOM("CUDA out of memory.")
        return self.a(x1) + self.b(x2)


def test_nested_and_dict_batches():
    g = torch.Generator().manual_seed(0)
    x1, x2, y = torch.randn(50, 3, generator=g), torch.randn(50, 5, generator=g), torch.randint(0, 2, (50,))

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return (x1[i], x2[i]), y[i]

    class Dicts(Pairs):
        def __getitem__(self, i):
            return {"x": (x1[i], x2[i]), "y": y[i], "name": "digits"}

    nested = DataLoader(Pairs(), batch_size=8)  # batches [[x1, x2], y]
    assert max_batch_size(TwoInputs(21), nested, nn.CrossEntropyLoss(), limit=64,
                          batch_fn=lambda b: (tuple(b[0]), (b[1],))) == 21
    dicts = DataLoader(Dicts(), batch_size=8)
    assert max_batch_size(TwoInputs(77), dicts, nn.CrossEntropyLoss(), limit=100,
                          batch_fn=lambda b: (tuple(b["x"]), (b["y"],))) == 77


def test_batches_of_other_shapes_are_not_mixed():
    "Per-batch padding: only batches shaped like the first are pooled (and repeated)."
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.widths = nn.Linear(1, 2), []

        def forward(self, x):
            self.widths.append(x.shape[1])
            return self.lin(x.mean(1, keepdim=True))

    y = torch.zeros(4, dtype=torch.long)
    batches = [(torch.randn(4, 3), y), (torch.randn(4, 3), y), (torch.randn(4, 5), y)]
    model = Pool()
    assert max_batch_size(model, batches, nn.CrossEntropyLoss(), limit=30) == 30
    assert set(model.widths) == {3}


def test_fastai_learner():
    from fastai.basics import Learner
    from fastai.data.core import DataLoaders
    from fastai.optimizer import Adam

    from gns_widget.datasets import digits

    xt, yt, xv, yv = digits()
    dls = DataLoaders.from_dsets(TensorDataset(xt, yt), TensorDataset(xv, yv), bs=32, device="cpu")
    torch.manual_seed(0)
    model = OOMAbove(_mlp(), 50)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=Adam)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng = learn.dls.train.rng.getstate()
    assert max_batch_size(learn, limit=1024) == 50
    assert model.sizes == [32, 64, 48, 56, 52, 50, 51]
    for k, v in weights.items():
        assert torch.equal(v, learn.model.state_dict()[k]), k
    assert learn.dls.train.rng.getstate() == rng and learn.dls.train.bs == 32


def test_plan_fits():
    assert plan_batch(256, 768) == MemoryPlan(256, 1, 256, "noise scale suggests 256; it fits on the device in one "
                                                           "step: use batch size 256")
    assert plan_batch(768, 768).accumulation_steps == 1


def test_plan_accumulates():
    p = plan_batch(2048, 768)
    assert (p.batch_size, p.accumulation_steps, p.effective_batch_size) == (683, 3, 2049)
    assert p.text == ("noise scale suggests 2048; the device fits 768 per step: use batch size 683 with gradient "
                      "accumulation 3 (effective 2049)")
    assert (plan_batch(2048, 512).batch_size, plan_batch(2048, 512).accumulation_steps) == (512, 4)
    assert (plan_batch(2048, 1023).batch_size, plan_batch(2048, 1023).accumulation_steps) == (683, 3)
    assert (plan_batch(1000, 300).batch_size, plan_batch(1000, 300).effective_batch_size) == (250, 1000)
    assert plan_batch(7, 1) == MemoryPlan(1, 7, 7, plan_batch(7, 1).text)


def test_plan_rule_everywhere():
    for s in range(1, 200):
        for m in range(1, 200):
            p = plan_batch(s, m)
            k = p.accumulation_steps
            assert p.batch_size <= m and p.effective_batch_size == p.batch_size * k >= s
            assert k == max(1, math.ceil(s / m)) and p.effective_batch_size - s < k


@pytest.mark.parametrize("args", [(0, 8), (8, 0), (-4, 8), (2048.0, 768), (2048, True), ("2048", 768), (None, 8)])
def test_plan_bad_input(args):
    with pytest.raises(ValueError, match="suggested_bs|max_fit"):
        plan_batch(*args)


@pytest.mark.slow
def test_bs_find_plans_accumulation_when_the_suggestion_does_not_fit(digits_dl):
    "bs_find(probe_memory=True): the suggestion is checked on the device, and accumulation planned to reach it."
    from gns_widget import bs_find

    torch.manual_seed(0)
    model = OOMAbove(_mlp(bn=False), 10_000)  # measure first: nothing runs out of memory during the run
    res = bs_find(model, digits_dl, nn.CrossEntropyLoss(), lr=0.05, num_it=200, n_batch=5, probe_memory=True)
    assert res.reliable and res.suggested_bs > 40
    model.threshold = 40  # now only 40 examples fit per step
    res = bs_find(model, digits_dl, nn.CrossEntropyLoss(), lr=0.05, num_it=200, n_batch=5, probe_memory=True)
    plan = res.memory_plan
    assert plan == plan_batch(res.suggested_bs, 40)
    assert plan.batch_size <= 40 and plan.accumulation_steps > 1
    assert f"{plan.text} (for the raw suggestion: res.advice() gives" in repr(res)
    probed = bs_find(model, digits_dl, nn.CrossEntropyLoss(), lr=0.05, num_it=200, n_batch=5).memory_plan
    assert (probed is not None) == (torch.cuda.is_available())  # the default probes on CUDA only


def test_the_speed_timing_stops_at_what_fits_and_the_advice_stays_below(digits_dl):
    "The timing runs out of memory above 40: it records the last size that fitted, and the advice never passes it."
    torch.manual_seed(0)
    model = OOMAbove(_mlp(bn=False), 40)
    before = copy.deepcopy(model.state_dict())
    res = bs_find(model, digits_dl, nn.CrossEntropyLoss(), lr=0, num_it=300, n_batch=5, probe_memory=True)
    tp = res.throughput
    assert tp is not None and tp.max_fit == 32 and max(tp.batch_sizes) == 32
    assert (res.advice(lr=0.05).batch_size or 32) <= 32  # None: uncertain, which keeps the batch too
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
