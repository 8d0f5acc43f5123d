"bs_find end to end: modes, listeners, stopping, and the user's state coming back exactly."
import copy
import random
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import GNSResult, bs_find


def _snapshot(model, opt=None):
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "opt": copy.deepcopy(opt.state_dict()) if opt is not None else None,
        "torch_rng": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()[1].copy(),
    }


def _assert_same(before, after):
    assert before["weights"].keys() == after["weights"].keys()
    for k in before["weights"]:
        assert torch.equal(before["weights"][k], after["weights"][k]), k
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before["training"] == after["training"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert before["random"] == after["random"]
    assert np.array_equal(before["numpy"], after["numpy"])
    if before["opt"] is not None:
        assert before["opt"]["param_groups"] == after["opt"]["param_groups"]
        for k, st in before["opt"]["state"].items():
            for name, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["opt"]["state"][k][name])), name


def _warm_adam(model, dl):
    "An optimizer with real state, and leftover grads, as a user's would be mid-training."
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in list(dl)[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixed", "sequential"])
def test_training_run_restores_everything_exactly(mlp, digits_dl, method):
    opt = _warm_adam(mlp, digits_dl)
    mlp.eval()
    mlp[3].train()  # a mixed train/eval state must come back as it was
    gen_state = digits_dl.sampler.generator  # None for a default shuffled loader: the global RNG is used
    before = _snapshot(mlp, opt)
    res = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0.05, num_it=60, n_batch=5, opt=opt, method=method)
    assert len(res.history) == 12
    _assert_same(before, _snapshot(mlp, opt))
    assert digits_dl.sampler.generator is gen_state


@pytest.mark.slow
def test_training_actually_moves_weights_during_the_run(mlp, digits_dl):
    "The restore test above would pass trivially if training did nothing: check that it does."
    seen = []
    w0 = mlp[0].weight.detach().clone()
    bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0.5, num_it=20, n_batch=5,
            on_update=lambda r: seen.append(not torch.equal(mlp[0].weight.cpu(), w0)))
    assert seen and all(seen)
    assert torch.equal(mlp[0].weight, w0)


@pytest.mark.slow
def test_fixed_mode_steps_once_per_window_and_sequential_every_batch(mlp, digits_dl):
    counts = {}
    for method in ("fixed", "sequential"):
        opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
        steps = []
        opt.register_step_post_hook(lambda *a, steps=steps: steps.append(1))
        bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0.1, num_it=20, n_batch=5, opt=opt, method=method)
        counts[method] = len(steps)
    assert counts == {"fixed": 4, "sequential": 20}


@pytest.mark.parametrize("as_factory", [False, True])
def test_the_lr_sets_the_top_group_and_other_groups_keep_their_ratio(mlp, digits_dl, as_factory):
    "Discriminative lrs are part of how the user trains: the body at 1/100 of the head, a group held still at 0."
    made = []

    def make(params=None):
        made.append(torch.optim.SGD([{"params": [mlp[0].weight], "lr": 1e-3}, {"params": [mlp[0].bias], "lr": 0.0},
                                     {"params": list(mlp[1:].parameters()), "lr": 0.1}]))
        return made[-1]
    opt = make if as_factory else make()
    bias, seen = mlp[0].bias.detach().clone(), []
    bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0.5, num_it=10, n_batch=5, opt=opt,
            on_update=lambda r: seen.append([g["lr"] for g in made[-1].param_groups]
                                            + [torch.equal(mlp[0].bias.cpu(), bias)]))
    assert seen and all(s == [pytest.approx(5e-3), 0.0, 0.5, True] for s in seen)
    assert [g["lr"] for g in made[0].param_groups] == ([1e-3, 0.0, 0.1] if not as_factory else
                                                      [pytest.approx(5e-3), 0.0, 0.5])  # the user's come back


def test_lr_zero_measures_without_moving_weights(mlp, digits_dl):
    w0 = {k: v.clone() for k, v in mlp.state_dict().items() if "running" not in k and "num_batches" not in k}
    moved = []
    bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0, num_it=20, n_batch=5,
            on_update=lambda r: moved.append(any(not torch.equal(v, mlp.state_dict()[k].cpu()) for k, v in w0.items())))
    assert moved == [False] * 4


def test_on_update_gets_every_estimate_and_history_columns(mlp, digits_dl):
    records = []
    res = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0.1, num_it=30, n_batch=10, on_update=records.append)
    assert [r.iteration for r in records] == [10, 20, 30]
    assert records[-1].samples == 30 * 32 and records[-1].total == 30
    for col in ("iteration", "samples", "loss", "noise", "scale", "noise_scale"):
        assert col in res.history.columns
    assert res.history.iteration.tolist() == [10, 20, 30]


def test_one_epoch_by_default_and_cycling_beyond(mlp, digits_dl):
    res = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), n_batch=5)
    assert res.history.iteration.iloc[-1] == len(digits_dl) // 5 * 5
    res = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), num_it=3 * len(digits_dl), n_batch=5)
    assert res.history.iteration.iloc[-1] == 3 * len(digits_dl) // 5 * 5


def test_short_last_batch_is_counted_exactly(mlp):
    ds = TensorDataset(torch.randn(70, 64), torch.randint(0, 10, (70,)))
    res = bs_find(mlp, DataLoader(ds, batch_size=32), nn.CrossEntropyLoss(), num_it=6, n_batch=3)
    assert res.history.samples.tolist() == [32 + 32 + 6, 140]


def test_stop_event_returns_partial_result_and_restores(mlp, digits_dl):
    stop = threading.Event()
    before = _snapshot(mlp)

    def stop_after_two(record):
        if record.iteration == 10:
            stop.set()

    res = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0.1, num_it=200, n_batch=5, on_update=stop_after_two,
                  stop_event=stop)
    assert res.stopped and res.history.iteration.tolist() == [5, 10]
    assert "stopped early" in repr(res)
    _assert_same(before, _snapshot(mlp))


def test_error_in_the_middle_still_restores(mlp, digits_dl):
    before = _snapshot(mlp)

    def boom(record):
        raise KeyError("listener failed")

    with pytest.raises(KeyError, match="listener failed"):
        bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0.1, num_it=20, n_batch=5, on_update=boom)
    _assert_same(before, _snapshot(mlp))


@pytest.mark.parametrize("method", ["fixed", "sequential", "per_example"])
def test_a_stray_nan_batch_is_left_out_and_never_stepped_on(digits_dl, method):
    """fixed finds a NaN batch at its window's end (no host sync per step) and drops that window; sequential and
    per_example check every batch as it comes (they step or estimate per batch) and skip it alone."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    calls = []

    def loss_nan_at_7(pred, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(pred, y)
        return loss * float("nan") if len(calls) == 7 else loss

    weights_ok = []
    res = bs_find(model, digits_dl, loss_nan_at_7, lr=0.1, num_it=20, n_batch=5, method=method,
                  on_update=lambda r: weights_ok.append(all(torch.isfinite(p).all() for p in model.parameters())))
    iterations = {"fixed": [5, 15, 20], "sequential": [5, 11, 16],  # batch 7 alone: its window ends one batch later
                  "per_example": [i for i in range(1, 21) if i != 7]}
    assert res.history.iteration.tolist() == iterations[method]
    assert res.n_skipped == 1 and res.n_dropped == (1 if method == "fixed" else 0)
    assert all(weights_ok) and np.isfinite(res.history.loss).all()


@pytest.mark.parametrize("method", ["fixed", "sequential"])
def test_divergence_names_the_iterations_and_restores(mlp, digits_dl, method):
    """n_batch non-finite batches in a row is divergence (or broken data): a clear error, the model restored.
    fixed learns it at the end of the window holding batch 11, sequential at batch 11: both name 7–11."""
    before = _snapshot(mlp)
    calls = []

    def loss_nan_from_7(pred, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(pred, y)
        return loss * float("nan") if len(calls) >= 7 else loss

    with pytest.raises(RuntimeError, match="iterations 7–11.*lower lr"):
        bs_find(mlp, digits_dl, loss_nan_from_7, lr=0.1, num_it=20, n_batch=5, method=method)
    assert len(calls) == (15 if method == "fixed" else 11)
    _assert_same(before, _snapshot(mlp))


@pytest.mark.slow
def test_result_repr_plot_and_advice(mlp, digits_dl):
    res = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0, num_it=400, n_batch=5, beta=0.9)
    assert isinstance(res, GNSResult)
    text = repr(res)
    assert "noise_scale=" in text and res.reason in text
    fig = res.plot()
    assert len(fig.axes) == 3
    advice = res.advice(0.1, rule="sgd")
    assert advice.lr_factor > 1 if advice.kind == "grow" else advice.lr_factor <= 1
    assert advice.kind != "grow" or "linear" in advice.lr_text
    with pytest.warns(DeprecationWarning, match=r"advice\(\)"):
        old = res.lr_advice(0.1, rule="sgd")
    assert old is None or old.factor == advice.lr_factor


@pytest.mark.slow
def test_batch_fn_splits_unusual_batches(mlp, digits_dl):
    dict_dl = [{"x": x, "y": y} for x, y in digits_dl]
    with pytest.raises(ValueError, match=r"keys \['x', 'y'\].*batch_fn=lambda b: \(\(b\['x'\],\), \(b\['y'\],\)\)"):
        bs_find(mlp, dict_dl, nn.CrossEntropyLoss(), num_it=10, n_batch=5)
    res = bs_find(mlp, dict_dl, nn.CrossEntropyLoss(), num_it=10, n_batch=5,
                  batch_fn=lambda b: ((b["x"],), (b["y"],)))
    assert len(res.history) == 2 and res.batch_size == 32


def test_seeded_loader_generator_is_restored(mlp):
    "A loader with its own generator shuffles the same after a run as it would have without one."
    ds = TensorDataset(torch.randn(96, 64), torch.randint(0, 10, (96,)))
    dl = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
    state = dl.generator.get_state()
    bs_find(mlp, dl, nn.CrossEntropyLoss(), lr=0.1, num_it=12, n_batch=3)
    assert torch.equal(dl.generator.get_state(), state)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixed", "per_example"])
def test_beta_defaults_to_a_plain_average_at_lr_zero_and_ema_while_training(digits_dl, method):
    "At lr=0 nothing drifts, so every estimate counts equally; while training the EMA forgets the old weights."
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # no BatchNorm: per_example applies
    still = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0, num_it=100, n_batch=5, method=method)
    h = still.history
    assert still.beta == 1.0 and still.noise_scale == pytest.approx(h.noise_raw.sum() / h.scale_raw.sum(), rel=1e-9)
    moving = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0.1, num_it=100, n_batch=5, method=method)
    assert moving.beta == 0.99
    chosen = bs_find(mlp, digits_dl, nn.CrossEntropyLoss(), lr=0, num_it=100, n_batch=5, beta=0.9, method=method)
    assert chosen.beta == 0.9 and chosen.noise_scale != pytest.approx(h.noise_raw.sum() / h.scale_raw.sum(), rel=1e-3)
