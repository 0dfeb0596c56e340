"""Vaccine: perturbation-aware alignment, and its random-perturbation variant.

Tiansheng Huang, Sihao Hu, Ling Liu. "Vaccine: Perturbation-aware Alignment for Large Language
Models against Harmful Fine-tuning Attack". NeurIPS 2024, arXiv:2402.01109 (git-disl/Vaccine).

With a_l the attention module's output of layer l (o_proj's, before Gemma 2's post-attention
norm and the residual add: where the official code's forward hook adds ε) and f the alignment
loss on the "align" batch:

    G_l = ∂f/∂a_l (θ; ε = 0)                 pass 1 (parameter gradients unused)
    ε_l = ρ · G_l / (‖G‖ + 1e-7)             ‖G‖: the global norm over all layers
    g   = ∇θ f(θ; a_l + sg(ε_l))             pass 2: the update direction (replaces the input)

Random Vaccine (the paper's ablation) draws ε_l ~ N(0, ρ I) instead and needs one pass.
G and ε are computed in max(model dtype, float32); the random ε is drawn in float32.

Cost in hfjax's train step: Vaccine 2F+2B (`activation_grads`: the step's own backward on the
"align" batch returns G as the hint `perturb_grads`, so pass 1 is free); random Vaccine 1F+1B
(`primary_perturb`: the step's own pass runs at a_l + ε, ε drawn from the step's `rng`, and
hands ε on as the hint `perturbation`, so the transform has nothing left to do). In a plain user
loop neither hint is passed and the transforms compute pass 1 / the perturbed pass themselves
from `loss_fn`, `batches["align"]` (and `rng` for the random variant): the same update. Both
replace the incoming gradient: put them first.
"""

from __future__ import annotations

import functools
from typing import Unpack

import jax
import jax.numpy as jnp
import optax

from hfjax import gaussian
from hfjax.defenses.api import (
    ALIGN,
    Cost,
    DefenseError,
    Hints,
    StepOptions,
    captures,
    check_update,
    register,
)
from hfjax.models.config import at_least_float32

PAPER = ("Huang, Hu, Liu. Vaccine: Perturbation-aware Alignment for Large Language Models "
         "against Harmful Fine-tuning Attack. NeurIPS 2024, arXiv:2402.01109")


def vaccine_perturbation(perturb_grads: jax.Array, rho: float) -> jax.Array:
    """ε = ρ · G / (‖G‖ + 1e-7) with one global norm over all layers [L, B, T, D]."""
    return rho * perturb_grads / (optax.tree.norm(perturb_grads) + 1e-7)


def random_perturbation(rng: jax.Array, shape: tuple[int, ...], rho: float) -> jax.Array:
    """ε ~ N(0, ρ I) of the given [L, B, T, D] shape (standard deviation √ρ), float32, drawn
    with `gaussian.standard_normal` (two samples per Threefry block)."""
    return jnp.sqrt(rho) * gaussian.standard_normal(rng, shape)


def perturb_spec(loss_fn, params, batch: dict) -> jax.ShapeDtypeStruct:
    """ε's [L, B, T, D] shape (the attention outputs' for `batch`) and dtype, max(their dtype,
    float32) (traced, never run)."""
    _, aux = jax.eval_shape(lambda: loss_fn(params, batch, capture=("attn_out",)))
    a = captures(aux, ("attn_out",), "vaccine")["attn_out"]
    return jax.ShapeDtypeStruct(a.shape, at_least_float32(a.dtype))


def _grad_at(loss_fn, params, batch: dict, eps: jax.Array):
    """∇θ f(θ; a_l + sg(ε_l)): one forward and one backward."""
    eps = jax.lax.stop_gradient(eps)
    return jax.grad(lambda p: loss_fn(p, batch, perturb=eps)[0])(params)


def _check_rho(rho: float) -> None:
    if not rho >= 0:
        raise DefenseError(f"Vaccine's rho must be >= 0, got {rho}")


def _vaccine_options(rho: float) -> StepOptions:
    return StepOptions(primary=ALIGN, activation_grads=True)


@register("vaccine", stage="alignment", level="gradient", cost=Cost(2, 2), batches=(ALIGN,),
          paper=PAPER, options=_vaccine_options)
def vaccine(rho: float = 2.0) -> optax.GradientTransformationExtraArgs:
    """Vaccine's update direction ∇θ f(θ; a + ε), ε = ρ G/(‖G‖ + 1e-7) (see the module doc).

    Reads loss_fn and batches["align"]; the hint perturb_grads = G saves pass 1.
    """
    _check_rho(rho)

    def update_fn(updates, state, params=None, *, loss_fn=None, batches=None, rng=None,
                  **hints: Unpack[Hints]):
        del updates, rng
        check_update("vaccine", params, loss_fn, batches, (ALIGN,))
        batch = batches[ALIGN]
        perturb_grads = hints.get("perturb_grads")
        if perturb_grads is None:
            spec = perturb_spec(loss_fn, params, batch)
            zeros = jnp.zeros(spec.shape, spec.dtype)
            perturb_grads = jax.grad(lambda e: loss_fn(params, batch, perturb=e)[0])(zeros)
        return _grad_at(loss_fn, params, batch, vaccine_perturbation(perturb_grads, rho)), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _random_options(rho: float) -> StepOptions:
    return StepOptions(primary=ALIGN,
                       primary_perturb=functools.partial(random_perturbation, rho=rho))


@register("random_vaccine", stage="alignment", level="gradient", cost=Cost(1, 1),
          batches=(ALIGN,), paper=PAPER + " (random-perturbation ablation)",
          options=_random_options)
def random_vaccine(rho: float = 2.0) -> optax.GradientTransformationExtraArgs:
    """∇θ f(θ; a + ε) with ε ~ N(0, ρ I) drawn from `rng`.

    With the hint `perturbation` (hfjax's step already ran its pass at a + ε, ε drawn from the
    same `rng`), the incoming gradient is that gradient and passes through unchanged.
    """
    _check_rho(rho)

    def update_fn(updates, state, params=None, *, loss_fn=None, batches=None, rng=None,
                  **hints: Unpack[Hints]):
        if hints.get("perturbation") is not None:
            return updates, state
        check_update("random_vaccine", params, loss_fn, batches, (ALIGN,))
        if rng is None:
            raise DefenseError("random_vaccine needs the extra arg rng (a jax.random key)")
        batch = batches[ALIGN]
        eps = random_perturbation(rng, perturb_spec(loss_fn, params, batch).shape, rho)
        return _grad_at(loss_fn, params, batch, eps), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)
