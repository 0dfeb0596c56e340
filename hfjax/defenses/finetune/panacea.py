"""Panacea: a post-fine-tuning perturbation optimized while fine-tuning.

Yibo Wang, Tiansheng Huang, Li Shen, Huanjin Yao, Haotian Luo, Rui Liu, Naiqiang Tan, Jiaxing
Huang, Dacheng Tao. "Panacea: Mitigating Harmful Fine-tuning for Large Language Models via
Post-fine-tuning Perturbation". NeurIPS 2025, arXiv:2501.18100 (w-yibo/Panacea, `trainer.py`
class Panacea).

With g the user loss ("user", the step's primary) and h the harmful loss ("harmful"), each step:

    g_g  = ∇g(θ)                                  the incoming gradient (the step's own pass)
    g_h  = ∇h(θ)
    ε    = ρ · g_h / (‖g_h‖ + 1e-7)               ‖·‖: the global norm over θ
    g_h' = ∇ min(h(θ + ε), c)                     torch.clamp: zero gradient where h > c
    g    = g_g − λ (g_h' − g_h)                   the update direction (trainer.py:494)

i.e. descent on g while ascending the harmful loss at the adversarial point θ + ε, treating ε
as constant. After training the adapter becomes θ + ε with the last step's ε (train.py:582-587,
`--tag eps`, `add_eps` True): `panacea_final(θ, opt_state)`, ε kept in `PanaceaState`.

Official defaults (script/finetune/panacea_gsm8k.sh): ρ (`eps_rho`) 1, λ (`lamb`) 0.001, c 5
(trainer.py:480); harmful batches of 10 rows (trainer.py:149) from 1000 BeaverTails unsafe rows
(train.py:434), user batch 10, lr 2e-5 constant after a 0.1 warmup, weight decay 0.1, 20
epochs. The published trainer backpropagates an undefined `clip_loss_h` and builds an undefined
`Pancacea` class; hfjax implements the evident intent, the backward of the clamped loss.

Cost in hfjax's train step: 3F+3B (the step's pass on "user" + two harmful passes here).
"""

from __future__ import annotations

from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import optax

from hfjax.defenses.api import (
    HARMFUL,
    USER,
    Cost,
    DefenseError,
    Hints,
    StepOptions,
    check_update,
    register,
)

PAPER = ("Wang, Huang, Shen, Yao, Luo, Liu, Tan, Huang, Tao. Panacea: Mitigating Harmful "
         "Fine-tuning for Large Language Models via Post-fine-tuning Perturbation. NeurIPS 2025, "
         "arXiv:2501.18100")


class PanaceaState(NamedTuple):
    epsilon: optax.Params  # ε of the last step (zeros before the first)


def clamp_max(loss: jax.Array, cap: float) -> jax.Array:
    """torch.clamp(loss, max=cap): the loss up to `cap`, gradient 1 where loss ≤ cap, else 0."""
    return jnp.where(loss <= cap, loss, cap)


def adversarial_harmful_gap(loss_fn, params, batch: dict, rho: float, loss_cap: float):
    """(g_h, g_h', ε) = (∇h(θ), ∇ min(h(θ + ε), c), ρ g_h / (‖g_h‖ + 1e-7)): two forward and two
    backward."""
    g_h = jax.grad(lambda p: loss_fn(p, batch)[0])(params)
    eps = optax.tree.scale(rho / (optax.tree.norm(g_h) + 1e-7), g_h)
    g_h_adv = jax.grad(lambda p: clamp_max(loss_fn(p, batch)[0], loss_cap))(
        optax.tree.add(params, eps))
    return g_h, g_h_adv, eps


def _options(rho: float, lam: float, loss_cap: float) -> StepOptions:
    return StepOptions(primary=USER)


@register("panacea", stage="finetune", level="gradient", cost=Cost(3, 3),
          batches=(USER, HARMFUL), paper=PAPER, options=_options)
def panacea(rho: float = 1.0, lam: float = 0.001,
            loss_cap: float = 5.0) -> optax.GradientTransformationExtraArgs:
    """g_g − λ (∇ min(h(θ + ε), c) − ∇h(θ)), ε = ρ ∇h/‖∇h‖ on the "harmful" batch (see the
    module doc); keeps ε for `panacea_final`. Reads loss_fn and batches["harmful"]; the
    incoming gradient is g_g."""
    if not rho >= 0 or not lam >= 0 or not loss_cap > 0:
        raise DefenseError(f"Panacea needs rho >= 0, lam >= 0 and loss_cap > 0, got rho={rho}, "
                           f"lam={lam}, loss_cap={loss_cap}")

    def init_fn(params) -> PanaceaState:
        return PanaceaState(jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, *, loss_fn=None, batches=None, rng=None,
                  **hints: Unpack[Hints]):
        del state, rng, hints
        check_update("panacea", params, loss_fn, batches, (HARMFUL,))
        g_h, g_h_adv, eps = adversarial_harmful_gap(loss_fn, params, batches[HARMFUL], rho,
                                                    loss_cap)
        updates = jax.tree.map(lambda g, a, b: g - lam * (b - a), updates, g_h, g_h_adv)
        return updates, PanaceaState(eps)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def panacea_final(params: optax.Params, opt_state) -> optax.Params:
    """θ + ε: the trained adapter with the last step's ε of the one `PanaceaState` inside an
    optimizer state (chains and MultiSteps included)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PanaceaState))
             if isinstance(s, PanaceaState)]
    if len(found) != 1:
        raise DefenseError(f"panacea_final expects one Panacea state in the optimizer state, "
                           f"found {len(found)}")
    return optax.tree.add(params, found[0].epsilon)


panacea.finalize = panacea_final  # type: ignore[attr-defined] - the pipeline applies it after training
