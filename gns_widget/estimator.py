"""The gradient-noise-scale math (McCandlish et al. 2018, appendix A.1).

`NoiseScaleEstimator` is fed one small-batch mean gradient at a time. Over a window of
`n_batch` of them it keeps a single running sum (memory O(parameters), independent of
`n_batch`) and a scalar sum of squared norms, then applies the paper's two unbiased
estimators. It knows nothing of training loops, optimizers, fastai or widgets.

Unequal batch sizes are exact, not approximated: with small batches of sizes b_i,
E|g_i|² = |G|² + tr(Σ)/b_i, so the mean of |g_i|² behaves like one batch of the
harmonic-mean size, and the example-weighted sum Σ b_i g_i / Σ b_i is the big batch.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["NoiseScaleEstimator", "WindowEstimate", "gradients_of", "loss_scale_of", "piece_norms", "squared_norm"]


@dataclass(frozen=True)
class WindowEstimate:
    "One unsmoothed estimate from a completed window of small batches."
    noise: float  # tr(Σ) estimate
    scale: float  # |G|² estimate
    b_small: float  # harmonic mean of the small batch sizes
    b_big: float  # examples in the window (its effective size when micro-batches are weighted unequally)


def gradients_of(grads_or_params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    """The gradient tensors to measure, read where they live (no copies).

    Accepts a module, its parameters (their `.grad` is used) or gradient tensors.
    Parameters without a gradient (unused in this step) are skipped.
    """
    items = grads_or_params.parameters() if isinstance(grads_or_params, nn.Module) else grads_or_params
    grads = []
    for t in items:
        if t.requires_grad:  # a parameter, not a gradient
            if t.grad is not None:
                grads.append(t.grad)
        else:
            grads.append(t)
    return grads


class NoiseScaleEstimator:
    """Estimate the gradient noise scale B_simple = tr(Σ)/|G|² from consecutive small batches.

    Shaped like a torchmetrics `Metric`: call `update` after each backward pass (before
    gradient clipping or the optimizer step), read `noise`, `scale` and `noise_scale`,
    and `reset` to start over. Every `n_batch` updates one raw estimate is made and
    folded into bias-corrected EMAs with decay `beta`; `noise_scale` is the ratio of the
    two EMAs (a ratio of averages: single raw estimates are noisy and can be negative).

    `n_train`: the training set size when a window's small batches are drawn without
    replacement from it (a shuffled epoch). Then E|G_b|² = |G|² + tr(Σ)/b·(1 − b/N): the noise
    formula stays unbiased but the scale formula comes out low by tr(Σ)/N, which inflates the
    noise scale by 1/(1 − B_simple/N) on small datasets. Giving `n_train` adds that term back.

    `accumulated=True` is for gradient accumulation: the gradients are *not* zeroed between
    micro-batches, so each `update` sees the running sum, and the micro-batches are the small
    batches while the accumulated gradient is the big one. The window must be the accumulation
    cycle (`n_batch` = accumulation steps, `update` after every micro-batch's backward). The same
    single buffer then holds the previous running sum, so memory stays O(parameters).
    """

    def __init__(self, n_batch: int = 20, beta: float = 0.99, n_train: int | None = None,
                 accumulated: bool = False):
        self.check_args(n_batch, beta, n_train)
        self.n_batch, self.beta, self.n_train, self.accumulated = n_batch, float(beta), n_train, accumulated
        self.reset()

    @staticmethod
    def check_args(n_batch: int, beta: float, n_train: int | None = None) -> None:
        "Raise a ValueError naming the bad argument and its accepted range."
        if not isinstance(n_batch, int) or isinstance(n_batch, bool) or n_batch < 2:
            raise ValueError(f"n_batch must be an integer >= 2 (small batches per estimate), got {n_batch!r}")
        if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
            raise ValueError(f"beta must be in [0, 1) (EMA decay; 0.99 is typical), got {beta!r}")
        if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
            raise ValueError(f"n_train must be a positive integer or None, got {n_train!r}")

    def reset(self) -> None:
        "Forget everything: the current window and the EMAs."
        self._acc: list[Tensor] | None = None  # Σ w_i g_i over the window, one buffer per gradient
        self._sq: Tensor | None = None  # Σ |g_i|², kept on the device: no host sync per step
        self._zero_window_counts()
        self._window_done = self._overflowed = False
        self._loss_scale = 1.0  # the scale the accumulated running sum carries (mixed precision)
        self._ema_noise = self._ema_scale = 0.0
        self.n_estimates = 0
        self.n_skipped = 0  # batches (or accumulation cycles) whose gradients or estimate were not finite
        self.last: WindowEstimate | None = None

    def _zero_window_counts(self) -> None:
        # small batches, Σ 1/b_i (B_small is their harmonic mean), Σ w_i and Σ w_i²/b_i (B_big = (Σw)²/Σ(w²/b))
        self._count, self._inv_bs, self._w_sum, self._w2_over_b = 0, 0.0, 0.0, 0.0

    def update(self, grads_or_params: nn.Module | Iterable[Tensor], batch_size: int,
               weight: float | None = None, grad_scale: float | Tensor | None = None) -> WindowEstimate | None:
        """Add one small batch's mean gradient; return the raw estimate when a window completes.

        `batch_size` is the number of examples the gradient averages over. The loss must be a
        mean over the batch (the PyTorch and fastai default), not a sum. With `accumulated=True`,
        `weight` is the factor this micro-batch's loss was multiplied by before backward
        (default 1/n_batch, i.e. `loss / accumulation_steps`; fastai's `GradientAccumulation`
        uses batch_size / n_acc). Without accumulation, small batches are weighted by their size.

        `grad_scale` is for mixed precision: the loss scale the gradients still carry when read
        before `GradScaler.unscale_` (pass `scaler.get_scale()`). Each update is divided by its
        own scale, so a scale that changes between steps does not bias the estimate, and a batch
        whose gradients overflowed (the scaler skips that step) is skipped here too; with
        accumulation the whole cycle is dropped, as its step is. This costs one host sync per
        update, as `GradScaler.step` does anyway.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if weight is not None and not self.accumulated:
            raise ValueError("weight only applies with accumulated=True (gradient accumulation)")
        if weight is not None and not weight > 0:
            raise ValueError(f"weight must be positive, got {weight!r}")
        loss_scale = loss_scale_of(grad_scale)
        grads = gradients_of(grads_or_params)
        if not grads:
            raise ValueError("no gradients to measure: call update after loss.backward() "
                             "on a model with trainable parameters")
        if self._window_done:
            self._start_window()
        if self._acc is None:
            self._acc = [torch.zeros_like(g, dtype=_acc_dtype(g)) for g in grads]
            self._sq = torch.zeros((), device=grads[0].device)
        elif len(self._acc) != len(grads):
            raise ValueError("the set of gradients changed inside a window: measure the same parameters every step")
        if self._acc[0].dtype != grads[0].dtype:  # low-precision grads against a float32 buffer
            grads = [g.to(a.dtype) for a, g in zip(self._acc, grads)]
        check_finite = grad_scale is not None
        if self.accumulated:
            w = 1.0 / self.n_batch if weight is None else float(weight)
            if not self._overflowed:
                torch._foreach_sub_(self._acc, grads)  # previous running sum − current = −w·g_i (times the scale)
                sq = squared_norm(self._acc) / (w * loss_scale) ** 2
                torch._foreach_copy_(self._acc, grads)  # the running sum, for the next micro-batch
                self._overflowed = check_finite and not torch.isfinite(sq).item()
            if self._overflowed:  # the running sum is lost for the rest of this cycle
                return self._count_overflowed_micro_batch()
            self._loss_scale = loss_scale  # constant within a cycle: GradScaler changes it after the step
        else:
            w = float(batch_size)
            sq = squared_norm(grads) / loss_scale**2
            if check_finite and not torch.isfinite(sq).item():
                self.n_skipped += 1
                return None
            torch._foreach_add_(self._acc, grads, alpha=batch_size / loss_scale)
        self._sq += sq
        self._count += 1
        self._inv_bs += 1.0 / batch_size
        self._w_sum += w
        self._w2_over_b += w * w / batch_size
        return self._finish_window() if self._count == self.n_batch else None

    def update_norms(self, small_sq: float | Tensor, big_sq: float | Tensor, b_small: float,
                     b_big: float, grad_scale: float | Tensor | None = None) -> WindowEstimate | None:
        """Make one estimate from squared norms measured elsewhere, at the same weights.

        For feeders that see the small and the big batch at once instead of building the big
        batch from a window: per-example gradients (`b_small=1`, the batch is the big one) or
        the ranks of a distributed job (each rank's batch is small, the all-reduced one big).
        `small_sq` is the mean |g|² over the small batches (b_small their harmonic-mean size),
        `big_sq` is |mean g|² of the big batch. A non-finite estimate is returned but kept out of
        the EMAs (and counted in `n_skipped`), as in `update`.

        `grad_scale` is the loss scale the gradients carried (mixed precision), divided out of both
        norms; with it, a step whose norms overflowed is skipped (None), as `GradScaler` skips it.
        """
        if not (b_big > b_small >= 1):
            raise ValueError(f"need b_big > b_small >= 1, got b_small={b_small!r}, b_big={b_big!r}")
        if self._count:
            raise RuntimeError("update_norms cannot be mixed with update inside a window")
        loss_scale = loss_scale_of(grad_scale)
        small, big = float(small_sq) / loss_scale**2, float(big_sq) / loss_scale**2
        if grad_scale is not None and not (math.isfinite(small) and math.isfinite(big)):
            self.n_skipped += 1
            return None
        return self._estimate(small, big, float(b_small), float(b_big))

    def _count_overflowed_micro_batch(self) -> None:
        self._count += 1
        if self._count == self.n_batch:  # the cycle is over: drop it, as GradScaler drops its step
            self.n_skipped += 1
            self._start_window()

    def _start_window(self) -> None:
        torch._foreach_zero_(self._acc)
        self._sq.zero_()
        self._zero_window_counts()
        self._window_done = self._overflowed = False

    def _finish_window(self) -> WindowEstimate | None:
        b_small = self._count / self._inv_bs
        b_big = self._w_sum**2 / self._w2_over_b  # Σ b_i when the weights are the batch sizes
        # One host sync per window: the big-batch norm and the summed small-batch norms.
        big_sq = piece_norms(self._acc).double().square().sum()
        big_sq = big_sq / (self._w_sum * (self._loss_scale if self.accumulated else 1.0)) ** 2
        self._window_done = True
        return self._estimate((self._sq.double() / self._count).item(), big_sq.item(), b_small, b_big)

    def _estimate(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> WindowEstimate:
        "The paper's two unbiased estimators, folded into the EMAs."
        scale = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
        noise = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
        if self.n_train:  # finite-population correction for sampling without replacement
            scale += noise / self.n_train
        self.last = WindowEstimate(noise=noise, scale=scale, b_small=b_small, b_big=b_big)
        if not (math.isfinite(noise) and math.isfinite(scale)):
            self.n_skipped += 1  # an overflow must not poison the EMAs
            return self.last
        self._ema_noise = self.beta * self._ema_noise + (1 - self.beta) * noise
        self._ema_scale = self.beta * self._ema_scale + (1 - self.beta) * scale
        self.n_estimates += 1
        return self.last

    def big_batch_grads(self) -> list[Tensor]:
        """The completed window's big-batch mean gradient, one tensor per gradient.

        Valid until the next `update`; the engine copies it into `.grad` to take one
        optimizer step per window at fixed weights, without a second buffer.
        """
        if not self._window_done:
            raise RuntimeError("big_batch_grads is only available right after a window completes")
        return torch._foreach_div(self._acc, self._w_sum * (self._loss_scale if self.accumulated else 1.0))

    def _debias(self, ema: float) -> float:
        if self.n_estimates == 0:
            return math.nan
        return ema / (1 - self.beta**self.n_estimates)

    @property
    def noise(self) -> float:
        "Smoothed tr(Σ), the per-example gradient variance (NaN before the first window)."
        return self._debias(self._ema_noise)

    @property
    def scale(self) -> float:
        "Smoothed |G|², the squared norm of the true gradient (NaN before the first window)."
        return self._debias(self._ema_scale)

    @property
    def noise_scale(self) -> float:
        "EMA(noise) / EMA(scale): the simple noise scale B_simple (NaN before the first window)."
        if self.n_estimates == 0 or self._ema_scale == 0:
            return math.nan
        return self._ema_noise / self._ema_scale

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_batch={self.n_batch}, beta={self.beta}, "
                f"estimates={self.n_estimates}, noise_scale={self.noise_scale:.4g})")


def loss_scale_of(grad_scale: float | Tensor | None) -> float:
    "The loss scale gradients carry (1 without mixed precision); a ValueError unless finite and positive."
    scale = 1.0 if grad_scale is None else float(grad_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"grad_scale must be a finite positive number (scaler.get_scale()), got {grad_scale!r}")
    return scale


_CPU_PIECE = 1 << 16  # elements per piece when norming long tensors on the CPU (see piece_norms)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def piece_norms(tensors: list[Tensor]) -> Tensor:
    """2-norms whose squares add up to Σ |t|² accurately, stacked on the tensors' device (no host sync).

    Half-precision tensors are normed in float32. On the CPU a float32 norm adds each vector lane
    up sequentially, so its relative error grows with the length: 7e-4 at 10M elements, which the
    cancellation in the |G|² estimate multiplies by about B_simple/B_small. Long tensors are
    therefore normed in 64k-element pieces there (error about 3e-7, for 1.5x the time of one
    norm). GPU reductions are trees, accurate at any length: no split.
    """
    if tensors and tensors[0].device.type == "cpu":
        tensors = [p for t in tensors for p in (t.reshape(-1).split(_CPU_PIECE) if t.numel() > _CPU_PIECE else (t,))]
    low = [t for t in tensors if t.dtype in _LOW_PRECISION]
    rest = [t for t in tensors if t.dtype not in _LOW_PRECISION]
    parts = [torch.stack(torch._foreach_norm(low, 2, dtype=torch.float32))] if low else []
    parts += [torch.stack(torch._foreach_norm(rest))] if rest else []
    return torch.cat(parts)  # promotes to the wider dtype when both kinds are there


def squared_norm(tensors: list[Tensor]) -> Tensor:
    "Σ |t|² over a list of tensors, as one float32 scalar on their device (no host sync); see `piece_norms`."
    return piece_norms(tensors).float().square().sum()


def _acc_dtype(g: Tensor) -> torch.dtype:
    "Accumulate half-precision gradients in float32; keep float32/float64 as they are."
    return torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
