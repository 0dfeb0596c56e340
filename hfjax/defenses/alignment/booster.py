"""Booster: attenuating the harmful perturbation at alignment time.

Tiansheng Huang, Sihao Hu, Fatih Ilhan, Selim Furkan Tekin, Ling Liu. "Booster: Tackling Harmful
Fine-tuning for Large Language Models via Attenuating Harmful Perturbation". 2024 (ICLR 2025),
arXiv:2409.01586 (git-disl/Booster).

With f the alignment loss ("align" batch, the step's primary) and h the harmful loss ("harmful"):

    g_f  = ∇f(θ)                                  the incoming gradient (the step's own pass)
    g_h  = ∇h(θ)
    θ'   = θ − α · g_h / (‖g_h‖ + 1e-7)           one normalized harmful step (θ is not changed)
    g_h' = ∇h(θ')
    g    = g_f + λ (g_h − g_h')                   the update direction

i.e. gradient descent on f + λ (h(θ) − h(θ − α ∇h/‖∇h‖)), treating the step direction as constant.
Cost in hfjax's train step: 3F+3B (the step's pass on "align" + two harmful passes here).
The paper's perturbation-aware variant (step 4 done Vaccine-style) is
`optax.chain(vaccine(rho), booster(lam, alpha), adamw)`: Vaccine replaces g_f, Booster adds.
"""

from __future__ import annotations

from typing import Unpack

import jax
import optax

from hfjax.defenses.api import (
    ALIGN,
    HARMFUL,
    Cost,
    DefenseError,
    Hints,
    StepOptions,
    check_update,
    register,
)

PAPER = ("Huang, Hu, Ilhan, Tekin, Liu. Booster: Tackling Harmful Fine-tuning for Large "
         "Language Models via Attenuating Harmful Perturbation. ICLR 2025, arXiv:2409.01586")


def harmful_perturbation_gap(loss_fn, params, batch: dict, alpha: float):
    """(g_h, g_h') = (∇h(θ), ∇h(θ − α g_h / (‖g_h‖ + 1e-7))): two forward and two backward."""
    grad_h = jax.grad(lambda p: loss_fn(p, batch)[0])
    g_h = grad_h(params)
    shifted = optax.tree.add_scale(params, -alpha / (optax.tree.norm(g_h) + 1e-7), g_h)
    return g_h, grad_h(shifted)


def _options(lam: float, alpha: float) -> StepOptions:
    return StepOptions(primary=ALIGN)


@register("booster", stage="alignment", level="gradient", cost=Cost(3, 3),
          batches=(ALIGN, HARMFUL), paper=PAPER, options=_options)
def booster(lam: float = 5.0, alpha: float = 0.1) -> optax.GradientTransformationExtraArgs:
    """g_f + λ (∇h(θ) − ∇h(θ − α ∇h/‖∇h‖)) on the "harmful" batch (see the module doc).

    Reads loss_fn and batches["harmful"]; the incoming gradient is g_f.
    """
    if not alpha >= 0 or not lam >= 0:
        raise DefenseError(f"Booster needs lam >= 0 and alpha >= 0, got lam={lam}, alpha={alpha}")

    def update_fn(updates, state, params=None, *, loss_fn=None, batches=None, rng=None,
                  **hints: Unpack[Hints]):
        del rng, hints
        check_update("booster", params, loss_fn, batches, (HARMFUL,))
        g_h, g_h_shifted = harmful_perturbation_gap(loss_fn, params, batches[HARMFUL], alpha)
        updates = jax.tree.map(lambda g, a, b: g + lam * (a - b), updates, g_h, g_h_shifted)
        return updates, state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)
