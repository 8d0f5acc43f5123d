"""The gradient-noise-scale math (McCandlish et al. 2018, appendix A.1).

`NoiseScaleEstimator` is fed one small-batch mean gradient at a time. Over a window of
`n_batch` of them it keeps a single running sum (memory O(parameters), independent of
`n_batch`) and a scalar sum of squared norms, then applies the paper's two unbiased
estimators. It knows nothing of training loops, optimizers, fastai or widgets.

Unequal batch sizes are exact, not approximated: with small batches of sizes b_i,
E|g_i|² = |G|² + tr(Σ)/b_i, so the mean of |g_i|² behaves like one batch of the
harmonic-mean size, and the example-weighted sum Σ b_i g_i / Σ b_i is the big batch.

Small datasets are exact too. When batches are drawn without replacement from N examples (a
shuffled epoch), a batch mean of size b has variance tr(Σ)/b·(N − b)/(N − 1), two batches of one
epoch covary by −tr(Σ)/(N − 1) and batches of different epochs are independent. With
c(B, f) = (N/B − f)/(N − 1), E|g_small|² = |G|² + tr(Σ)·c(B_small, 1) and
E|g_big|² = |G|² + tr(Σ)·c(B_big, f), where f = Σ_e (W_e/W)² sums the squared shares of the
window's weight W drawn from each epoch e (1 when the window lies in one epoch). Solving the two
equations gives both quantities for any mix of epochs; as N → ∞, c(B, f) → 1/B and they reduce
to the paper's estimators.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .norms import loss_scale_of, piece_norms, squared_norm

__all__ = ["NoiseScaleEstimator", "WindowEstimate", "gradients_of", "trainable_grads", "check_batch_size"]


@dataclass(frozen=True)
class WindowEstimate:
    "One unsmoothed estimate from a completed window of small batches."
    noise: float  # tr(Σ) estimate
    scale: float  # |G|² estimate
    b_small: float  # harmonic mean of the small batch sizes
    b_big: float  # examples in the window (its effective size when micro-batches are weighted unequally)
    n_small: int = 1  # small batches in the window: its weight in the averages


def trainable_grads(params: nn.Module | Iterable[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, gradient) for each trainable parameter that has a gradient, read in place (no copies).

    Frozen parameters (`requires_grad=False`) are not measured: the noise scale is that of what
    trains. Parameters without a gradient in this step (unused by this batch) are left out.
    Raw gradient tensors are refused here: they go through `update(grads=...)`, never guessed.
    """
    items = params.parameters() if isinstance(params, nn.Module) else params
    if isinstance(items, Tensor):
        items = [items]
    out = []
    for p in items:
        if not isinstance(p, Tensor):
            raise ValueError(f"params must be a module or its parameters, got an item of type {type(p).__name__}")
        if not isinstance(p, nn.Parameter) and not p.requires_grad:
            raise ValueError("params must be a module or its parameters, got a plain tensor: pass raw gradient "
                             "tensors as update(grads=[...], batch_size=...)")
        if p.requires_grad and p.grad is not None:
            out.append((p, p.grad))
    return out


def gradients_of(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    "The gradients of the trainable parameters that have one (see `trainable_grads`)."
    return [g for _, g in trainable_grads(params)]


class NoiseScaleEstimator:
    """Estimate the gradient noise scale B_simple = tr(Σ)/|G|² from consecutive small batches.

    Shaped like a torchmetrics `Metric`: call `update` after each backward pass (before
    gradient clipping or the optimizer step), read `noise`, `scale` and `noise_scale`,
    and `reset` to start over. Every `n_batch` updates one raw estimate is made and
    folded into bias-corrected EMAs with decay `beta`; `noise_scale` is the ratio of the
    two EMAs (a ratio of averages: single raw estimates are noisy and can be negative).
    `beta=1` weights every estimate equally: right when the weights do not move (a measurement
    at lr=0), where forgetting would only throw measurements away.

    What is measured: `update(model)` (or its parameters) measures the trainable parameters,
    keyed by identity, so frozen layers are left out and a parameter that gets no gradient in
    some step (a branch or head this batch did not use) counts as a zero gradient for that small
    batch, which it is. `update(grads=[...])` takes raw gradient tensors, matched by position.

    `n_train`: the training set size when small batches are drawn without replacement from it
    (shuffled epochs). The estimate is then exact for small datasets, including windows that
    straddle epochs, when `update` is told each batch's `epoch` (see the module docstring);
    without `epoch`, all batches of a window are taken to come from one epoch.

    `accumulated=True` is for gradient accumulation: the gradients are *not* zeroed between
    micro-batches, so each `update` sees the running sum, and the micro-batches are the small
    batches while the accumulated gradient is the big one. The window must be the accumulation
    cycle (`n_batch` = accumulation steps, `update` after every micro-batch's backward). The same
    single buffer then holds the previous running sum, so memory stays O(parameters).

    No host sync per update: the squared norms stay on the device until the window completes, where
    one read brings them back with the big-batch norm. So a small batch whose gradient is not finite
    (NaN or inf) is only found then, after it was added to the big batch, and its whole window is
    dropped: no estimate, `n_skipped` counts the non-finite batches and `n_dropped` the window. The
    caller's `.grad` tensors are never modified. Skipping a bad batch alone would need either a host
    sync per update or a masked copy of every gradient (measured: it doubles the update's cost).

    `check_each=True` checks each small batch as it comes instead (one scalar read from the device per
    update, as `torch.amp.GradScaler` makes one per step) and skips a non-finite one alone, keeping
    the rest of its window. Updates with a `grad_scale` (float16's overflows) and gradient accumulation
    are always checked this way: like `GradScaler`, they must know at once that a step overflowed.
    """

    def __init__(self, n_batch: int = 20, beta: float = 0.99, n_train: int | None = None,
                 accumulated: bool = False, *, check_each: bool = False):
        n_batch = self.check_args(n_batch, beta, n_train)
        self.n_batch, self.beta, self.n_train, self.accumulated = n_batch, float(beta), n_train, accumulated
        self.check_each = check_each
        self.reset()

    @staticmethod
    def check_args(n_batch: int, beta: float, n_train: int | None = None) -> int:
        "Raise a ValueError naming the bad argument and its accepted range; return n_batch as an int."
        if not _is_int(n_batch) or n_batch < 2:
            raise ValueError(f"n_batch must be an integer >= 2 (small batches per estimate), got {n_batch!r}")
        if isinstance(beta, bool) or not (isinstance(beta, numbers.Real) and 0 <= beta <= 1):
            raise ValueError(f"beta must be in [0, 1] (EMA decay; 0.99 while training, 1 averages every estimate "
                             f"equally), got {beta!r}")
        if n_train is not None and (not _is_int(n_train) or n_train < 1):
            raise ValueError(f"n_train must be a positive integer or None, got {n_train!r}")
        return int(n_batch)

    def reset(self) -> None:
        "Forget everything: the current window and the EMAs."
        self._keys: dict[int, int] = {}  # id of a parameter (or position, for raw grads) -> its buffer's index
        self._owners: list[Hashable] = []  # the parameter (or position) of each buffer
        self._acc: list[Tensor] = []  # Σ w_i g_i over the window, one buffer per measured tensor
        self._by_params: bool | None = None  # fed parameters (keyed by identity) or raw gradients (by position)
        self._last_keys: tuple = ()  # the previous update's key ids and their buffers, reused while unchanged
        self._last_acc: list[Tensor] = []
        self._sqs: list[Tensor] = []  # |g_i|² of the window's small batches, on the device until it completes
        self._zero_window_counts()
        self._window_done = self._overflowed = self._dropped = False
        self._loss_scale = 1.0  # the scale the accumulated running sum carries (mixed precision)
        self._ema_noise = self._ema_scale = self._ema_weight = 0.0  # Σ beta^(k-i)·w_i·x_i and Σ beta^(k-i)·w_i
        self.n_estimates = 0
        # Not finite: small batches (checked or found at their window's end), accumulation cycles, update_norms steps
        # and estimates; n_dropped: windows (accumulation cycles) left out because they held such a batch
        self.n_skipped = self.n_dropped = 0
        self._last_finite: tuple[bool, ...] = ()
        self.last: WindowEstimate | None = None

    @property
    def last_finite(self) -> tuple[bool, ...]:
        """Whether the small batches whose check the latest `update` completed had finite gradients, oldest first.

        Its own batch when it was checked at once (`check_each`, a `grad_scale`, accumulation); every batch of the
        window when the window's end checked them; () in between. A training loop reads it to skip the optimizer
        step of a batch that was not finite, or to tell divergence from a stray batch.
        """
        return self._last_finite

    @property
    def window_open(self) -> bool:
        "Whether a window has started and is not complete yet (its next small batch must follow this one)."
        return self._count > 0 and not self._window_done

    def set_window(self, n_batch: int) -> None:
        """Make every window from the next one on `n_batch` small batches (`num_it="auto"` widens them at fixed
        weights, where a wider window measures a noise scale above the big batch better). Only between windows."""
        n_batch = self.check_args(n_batch, self.beta)
        if self._count and not self._window_done:
            raise RuntimeError(f"set_window is only possible between windows: {self._count} of this window's "
                               f"{self.n_batch} small batches are in")
        self.n_batch = n_batch

    def _zero_window_counts(self) -> None:
        # small batches, Σ 1/b_i (B_small is their harmonic mean), Σ w_i and Σ w_i²/b_i (B_big = (Σw)²/Σ(w²/b)),
        # and Σ w_i per epoch (for the finite-population correction)
        self._count, self._inv_bs, self._w_sum, self._w2_over_b = 0, 0.0, 0.0, 0.0
        self._epoch_w: dict[Hashable, float] = {}

    def update(self, params: nn.Module | Iterable[Tensor] | None = None, batch_size: int | None = None,
               weight: float | None = None, grad_scale: float | Tensor | None = None, *,
               grads: Sequence[Tensor] | None = None, epoch: Hashable = None) -> WindowEstimate | None:
        """Add one small batch's mean gradient; return the raw estimate when a window completes.

        `params` is the model (or its parameters): the `.grad` of each trainable parameter is read.
        Or pass `grads`, the raw gradient tensors, always the same tensors in the same order.
        `batch_size` is the number of examples the gradient averages over. The loss must be a
        mean over the batch (the PyTorch and fastai default), not a sum. `epoch` labels the pass
        over the data this batch comes from (with `n_train`, for small datasets).

        With `accumulated=True`, `weight` is the factor this micro-batch's loss was multiplied by
        before backward (default 1/n_batch, i.e. `loss / accumulation_steps`; fastai's
        `GradientAccumulation` uses batch_size / n_acc). Without accumulation, small batches are
        weighted by their size.

        `grad_scale` is for mixed precision: the loss scale the gradients still carry when read
        before `GradScaler.unscale_` (pass `scaler.get_scale()`). Each update is divided by its
        own scale, so a scale that changes between steps does not bias the estimate, and a batch
        whose gradients overflowed (the scaler skips that step) is skipped here too; with
        accumulation the whole cycle is dropped, as its step is. Such updates cost one host sync each.
        """
        check_batch_size(batch_size)
        if weight is not None and not self.accumulated:
            raise ValueError("weight only applies with accumulated=True (gradient accumulation)")
        if weight is not None and not weight > 0:
            raise ValueError(f"weight must be positive, got {weight!r}")
        loss_scale = loss_scale_of(grad_scale)
        keys, tensors = self._read(params, grads)
        if self._window_done:
            self._start_window()
        acc = self._buffers(keys, tensors)
        if acc and acc[0].dtype != tensors[0].dtype:  # low-precision grads against a float32 buffer
            tensors = [g.to(a.dtype) for a, g in zip(acc, tensors)]
        checked = self.check_each or self.accumulated or grad_scale is not None
        self._last_finite = ()
        if self.accumulated:
            w = 1.0 / self.n_batch if weight is None else float(weight)
            if not self._overflowed:
                if acc:
                    torch._foreach_sub_(acc, tensors)  # previous running sum − current = −w·g_i (times the scale)
                sq = self._squared_norm(acc) / (w * loss_scale) ** 2
                if acc:
                    torch._foreach_copy_(acc, tensors)  # the running sum, for the next micro-batch
                self._overflowed = not torch.isfinite(sq).item()
                self._last_finite = (not self._overflowed,)
            if self._overflowed:  # the running sum is lost for the rest of this cycle
                return self._count_overflowed_micro_batch()
            self._loss_scale = loss_scale  # constant within a cycle: GradScaler changes it after the step
        else:
            w = float(batch_size)
            sq = self._squared_norm(tensors)
            if loss_scale != 1.0:
                sq = sq / loss_scale**2
            if checked:
                self._last_finite = (bool(torch.isfinite(sq)),)
                if not self._last_finite[0]:  # this small batch alone is left out
                    self.n_skipped += 1
                    return None
            if acc:
                torch._foreach_add_(acc, tensors, alpha=batch_size / loss_scale)
        self._sqs.append(sq)
        self._count += 1
        self._inv_bs += 1.0 / batch_size
        self._w_sum += w
        self._w2_over_b += w * w / batch_size
        self._epoch_w[epoch] = self._epoch_w.get(epoch, 0.0) + w
        return self._finish_window(checked) if self._count == self.n_batch else None

    def _read(self, params: nn.Module | Iterable[Tensor] | None,
              grads: Sequence[Tensor] | None) -> tuple[tuple, list[Tensor]]:
        "The keys (parameters, or positions for raw gradients) and gradient tensors of one update."
        if (params is None) == (grads is None):
            raise ValueError("update takes either params (a model or its parameters) or grads (raw gradient "
                             "tensors), exactly one of them")
        by_params = params is not None
        if self._by_params is None:
            self._by_params = by_params
        elif self._by_params != by_params:
            raise ValueError("update was fed parameters before and raw gradients now (or the reverse): feed one "
                             "kind, or reset() first")
        if by_params:
            pairs = trainable_grads(params)
            if not pairs and not self._acc:
                raise ValueError("no gradients to measure: call update after loss.backward() on a model with "
                                 "trainable parameters (requires_grad=True)")
            keys, tensors = tuple(p for p, _ in pairs), [g for _, g in pairs]
        else:
            tensors = list(grads)
            if not tensors or not all(isinstance(g, Tensor) for g in tensors):
                raise ValueError("grads must be a non-empty list of gradient tensors")
            keys = tuple(range(len(tensors)))
            if self._keys and len(keys) != len(self._keys):
                raise ValueError(f"grads: {len(keys)} tensors now, {len(self._keys)} before: pass the same "
                                 "gradient tensors every update")
        for g in tensors:
            if g.layout != torch.strided:
                raise ValueError(f"a gradient of shape {tuple(g.shape)} is sparse ({g.layout}), e.g. from "
                                 "nn.Embedding(sparse=True): use dense gradients (sparse=False) to measure it")
        return keys, tensors

    def _buffers(self, keys: tuple, tensors: list[Tensor]) -> list[Tensor]:
        "The window's buffers for these keys, created (zero: no gradient so far) for keys seen first."
        ids = tuple(k if isinstance(k, int) else id(k) for k in keys)
        if ids == self._last_keys:
            acc = self._last_acc
        else:
            acc = []
            for k, key_id, g in zip(keys, ids, tensors):
                i = self._keys.get(key_id)
                if i is None:
                    i = self._keys[key_id] = len(self._acc)
                    self._owners.append(k)
                    self._acc.append(torch.zeros_like(g, dtype=_acc_dtype(g)))
                acc.append(self._acc[i])
            self._last_keys, self._last_acc = ids, acc
        for a, g in zip(acc, tensors):
            if a.shape != g.shape:
                raise ValueError(f"a gradient's shape changed between updates ({tuple(a.shape)} -> {tuple(g.shape)}): "
                                 "measure the same tensors every update, or reset() first")
        return acc

    def _squared_norm(self, tensors: list[Tensor]) -> Tensor:
        "Σ |t|² on the device; zero when no parameter got a gradient in this batch."
        return squared_norm(tensors) if tensors else self._acc[0].new_zeros((), dtype=torch.float32)

    def update_norms(self, small_sq: float | Tensor, big_sq: float | Tensor, b_small: float,
                     b_big: float, grad_scale: float | Tensor | None = None) -> WindowEstimate | None:
        """Make one estimate from squared norms measured elsewhere, at the same weights.

        For feeders that see the small and the big batch at once instead of building the big
        batch from a window: per-example gradients (`b_small=1`, the batch is the big one) or
        the ranks of a distributed job (each rank's batch is small, the all-reduced one big).
        `small_sq` is the mean |g|² over the small batches (b_small their harmonic-mean size),
        `big_sq` is |mean g|² of the big batch (all from one epoch). A step whose norms are not
        finite is skipped (None, counted in `n_skipped`). Reading the two norms is one host sync
        per call, which is one per estimate, as `update` makes.

        `grad_scale` is the loss scale the gradients carried (mixed precision), divided out of both
        norms; a step whose norms overflowed is skipped, as `GradScaler` skips it.
        """
        if not (b_big > b_small >= 1):
            raise ValueError(f"need b_big > b_small >= 1, got b_small={b_small!r}, b_big={b_big!r}")
        if self._count:
            raise RuntimeError("update_norms cannot be mixed with update inside a window")
        loss_scale = loss_scale_of(grad_scale)
        small, big = float(small_sq) / loss_scale**2, float(big_sq) / loss_scale**2
        if not (math.isfinite(small) and math.isfinite(big)):  # this step alone is left out
            self.n_skipped += 1
            return None
        return self._estimate(small, big, float(b_small), float(b_big), 1.0, 1)

    def _count_overflowed_micro_batch(self) -> None:
        self._count += 1
        if self._count == self.n_batch:  # the cycle is over: drop it, as GradScaler drops its step
            self.n_skipped += 1
            self.n_dropped += 1
            self._start_window()

    def _start_window(self) -> None:
        torch._foreach_zero_(self._acc)
        self._sqs = []
        self._zero_window_counts()
        self._window_done = self._overflowed = self._dropped = False

    def _finish_window(self, checked: bool) -> WindowEstimate | None:
        "The window's estimate, or None when a small batch in it (found only now, unless `checked`) was not finite."
        b_small = self._count / self._inv_bs
        b_big = self._w_sum**2 / self._w2_over_b  # Σ b_i when the weights are the batch sizes
        epoch_share = sum((w / self._w_sum) ** 2 for w in self._epoch_w.values())
        big_sq = piece_norms(self._acc).double().square().sum()
        big_sq = big_sq / (self._w_sum * (self._loss_scale if self.accumulated else 1.0)) ** 2
        *small_sqs, big_sq = torch.cat([torch.stack(self._sqs).double(), big_sq.view(1)]).tolist()  # the one sync
        self._window_done = True
        finite = tuple(math.isfinite(sq) for sq in small_sqs)  # a checked batch joined the window only if finite
        if not checked:
            self._last_finite = finite
        if not all(finite):  # found after it joined the big batch: the whole window is lost
            self.n_skipped += finite.count(False)
            self.n_dropped += 1
            self._dropped = True
            return None
        return self._estimate(sum(small_sqs) / self._count, big_sq, b_small, b_big, epoch_share, self._count)

    def _estimate(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float,
                  epoch_share: float, weight: int) -> WindowEstimate:
        """The two unbiased estimators (with the finite-population terms when n_train is set), folded into the EMAs.

        `weight` is the window's small batches: a window `n_batch` was widened for counts for more.
        """
        c_small, c_big = self._variance_factor(b_small, 1.0), self._variance_factor(b_big, epoch_share)
        if c_small - c_big > 1e-12 * c_small:
            noise = (g_small_sq - g_big_sq) / (c_small - c_big)
            scale = (c_small * g_big_sq - c_big * g_small_sq) / (c_small - c_big)
        else:  # every small batch is the whole dataset: no sampling noise to measure
            noise = scale = math.nan
        self.last = WindowEstimate(noise=noise, scale=scale, b_small=b_small, b_big=b_big, n_small=weight)
        if not (math.isfinite(noise) and math.isfinite(scale)):
            self.n_skipped += 1  # an overflow must not poison the EMAs
            return self.last
        self._ema_noise = self.beta * self._ema_noise + weight * noise
        self._ema_scale = self.beta * self._ema_scale + weight * scale
        self._ema_weight = self.beta * self._ema_weight + weight
        self.n_estimates += 1
        return self.last

    def _variance_factor(self, b: float, epoch_share: float) -> float:
        "E|g_B|² = |G|² + tr(Σ)·c: c = 1/B from an infinite population, (N/B − f)/(N − 1) from N examples."
        n = self.n_train
        if not n or n == 1:
            return 1.0 / b
        return (n / b - epoch_share) / (n - 1)

    def big_batch_grads(self) -> dict[Hashable, Tensor]:
        """The completed window's big-batch mean gradient, by parameter (or position, for raw gradients).

        Valid until the next `update`; the engine copies it into `.grad` to take one optimizer
        step per window at fixed weights. A parameter no batch of the window used is left out.
        """
        if not self._window_done or self._dropped:
            raise RuntimeError("big_batch_grads is only available right after a window completes with an estimate")
        big = torch._foreach_div(self._acc, self._w_sum * (self._loss_scale if self.accumulated else 1.0))
        return dict(zip(self._owners, big))

    def _smoothed(self, ema_sum: float) -> float:
        "A weighted sum over the sum of its weights: the bias-corrected EMA (beta < 1) or the plain mean (beta = 1)."
        return ema_sum / self._ema_weight if self.n_estimates else math.nan

    @property
    def noise(self) -> float:
        "Smoothed tr(Σ), the per-example gradient variance (NaN before the first window)."
        return self._smoothed(self._ema_noise)

    @property
    def scale(self) -> float:
        "Smoothed |G|², the squared norm of the true gradient (NaN before the first window)."
        return self._smoothed(self._ema_scale)

    @property
    def noise_scale(self) -> float:
        "EMA(noise) / EMA(scale): the simple noise scale B_simple (NaN before the first window)."
        if self.n_estimates == 0 or self._ema_scale == 0:
            return math.nan
        return self._ema_noise / self._ema_scale

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_batch={self.n_batch}, beta={self.beta}, "
                f"estimates={self.n_estimates}, noise_scale={self.noise_scale:.4g})")


def _is_int(x: object) -> bool:
    "An integer, numpy's included, but not a bool."
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_batch_size(batch_size: object, meaning: str = "examples the gradient averages over") -> None:
    "A ValueError unless `batch_size` is a positive integer (numpy's included, bools not)."
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer ({meaning}), got {batch_size!r}")


def _acc_dtype(g: Tensor) -> torch.dtype:
    "Accumulate half-precision gradients in float32; keep float32/float64 as they are."
    return torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
