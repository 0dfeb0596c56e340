"""Optimizer construction from flags: AdamW, schedules with warmup, clipping, accumulation.

Defense transformations (optax `GradientTransformationExtraArgs`) are chained *before* the
optimizer, so they see raw gradients and may call the gradient oracle passed as extra args:

    optax.chain(*defense_transforms, MultiSteps(chain(clip, adamw(schedule)), k))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import optax

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    total_steps: int = 1000
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = None
    accumulation_steps: int = 1

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.total_steps < 1 or self.accumulation_steps < 1:
            raise ValueError("total_steps and accumulation_steps must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def make_schedule(c: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 over w = ⌈total_steps · warmup_ratio⌉ optimizer updates, then the
    schedule over the remaining total_steps − w: HF Trainer's `get_scheduler(..., w, total)`
    with w from `TrainingArguments.get_warmup_steps` (which rounds up)."""
    warmup = math.ceil(c.total_steps * c.warmup_ratio)
    decay_steps = max(c.total_steps - warmup, 1)
    if c.schedule == "constant":
        main = optax.constant_schedule(c.learning_rate)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(c.learning_rate, decay_steps)
    else:
        main = optax.linear_schedule(c.learning_rate, 0.0, decay_steps)
    if not warmup:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.learning_rate, warmup), main], [warmup]
    )


def make_optimizer(
    c: OptimizerConfig, pre: Sequence[optax.GradientTransformation] = ()
) -> optax.GradientTransformationExtraArgs:
    """`pre` (defense transforms) → [clip → AdamW(schedule)] accumulated over k micro-steps.

    The defenses sit outside the accumulation so each micro-batch's defended gradient is
    accumulated (inside `MultiSteps` only the last micro-step's defense term would survive).
    """
    adamw = optax.adamw(make_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps,
                        weight_decay=c.weight_decay)
    inner = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), adamw) if c.max_grad_norm \
        else adamw
    if c.accumulation_steps > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=c.accumulation_steps)
    return optax.chain(*pre, inner)
