"""Host syncs per small batch: what the finder adds to a training step on a GPU.

Every read of a tensor's value by Python (`.item()`, `float()`, `bool()`, `.tolist()`, `.cpu()`) waits there
for the device to finish its queued work. The count is what matters; on the CPU each read is cheap, but
counting them here proves the GPU path: `fixed` reads nothing per small batch, one or two per window;
`per_example` at lr=0 reads n_batch steps at once, and once per step where a step must know its verdict.
"""
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gns_widget import NoiseScaleEstimator, bs_find, engine
from gns_widget.interval import AutoStop
from tests.exact import per_example_grads

_READS = {torch.Tensor.tolist, torch.Tensor.numpy}  # they dispatch nothing on a CPU tensor


class HostReads:
    """Counts reads of tensor values by the host: device→host syncs on a GPU.

    `.item()`, `float()` and `bool()` dispatch to `aten._local_scalar_dense` (a TorchDispatchMode sees it,
    and a `copy_` from the device into a CPU tensor); `.tolist()` and `.numpy()` of a CPU tensor dispatch
    nothing, so a TorchFunctionMode counts those calls. `.cpu()` and `.to("cpu")` are counted from another
    device only: on the CPU they are no-ops, like moving the CPU-held batches to the run's CPU device.
    """

    def __init__(self):
        self.n = 0
        reads = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default or (
                        func is torch.ops.aten.copy_.default and args[0].device.type == "cpu"
                        and args[1].device.type != "cpu"):
                    reads.n += 1
                return func(*args, **(kwargs or {}))

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                to_cpu = func is torch.Tensor.cpu or (
                    func is torch.Tensor.to and "cpu" in (str(a) for a in (*args[1:], kwargs.get("device"))))
                if func in _READS or (to_cpu and args[0].device.type != "cpu"):
                    reads.n += 1
                return func(*args, **kwargs)

        self._modes = [Function(), Dispatch()]

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def test_the_counter_sees_every_kind_of_read():
    "Guard on the tests below: each way of reading a value counts once."
    t = torch.randn(3)
    for read in (lambda: t[0].item(), lambda: float(t[0]), lambda: bool(t[0] > 0), lambda: t.tolist(),
                 lambda: t.numpy()):
        with HostReads() as reads:
            read()
        assert reads.n == 1
    with HostReads() as reads:
        (t * 2).sum().sqrt().cpu().to("cpu")
    assert reads.n == 0


def _model_with_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.functional.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 3, (32,))).backward()
    return model


def test_the_estimator_reads_nothing_until_its_window_ends():
    model = _model_with_grads()
    est = NoiseScaleEstimator(n_batch=5)
    for _window in range(3):
        per_update = []
        for _ in range(5):
            with HostReads() as reads:
                out = est.update(model, 32)
            per_update.append(reads.n)
        assert per_update[:-1] == [0, 0, 0, 0] and 1 <= per_update[-1] <= 2 and out is not None
        with HostReads() as reads:  # the engine's step on the big batch
            est.big_batch_grads()
        assert reads.n == 0


def test_checking_each_batch_costs_one_read_per_update():
    "What check_each (and grad_scale, float16's loss scale) pays: one read per update, as GradScaler does."
    model = _model_with_grads()
    for est, kwargs in ((NoiseScaleEstimator(5, check_each=True), {}), (NoiseScaleEstimator(5), {"grad_scale": 2.0})):
        with HostReads() as reads:
            for _ in range(4):
                est.update(model, 32, **kwargs)
        assert reads.n == 4


def test_bs_find_fixed_reads_twice_per_window_not_per_step():
    """bs_find(method="fixed") trains 200 small batches: one read for the window's norms, one for its mean loss,
    nothing per step (a loss or finiteness check per step would add 200)."""
    torch.manual_seed(0)
    x = torch.randn(2000, 20)
    y = (x[:, :3].sum(1) > 0).long()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 1984, 32)]  # a list: no sampler reading its seed
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    with HostReads() as reads:
        res = bs_find(model, batches, nn.CrossEntropyLoss(), lr=0.1, num_it=200, n_batch=10)
    assert len(res.history) == 20
    assert reads.n <= 2 * len(res.history) + 2, f"{reads.n} host reads for 200 small batches"


# ---- method="per_example": one estimate per step, read n_batch steps at a time -----------------------------------

def _problem():
    "A list of batches (no sampler reading its seed) and a fresh MLP with the same weights at each call."
    torch.manual_seed(0)
    x = torch.randn(2000, 20)
    y = (x[:, :3].sum(1) > 0).long()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 1984, 32)]

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    return batches, model


def _history(res):
    return res.history.drop(columns="elapsed")


def test_per_example_at_lr_zero_reads_once_per_n_batch_steps_and_matches_exact():
    """200 steps at lr=0, n_batch=10: one read per 10 steps (the norms and losses of all 10), where reading each
    step's two norms and loss would add 600. The history is the one exact per-example gradients give when fed to
    the estimator step by step (tests/exact.py, float64)."""
    batches, model = _problem()
    loss_func = nn.CrossEntropyLoss()
    with HostReads() as reads:
        res = bs_find(model(), batches, loss_func, lr=0, num_it=200, n_batch=10, beta=0.9, method="per_example")
    assert len(res.history) == 200 and res.history.iteration.tolist() == list(range(1, 201))
    assert reads.n <= 200 / 10 + 2, f"{reads.n} host reads for 200 steps"

    exact_model, est = model(), NoiseScaleEstimator(10, 0.9 ** (1 / 10))
    rows = []
    for i in range(200):
        x, y = batches[i % len(batches)]
        g = per_example_grads(exact_model, loss_func, x, y)
        e = est.update_norms(g.square().sum(1).mean().item(), g.mean(0).square().sum().item(), 1, len(x))
        rows.append((loss_func(exact_model(x), y).item(), est.noise, est.scale, est.noise_scale, e.noise, e.scale))
    expected = np.array(rows)
    got = res.history[["loss", "noise", "scale", "noise_scale", "noise_raw", "scale_raw"]].to_numpy()
    np.testing.assert_allclose(got[:, :4], expected[:, :4], rtol=1e-4)
    # the raw |G|² cancels: compare it on the scale of the per-example noise it is made from
    np.testing.assert_allclose(got[:, 4:], expected[:, 4:], rtol=1e-4, atol=1e-5 * expected[:, 4].mean())


@pytest.mark.parametrize("lr, amp", [(0.1, None), (0, torch.float16)])
def test_per_example_reads_each_step_once_when_training_or_in_float16(lr, amp):
    """A training step must know whether its gradients were finite before the optimizer steps, and float16's loss
    scale changes after every step: one read per step there (as GradScaler makes), not one per number."""
    batches, model = _problem()
    with HostReads() as reads:
        res = bs_find(model(), batches, nn.CrossEntropyLoss(), lr=lr, num_it=100, n_batch=10, method="per_example",
                      amp=amp)
    assert len(res.history) > 90
    assert reads.n <= 100 + 2, f"{reads.n} host reads for 100 steps"


def _nan_at(steps):
    "A cross-entropy whose loss (and so every gradient) is NaN at these calls."
    calls = []

    def loss(pred, y):
        calls.append(1)
        out = nn.functional.cross_entropy(pred, y)
        return out * float("nan") if len(calls) in steps else out
    return loss


def _stop_at(iteration, event):
    def on_update(record):
        if record.iteration == iteration:
            event.set()
    return on_update


def _stopping_loss(call, event):
    "A cross-entropy that sets `event` at this call, as a Stop button pressed while that step runs."
    calls = []

    def loss(pred, y):
        calls.append(1)
        if len(calls) == call:
            event.set()
        return nn.functional.cross_entropy(pred, y)
    return loss


CASES = {  # runs that end or skip inside a burst of 10 steps read at once
    "stray NaN steps": lambda model, b: bs_find(model, b, _nan_at({7, 23, 42}), lr=0, num_it=45, n_batch=10,
                                                method="per_example"),
    "auto stops at record 19": lambda model, b: bs_find(model, b, nn.CrossEntropyLoss(), lr=0, n_batch=7,
                                                        num_it=AutoStop(0.5, 200, 10), method="per_example"),
    "stopped at record 13": lambda model, b: bs_find(model, b, nn.CrossEntropyLoss(), lr=0, num_it=200, n_batch=10,
                                                     method="per_example", stop_event=(e := threading.Event()),
                                                     on_update=_stop_at(13, e)),
    "stopped during step 15": lambda model, b: bs_find(model, b, _stopping_loss(15, e := threading.Event()), lr=0,
                                                       num_it=200, n_batch=10, method="per_example", stop_event=e),
}


@pytest.mark.parametrize("case", CASES)
def test_per_example_bursts_end_where_a_step_by_step_run_ends(case, monkeypatch):
    """Steps read 10 at a time give the same result as each read at once (`_read_every` = 1): a NaN step left out
    alone (the last steps read when the run ends), AutoStop and a stop set by on_update ending the history at their
    record, not at the burst's end, and a stop from elsewhere keeping every step taken before it was seen."""
    batches, model = _problem()
    with HostReads() as reads:
        bursts = CASES[case](model(), batches)
    monkeypatch.setattr(engine, "_read_every", lambda *args: 1)
    with HostReads() as per_step_reads:
        per_step = CASES[case](model(), batches)
    assert _history(bursts).equals(_history(per_step))
    assert (bursts.n_skipped, bursts.stopped) == (per_step.n_skipped, per_step.stopped)
    assert per_step_reads.n >= 3 * reads.n  # the counter tells the two apart
    end = {"stray NaN steps": (42, 45, 3), "auto stops at record 19": (19, 19, 0), "stopped at record 13": (13, 13, 0),
           "stopped during step 15": (15, 15, 0)}
    assert (len(bursts.history), bursts.history.iteration.iloc[-1], bursts.n_skipped) == end[case]


def test_per_example_divergence_is_found_when_its_burst_is_read(monkeypatch):
    "10 non-finite steps in a row are divergence: the same error, naming the same iterations, read at once or not."
    batches, model = _problem()
    errors = []
    for per_step in (False, True):
        if per_step:
            monkeypatch.setattr(engine, "_read_every", lambda *args: 1)
        with pytest.raises(RuntimeError, match="iterations 15–24") as e:
            bs_find(model(), batches, _nan_at(set(range(15, 40))), lr=0, num_it=50, n_batch=10, method="per_example")
        errors.append(str(e.value))
    assert errors[0] == errors[1]
