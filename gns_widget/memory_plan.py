"""How to train at a suggested batch size when only a smaller one fits: gradient accumulation.

Kept apart from `memory.py` (which probes the device) so that results can name a plan without
importing the prober.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MemoryPlan", "plan_batch"]


@dataclass(frozen=True)
class MemoryPlan:
    batch_size: int  # per optimizer micro-step: what fits on the device
    accumulation_steps: int  # micro-batches whose gradients are accumulated before each optimizer step
    effective_batch_size: int  # batch_size * accumulation_steps, ≥ the suggestion
    text: str


def plan_batch(suggested_bs: int, max_fit: int) -> MemoryPlan:
    """How to train at `suggested_bs` when only `max_fit` examples fit in one step.

    If it fits, use it as is. Otherwise take the fewest accumulation steps that can reach
    the suggestion, k = ceil(suggested / max_fit) (bigger micro-batches run faster), and
    the smallest per-step batch that reaches it in k steps, ceil(suggested / k): it is
    ≤ max_fit, and the effective batch exceeds the suggestion by fewer than k examples
    (by none when k divides it). 2048 with 768 fitting: 683 × 3 = 2049.
    """
    check_positive_int("suggested_bs", suggested_bs)
    check_positive_int("max_fit", max_fit)
    if suggested_bs <= max_fit:
        return MemoryPlan(suggested_bs, 1, suggested_bs,
                          f"noise scale suggests {suggested_bs}; it fits on the device in one step: "
                          f"use batch size {suggested_bs}")
    k = math.ceil(suggested_bs / max_fit)
    bs = math.ceil(suggested_bs / k)
    return MemoryPlan(bs, k, bs * k,
                      f"noise scale suggests {suggested_bs}; the device fits {max_fit} per step: use batch size "
                      f"{bs} with gradient accumulation {k} (effective {bs * k})")


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (a batch size), got {value!r}")
