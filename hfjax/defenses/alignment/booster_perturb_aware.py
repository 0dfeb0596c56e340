"""Booster, perturbation-aware: Booster's harmful-perturbation term on Vaccine's update.

Huang et al., "Booster" (ICLR 2025, arXiv:2409.01586), git-disl/Booster with `--perturb_aware
True` (`BoosterAlignmentTrainer.training_step`, trainer.py:272-380; script
`smooth_align_perturb.sh`, rho 5): the alignment gradient is computed Vaccine-style, at
activations perturbed along their own gradient, and Booster's term is added:

    ε = ρ G / (‖G‖ + 1e-7),  G = ∂f/∂a           (Vaccine's first pass on "align")
    g = ∇θ f(θ; a + ε) + λ (∇h(θ) − ∇h(θ − α ∇h/‖∇h‖))

i.e. `optax.chain(vaccine(rho), booster(lam, alpha))`. Cost 4F+4B in hfjax's train step (the
step's pass returns G; Vaccine's perturbed pass; Booster's two harmful passes). Checked against a
PyTorch mirror of the official step in tests/test_defense_reference.py.
"""

from __future__ import annotations

import optax

from hfjax.defenses.alignment.booster import PAPER, booster
from hfjax.defenses.alignment.vaccine import vaccine
from hfjax.defenses.api import ALIGN, HARMFUL, Cost, StepOptions, register


def _options(lam: float, alpha: float, rho: float) -> StepOptions:
    return StepOptions(primary=ALIGN, activation_grads=True)


@register("booster_perturb_aware", stage="alignment", level="gradient", cost=Cost(4, 4),
          batches=(ALIGN, HARMFUL), paper=PAPER + " (perturb_aware)", options=_options)
def booster_perturb_aware(lam: float = 5.0, alpha: float = 0.1,
                          rho: float = 5.0) -> optax.GradientTransformationExtraArgs:
    """Vaccine's ∇θ f(θ; a + ε) plus Booster's λ (g_h − g_h') (see the module doc)."""
    return optax.chain(vaccine(rho=rho), booster(lam=lam, alpha=alpha))
