"""Optimizer construction from flags: AdamW, schedules with warmup, clipping, accumulation.

Defense transformations (optax `GradientTransformationExtraArgs`) are chained *before* the
optimizer, so they see raw gradients and may call the gradient oracle passed as extra args:

    optax.chain(*defense_transforms, MultiSteps(chain(clip, adamw(schedule)), k))

A transform that carries `wrap_optimizer(inner) -> transform` acts around everything chained
after it instead (`chain_around`): it sees the gradient first, may hand `inner` more extra args
and may change `inner`'s update (SaLoRA projects AdamW's update too; T-Vaccine hands it the
layers that train). `make_optimizer(c, layerwise=True)` builds the AdamW that reads those
layers, torch's AdamW on a model whose every layer of every LoRA module is its own parameter:

    clip (global norm) → [Adam moments and step count, weight decay: per layer slice of each
    leaf, skipped where the extra arg `trained` is False] → −lr(t) (t the global step)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
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


def chain_around(transforms: Sequence[optax.GradientTransformation],
                 optimizer: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(*transforms, optimizer)`, except that the first transform t_k carrying
    `wrap_optimizer(inner)` takes everything after it as `inner`:

        chain(t_1, …, t_{k−1}, t_k.wrap_optimizer(chain_around(t_{k+1}, …, optimizer)))

    With no such transform it is the plain chain (the same state tree)."""
    for k, t in enumerate(transforms):
        wrap = getattr(t, "wrap_optimizer", None)
        if wrap is not None:
            rest = transforms[k + 1:]
            return optax.chain(*transforms[:k],
                               wrap(chain_around(rest, optimizer) if rest else optimizer))
    return optax.chain(*transforms, optimizer)


def layerwise(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner` on every layer slice of every leaf (leaves stacked on a leading layer axis L, as
    LoRA's), each slice with its own state: torch's one parameter per layer and module.

    The extra arg `trained` (a pytree like the updates with an [L] bool per leaf; None: all)
    marks the slices that have a gradient; the others keep their state and get a zero update,
    as torch's optimizers skip a parameter whose `.grad` is None (no moment update, no weight
    decay, no step count). `inner` must act entry by entry (Adam's moments, decayed weights,
    a constant scale): it sees one slice at a time and no extra args.
    """
    def init_fn(params):
        return jax.tree.map(jax.vmap(inner.init), params)

    def update_fn(updates, state, params=None, *, trained=None, **extra):
        del extra
        grads, treedef = jax.tree.flatten(updates)
        states = treedef.flatten_up_to(state)
        thetas = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        masks = treedef.flatten_up_to(trained) if trained is not None else [None] * len(grads)

        def leaf(g, s, p, m):
            u, new = jax.vmap(inner.update)(g, s, p)
            if m is None:
                return u, new

            def keep(a, b):
                return jnp.where(jnp.reshape(m, m.shape + (1,) * (a.ndim - 1)), a, b)

            return keep(u, jnp.zeros_like(u)), jax.tree.map(keep, new, s)

        out = [leaf(*args) for args in zip(grads, states, thetas, masks, strict=True)]
        return (treedef.unflatten([u for u, _ in out]),
                treedef.unflatten([s for _, s in out]))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layerwise_adamw(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8,
                    weight_decay: float = 1e-4) -> optax.GradientTransformationExtraArgs:
    """`optax.adamw` (same defaults) with Adam's moments, step count (bias correction) and
    weight decay per layer slice of each leaf (`layerwise`: skipped where the extra arg
    `trained` is False) and the learning rate at the global step (torch's LambdaLR): torch's
    AdamW on one parameter per layer and module."""
    return optax.chain(
        layerwise(optax.chain(optax.scale_by_adam(b1, b2, eps),
                              optax.add_decayed_weights(weight_decay))),
        optax.scale_by_learning_rate(learning_rate))


def _forwarding(steps: optax.MultiSteps, name: str) -> optax.GradientTransformationExtraArgs:
    """`steps` (which `optax.chain` would hand no extra args) taking the extra arg `name` on to
    its inner optimizer."""
    def update_fn(updates, state, params=None, **extra):
        return steps.update(updates, state, params, **{name: extra.get(name)})

    return optax.GradientTransformationExtraArgs(steps.init, update_fn)


def make_optimizer(
    c: OptimizerConfig, pre: Sequence[optax.GradientTransformation] = (), *,
    layerwise: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """`pre` (defense transforms) → [clip → AdamW(schedule)] accumulated over k micro-steps,
    chained by `chain_around` (a transform in `pre` may wrap what follows it).

    The defenses sit outside the accumulation so each micro-batch's defended gradient is
    accumulated (inside `MultiSteps` only the last micro-step's defense term would survive).
    `layerwise`: AdamW's state per layer slice and the extra arg `trained` honoured
    (`layerwise_adamw`; the module docstring), handed through the accumulation.
    """
    schedule = make_schedule(c)
    if layerwise:
        adamw = layerwise_adamw(schedule, c.b1, c.b2, c.eps, c.weight_decay)
    else:
        adamw = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    inner = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), adamw) if c.max_grad_norm \
        else adamw
    if c.accumulation_steps > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=c.accumulation_steps)
        if layerwise:
            inner = _forwarding(inner, "trained")
    return chain_around(pre, inner)
