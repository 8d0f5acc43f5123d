"""The learning-rate rules the advice scales the lr by when the batch size changes.

The paper's step size ε(B) ∝ 1/(1 + B_noise/B) (AdaScale's gain) gives the factor for plain SGD; with momentum
or an Adam-like optimizer the square root of it (`advice.detect_rule` tells which an optimizer follows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RULES", "check_rule", "lr_factor", "LRAdvice"]

RULES = ("sgd", "momentum", "adam")  # lr rules: linear for plain SGD, square root with momentum or adaptive steps


def check_rule(rule: object) -> None:
    "A ValueError unless `rule` is one of RULES."
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))} (or None to detect it from the "
                         f"optimizer), got {rule!r}")


def lr_factor(old_bs: int, new_bs: int, noise_scale: float, rule: str = "sgd") -> float:
    """The paper's ε(new_bs)/ε(old_bs), ε(B) ∝ 1/(1 + B_noise/B) (AdaScale's gain): as is for plain SGD, its square
    root with momentum or for Adam-like optimizers."""
    check_rule(rule)
    if not (noise_scale > 0):
        raise ValueError(f"noise_scale must be positive to scale the learning rate, got {noise_scale!r}")
    ratio = (1 + noise_scale / old_bs) / (1 + noise_scale / new_bs)
    return ratio if rule == "sgd" else math.sqrt(ratio)


@dataclass(frozen=True)
class LRAdvice:
    "The deprecated `GNSResult.lr_advice`'s answer: the learning-rate part of `advice()`."
    lr: float | slice  # a slice for a slice of discriminative lrs
    factor: float
    rule: str  # "sgd" (linear) or "adam" (square root)
    text: str
