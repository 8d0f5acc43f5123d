"""Mixed precision for a finder run: which autocast dtype to use, and float16's dynamic loss scale.

A Learner trained with `to_fp16()`/`to_bf16()` should be measured (and its memory probed) in the
precision it trains in. bfloat16 has float32's range and needs only autocast; float16 gradients
overflow, so the loss is scaled up and the scale managed as `torch.amp.GradScaler` does: halved
after an overflow (that batch is skipped), doubled after `growth_interval` good steps. The
estimator divides each batch by the scale it carried, so the changing scale biases nothing.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["AMP_DTYPES", "resolve_amp", "LossScale"]

AMP_DTYPES = (torch.float16, torch.bfloat16)


def resolve_amp(target: Any, amp: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of a run, or None for full precision.

    None follows a Learner's `MixedPrecision` callback (fp16 or bf16), else full precision;
    `torch.float32` forces full precision.
    """
    if amp is None:
        return _learner_amp(target)
    if amp == torch.float32:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be torch.float16, torch.bfloat16, torch.float32 (full precision) or None "
                         f"(a Learner's MixedPrecision, else full precision), got {amp!r}")
    return amp


def _learner_amp(target: Any) -> torch.dtype | None:
    for cb in getattr(target, "cbs", ()):
        mode = getattr(cb, "amp_mode", None)  # fastai's MixedPrecision
        if mode is not None:
            return torch.bfloat16 if str(getattr(mode, "value", mode)).lower() == "bf16" else torch.float16
    return None


class LossScale:
    "The loss scale of a float16 run (1 and inert otherwise), with GradScaler's default schedule."

    def __init__(self, enabled: bool, init: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.value = init if enabled else 1.0
        self.good_steps = 0

    @property
    def grad_scale(self) -> float | None:
        "The scale the next backward pass puts on the gradients, as the estimator takes it (None: unscaled)."
        return self.value if self.enabled else None

    def update(self, overflowed: bool) -> None:
        "After a step: halve the scale on an overflow, double it after `growth_interval` good steps."
        if not self.enabled:
            return
        if overflowed:
            self.value, self.good_steps = self.value / 2, 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.value, self.good_steps = self.value * 2, 0
