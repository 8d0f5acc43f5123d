"""Gradient noise scale under DistributedDataParallel: one estimate per optimizer step, for free.

In a DDP job every rank already computes a small-batch gradient (its own batch) and the job
computes the big-batch gradient (the all-reduced average). Both are measured at the same
weights, so each step gives one estimate through `NoiseScaleEstimator.update_norms`, with no
window of extra batches and no extra gradient traffic: only a few scalars are all-reduced.

DDP averages the rank gradients with equal weights whatever the per-rank batch sizes b_r, so
E|g_r|² = |G|² + tr(Σ)/b_r gives B_small = R/Σ(1/b_r) (harmonic mean) for the mean of the
|g_r|², and B_big = R²/Σ(1/b_r) for the average (= R·b when all ranks have b examples).

- `DDPNoiseScale`: for your own training loop; reads the local gradients in a DDP comm hook.
- `allreduce_measured`: for the finder engine, after a backward pass run under `no_sync()`
  (`allreduce_norms` leaves its four numbers on the device, for a caller that reads many steps at once).
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from .estimator import NoiseScaleEstimator, WindowEstimate, check_batch_size
from .norms import loss_scale_of, piece_norms

__all__ = ["DDPNoiseScale", "allreduce_measured", "allreduce_norms", "is_distributed"]

# Gradients are averaged in flat buffers of at most this size: one all_reduce for small models,
# bounded extra memory for big ones.
_BUCKET_BYTES = 64 * 2**20


def is_distributed(model: nn.Module) -> bool:
    """Whether `model` is a DDP module in a live process group of at least two ranks.

    With a single rank there is no big batch to compare with: callers use the single-process path.
    """
    return (isinstance(model, DistributedDataParallel) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(model.process_group) > 1)


def allreduce_measured(model: nn.Module, batch_size: int,
                       group: dist.ProcessGroup | None = None) -> tuple[float, float, float, float]:
    """Average the local gradients across ranks in place and measure both norms on the way.

    Call it after a backward pass run under `ddp_model.no_sync()`, so that `.grad` holds this
    rank's gradient of its `batch_size` examples. Afterwards `.grad` holds what DDP would have
    produced (the mean over ranks; a parameter without a gradient counts as zero, as DDP's
    `find_unused_parameters` does) and the return value, the same on every rank, is
    `(small_sq, big_sq, b_small, b_big)` for `NoiseScaleEstimator.update_norms`. `model` is the
    DDP wrapper or its `.module`; `group` defaults to the wrapper's process group (else WORLD).
    Costs the gradient all-reduce DDP would have done plus one of two scalars, and one host sync.
    """
    return _floats(allreduce_norms(model, batch_size, group))


def allreduce_norms(model: nn.Module, batch_size: int,
                    group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    "`allreduce_measured` with its four numbers left on the device as float64 scalars: no host sync."
    check_batch_size(batch_size, "this rank's examples")
    _check_initialized("model")
    if isinstance(model, DistributedDataParallel):
        group = model.process_group if group is None else group
        model = model.module
    world = dist.get_world_size(group)
    if world < 2:
        raise ValueError(f"group: need at least 2 ranks to compare small and big batches, got {world}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameters to measure")
    for p in params:
        if p.grad is None:  # every rank must flatten the same tensors, or the all_reduce mismatches
            p.grad = torch.zeros_like(p)
        elif p.grad.is_sparse:
            raise ValueError("model: sparse gradients are not supported")
    local_sq = big_sq = None
    for grads in _buckets([p.grad for p in params]):
        flat = _flatten_dense_tensors(grads)
        local_sq = _add(local_sq, _sq([flat]))  # before the in-place average below
        flat.div_(world)  # divide first, as DDP's allreduce_hook does (no fp16 overflow, same rounding)
        dist.all_reduce(flat, group=group)
        big_sq = _add(big_sq, _sq([flat]))
        torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))
    return _reduce_norms(local_sq, big_sq, float(batch_size), world, group)


class DDPNoiseScale:
    """Measure the noise scale of a DDP training loop from gradients DDP computes anyway.

        gns = DDPNoiseScale(ddp_model)            # before the first backward
        for x, y in loader:
            loss_fn(ddp_model(x), y).backward()
            gns.update(len(x))                    # this rank's examples, before clipping/step
            opt.step(); opt.zero_grad()
        gns.noise_scale                           # same value on every rank

    It registers a DDP communication hook that squares the norm of each bucket's local gradient
    before handing the bucket to DDP's default all-reduce (so training is unchanged). DDP allows
    only one comm hook per model: this cannot be combined with compression or other hooks.
    `update` then all-reduces two scalars and makes one estimate per step; it may also be called
    only every k-th step, measuring that step.

    Gradient accumulation (`no_sync()` micro-batches): DDP skips the hook under `no_sync`, so those
    backward passes are not measured on their own. An `update` after one returns None and only
    counts its examples; the next synchronized step is measured with the whole accumulated batch
    as this rank's small batch (k micro-batches of sizes m_j count as k²/Σ(1/m_j) examples, which
    assumes the usual `loss / k`). Calling `update` once per step with all its examples also works.

    Every rank must call `update` after every measured step (it is a collective), so uneven inputs
    under `ddp_model.join()` are not supported. `beta` and `n_train` are those of
    `NoiseScaleEstimator`; or pass an existing `estimator`.
    """

    def __init__(self, ddp_model: DistributedDataParallel, beta: float = 0.99, n_train: int | None = None,
                 estimator: NoiseScaleEstimator | None = None):
        if not isinstance(ddp_model, DistributedDataParallel):
            raise ValueError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got "
                             f"{type(ddp_model).__name__} (for a single process use NoiseScaleEstimator)")
        _check_initialized("ddp_model")
        self.group = ddp_model.process_group
        self.world_size = dist.get_world_size(self.group)
        if self.world_size < 2:
            raise ValueError(f"ddp_model: need at least 2 ranks to compare small and big batches, got "
                             f"{self.world_size} (for a single process use NoiseScaleEstimator)")
        if estimator is None:
            # n_batch is unused: update_norms makes each estimate from the ranks of one step
            estimator = NoiseScaleEstimator(n_batch=2, beta=beta, n_train=n_train)
        elif not isinstance(estimator, NoiseScaleEstimator):
            raise ValueError(f"estimator must be a NoiseScaleEstimator or None, got {type(estimator).__name__}")
        elif beta != 0.99 or n_train is not None:
            raise ValueError("estimator: pass beta and n_train to the NoiseScaleEstimator, not beside it")
        if getattr(ddp_model, "_comm_hooks", None):
            raise ValueError("ddp_model already has a communication hook; DDP allows only one per model")
        self.model, self.estimator = ddp_model, estimator
        self._norms: list[Tensor] = []  # norms of each bucket's pieces, for the latest synchronized backward
        self._fresh = False  # a synchronized backward happened since the last update
        self._pending: list[int] = []  # sizes of no_sync micro-batches reported since then
        self._micro: list[int] = []  # those that belong to the latest synchronized step
        ddp_model.register_comm_hook(None, self._hook)

    # Unannotated state, annotated bucket/return: DDP checks the annotations' values.
    def _hook(self, state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        "Norm of this bucket's local gradient, then DDP's own all-reduce (which averages in place)."
        if bucket.index() == 0:  # DDP launches buckets in index order: a new backward pass
            self._norms, self._micro, self._pending, self._fresh = [], self._pending, [], True
        self._norms.append(piece_norms([bucket.buffer()]))  # queued before the in-place divide: no host sync
        return allreduce_hook(self.group, bucket)

    def update(self, batch_size: int, grad_scale: float | Tensor | None = None) -> WindowEstimate | None:
        """Make this step's estimate, the same on every rank; call it on every rank after backward.

        `batch_size` is this rank's number of examples (ranks may differ). `grad_scale` is the
        loss scale the gradients carry under mixed precision (`scaler.get_scale()`); a step whose
        gradients overflowed is skipped, as the scaler skips it. Returns the raw estimate, or None
        after a `no_sync()` backward (see the class docstring) or an overflow.
        """
        check_batch_size(batch_size, "this rank's examples")
        loss_scale_of(grad_scale)  # a bad scale is refused before any collective starts
        if not self._fresh:
            self._pending.append(batch_size)
            return None
        sizes, self._micro, self._fresh = [*self._micro, batch_size], [], False
        b_local = len(sizes) ** 2 / sum(1 / s for s in sizes)  # equal-weight micro-batches, as in the docstring
        local_sq = torch.cat(self._norms).double().square().sum()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            raise RuntimeError("no gradients: call update after loss.backward() and before zero_grad()")
        big_sq = _sq(grads)  # DDP has already averaged .grad
        small_sq, big_sq, b_small, b_big = _floats(_reduce_norms(local_sq, big_sq, b_local, self.world_size,
                                                                 self.group))
        return self.estimator.update_norms(small_sq, big_sq, b_small, b_big, grad_scale)

    def reset(self) -> None:
        "Forget the estimates (the hook stays registered)."
        self.estimator.reset()
        self._pending, self._micro = [], []

    @property
    def noise_scale(self) -> float:
        "Smoothed B_simple = tr(Σ)/|G|² (NaN before the first estimate)."
        return self.estimator.noise_scale

    @property
    def noise(self) -> float:
        "Smoothed tr(Σ), the per-example gradient variance."
        return self.estimator.noise

    @property
    def scale(self) -> float:
        "Smoothed |G|², the squared norm of the true gradient."
        return self.estimator.scale

    @property
    def n_estimates(self) -> int:
        return self.estimator.n_estimates

    @property
    def last(self) -> WindowEstimate | None:
        "The latest raw (unsmoothed) estimate."
        return self.estimator.last

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(world_size={self.world_size}, estimates={self.n_estimates}, "
                f"noise_scale={self.noise_scale:.4g})")


def _reduce_norms(local_sq: Tensor, big_sq: Tensor, b_local: float, world: int,
                  group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean |g_r|², |mean g_r|², B_small, B_big) as float64 scalars on the device: one all_reduce of
    [|g_r|², 1/b_r] and no host sync.

    `big_sq` is the same on every rank (it is measured after the average) and is not reduced.
    """
    vec = torch.stack([local_sq.double(), local_sq.new_full((), 1.0 / b_local, dtype=torch.float64)])
    dist.all_reduce(vec, group=group)
    sq_sum, inv_sum = vec.unbind()
    ranks = inv_sum.new_full((), world)
    return sq_sum / world, big_sq.double().to(vec.device), ranks / inv_sum, ranks * world / inv_sum


def _floats(values: tuple[Tensor, ...]) -> tuple[float, ...]:
    "Device scalars as floats, in one host sync."
    return tuple(torch.stack(values).tolist())


def _buckets(grads: list[Tensor]) -> list[list[Tensor]]:
    "Group gradients by dtype and device, in order, into lists of at most _BUCKET_BYTES each."
    out: list[list[Tensor]] = []
    open_: dict[tuple, tuple[list[Tensor], int]] = {}
    for g in grads:
        key = (g.dtype, g.device)
        bucket, size = open_.get(key, ([], 0))
        if bucket and size + g.numel() * g.element_size() > _BUCKET_BYTES:
            out.append(bucket)
            bucket, size = [], 0
        bucket.append(g)
        open_[key] = (bucket, size + g.numel() * g.element_size())
    return out + [b for b, _ in open_.values()]


def _sq(tensors: list[Tensor]) -> Tensor:
    "Σ|t|² as a float64 scalar on the device (accurate for long tensors: see `piece_norms`)."
    return piece_norms(tensors).double().square().sum()


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b


def _check_initialized(arg: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{arg}: the torch.distributed process group is not initialized "
                         "(call dist.init_process_group first, e.g. under torchrun)")
