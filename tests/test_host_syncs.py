"""Host syncs per small batch: what the `fixed` finder adds to a training step on a GPU.

Every read of a tensor's value by Python (`.item()`, `float()`, `bool()`, `.tolist()`, `.cpu()`) waits there
for the device to finish its queued work. The count is what matters; on the CPU each read is cheap, but
counting them here proves the GPU path: none per small batch, one or two per window.
"""
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gns_widget import NoiseScaleEstimator, bs_find

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
