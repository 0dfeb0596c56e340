"""Lisa: lazy safety alignment, bi-state optimization with proximal anchors.

Tiansheng Huang, Sihao Hu, Fatih Ilhan, Selim Furkan Tekin, Ling Liu. "Lisa: Lazy Safety
Alignment for Large Language Models against Harmful Fine-tuning Attack". NeurIPS 2024,
arXiv:2405.18641 (git-disl/Lisa).

Steps alternate between an alignment state (K_a steps on the "align" batch, loss f) and a
fine-tune state (K_f steps on the "user" batch, loss g), starting in the alignment state:

    step t is in the alignment state  ⇔  t mod (K_a + K_f) < K_a
    on entering a state at t > 0:       anchor of the state being left ← θ_t
    alignment state:  ∇[f + (ρ/2)‖θ − θ_ft‖²] = ∇f + ρ (θ − θ_ft)
    fine-tune state:  ∇[g + (ρ/2)‖θ − θ_al‖²] = ∇g + ρ (θ − θ_al)

Both anchors start at θ_0. One optimizer state and schedule are shared; the proximal gradient
is added before Adam. The official code applies the proximal term only on the steps t with
t > 0.1 · total (`trainer.py:183-193`, counting from 1): `proximal_warmup=0.1` does exactly that
(the term from step ⌊0.1 · total⌋ + 1, given the run's `total_steps`, which the pipeline
passes); `proximal_after` starts it at a fixed step; the default (both 0) is from the start, as
in the paper's equations.

The phase clock t and both anchors live in `LisaState`. hfjax's train step reads the phase
from that state (`phase_index`) to pick its primary batch (an elementwise select of
same-shaped batches, else `lax.switch`: 1F+1B); in a plain user loop, pick the batch with
`in_alignment(t, K_a, K_f)`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import optax

from hfjax.defenses.api import (
    ALIGN,
    UPDATE_CALL,
    USER,
    Cost,
    DefenseError,
    Hints,
    StepOptions,
    register,
)

PAPER = ("Huang, Hu, Ilhan, Tekin, Liu. Lisa: Lazy Safety Alignment for Large Language Models "
         "against Harmful Fine-tuning Attack. NeurIPS 2024, arXiv:2405.18641")


class LisaState(NamedTuple):
    count: jax.Array  # the phase clock: steps taken so far
    anchor_align: optax.Params  # θ when the alignment state was last left
    anchor_finetune: optax.Params  # θ when the fine-tune state was last left


def in_alignment(count, align_steps: int, finetune_steps: int):
    """Whether step `count` is in the alignment state: count mod (K_a + K_f) < K_a."""
    return (count % (align_steps + finetune_steps)) < align_steps


def phase_index(opt_state, align_steps: int, finetune_steps: int) -> jax.Array:
    """0 (alignment: "align" batch) or 1 (fine-tune: "user") for the next update, read from the
    one `LisaState` inside an optimizer state (chains and MultiSteps included)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LisaState))
             if isinstance(s, LisaState)]
    if len(found) != 1:
        raise DefenseError(f"expected one Lisa state in the optimizer state, found {len(found)}")
    return jnp.where(in_alignment(found[0].count, align_steps, finetune_steps), 0, 1)


def _options(rho: float, align_steps: int, finetune_steps: int, proximal_after: int,
             proximal_warmup: float) -> StepOptions:
    return StepOptions(primary=(ALIGN, USER),
                       primary_phase=functools.partial(phase_index, align_steps=align_steps,
                                                       finetune_steps=finetune_steps))


@register("lisa", stage="finetune", level="gradient", cost=Cost(1, 1), batches=(ALIGN, USER),
          paper=PAPER, options=_options)
def lisa(rho: float = 1.0, align_steps: int = 100, finetune_steps: int = 900,
         proximal_after: int = 0, proximal_warmup: float = 0.0, *,
         total_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
    """Adds ρ (θ − anchor of the other state) to the gradient of the current state's batch.

    The incoming gradient must be ∇f on "align" in the alignment state and ∇g on "user" in the
    fine-tune state (hfjax's step does this with `step_options("lisa")`). `total_steps`: the
    run's optimizer steps, needed by `proximal_warmup` (a run input, not a hyper-parameter).
    """
    if not rho >= 0 or align_steps < 0 or finetune_steps < 0 or align_steps + finetune_steps < 1:
        raise DefenseError(f"Lisa needs rho >= 0 and step counts >= 0 with K_a + K_f >= 1, got "
                           f"rho={rho}, align_steps={align_steps}, finetune_steps={finetune_steps}")
    if proximal_after < 0:
        raise DefenseError(f"Lisa's proximal_after must be >= 0, got {proximal_after}")
    if not 0.0 <= proximal_warmup < 1.0:
        raise DefenseError(f"Lisa's proximal_warmup must be in [0, 1), got {proximal_warmup}")
    if proximal_warmup:
        if proximal_after:
            raise DefenseError("give Lisa proximal_after or proximal_warmup, not both")
        if total_steps is None:
            raise DefenseError("Lisa's proximal_warmup needs the run's total_steps")
        proximal_after = math.floor(proximal_warmup * total_steps) + 1

    def init_fn(params: optax.Params) -> LisaState:
        return LisaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params),
                         jax.tree.map(jnp.copy, params))

    def update_fn(updates, state: LisaState, params=None, *, loss_fn=None, batches=None,
                  rng=None, **hints: Unpack[Hints]):
        del loss_fn, batches, rng, hints
        if params is None:
            raise DefenseError(f"lisa needs params θ: {UPDATE_CALL}")
        t = state.count
        align_now = in_alignment(t, align_steps, finetune_steps)
        align_before = in_alignment(t - 1, align_steps, finetune_steps)
        switched = (t > 0) & (align_now != align_before)
        anchor_align = optax.tree.where(switched & align_before, params, state.anchor_align)
        anchor_finetune = optax.tree.where(switched & ~align_before, params,
                                           state.anchor_finetune)
        other = optax.tree.where(align_now, anchor_finetune, anchor_align)
        coef = jnp.where(t >= proximal_after, rho, 0.0)
        updates = jax.tree.map(lambda g, p, a: g + coef * (p - a), updates, params, other)
        return updates, LisaState(t + 1, anchor_align, anchor_finetune)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
