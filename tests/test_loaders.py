"apply_batch_size rebuilds torch loaders faithfully and refuses what it cannot rebuild."
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, SubsetRandomSampler, TensorDataset

from gns_widget import apply_batch_size
from gns_widget.loaders import current_batch_size

DS = TensorDataset(torch.arange(100).float(), torch.arange(100))
pytestmark = pytest.mark.filterwarnings(r"ignore:bs=\d+ leaves:UserWarning")  # a 100-example set has few steps


def _collate(items):
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


def test_rebuild_keeps_every_setting():
    gen = torch.Generator().manual_seed(0)
    old = DataLoader(DS, batch_size=8, shuffle=True, generator=gen, collate_fn=_collate, drop_last=True,
                     pin_memory=False, num_workers=0)
    new = apply_batch_size(old, 32)
    assert new is not old and old.batch_size == 8 and current_batch_size(new) == 32
    assert new.sampler is old.sampler and new.collate_fn is _collate and new.drop_last and new.generator is gen
    assert len(new) == 3  # drop_last kept: 100 // 32


def test_shuffling_survives():
    new = apply_batch_size(DataLoader(DS, batch_size=8, shuffle=True), 100)
    assert next(iter(new))[1].tolist() != list(range(100))


class _BucketSampler(BatchSampler):
    "A custom batch sampler (a subclass): only it knows its batch size."


def test_custom_batch_sampler_is_refused():
    dl = DataLoader(DS, batch_sampler=_BucketSampler(SequentialSampler(DS), 10, False))
    with pytest.raises(ValueError, match="batch_sampler"):
        apply_batch_size(dl, 20)


@pytest.mark.parametrize("bs", [0, -3, 2.5, True])
def test_bad_bs(bs):
    with pytest.raises(ValueError, match="bs must be a positive integer"):
        apply_batch_size(DataLoader(DS, batch_size=8), bs)


def test_unknown_loader_type():
    with pytest.raises(TypeError, match="fastai DataLoaders or a torch DataLoader"):
        apply_batch_size([1, 2], 4)


def test_population_size_only_for_sampling_without_replacement():
    from torch.utils.data import RandomSampler, SubsetRandomSampler

    from gns_widget.loaders import population_size

    assert population_size(DataLoader(DS, batch_size=8, shuffle=True)) == 100
    assert population_size(DataLoader(DS, batch_size=8)) == 100
    assert population_size(DataLoader(DS, batch_size=8, sampler=SubsetRandomSampler(range(30)))) == 30
    assert population_size(DataLoader(DS, batch_size=8, sampler=RandomSampler(DS, replacement=True))) is None
    assert population_size([(torch.ones(2), torch.ones(2))]) is None


def test_bs_larger_than_the_dataset_with_drop_last_is_refused():
    "drop_last with bs > N would give a loader that yields nothing at all."
    dl = DataLoader(TensorDataset(torch.randn(50, 3)), batch_size=8, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match="larger than the training set \\(50 examples\\).*drop_last"):
        apply_batch_size(dl, 64)
    assert len(apply_batch_size(dl, 50)) == 1


def test_no_suggestion_says_so():
    "apply_batch_size(dls, res.suggested_bs) after a run without a suggestion: say why, not 'got None'."
    with pytest.raises(ValueError, match="no suggestion.*reason"):
        apply_batch_size(DataLoader(DS, batch_size=8), None)


def test_shuffles_reads_the_sampler():
    "The unshuffled-loader warning relies on it: random samplers shuffle, sequential ones and DDP's shuffle=False not."
    from torch.utils.data.distributed import DistributedSampler

    from gns_widget.loaders import shuffles

    def ddp(shuffle: bool) -> DistributedSampler:
        return DistributedSampler(DS, num_replicas=2, rank=0, shuffle=shuffle)
    assert shuffles(DataLoader(DS, batch_size=8, shuffle=True)) is True
    assert shuffles(DataLoader(DS, batch_size=8)) is False
    assert shuffles(DataLoader(DS, batch_size=8, sampler=SubsetRandomSampler(range(50)))) is True
    assert shuffles(DataLoader(DS, batch_size=8, sampler=ddp(True))) is True
    assert shuffles(DataLoader(DS, batch_size=8, sampler=ddp(False))) is False
    assert shuffles([(torch.zeros(2, 3), torch.zeros(2))]) is None  # a list of batches: cannot tell


def test_a_subset_sampler_split_counts_its_examples_not_the_whole_dataset():
    """The classic split: DataLoader(full_ds, sampler=SubsetRandomSampler(train_idx)). The training set is the
    subset: it caps the suggestion and sets the epochs of the advice (the whole dataset was taken before)."""
    from torch import nn

    from gns_widget import bs_find

    ds = TensorDataset(torch.randn(2000, 4), torch.randn(2000, 1))
    dl = DataLoader(ds, batch_size=10, sampler=SubsetRandomSampler(range(300)), drop_last=True)
    assert bs_find(nn.Linear(4, 1), dl, nn.MSELoss(), lr=0, num_it=10, n_batch=5).n_train == 300
    with pytest.raises(ValueError, match="larger than the training set \\(300 examples\\)"):
        apply_batch_size(dl, 400)


def test_a_copy_at_another_batch_size_draws_from_no_rng():
    "A fastai DataLoader seeds its own generator from Python's `random`: making one must not move the user's."
    import random

    import numpy as np
    from fastai.data.load import DataLoader as FastaiDataLoader

    from gns_widget.loaders import loader_at

    ds = TensorDataset(torch.arange(100.0))
    for dl in (FastaiDataLoader(ds, bs=10, shuffle=True), DataLoader(ds, 10, shuffle=True)):
        before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
        copy = loader_at(dl, 20)
        assert current_batch_size(copy) == 20
        assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
        assert torch.equal(torch.get_rng_state(), before[2])
