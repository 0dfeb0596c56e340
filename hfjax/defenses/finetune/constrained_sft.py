"""Constrained SFT: the token-wise constrained fine-tuning objective of deep safety alignment.

Xiangyu Qi, Ashwinee Panda, Kaifeng Lyu, Xiao Ma, Subhrajit Roy, Ahmad Beirami, Prateek Mittal,
Peter Henderson. "Safety Alignment Should Be Made More Than Just a Few Tokens Deep". ICLR 2025,
arXiv:2406.05946 (Unispac/shallow-vs-deep-alignment @fb1749e).

With π_ref the frozen initial model, y_t the t-th response token of a row (t = 0 the first) and
Δ_t = log π_θ(y_t) − log π_ref(y_t), the objective on the "user" batch is

    L(θ) = (1/N) Σ_t (2/β_t) · softplus(−β_t Δ_t)              N: the batch's response tokens
    ∇L   = (1/N) Σ_t w_t ∇(−log π_θ(y_t)),   w_t = sg(max(2 (1 − σ(β_t Δ_t)), 1e-3))

implemented as the official code does (`finetuning_buckets/trainer/trainer.py:896-936`
`soft_sft_loss`): token CE weighted by the detached w_t, clamped below at 1e-3 (where the
clamp acts the two forms differ), averaged over all response tokens of the batch (`losses.mean()`,
:998). β_t = β · first_token_bias_factor at t = 0, β · bias_factor for 1 ≤ t < bias_length,
β after (`get_beta_list`, :873-894); the official fine-tuning attack defaults (README, finetune.py
`ScriptArguments`) β 0.1, bias_factor 20, first_token_bias_factor 5, bias_length 5, i.e. β_t =
0.5, 2, 2, 2, 2, 0.1, 0.1, … The official script also sets Adam's β₁ = 0.5 (finetune.py:118):
an optimizer setting, not part of this transform.

π_ref: the official trainer precomputes log π_ref once over the training set with the model
before training (`get_train_dataloader`, :670-745, ref_model = model). Here π_ref is θ₀, the
trainable at step 0, kept in the transformation state (memory +θ), and its log-probs are
recomputed on each step's batch: the same values as the precomputed ones (the frozen base and
θ₀ do not change), one more forward pass per step. Dropout: the official trainer disables it;
the reference forward goes through the same oracle as the step (its LoRA dropout, if any).

Per-token log-probs come from the oracle's `token_nll` capture (`hfjax.train.loss`). The
transform replaces the incoming gradient (put it first in the chain): hfjax's step still
differentiates the plain CE on "user" (its metrics), so the step costs 3F+2B (that pass, the
reference forward, and the weighted objective's forward and backward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import optax

from hfjax.data.batching import IGNORE_INDEX
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

PAPER = ("Qi, Panda, Lyu, Ma, Roy, Beirami, Mittal, Henderson. Safety Alignment Should Be Made "
         "More Than Just a Few Tokens Deep. ICLR 2025, arXiv:2406.05946")
WEIGHT_FLOOR = 1e-3  # the official `torch.clamp(losses_list, min=1e-3)`


class ConstrainedSFTState(NamedTuple):
    reference: optax.Params  # θ₀: the trainable at step 0, the reference model's adapter


def response_index(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mask, t) [B, T]: whether position p predicts a response token (labels_{p+1} ≠ −100), and
    that token's index t among its row's response tokens (0 for the first)."""
    mask = jnp.concatenate([labels[:, 1:] != IGNORE_INDEX,
                            jnp.zeros((labels.shape[0], 1), bool)], axis=1)
    return mask, jnp.cumsum(mask, axis=1) - 1


def token_betas(t: jax.Array, beta: float, first_token_bias_factor: float, bias_factor: float,
                bias_length: int) -> jax.Array:
    """β_t: β · first_token_bias_factor at t = 0, β · bias_factor for 1 ≤ t < bias_length, β
    after (with bias_length 0: β everywhere)."""
    prefix = jnp.where(t == 0, first_token_bias_factor, bias_factor) * beta
    return jnp.where(t < bias_length, prefix, beta)


def token_weights(nll: jax.Array, ref_nll: jax.Array, betas: jax.Array) -> jax.Array:
    """w_t = max(2 (1 − σ(β_t Δ_t)), 1e-3), Δ_t = log π_θ − log π_ref = ref_nll − nll."""
    return jnp.maximum(2.0 * (1.0 - jax.nn.sigmoid(betas * (ref_nll - nll))), WEIGHT_FLOOR)


def constrained_loss(nll: jax.Array, ref_nll: jax.Array, labels: jax.Array,
                     betas_of: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """(1/N) Σ_t sg(w_t) · nll_t over the response tokens of labels [B, T]; nll, ref_nll [B, T]
    from the `token_nll` capture; betas_of(t) gives β_t."""
    mask, t = response_index(labels)
    w = jax.lax.stop_gradient(token_weights(nll, ref_nll, betas_of(t)))
    return jnp.sum(jnp.where(mask, w * nll, 0.0)) / jnp.maximum(mask.sum(), 1)


def _options(**_) -> StepOptions:
    return StepOptions(primary=USER)


@register("constrained_sft", stage="finetune", level="gradient", cost=Cost(3, 2),
          batches=(USER,), paper=PAPER, options=_options)
def constrained_sft(beta: float = 0.1, first_token_bias_factor: float = 5.0,
                    bias_factor: float = 20.0,
                    bias_length: int = 5) -> optax.GradientTransformationExtraArgs:
    """Replaces the incoming gradient by ∇ of the token-wise constrained objective on "user"
    (see the module doc); π_ref = θ at the first update (init's params)."""
    if not beta > 0 or not first_token_bias_factor > 0 or not bias_factor > 0:
        raise DefenseError(f"constrained_sft needs beta, first_token_bias_factor and bias_factor "
                           f"> 0, got {beta}, {first_token_bias_factor}, {bias_factor}")
    if isinstance(bias_length, bool) or not isinstance(bias_length, int) or bias_length < 0:
        raise DefenseError(f"constrained_sft's bias_length must be an integer >= 0, "
                           f"got {bias_length!r}")

    def betas_of(t):
        return token_betas(t, beta, first_token_bias_factor, bias_factor, bias_length)

    def update_fn(updates, state: ConstrainedSFTState, params=None, *, loss_fn=None,
                  batches=None, rng=None, **hints: Unpack[Hints]):
        del updates, rng, hints
        check_update("constrained_sft", params, loss_fn, batches, (USER,))
        batch = batches[USER]

        def nll_at(theta):
            aux = loss_fn(theta, batch, capture=("token_nll",))[1]
            return captures(aux, ("token_nll",), "constrained_sft")["token_nll"]

        ref_nll = jax.lax.stop_gradient(nll_at(state.reference))
        grads = jax.grad(lambda p: constrained_loss(nll_at(p), ref_nll, batch["labels"],
                                                    betas_of))(params)
        return grads, state

    def init_fn(params):
        return ConstrainedSFTState(jax.tree.map(jnp.copy, params))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
