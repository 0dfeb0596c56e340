"""TAR: tamper-resistant training by first-order meta-learning against simulated fine-tuning.

Rishub Tamirisa, Bhrugu Bharathi, Long Phan, Andy Zhou, Alice Gatti, Tarun Suresh, Maxwell Lin,
Justin Wang, Rowan Wang, Ron Arel, Andy Zou, Dawn Song, Bo Li, Dan Hendrycks, Mantas Mazeika.
"Tamper-Resistant Safeguards for Open-Weight LLMs". ICLR 2025, arXiv:2408.00761
(rishub-tamirisa/tamper-resistance @19de233, `modules/training.py:864-1142`
`tar_training_loop`, `run_tar_bio.sh`).

One outer step at θ. The adversary fine-tunes a copy θ'_0 = θ with a fresh AdamW whose learning
rate η is drawn uniformly from {2e-6, 2e-5, 4e-5} (torch's defaults: β (0.9, 0.999), ε 1e-8,
weight decay 0.01; training.py:1004-1010), one adversary micro-batch x_k per inner step:

    θ'_{k+1} = AdamW_η(θ'_k, ∇CE(θ'_k; x_k)),   k = 0 … K − 1                  K = 64

After inner step i with (i + 1) mod r = 0 (r = 4, `tar_inner_loop_subsample`; :1054-1056) the
tamper-resistance loss L_TR is evaluated at the adapted weights on one held-out batch x_tr (drawn
once per outer step; :997-1001), and its gradient is taken there, first order (no gradient
through the inner loop), weighted by the schedule (:1047-1051, :1067-1069, `schedule` :831-846)

    w_i = s · exp(λ (i − (K − 1))),   s = 4 (`tar_tamper_resistance_grad_scale`), λ = 0.0625

(unnormalized: the last evaluation weighs 4, the first of K = 64 about 0.09). The outer gradient
(:1091-1118) adds the retain gradient at θ on the retain batch x_r, scaled by c_r = 1:

    g = c_r ∇[CE(θ; x_r) + (1/(L+1)) Σ_l mean_{(b,t) ∈ V} ‖h_l(θ; x_r)_bt − h_l(θ₀; x_r)_bt‖₂]
        + Σ_{i : (i+1) mod r = 0} w_i ∇L_TR(θ'_{i+1})

h_l: HF's L + 1 hidden states (the embeddings, the residual stream after layers 1 … L − 1, the
final-normed last one; `obj_model_mse_representations`, objectives.py:335-368): the ℓ2 distance
(not squared) per token, averaged over the tokens V of the batch (attention mask 1).
`retain_representations=False` leaves the distance out (the official flag; the scripts set it).
The official outer optimizer is schedule-free AdamW, lr 2e-5, 32 warm-up steps, 750 steps
(tar.py:81-83, run_tar_bio.sh): an optimizer setting, chained after this transform.

L_TR (`tr_loss`):
- "entropy" (knowledge restriction, the scripts' `max_entropy`; objectives.py:114-131): the
  negative mean entropy of the next-token distribution over the tokens of x_tr, prompt
  included: L_TR = −mean_{(b,t) ∈ V} H(softmax(z_bt)).
- "dpo" (refusal; objectives.py:814-860, β = 0.1, sigmoid loss): x_tr holds pairs, a chosen
  (refusal) row and a rejected (harmful answer) row per prompt; with ℓ(θ) the sum of the
  response tokens' log-probabilities of a row (`get_batch_logps`), π_ref = θ₀,
  L_TR = mean_b −log σ(β [(ℓ_c(θ) − ℓ_r(θ)) − (ℓ_c(θ₀) − ℓ_r(θ₀))]); both sides run as one
  concatenated batch (one pass), padded to one length. The official code precomputes ℓ(θ₀) once
  per row before training (dataloaders.py:659-669); here they are recomputed at θ₀ once per outer
  step (same values, +1F).

θ₀: the trainable at step 0, kept in the transformation state (memory +θ): the frozen reference
of the retain distance and of DPO. The official retain reference is the model named by
`retain_model_name` (Llama-3-8B-Instruct, the model its random-mapping pre-stage started from);
at hfjax's alignment stage it is the model before TAR (LoRA: the base).

Batches: "align" = x_r (the step's own pass gives ∇CE(θ; x_r), the incoming gradient);
`harmful` = the adversary's K micro-batches, `inner_steps · adversary_rows` rows, inner step k
reading rows [k a, (k + 1) a) (a = 4, `tar_adversary_batch_size`); `heldout` = x_tr ("entropy":
held-out harmful text; "dpo": the rejected rows, paired row by row with "align" as the chosen
ones). Inner steps after the last evaluation change nothing the update reads and are not run.

Padding: the official means (entropy, distance) run over every position of its batches, which
it pads to 256 tokens; the states at padding positions depend on the framework's position ids
there (HF counts on, hfjax repeats the last token's), so hfjax averages over the tokens (attention
mask 1): the official values on unpadded batches.

Not reproduced: the scripts' mixture of adversaries (each outer step draws pile-bio, camel-bio or
a retain-then-forget switch at M ~ Beta(6, 3) K; here the adversary always trains on `harmful`),
`tar_num_tasks_sampled` > 1 (the scripts use 1) and the "linear_warmup" adversary schedule (the
scripts use "constant"). `tr_lower_bound` is the official bound (drop the TR gradient when
Σ_i w_i L_TR < bound; :1110-1118), off by default as the scripts' `--unbounded`.

Cost in hfjax's train step, with n = ⌊K/r⌋ evaluations: (1 + 2 + n(r + 1))F + (1 + 1 +
n(r + 1))B: the step's pass on "align", the reference hidden states at θ₀ (1F) and the distance
term's pass, n r adversary steps and n TR evaluations; "dpo" adds the reference pass at θ₀ (1F).
K 64, r 4: 83F+82B (dpo 84F+82B). The inner loop is one `lax.scan` over the n evaluations whose
body scans the r adversary steps, so the program holds one adversary step and one evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfjax.defenses.api import (
    ALIGN,
    HARMFUL,
    Cost,
    CostOf,
    DefenseError,
    Hints,
    StepOptions,
    captures,
    check_update,
    register,
)
from hfjax.models.config import at_least_float32

PAPER = ("Tamirisa, Bharathi, Phan, Zhou, Gatti, Suresh, Lin, Wang, Wang, Arel, Zou, Song, Li, "
         "Hendrycks, Mazeika. Tamper-Resistant Safeguards for Open-Weight LLMs. ICLR 2025, "
         "arXiv:2408.00761")
TR_LOSSES = ("entropy", "dpo")
HELDOUT = "calibration"  # a harmful-kind stream of the pipeline, drawn apart from "harmful"
TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


class TARState(NamedTuple):
    reference: optax.Params | None  # θ₀ (None when neither the distance nor DPO reads it)


def schedule_weights(inner_steps: int, tr_every: int, tr_scale: float,
                     schedule_lambda: float) -> np.ndarray:
    """[n] w_i = s · exp(λ (i − (K − 1))) of the evaluated inner steps i = (j + 1) r − 1."""
    steps = np.arange(1, inner_steps // tr_every + 1) * tr_every - 1
    return tr_scale * np.exp(schedule_lambda * (steps - (inner_steps - 1)))


def adversary_batches(batch: dict, blocks: int, tr_every: int, inner_steps: int,
                      rows: int) -> dict:
    """The adversary's micro-batches as leaves [blocks, r, a, ...]: rows [k a, (k + 1) a) of
    the K · a rows for inner step k < blocks · r."""
    got = batch["input_ids"].shape[0]
    if got != inner_steps * rows:
        raise DefenseError(f"tar's adversary batch must hold inner_steps x adversary_rows = "
                           f"{inner_steps} x {rows} = {inner_steps * rows} rows, one adversary "
                           f"batch per inner step; got {got} rows")
    return {k: jnp.asarray(v)[:blocks * tr_every * rows].reshape(blocks, tr_every, rows,
                                                                 *v.shape[1:])
            for k, v in batch.items()}


def concatenated(chosen: dict, rejected: dict) -> dict:
    """Chosen rows then rejected rows, right-padded to one length (ids 0, mask 0, labels −100),
    as the official `concatenated_inputs`."""
    if chosen["input_ids"].shape[0] != rejected["input_ids"].shape[0]:
        raise DefenseError(f"tar's DPO loss pairs chosen and rejected rows one by one: got "
                           f"{chosen['input_ids'].shape[0]} and "
                           f"{rejected['input_ids'].shape[0]} rows")
    length = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])

    def pad(k, v):
        v = jnp.asarray(v)
        return jnp.pad(v, ((0, 0), (0, length - v.shape[1])),
                       constant_values=-100 if k == "labels" else 0)

    return {k: jnp.concatenate([pad(k, chosen[k]), pad(k, rejected[k])]) for k in TOKEN_KEYS}


def sequence_logps(loss_fn: Callable, theta, batch: dict) -> jax.Array:
    """[rows] Σ_t log p_θ(labels_{t+1} | ≤ t) over each row's response tokens."""
    aux = loss_fn(theta, batch, capture=("token_nll",))[1]
    return -jnp.sum(captures(aux, ("token_nll",), "tar")["token_nll"], axis=-1)


def dpo_loss(policy: jax.Array, reference: jax.Array, beta: float) -> jax.Array:
    """mean_b −log σ(β [(ℓ_c − ℓ_r) − (ℓ⁰_c − ℓ⁰_r)]), chosen rows first in both [2B]."""
    b = policy.shape[0] // 2
    margin = (policy[:b] - policy[b:]) - (reference[:b] - reference[b:])
    return jnp.mean(-jax.nn.log_sigmoid(beta * margin))


def entropy_loss(loss_fn: Callable, theta, batch: dict) -> jax.Array:
    """−mean_{(b,t) ∈ V} H(softmax(z_bt)) over the batch's tokens V (attention mask 1)."""
    aux = loss_fn(theta, batch, capture=("entropy",))[1]
    return -token_mean(captures(aux, ("entropy",), "tar")["entropy"], batch["attention_mask"])


def hidden_states(loss_fn: Callable, theta, batch: dict) -> jax.Array:
    """HF's hidden states [L + 1, B, T, D] from the oracle."""
    aux = loss_fn(theta, batch, capture=("hidden_states",))[1]
    return captures(aux, ("hidden_states",), "tar")["hidden_states"]


def hidden_distance(states: jax.Array, reference: jax.Array,
                    attention_mask: jax.Array) -> jax.Array:
    """(1/(L+1)) Σ_l mean_{(b,t) ∈ V} ‖h_l − h⁰_l‖₂ over the batch's tokens V (gradient 0
    where h = h⁰), states [L + 1, B, T, D]."""
    dtype = at_least_float32(jnp.result_type(states, reference))
    dist = optax.safe_norm(states.astype(dtype) - reference.astype(dtype), 0.0, axis=-1)
    return jnp.mean(jax.vmap(token_mean, (0, None))(dist, attention_mask))


def token_mean(values: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The mean of values [B, T] over the positions with attention mask 1."""
    valid = jnp.asarray(attention_mask).astype(bool)
    return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(valid.sum(), 1)


def _cost(inner_steps: int, tr_every: int, tr_loss: str, retain_representations: bool,
          **_) -> Cost:
    inner = inner_steps // tr_every * (tr_every + 1)
    return Cost(1 + inner + 2 * retain_representations + (tr_loss == "dpo"),
                1 + inner + retain_representations)


def _options(inner_steps: int, adversary_rows: int, tr_loss: str, harmful: str, heldout: str,
             **_) -> StepOptions:
    """Primary "align" (the retain batch); DPO pairs "align" (chosen) with `heldout`
    (rejected); the adversary's stream holds K · a rows unless it is one of the pair."""
    paired = (ALIGN, heldout) if tr_loss == "dpo" else ()
    sizes = () if harmful in paired else ((harmful, inner_steps * adversary_rows),)
    return StepOptions(primary=ALIGN, paired=paired, batch_sizes=sizes)


def _check(inner_steps, tr_every, adversary_rows, adversary_lrs, tr_loss, tr_scale,
           schedule_lambda, retain_scale, dpo_beta, adversary_weight_decay, tr_lower_bound,
           heldout) -> None:
    ints = {"inner_steps": inner_steps, "tr_every": tr_every, "adversary_rows": adversary_rows}
    bad = {k: v for k, v in ints.items() if isinstance(v, bool) or not isinstance(v, int)
           or v < 1}
    if bad:
        raise DefenseError(f"tar needs positive integers {sorted(bad)}, got {bad}")
    if tr_every > inner_steps:
        raise DefenseError(f"tar evaluates the tamper-resistance loss every tr_every inner steps: "
                           f"tr_every={tr_every} > inner_steps={inner_steps} evaluates none")
    lrs = tuple(adversary_lrs) if isinstance(adversary_lrs, tuple | list) else None
    if not lrs or not all(isinstance(x, int | float) and math.isfinite(x) and x > 0
                          for x in lrs):
        raise DefenseError(f"tar's adversary_lrs must be a non-empty tuple of positive learning "
                           f"rates, got {adversary_lrs!r}")
    if tr_loss not in TR_LOSSES:
        raise DefenseError(f"tar's tr_loss must be one of {TR_LOSSES}, got {tr_loss!r}")
    floats = {"tr_scale": tr_scale, "schedule_lambda": schedule_lambda,
              "retain_scale": retain_scale, "adversary_weight_decay": adversary_weight_decay}
    bad = {k: v for k, v in floats.items() if not (v >= 0 and math.isfinite(v))}
    if bad or not dpo_beta > 0 or not math.isfinite(dpo_beta):
        raise DefenseError(f"tar needs finite tr_scale, schedule_lambda, retain_scale, "
                           f"adversary_weight_decay >= 0 and dpo_beta > 0, got "
                           f"{ {**bad, 'dpo_beta': dpo_beta} }")
    if tr_lower_bound is not None and not math.isfinite(tr_lower_bound):
        raise DefenseError(f"tar's tr_lower_bound must be a finite number or None (unbounded), "
                           f"got {tr_lower_bound}")
    if heldout == ALIGN:
        raise DefenseError(f"tar's heldout batch must differ from {ALIGN!r}, the retain batch "
                           "(the DPO loss pairs the two)")


@register("tar", stage="alignment", level="gradient",
          cost=CostOf(_cost, "(3+⌊K/r⌋(r+1))F+(2+⌊K/r⌋(r+1))B"),
          batches=(ALIGN, HARMFUL, HELDOUT), paper=PAPER, options=_options)
def tar(inner_steps: int = 64, tr_every: int = 4, adversary_rows: int = 4,
        adversary_lrs: tuple[float, ...] = (2e-6, 2e-5, 4e-5), tr_loss: str = "entropy",
        tr_scale: float = 4.0, schedule_lambda: float = 0.0625, retain_scale: float = 1.0,
        retain_representations: bool = True, dpo_beta: float = 0.1,
        adversary_weight_decay: float = 0.01, tr_lower_bound: float | None = None,
        harmful: str = HARMFUL, heldout: str = HELDOUT) -> optax.GradientTransformationExtraArgs:
    """TAR's outer gradient (module docstring) from the incoming ∇CE(θ; "align").

    inner_steps K, tr_every r, adversary_rows a (rows per inner step), adversary_lrs (η drawn
    from `rng` each step), tr_loss ("entropy" | "dpo"), tr_scale s, schedule_lambda λ,
    retain_scale c_r, retain_representations (the hidden-state distance), dpo_beta β,
    adversary_weight_decay (torch AdamW's 0.01), tr_lower_bound (None: unbounded), and the
    batch names `harmful` (the adversary's K · a rows) and `heldout` (x_tr).
    """
    _check(inner_steps, tr_every, adversary_rows, adversary_lrs, tr_loss, tr_scale,
           schedule_lambda, retain_scale, dpo_beta, adversary_weight_decay, tr_lower_bound,
           heldout)
    blocks = inner_steps // tr_every
    weights = schedule_weights(inner_steps, tr_every, tr_scale, schedule_lambda)
    needs_reference = retain_representations or tr_loss == "dpo"
    reads = ((ALIGN,) if needs_reference else ()) + (harmful, heldout)

    def tr_objective(loss_fn, heldout_batch, reference_logps):
        if tr_loss == "entropy":
            return lambda theta: entropy_loss(loss_fn, theta, heldout_batch)
        return lambda theta: dpo_loss(sequence_logps(loss_fn, theta, heldout_batch),
                                      reference_logps, dpo_beta)

    def update_fn(updates, state: TARState, params=None, *, loss_fn=None, batches=None,
                  rng=None, **hints: Unpack[Hints]):
        del hints
        check_update("tar", params, loss_fn, batches, reads)
        if rng is None and len(adversary_lrs) > 1:
            raise DefenseError("tar draws the adversary's learning rate from adversary_lrs every "
                               "step: pass rng= (a fresh jax.random key)")
        lrs = jnp.asarray(adversary_lrs, jnp.float32)
        lr = lrs[0] if len(adversary_lrs) == 1 else jax.random.choice(rng, lrs)
        adversary = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8,
                                weight_decay=adversary_weight_decay)

        x_tr, reference_logps = batches[heldout], None
        if tr_loss == "dpo":
            x_tr = concatenated(batches[ALIGN], batches[heldout])
            reference_logps = jax.lax.stop_gradient(
                sequence_logps(loss_fn, state.reference, x_tr))
        objective = tr_objective(loss_fn, x_tr, reference_logps)

        def adversary_step(carry, batch):
            theta, opt_state = carry
            g = jax.grad(lambda p: loss_fn(p, batch)[0])(theta)
            u, opt_state = adversary.update(g, opt_state, theta)
            return (optax.apply_updates(theta, u), opt_state), None

        def evaluation(carry, xs):
            theta, opt_state, g_tr, total = carry
            micro, w = xs
            (theta, opt_state), _ = jax.lax.scan(adversary_step, (theta, opt_state), micro)
            value, g = jax.value_and_grad(objective)(theta)
            return (theta, opt_state, optax.tree.add_scale(g_tr, w, g), total + w * value), None

        micro = adversary_batches(batches[harmful], blocks, tr_every, inner_steps,
                                  adversary_rows)
        init = (params, adversary.init(params), optax.tree.zeros_like(params),
                jnp.zeros((), jnp.float32))
        (_, _, g_tr, total), _ = jax.lax.scan(
            evaluation, init, (micro, jnp.asarray(weights, jnp.float32)))

        retain = updates
        if retain_representations:
            x_r = batches[ALIGN]
            ref = jax.lax.stop_gradient(hidden_states(loss_fn, state.reference, x_r))
            g_dist = jax.grad(lambda p: hidden_distance(
                hidden_states(loss_fn, p, x_r), ref, x_r["attention_mask"]))(params)
            retain = optax.tree.add(updates, g_dist)
        keep = 1.0 if tr_lower_bound is None else (total >= tr_lower_bound).astype(jnp.float32)
        out = jax.tree.map(lambda r, t: (retain_scale * r + keep * t).astype(r.dtype),
                           retain, g_tr)
        return out, state

    def init_fn(params):
        return TARState(jax.tree.map(jnp.copy, params) if needs_reference else None)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
