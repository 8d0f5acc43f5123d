"""Read and change the batch size of fastai `DataLoaders` and torch `DataLoader`s.

fastai loaders take a new `bs` in place (only `dls.train.bs = n` works: `dls.bs = n` is
silently ignored). A torch `DataLoader` refuses `batch_size` changes after construction,
so it is rebuilt with everything else kept: dataset, sampler (and so shuffling), collate_fn,
workers, pin_memory, drop_last and the rest.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from .state import rngs_kept

__all__ = ["loader_at", "apply_batch_size", "current_batch_size", "dataset_len", "loader_len", "population_size",
           "shuffles"]


def _is_fastai_dls(obj: Any) -> bool:
    return hasattr(obj, "train") and hasattr(obj, "loaders")


def _is_fastai_dl(obj: Any) -> bool:
    return hasattr(obj, "bs") and hasattr(obj, "create_batches")


def current_batch_size(dl: Any) -> int | None:
    "The training batch size of fastai DataLoaders, a fastai DataLoader or a torch DataLoader (None if unknown)."
    if _is_fastai_dls(dl):
        dl = dl.train
    if _is_fastai_dl(dl):
        return dl.bs
    if isinstance(dl, DataLoader):
        return dl.batch_size if dl.batch_size is not None else getattr(dl.batch_sampler, "batch_size", None)
    return None


def loader_len(dl: Any) -> int | None:
    "Batches per epoch, None for a loader without a length (an iterable dataset, a generator)."
    try:
        return len(dl)
    except TypeError:
        return None


def dataset_len(dl: Any) -> int | None:
    "Examples in the training set behind a loader, when it can tell."
    if _is_fastai_dls(dl):
        dl = dl.train
    if _is_fastai_dl(dl):
        return dl.n
    sampler = getattr(dl, "sampler", None)
    if isinstance(sampler, SubsetRandomSampler):  # a train split of a larger dataset: only these examples train
        return len(sampler.indices)
    try:
        return len(dl.dataset)
    except (AttributeError, TypeError):
        return None


def population_size(dl: Any) -> int | None:
    """How many examples an epoch draws its batches from without replacement, or None.

    This is the N of the estimator's finite-population correction. Samplers that draw with
    replacement (or that we do not know) give None: no correction is needed or possible.
    """
    if _is_fastai_dls(dl):
        dl = dl.train
    if _is_fastai_dl(dl):
        return dl.n  # fastai shuffles a permutation of the whole dataset
    sampler = getattr(dl, "sampler", None)
    if isinstance(sampler, SubsetRandomSampler):
        return len(sampler.indices)
    if isinstance(sampler, SequentialSampler) or (isinstance(sampler, RandomSampler) and not sampler.replacement
                                                  and sampler.num_samples == len(sampler.data_source)):
        return len(sampler.data_source)
    return None


def shuffles(dl: Any) -> bool | None:
    "Whether the training loader draws its batches in a new random order each epoch; None when it cannot tell."
    if _is_fastai_dls(dl):
        dl = dl.train
    if _is_fastai_dl(dl):
        return bool(dl.shuffle)
    sampler = getattr(dl, "sampler", None)
    if isinstance(sampler, SequentialSampler):
        return False
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle)
    return True if isinstance(sampler, (RandomSampler, SubsetRandomSampler)) else None


def apply_batch_size(dls_or_loader: Any, bs: int) -> Any:
    """Use batch size `bs` for training.

    fastai `DataLoaders` (or a single fastai `DataLoader`): the training loader's `bs` is
    set in place and the same object is returned; the validation loader is left alone, as
    its batch size does not change training. torch `DataLoader`: a new loader is returned
    with the same dataset, sampler, collate_fn, workers, pin_memory, drop_last and other
    settings (a plain `BatchSampler` passed as `batch_sampler` is rebuilt around its sampler);
    the old one is untouched. A UserWarning says when an epoch would keep fewer than
    `MIN_STEPS_PER_EPOCH` optimizer steps (`res.suggested_bs` on a small dataset; `res.advice()` caps it).
    """
    if bs is None:  # apply_batch_size(dls, res.suggested_bs) after a run without a suggestion
        raise ValueError("bs is None: the finder made no suggestion (its result's .reason says why and what to "
                         "change); the batch size is left as it is")
    if isinstance(bs, bool) or not isinstance(bs, numbers.Integral) or bs < 1:
        raise ValueError(f"bs must be a positive integer, got {bs!r}")
    bs = int(bs)
    _check_steps(dls_or_loader, bs)
    if _is_fastai_dls(dls_or_loader):
        dls_or_loader.train.bs = bs
        return dls_or_loader
    if _is_fastai_dl(dls_or_loader):
        dls_or_loader.bs = bs
        return dls_or_loader
    if isinstance(dls_or_loader, DataLoader):
        return _rebuild(dls_or_loader, bs)
    raise TypeError("apply_batch_size takes fastai DataLoaders or a torch DataLoader, "
                    f"got {type(dls_or_loader).__name__}")


def _drops_last(dl: Any) -> bool:
    "Whether the loader drops its last incomplete batch (its own flag, or its BatchSampler's)."
    return bool(getattr(dl, "drop_last", False) or getattr(getattr(dl, "batch_sampler", None), "drop_last", False))


def _check_steps(dls_or_loader: Any, bs: int) -> None:
    """Refuse a batch size that leaves an epoch with no batch at all (drop_last and bs > N); warn when the
    change leaves it fewer than MIN_STEPS_PER_EPOCH (a schedule and the noise that helps generalisation need steps)."""
    from .advice import MIN_STEPS_PER_EPOCH  # a constant of the advice; loaders sit below it

    dl = dls_or_loader.train if _is_fastai_dls(dls_or_loader) else dls_or_loader
    n = dataset_len(dl)
    if n is None:
        return
    drop = _drops_last(dl)
    if drop and bs > n:
        raise ValueError(f"bs={bs} is larger than the training set ({n} examples) and the loader drops its last "
                         f"incomplete batch (drop_last=True), so it would yield no batch at all: use bs <= {n}")
    old = current_batch_size(dl)

    def steps(b: int) -> int:
        return n // b if drop else math.ceil(n / b)

    if steps(bs) < MIN_STEPS_PER_EPOCH and (old is None or steps(bs) < steps(old)):
        k = steps(bs)
        warnings.warn(f"bs={bs} leaves {k} optimizer step{'' if k == 1 else 's'} per epoch of the {n:,} training "
                      f"examples{' (drop_last)' if drop else ''}: too few for a learning-rate schedule and the "
                      f"noise that helps generalisation; res.advice() caps the batch so an epoch keeps at least "
                      f"{MIN_STEPS_PER_EPOCH}", UserWarning, stacklevel=3)


def loader_at(dl: Any, bs: int, in_process: bool = False) -> Any:
    """A copy of a fastai or torch loader at batch size `bs` over the same data and settings, the user's loader
    untouched (it may share its random generator: a caller that iterates the copy restores it); `in_process`:
    without worker processes. None when no copy can be made (a custom batch sampler, another kind of loader).

    Making it draws nothing the training would draw next: a fastai DataLoader seeds its own generator from
    Python's `random` and a weighted one samples with numpy's, so the global RNGs are put back (unrestored, a
    fit that never used the copy trained on other samples and augmentations than without it)."""
    with rngs_kept(dl):
        return _copy_at(dl, bs, in_process)


def _copy_at(dl: Any, bs: int, in_process: bool) -> Any:
    if _is_fastai_dl(dl):
        return dl.new(bs=bs, num_workers=0) if in_process else dl.new(bs=bs)
    if isinstance(dl, DataLoader):
        try:
            return _rebuild(dl, bs, num_workers=0 if in_process else None)
        except ValueError:
            return None
    return None


def _rebuild(dl: DataLoader, bs: int, num_workers: int | None = None) -> DataLoader:
    "`dl` at batch size `bs`, with its own settings (and `num_workers` when given)."
    workers = dl.num_workers if num_workers is None else num_workers
    kwargs: dict[str, Any] = dict(
        num_workers=workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory,
        timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
        multiprocessing_context=dl.multiprocessing_context, generator=dl.generator,
        persistent_workers=dl.persistent_workers and workers > 0, pin_memory_device=dl.pin_memory_device,
    )
    if workers > 0:
        kwargs["prefetch_factor"] = dl.prefetch_factor
    if hasattr(dl, "in_order"):
        kwargs["in_order"] = dl.in_order
    if dl.batch_size is None:
        if dl.batch_sampler is None:
            raise ValueError("this DataLoader has automatic batching disabled (batch_size=None): its batch size "
                             "is set by the dataset, so change it there")
        if type(dl.batch_sampler) is not BatchSampler:
            raise ValueError(f"this DataLoader uses a custom batch_sampler ({type(dl.batch_sampler).__name__}), "
                             "whose batch size only it knows: rebuild the loader with your batch_sampler at the "
                             "new size")
        old = dl.batch_sampler  # DataLoader(batch_sampler=BatchSampler(...)): the same batching, rebuilt at bs
        return DataLoader(dl.dataset, batch_sampler=BatchSampler(old.sampler, bs, old.drop_last), **kwargs)
    if type(dl.batch_sampler) is not BatchSampler:
        raise ValueError(f"this DataLoader uses a custom batch_sampler ({type(dl.batch_sampler).__name__}): "
                         "rebuild it with your batch_sampler at the new size")
    if not isinstance(dl.dataset, IterableDataset):
        kwargs["sampler"] = dl.sampler  # the same sampler object: shuffling and its generator carry over
    return DataLoader(dl.dataset, batch_size=bs, drop_last=dl.drop_last, **kwargs)
