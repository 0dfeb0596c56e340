"""LDIFS: ℓ2 distance in feature space to the frozen initial model while fine-tuning.

Jishnu Mukhoti, Yarin Gal, Philip H.S. Torr, Puneet K. Dokania. "Fine-tuning can cripple your
foundation model; preserving features may be the solution". TMLR 2024, arXiv:2308.13320.
Used as a harmful fine-tuning baseline by the git-disl code base (git-disl/Booster @6421918,
`trainer.py:772-878` `LDIFSTrainer`, `script/finetune/LDIFS_ep.sh`).

On the "user" batch, with φ_l(θ) ∈ R^{B×T×D} the features of layer l and θ₀ the trainable at
step 0 (kept in the transformation state, memory +θ):

variant="paper" (default): the paper's normalized feature distance,

    L(θ) = CE(θ) + α · (1/L) Σ_l (1/|V|) Σ_{(b,t) ∈ V} ‖φ̂_l(θ)_bt − φ̂_l(θ₀)_bt‖²,   α = 0.05
    φ̂ = φ / max(‖φ‖₂, 1e-12) per token,   φ_l = the residual stream after layer l,
    V = the non-padding tokens (attention mask 1).

The paper regularizes a vision encoder (per-layer features normalized along the channel axis);
its transcription to a decoder LM (per-token normalization of the residual stream, the mean
over non-padding tokens, every layer) is hfjax's reading of it, not an official LLM port.

variant="gitdisl": the git-disl port, term by term,

    L(θ) = CE(θ) + Σ_l [r_l < τ] · r_l,   r_l = (ρ/2) ‖m_l(θ) − m_l(θ₀)‖²_F,   ρ = 1e-4, τ = 0.1

m_l: the MLP module's output of layer l (the port hooks `layers.{l}.mlp`), unnormalized, summed
over every position of the batch, padding included; a layer whose term is ≥ τ (or NaN) is
dropped that step ("drop those overflow loss"). ρ 1e-4 as `LDIFS_ep.sh` (train.py's default is
0.1). The port also clips the gradient norm at 5 and trains with lr 1e-5: optimizer settings.

The transform adds ∇ of the regularizer to the incoming gradient ∇CE (hfjax's step: "user").
Cost 3F+2B: the step's pass, the reference forward at θ₀ and the regularizer's forward and
backward (the paper's single backward on CE + reg traverses the same graph once; in the gradient
contract CE's pass is the step's own). The reference forward goes through the step's oracle (its
LoRA dropout, if any; the port's reference copy runs in eval mode).
"""

from __future__ import annotations

from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import optax

from hfjax.defenses.api import (
    USER,
    Cost,
    DefenseError,
    Hints,
    StepOptions,
    captures,
    check_update,
    register,
)
from hfjax.models.config import at_least_float32

PAPER = ("Mukhoti, Gal, Torr, Dokania. Fine-tuning can cripple your foundation model; preserving "
         "features may be the solution. TMLR 2024, arXiv:2308.13320")
VARIANTS = ("paper", "gitdisl")
FEATURES = {"paper": "residual", "gitdisl": "mlp_out"}


class LDIFSState(NamedTuple):
    reference: optax.Params  # θ₀: the trainable at step 0


def normalized_distance(feats: jax.Array, ref: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(1/L) Σ_l mean over the unmasked tokens of ‖φ̂_l − φ̂⁰_l‖², features [L, B, T, D]."""
    def unit(f):  # F.normalize: f / max(‖f‖, 1e-12), differentiable at f = 0
        return f * jax.lax.rsqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), 1e-24))

    sq = jnp.sum(jnp.square(unit(feats) - unit(ref)), axis=-1)  # [L, B, T]
    valid = attention_mask.astype(bool)[None]
    per_layer = jnp.sum(jnp.where(valid, sq, 0.0), axis=(1, 2)) / jnp.maximum(valid.sum(), 1)
    return jnp.mean(per_layer)


def clipped_proximal(feats: jax.Array, ref: jax.Array, rho: float, threshold: float) -> jax.Array:
    """Σ_l [r_l < τ] r_l, r_l = (ρ/2) ‖m_l − m⁰_l‖²_F over every position, features [L, ...]."""
    r = rho / 2 * jnp.sum(jnp.square(feats - ref), axis=tuple(range(1, feats.ndim)))
    return jnp.sum(jnp.where(r < threshold, r, 0.0))


def _options(**_) -> StepOptions:
    return StepOptions(primary=USER)


@register("ldifs", stage="finetune", level="gradient", cost=Cost(3, 2), batches=(USER,),
          paper=PAPER, options=_options)
def ldifs(alpha: float = 0.05, variant: str = "paper", rho: float = 1e-4,
          threshold: float = 0.1) -> optax.GradientTransformationExtraArgs:
    """∇CE + ∇(feature distance to θ₀) on "user" (see the module doc). alpha: the paper
    variant's weight; rho, threshold: the gitdisl variant's (ρ/2)‖·‖² and its drop threshold."""
    if variant not in VARIANTS:
        raise DefenseError(f"ldifs has no variant {variant!r}; choose from {VARIANTS}")
    if not alpha >= 0 or not rho >= 0 or not threshold > 0:
        raise DefenseError(f"ldifs needs alpha >= 0, rho >= 0 and threshold > 0, got "
                           f"alpha={alpha}, rho={rho}, threshold={threshold}")
    defaults = {"paper": {"rho": (rho, 1e-4), "threshold": (threshold, 0.1)},
                "gitdisl": {"alpha": (alpha, 0.05)}}[variant]
    changed = sorted(k for k, (got, default) in defaults.items() if got != default)
    if changed:
        raise DefenseError(f"ldifs variant={variant!r} does not use {changed}: alpha is the "
                           "paper variant's, rho and threshold the gitdisl variant's")
    feature = FEATURES[variant]

    def regularizer(feats, ref, batch):
        feats, ref = (f.astype(at_least_float32(f.dtype)) for f in (feats, ref))
        if variant == "paper":
            return alpha * normalized_distance(feats, ref, batch["attention_mask"])
        return clipped_proximal(feats, ref, rho, threshold)

    def update_fn(updates, state: LDIFSState, params=None, *, loss_fn=None, batches=None,
                  rng=None, **hints: Unpack[Hints]):
        del rng, hints
        check_update("ldifs", params, loss_fn, batches, (USER,))
        batch = batches[USER]

        def features(theta):
            aux = loss_fn(theta, batch, capture=(feature,))[1]
            return captures(aux, (feature,), "ldifs")[feature]

        ref = jax.lax.stop_gradient(features(state.reference))
        g_reg = jax.grad(lambda p: regularizer(features(p), ref, batch))(params)
        return optax.tree.add(updates, g_reg), state

    def init_fn(params):
        return LDIFSState(jax.tree.map(jnp.copy, params))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
