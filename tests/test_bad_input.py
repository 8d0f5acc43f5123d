"Bad input gets an error that names the problem and the fix, never a hang or a silent number."
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from gns_widget import bs_find

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("kwargs, match", [
    ({"n_batch": 1}, "n_batch must be an integer >= 2"),
    ({"beta": 1.0}, r"beta must be in \[0, 1\)"),
    ({"beta": -0.5}, r"beta must be in \[0, 1\)"),
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
    with pytest.raises(ValueError, match="reduction='mean'"):
        bs_find(mlp, digits_dl, nn.CrossEntropyLoss(reduction="sum"))


def test_wrong_target_type(digits_dl):
    with pytest.raises(TypeError, match="Learner or a torch nn.Module"):
        bs_find("model", digits_dl, CE)


def test_batches_that_are_not_pairs(mlp):
    triples = [(torch.randn(8, 64), torch.randint(0, 10, (8,)), torch.ones(8))] * 10
    with pytest.raises(ValueError, match="3-tuple.*batch_fn"):
        bs_find(mlp, triples, CE, num_it=10, n_batch=5)
