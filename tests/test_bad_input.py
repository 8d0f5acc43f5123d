"Bad input gets an error that names the problem and the fix, never a hang or a silent number."
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from gns_widget import bs_find

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("kwargs, match", [
    ({"n_batch": 1}, "n_batch must be an integer >= 2"),
    ({"beta": 1.5}, r"beta must be in \[0, 1\]"),
    ({"beta": -0.5}, r"beta must be in \[0, 1\]"),
    ({"num_it": 5, "n_batch": 10}, "num_it must be an integer >= n_batch"),
    ({"lr": -1.0}, "lr must be a finite number >= 0"),
    ({"lr": float("nan")}, "lr must be a finite number >= 0"),
    ({"method": "fast"}, "method must be one of"),
])
def test_bad_arguments(mlp, digits_dl, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bs_find(mlp, digits_dl, CE, **kwargs)


def test_frozen_model(digits_dl):
    model = nn.Linear(64, 10).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        bs_find(model, digits_dl, CE)


def test_empty_loader(mlp):
    empty = DataLoader(TensorDataset(torch.empty(0, 64), torch.empty(0, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match="train_dl is empty"):
        bs_find(mlp, empty, CE)


class _Nothing(IterableDataset):
    def __iter__(self):
        return iter(())


def test_empty_iterable_loader_does_not_hang(mlp):
    with pytest.raises(ValueError, match="yielded no batches"):
        bs_find(mlp, DataLoader(_Nothing(), batch_size=8), CE, num_it=10, n_batch=5)


def test_unsized_loader_needs_num_it(mlp):
    with pytest.raises(ValueError, match="pass num_it"):
        bs_find(mlp, DataLoader(_Nothing(), batch_size=8), CE)


def test_epoch_shorter_than_a_window(mlp):
    small = DataLoader(TensorDataset(torch.randn(40, 64), torch.randint(0, 10, (40,))), batch_size=10)
    with pytest.raises(ValueError, match="one epoch is only 4 batches"):
        bs_find(mlp, small, CE, n_batch=5)


def test_missing_loader_or_loss(mlp, digits_dl):
    with pytest.raises(ValueError, match="train_dl is required"):
        bs_find(mlp, None, CE)
    with pytest.raises(ValueError, match="loss_func is required"):
        bs_find(mlp, digits_dl)
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match=f"reduction='mean'.*not reduction='{reduction}'"):
            bs_find(mlp, digits_dl, nn.CrossEntropyLoss(reduction=reduction))


class _TupleOut(nn.Sequential):
    "A model that returns (logits, features), as many do."

    def forward(self, x):
        return super().forward(x), x


@pytest.mark.parametrize("model, loss_func, match", [
    (_TupleOut(nn.Linear(64, 10)), CE, r"model's output, a tuple rather than a tensor.*out\[0\]"),
    (nn.Linear(64, 10), lambda p, y: nn.functional.cross_entropy(p, y, reduction="none"),
     r"one number.*shape \(32,\).*\.mean\(\)"),
    (nn.Linear(64, 10), lambda p, y: (p.argmax(1) == y).float().mean(), "no gradient.*metric"),
], ids=["tuple-output", "loss-per-example", "metric-as-loss"])
def test_a_loss_that_does_not_fit_the_model_is_named(digits_dl, model, loss_func, match):
    "Each raised deep in torch before (a TypeError in cross_entropy, 'grad can be implicitly created only for scalar "
    "outputs', 'element 0 of tensors does not require grad')."
    for method in ("fixed", "per_example"):
        with pytest.raises(ValueError, match=match):
            bs_find(model, digits_dl, loss_func, num_it=10, n_batch=5, method=method)


def test_wrong_target_type(digits_dl):
    with pytest.raises(TypeError, match="Learner or a torch nn.Module"):
        bs_find("model", digits_dl, CE)


def test_batches_that_are_not_pairs(mlp):
    triples = [(torch.randn(8, 64), torch.randint(0, 10, (8,)), torch.ones(8))] * 10
    with pytest.raises(ValueError, match="3-tuple.*batch_fn"):
        bs_find(mlp, triples, CE, num_it=10, n_batch=5)


def _data(n=200):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen))


@pytest.mark.slow
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_runs_when_called_under_no_grad(mlp, digits_dl, context):
    with context():
        res = bs_find(mlp, digits_dl, CE, num_it=20, n_batch=5)
    assert len(res.history) == 4


def test_single_example_loader_is_not_misread_as_a_batch(mlp):
    "batch_size=None yields single examples: the feature count (64) must not be taken for a batch size."
    with pytest.raises(ValueError, match="single value.*batch_size=32"):
        bs_find(mlp, DataLoader(_data(), batch_size=None), CE, num_it=20, n_batch=5)


def test_dataset_smaller_than_one_batch_is_refused(mlp):
    with pytest.raises(ValueError, match="fits in one batch of 32"):
        bs_find(mlp, DataLoader(_data(20), batch_size=32, shuffle=True), CE, num_it=20, n_batch=5)


def test_sparse_embedding_gradients(digits_dl):
    model = nn.Sequential(nn.Embedding(17, 8, sparse=True), nn.Flatten(), nn.Linear(64 * 8, 10))
    dl = [(torch.randint(0, 17, (8, 64)), torch.randint(0, 10, (8,)))] * 10
    with pytest.raises(ValueError, match="sparse=False"):
        bs_find(model, dl, CE, num_it=10, n_batch=5)


@pytest.mark.slow
def test_one_shot_generator_says_it_is_exhausted(mlp):
    gen = ((x, y) for x, y in DataLoader(_data(), batch_size=20))
    with pytest.raises(ValueError, match="exhausted after 10 batches.*one-shot"):
        bs_find(mlp, gen, CE, num_it=20, n_batch=5)
    with pytest.raises(ValueError, match="generator can only be iterated once"):
        bs_find(mlp, gen, CE, num_it=20, n_batch=5)


def test_batch_fn_with_the_wrong_shape_is_named(mlp, digits_dl):
    with pytest.raises(ValueError, match="batch_fn must return \\(inputs, targets\\)"):
        bs_find(mlp, digits_dl, CE, num_it=10, n_batch=5, batch_fn=lambda b: (b[0], b[1]))


def test_optimizer_factory_returning_none(mlp, digits_dl):
    with pytest.raises(ValueError, match="factory returned NoneType"):
        bs_find(mlp, digits_dl, CE, num_it=10, n_batch=5, opt=lambda params: None)


@pytest.mark.slow
def test_numpy_integers_are_accepted(mlp, digits_dl):
    res = bs_find(mlp, digits_dl, CE, num_it=np.int64(10), n_batch=np.int32(5))
    assert len(res.history) == 2 and res.n_batch == 5


@pytest.mark.parametrize("device, match", [("meta", "holds no data"), ("cuda:99", "not usable"),
                                           ("banana", "torch device")])
def test_unusable_device_is_refused_before_the_model_moves(mlp, digits_dl, device, match):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        bs_find(mlp, digits_dl, CE, num_it=10, n_batch=5, device=device)
    assert all(torch.equal(v, mlp.state_dict()[k]) for k, v in before.items())


def test_model_on_the_meta_device(digits_dl):
    with torch.device("meta"):
        model = nn.Linear(64, 10)
    with pytest.raises(ValueError, match="meta device"):
        bs_find(model, digits_dl, CE, num_it=10, n_batch=5)
