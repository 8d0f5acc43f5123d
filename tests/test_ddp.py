"""DDP support on real 2-process gloo jobs (CPU), against the exact noise scale and a single process.

Each test spawns two workers; a worker returns a dict that the parent asserts on, and a failure
in a worker fails the test with that worker's traceback. lr=0 throughout: nothing is stepped,
so every estimate is made at the weights where the exact value is computed.
"""
import math
import multiprocessing
import socket
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gns_widget.ddp as ddp_mod
from gns_widget import NoiseScaleEstimator
from gns_widget.datasets import digits
from gns_widget.ddp import DDPNoiseScale, allreduce_measured, is_distributed
from tests.exact import exact_noise_scale
from tests.test_exactness import _linear_problem

pytestmark = pytest.mark.slow  # DDP: gloo process groups

N = 20_000
STEPS = 1000
# Never fork this process: once autograd has run in it (any earlier test), a forked child cannot use autograd
# ("Unable to handle autograd's threading in combination with fork-based multiprocessing"). A forkserver is a fresh
# process that has imported torch and this module once and never ran autograd: forking workers from it is safe and
# takes milliseconds, where spawn re-imports everything for each worker (~10 s on 2 slow cores).
if sys.platform == "linux":
    START_METHOD = "forkserver"
    multiprocessing.set_forkserver_preload(["torch", "tests.test_ddp"])
else:
    START_METHOD = "spawn"


# ---------------------------------------------------------------- shared by the parent and the workers

def _batch_indices(sizes: tuple[int, ...], steps: int, n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    "Per rank, per step, disjoint example indices: consecutive slices of a new permutation each epoch."
    out: list[list[torch.Tensor]] = [[] for _ in sizes]
    epoch, pos, perm = 0, n, None
    for _ in range(steps):
        if pos + sum(sizes) > n:
            perm, pos, epoch = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)), 0, epoch + 1
        for r, b in enumerate(sizes):
            out[r].append(perm[pos:pos + b])
            pos += b
    return out


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- launcher

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))  # a dead peer fails the test instead of hanging it
    try:
        torch.save(worker(rank, *args), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _launch(worker, tmp_path, *args, timeout: float = 120.0) -> list[dict]:
    "Run `worker(rank, *args)` on 2 gloo ranks; their return values, or the failing worker's traceback."
    ctx = mp.start_processes(_entry, args=(worker, _free_port(), str(tmp_path), args), nprocs=2, join=False,
                             start_method=START_METHOD)
    deadline, error = time.monotonic() + timeout, None
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                error = f"DDP workers did not finish within {timeout:.0f} s"
                break
    except mp.ProcessRaisedException as e:  # join has stopped the other worker
        error = str(e)
    if error:
        pytest.fail(error, pytrace=False)  # the worker's own traceback, not join's
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


# ---------------------------------------------------------------- workers

def _measure_worker(rank: int, sizes: tuple[int, int], beta: float) -> dict:
    "Train-loop usage of DDPNoiseScale at fixed weights; every raw estimate is returned."
    model, loss_func, x, y = _linear_problem(N)
    ddp = DDP(model)
    gns = DDPNoiseScale(ddp, beta=beta)
    raw = []
    for idx in _batch_indices(sizes, STEPS, N)[rank]:
        loss_func(ddp(x[idx]), y[idx]).backward()
        est = gns.update(len(idx))
        raw.append((est.noise, est.scale, est.b_small, est.b_big))
        ddp.zero_grad()
    return {"noise_scale": gns.noise_scale, "noise": gns.noise, "scale": gns.scale, "raw": raw,
            "n_estimates": gns.n_estimates}


def _consistency_worker(rank: int) -> dict:
    """Per step: a normal DDP backward (comm-hook path), then the same batch under no_sync + allreduce_measured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))  # no dropout: replays must match
    x, y = digits()[:2]
    loss_func = nn.CrossEntropyLoss()
    ddp = DDP(model)
    gns = DDPNoiseScale(ddp, beta=0.5)
    sizes = (16, 24)
    steps, default_bucket = [], ddp_mod._BUCKET_BYTES
    for t, idx in enumerate(_batch_indices(sizes, 3, len(x), seed=1)[rank]):
        ddp.zero_grad()
        loss_func(ddp(x[idx]), y[idx]).backward()
        est = gns.update(len(idx))
        ddp_grads = _grads(model)
        ddp.zero_grad()
        with ddp.no_sync():
            loss_func(ddp(x[idx]), y[idx]).backward()
        local = _grads(model)
        # the wrapper or its module; at t=1 with 1 KiB buckets, so that each gradient is reduced on its own
        ddp_mod._BUCKET_BYTES = 1024 if t == 1 else default_bucket
        measured = allreduce_measured(ddp if t % 2 == 0 else ddp.module, len(idx))
        steps.append({"hook": (est.noise, est.scale, est.b_small, est.b_big), "ddp_grads": ddp_grads,
                      "local": local, "measured": measured, "after": _grads(model)})

    # Gradient accumulation: two micro-batches with loss/2, the first under no_sync. Rank 1's are unequal
    # (4 and 12 examples), which the hook path counts as 2²/(1/4 + 1/12) = 12 examples.
    micro = [(8, 8), (4, 12)][rank]
    idx = _batch_indices((16, 16), 1, len(x), seed=2)[rank][0]
    batches, labels = x[idx].split(micro), y[idx].split(micro)
    ddp.zero_grad()
    with ddp.no_sync():
        (loss_func(ddp(batches[0]), labels[0]) / 2).backward()
    skipped = gns.update(micro[0])
    (loss_func(ddp(batches[1]), labels[1]) / 2).backward()
    est = gns.update(micro[1])
    accum = {"skipped": skipped, "hook": (est.noise, est.scale, est.b_small, est.b_big), "ddp_grads": _grads(model)}
    ddp.zero_grad()
    with ddp.no_sync():
        for xb, yb in zip(batches, labels):
            (loss_func(ddp(xb), yb) / 2).backward()
    accum["local"] = _grads(model)
    accum["measured"] = allreduce_measured(ddp, [16, 12][rank])
    accum["after"] = _grads(model)

    # Bad input that needs a live process group.
    assert is_distributed(ddp) and not is_distributed(ddp.module)
    with pytest.raises(ValueError, match="batch_size"):
        gns.update(0)
    with pytest.raises(ValueError, match="grad_scale"):
        gns.update(4, grad_scale=math.nan)
    with pytest.raises(ValueError, match="batch_size"):
        allreduce_measured(ddp, 0)
    with pytest.raises(ValueError, match="only one"):
        DDPNoiseScale(ddp)
    with pytest.raises(ValueError, match="estimator"):
        DDPNoiseScale(DDP(nn.Linear(2, 1)), beta=0.9, estimator=NoiseScaleEstimator())
    return {"steps": steps, "accum": accum}


# ---------------------------------------------------------------- tests

def _exact_and_single_process(sizes: tuple[int, int], beta: float) -> tuple[float, float]:
    "The exact B_simple, and NoiseScaleEstimator fed the same batches in windows of n_batch=2 (rank 0, rank 1)."
    model, loss_func, x, y = _linear_problem(N)
    exact = exact_noise_scale(model, loss_func, x, y)[2]
    est = NoiseScaleEstimator(n_batch=2, beta=beta)
    for pair in zip(*_batch_indices(sizes, STEPS, N)):
        for idx in pair:
            model.zero_grad()
            loss_func(model(x[idx]), y[idx]).backward()
            est.update(model, len(idx))
    return exact, est.noise_scale


def _ratio_of_means(raw: list[tuple], b_small: float, b_big: float) -> float:
    """Mean noise / mean scale from the raw estimates, redone as if B_small, B_big had been these.

    The raw (noise, scale) pair is inverted back to the measured norms: |g_small|² = scale + noise/B_small.
    """
    noise = scale = 0.0
    for n, s, bs, bb in raw:
        small, big = s + n / bs, s + n / bb
        scale += (b_big * big - b_small * small) / (b_big - b_small)
        noise += (small - big) / (1 / b_small - 1 / b_big)
    return noise / scale


def test_comm_hook_matches_exact_and_single_process(tmp_path):
    beta = 0.999  # ~uniform average over the run's 1,000 estimates
    res = _launch(_measure_worker, tmp_path, (32, 32), beta)
    exact, single = _exact_and_single_process((32, 32), beta)
    r0, r1 = res
    ns = r0["noise_scale"]
    print(f"\nexact {exact:.4g}  DDP {ns:.4g} ({ns / exact - 1:+.2%})  single process {single:.4g} "
          f"({single / exact - 1:+.2%});  DDP/single - 1 = {ns / single - 1:.1e}")
    assert r0["n_estimates"] == STEPS
    assert r0["noise_scale"] == r1["noise_scale"]  # every rank ends with the same estimate
    assert r0["raw"][-1][2:] == (32.0, 64.0)
    assert r0["noise_scale"] == pytest.approx(exact, rel=0.10)
    assert single == pytest.approx(exact, rel=0.10)
    # Equal batches: the rank average is the single process's big batch, so each estimate is the same.
    assert r0["noise_scale"] == pytest.approx(single, rel=1e-4)


def test_unequal_rank_batches_are_weighted_as_ddp_averages(tmp_path):
    "8 and 40 examples: DDP's equal-weight average makes B_small = 2/(1/8+1/40) = 13.3 and B_big 26.7, not 24/48."
    res = _launch(_measure_worker, tmp_path, (8, 40), 0.999)
    model, loss_func, x, y = _linear_problem(N)
    exact = exact_noise_scale(model, loss_func, x, y)[2]
    r0, r1 = res
    raw = r0["raw"]
    hm = 2 / (1 / 8 + 1 / 40)
    assert raw[-1][2] == pytest.approx(hm) and raw[-1][3] == pytest.approx(2 * hm)
    assert r0["noise_scale"] == r1["noise_scale"]
    assert r0["noise_scale"] == pytest.approx(exact, rel=0.10)
    assert _ratio_of_means(raw, hm, 2 * hm) == pytest.approx(exact, rel=0.10)  # the inversion is faithful
    # Weightings that would be wrong here, far off the exact value: this test can fail.
    naive = _ratio_of_means(raw, 24, 48)  # arithmetic mean and total
    example_weighted = _ratio_of_means(raw, hm, 48)  # big batch as if weighted by batch size
    print(f"\nexact {exact:.4g}  DDP {r0['noise_scale']:.4g} ({r0['noise_scale'] / exact - 1:+.2%})  "
          f"naive {naive:.4g}  example-weighted {example_weighted:.4g}")
    assert abs(naive / exact - 1) > 0.3 and abs(example_weighted / exact - 1) > 0.3


def _norms_of(estimate: tuple) -> tuple[float, float, float, float]:
    """(small_sq, big_sq, b_small, b_big) behind a raw (noise, scale, b_small, b_big) estimate.

    Compared instead of noise and scale, which cancel to near zero on single steps (scale, at B_simple ≫ b).
    """
    noise, scale, bs, bb = estimate
    return scale + noise / bs, scale + noise / bb, bs, bb


def test_allreduce_measured_gives_ddp_gradients_and_the_hook_estimate(tmp_path):
    r0, r1 = _launch(_consistency_worker, tmp_path)
    hm = 2 / (1 / 16 + 1 / 24)
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        assert s0["measured"] == s1["measured"]  # the same on every rank
        small_sq, big_sq, b_small, b_big = s0["measured"]
        for d, a0, a1, l0, l1 in zip(s0["ddp_grads"], s0["after"], s1["after"], s0["local"], s1["local"]):
            torch.testing.assert_close(a0, d, rtol=1e-6, atol=0)  # .grad is what DDP produced
            torch.testing.assert_close(a1, d, rtol=1e-6, atol=0)
            torch.testing.assert_close(d, (l0 + l1) / 2)  # DDP weights ranks equally, whatever their sizes
        local_sq = [sum(g.double().square().sum().item() for g in s["local"]) for s in (s0, s1)]
        assert small_sq == pytest.approx(sum(local_sq) / 2, rel=1e-5)
        assert big_sq == pytest.approx(sum(g.double().square().sum().item() for g in s0["ddp_grads"]), rel=1e-5)
        assert (b_small, b_big) == pytest.approx((hm, 2 * hm))
        assert _norms_of(s0["hook"]) == pytest.approx(s0["measured"], rel=1e-5)  # the same estimate
        est = NoiseScaleEstimator().update_norms(*s0["measured"])
        assert s0["hook"][0] == pytest.approx(est.noise, rel=1e-4)

    a0, a1 = r0["accum"], r1["accum"]
    assert a0["skipped"] is None  # the no_sync micro-batch is counted, not measured
    hm = 2 / (1 / 16 + 1 / 12)  # rank 0: 8+8 examples; rank 1: 4 and 12, equally weighted = 12
    assert a0["hook"][2:] == pytest.approx((hm, 2 * hm))
    assert a0["measured"] == a1["measured"]
    for d, a, l0, l1 in zip(a0["ddp_grads"], a0["after"], a0["local"], a1["local"]):
        torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(d, (l0 + l1) / 2)
    assert _norms_of(a0["hook"]) == pytest.approx(a0["measured"], rel=1e-5)


def test_bad_input(tmp_path):
    model = nn.Linear(2, 1)
    assert not is_distributed(model)
    with pytest.raises(ValueError, match="ddp_model"):
        DDPNoiseScale(model)
    with pytest.raises(ValueError, match="batch_size"):
        allreduce_measured(model, 0)
    with pytest.raises(ValueError, match="not initialized"):
        allreduce_measured(model, 4)
    # A one-rank job has no big batch to compare with.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        assert not is_distributed(ddp)
        with pytest.raises(ValueError, match="at least 2 ranks"):
            DDPNoiseScale(ddp)
        with pytest.raises(ValueError, match="at least 2 ranks"):
            allreduce_measured(ddp, 4)
    finally:
        dist.destroy_process_group()


def _bs_find_worker(rank: int) -> dict:
    "bs_find on a DDP model, as each rank of a torchrun job would call it: lr=0 to measure, then a training run."
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from gns_widget import bs_find
    from tests.test_host_syncs import HostReads

    model, loss_func, x, y = _linear_problem(N)
    ddp = DDP(model)
    ds = TensorDataset(x, y)
    dl = DataLoader(ds, batch_size=32, sampler=DistributedSampler(ds, seed=rank + 3))
    with HostReads() as reads:
        measured = bs_find(ddp, dl, loss_func, lr=0, num_it=STEPS, beta=0.999)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trained = bs_find(ddp, dl, loss_func, lr=0.01, num_it=50, beta=0.9, opt=opt)
    after = model.state_dict()
    return {"noise_scale": measured.noise_scale, "estimates": len(measured.history), "method": measured.method,
            "reads": reads.n,
            "trained": trained.history.noise_scale.tolist(),
            "restored": all(torch.equal(v, after[k]) for k, v in before.items()) and not opt.state}


def test_bs_find_under_ddp_matches_exact(tmp_path):
    "Each step one estimate from the two ranks' batches; every rank gets the same numbers and its model back."
    r0, r1 = _launch(_bs_find_worker, tmp_path)
    model, loss_func, x, y = _linear_problem(N)
    exact = exact_noise_scale(model, loss_func, x, y)[2]
    print(f"\nexact {exact:.4g}  bs_find under DDP {r0['noise_scale']:.4g} ({r0['noise_scale'] / exact - 1:+.2%}), "
          f"{r0['reads']} host reads in {STEPS} steps")
    assert r0["estimates"] == STEPS and r0["method"] == "fixed"
    # at lr=0 the steps' norms are read n_batch (20) at a time: 50 reads, and a few by the sampler each epoch
    assert r0["reads"] <= STEPS / 20 + 20, f"{r0['reads']} host reads for {STEPS} steps"
    assert r0["noise_scale"] == r1["noise_scale"] == pytest.approx(exact, rel=0.10)
    assert r0["trained"] == r1["trained"]  # the ranks stepped in lockstep on the all-reduced gradient
    assert r0["restored"] and r1["restored"]


def _refuse_worker(rank: int) -> str:
    from torch.utils.data import DataLoader, TensorDataset

    from gns_widget import bs_find

    dl = DataLoader(TensorDataset(torch.randn(64, 2), torch.randn(64, 1)), batch_size=8)
    with pytest.raises(ValueError, match="not available under DistributedDataParallel") as e:
        bs_find(DDP(nn.Linear(2, 1)), dl, nn.MSELoss(), method="per_example")
    return str(e.value).split(":")[0]


def test_bs_find_refuses_other_methods_under_ddp(tmp_path):
    r0, r1 = _launch(_refuse_worker, tmp_path)
    assert r0 == r1 == "method='per_example' is not available under DistributedDataParallel"
