"""T-Vaccine: Vaccine restricted to safety-critical layers sampled from harmful gradient norms.

Guozhi Liu, Weiwei Lin, Tiansheng Huang, Ruichao Mo, Qi Mu, Li Shen. "Targeted Vaccine: Safety
Alignment for Large Language Models against Harmful Fine-Tuning via Layer-wise Perturbation".
2024, arXiv:2410.09760 (Lslland/T-Vaccine, `trainer.py` BaseTrainer).

With a_l the attention output of layer l (Vaccine's), f the alignment loss ("align") and h the
harmful loss ("harmful"), at step t (counted from 0, as HF's global_step):

    t mod K = 0:  s_l = ‖∂h/∂a_l‖ (θ; ε = 0),  p_l = s_l / Σ_k s_k        (trainer.py:190-211, 371)
    t mod J = 0:  S = S_n layers drawn from p without replacement           (trainer.py:145, 213)
    G_l = ∂f/∂a_l (θ; ε = 0),  m_l = [l ∈ S]
    ε_l = ρ · m_l G_l / (‖m G‖ + 1e-7)                 the norm over the sampled layers only
    g   = M ⊙ ∇θ f(θ; a_l + sg(ε_l))                  M: which LoRA entries train (below)

Official defaults (script/alignment/T-Vaccine.sh, README `bash T-Vaccine.sh 3`): ρ 3, S_n 8,
J 20, K 200, harmful batches of 1 row (trainer.py:95) from 200 BeaverTails unsafe rows;
lr 1e-3, batch 10, 20 epochs, cosine, warmup 0.1, weight decay 0.1, LoRA r 8 α 4 on all seven
projections. The draw uses `rng` (`jax.random.choice`: Gumbel top-k, the same distribution as
numpy's successive draws without replacement).

Which entries train (M). `scope="attention"` (default, the official code): the sampled layers'
attention LoRA (q, k, v, o_proj; trainer.py:240-250 sets requires_grad on the attention
modules' parameters only). The MLP LoRA (gate, up, down_proj) stays trainable but the official
modeling file runs every layer outside `activate_layers` under reentrant
`torch.utils.checkpoint` (models/modeling_llama_my_new.py:1002-1012), whose output carries no
gradient until a layer runs normally: the MLP LoRA trains in the layers from the first
`activate_layers` entry on, where `activate_layers` = S, plus layer i − 1 of every sampled
i > 0 when the model has more than 26 layers (trainer.py:219-224). `scope="all"` (the paper's
description): every LoRA module of the sampled layers and nothing else.

The optimizer. The official trainer leaves the entries outside M without a gradient
(requires_grad False, or no gradient through the checkpointed layers; HF's `zero_grad` sets
them to None), and torch's AdamW skips such a parameter: no weight decay, no moment update, no
step count, each LoRA matrix of each layer being its own parameter with its own step. The
transform zeroes g outside M (so the clip norm is the one over the gradients present) and also
wraps the optimizer (`hfjax.defenses.compose.around_optimizer`), handing it the extra arg
`trained` = M per LoRA leaf [L]; hfjax's builder then builds its AdamW per layer
(`StepOptions.layerwise_optimizer`, `hfjax.train.optim.layerwise_adamw`: optax's scale_by_adam
and decayed weights vmapped over the layer axis with per-layer state, selected by M; the
learning rate at the global step, torch's LambdaLR), so entries outside M do not change at all.
Measured (tests/test_defenses_wrapped_optimizer.py, tiny Llama, float32 on CPU) against a
float64 mirror of clip_grad_norm_ + torch.optim.AdamW + LambdaLR (warm-up + cosine, weight decay
0.1, clip acting) fed the same defended gradients, with `.grad` None outside M, 4 optimizer
steps with and without accumulation over 2 micro-steps: weights within 1.7e-7 (weights ~0.1),
every per-parameter step count equal, Adam's moments within 1e-5 relative, and the entries
outside M bitwise unchanged (weights, moments, counts). In a plain optax loop:

    tx = t_vaccine(...)
    opt = tx.wrap_optimizer(optax.chain(optax.clip_by_global_norm(1.0),
                                        hfjax.train.optim.layerwise_adamw(lr, weight_decay=0.1)))

`optax.chain(t_vaccine(...), any_optimizer)`, or a builder given a plain optax optimizer, only
zeroes the gradients outside M: exact for SGD, while Adam would still move those entries by
momentum and weight decay. Left as in hfjax's step: with accumulation over k > 1 micro-steps the
counters (sampling every J, estimation every K) count micro-steps, and the optimizer reads the
last micro-step's M. The re-estimation runs in a `lax.cond`; the train step evaluates only the
branch taken.

Cost in hfjax's train step: 2F+2B (`activation_grads`: the step's own backward on "align" gives
G as the hint `perturb_grads`; pass 2 here), plus 1F+1B on the "harmful" batch (1 row by
default) every K steps. In a plain loop without the hint G costs one more F+B, as in Vaccine.

Memory against Vaccine. Official: the non-sampled layers are rematerialized (their activations
not stored) and their attention LoRA gets no gradient or optimizer state, the saving the paper
reports. hfjax: every layer runs under the same `lax.scan` with one remat policy, the frozen
entries' gradients are computed and then zeroed, not skipped, and the optimizer state keeps
every entry: T-Vaccine saves no memory against Vaccine. Measured with XLA's memory analysis of
hfjax's compiled train step on CPU (8-layer width-256 Llama, LoRA r 8 on all seven projections,
AdamW, batches of 8 x 128 tokens, 2 of 8 layers sampled): temporary memory 211.6 MB for Vaccine,
211.6 MB (+1 KB) for T-Vaccine with the official 1-row harmful batch, 288.3 MB (+36%) with an
8-row harmful batch (the re-estimation branch's buffers). The per-layer AdamW adds one int32
step count per layer and LoRA matrix to the state and 0.2 MB of temporaries (433.2 → 433.4 MB,
same setting with MLP width 1024, vocabulary 4096, clip + cosine AdamW). For less activation
memory use the model config's `remat=True`, which applies to every layer.
"""

from __future__ import annotations

from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import optax

from hfjax.defenses.alignment.vaccine import perturb_spec, vaccine_perturbation
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
from hfjax.defenses.compose import around_optimizer
from hfjax.models.lora import LoRA

PAPER = ("Liu, Lin, Huang, Mo, Mu, Shen. Targeted Vaccine: Safety Alignment for Large Language "
         "Models against Harmful Fine-Tuning via Layer-wise Perturbation. arXiv:2410.09760")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SCOPES = ("attention", "all")
NEIGHBOUR_LAYERS_ABOVE = 26  # more layers: the official code also runs layer i − 1 with grads


class TVaccineState(NamedTuple):
    count: jax.Array  # steps taken (HF's global_step)
    probs: jax.Array  # p_l [L] of the last estimate
    active: jax.Array  # [L] bool: the sampled layers S


def layer_probabilities(harmful_grads: jax.Array) -> jax.Array:
    """p_l = s_l / Σ s, s_l = ‖∂h/∂a_l‖ (the norm of layer l's whole [B, T, D] slice)."""
    g = harmful_grads.astype(jnp.float32)
    s = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))
    return s / jnp.sum(s)


def sample_layers(rng: jax.Array, probs: jax.Array, layers: int) -> jax.Array:
    """[L] bool: `layers` layer indices drawn from p without replacement."""
    chosen = jax.random.choice(rng, probs.shape[0], (layers,), replace=False, p=probs)
    return jnp.zeros(probs.shape, bool).at[chosen].set(True)


def trained_layers(active: jax.Array, scope: str) -> dict[str, jax.Array]:
    """{"attention": [L] bool, "mlp": [L] bool}: the layers whose LoRA trains (module doc)."""
    if scope == "all":
        return {"attention": active, "mlp": active}
    run_with_grads = active
    if active.shape[0] > NEIGHBOUR_LAYERS_ABOVE:
        run_with_grads = active | jnp.append(active[1:], False)
    return {"attention": active, "mlp": jnp.cumsum(run_with_grads) > 0}


def layer_masks(lora: LoRA, trained: dict[str, jax.Array]) -> LoRA:
    """The [L] bool mask of every LoRA leaf: the trained layers of its module kind."""
    return lora.replace(weights={
        name: {k: trained["attention" if name in ATTENTION else "mlp"] for k in ab}
        for name, ab in lora.weights.items()})


def mask_lora(grads: LoRA, trained: dict[str, jax.Array]) -> LoRA:
    """Zero the LoRA gradients [L, ...] of the layers not trained, per module kind."""
    return jax.tree.map(lambda w, m: w * m.reshape(-1, *(1,) * (w.ndim - 1)).astype(w.dtype),
                        grads, layer_masks(grads, trained))


def _activation_grads(loss_fn, params, batch: dict) -> jax.Array:
    """∂L/∂a_l at ε = 0 [L, B, T, D]: one forward and one backward."""
    spec = perturb_spec(loss_fn, params, batch)
    zeros = jnp.zeros(spec.shape, spec.dtype)
    return jax.grad(lambda e: loss_fn(params, batch, perturb=e)[0])(zeros)


def _num_layers(params) -> int:
    if not isinstance(params, LoRA):
        raise DefenseError("t_vaccine freezes the LoRA modules of unsampled layers; it trains a "
                           f"hfjax.models.lora.LoRA, got {type(params).__name__}")
    return int(next(iter(params.weights.values()))["A"].shape[0])


def _options(rho: float, layers: int, sample_every: int, estimate_every: int,
             harmful_batch_size: int, scope: str) -> StepOptions:
    return StepOptions(primary=ALIGN, activation_grads=True,
                       batch_sizes=((HARMFUL, harmful_batch_size),), layerwise_optimizer=True)


@register("t_vaccine", stage="alignment", level="gradient", cost=Cost(2, 2),
          batches=(ALIGN, HARMFUL), paper=PAPER, options=_options)
def t_vaccine(rho: float = 3.0, layers: int = 8, sample_every: int = 20,
              estimate_every: int = 200, harmful_batch_size: int = 1,
              scope: str = "attention") -> optax.GradientTransformationExtraArgs:
    """Vaccine on `layers` layers drawn every `sample_every` steps from harmful gradient norms
    re-estimated every `estimate_every` steps (see the module doc); replaces the incoming
    gradient. Reads loss_fn, batches["align"], batches["harmful"] and rng; the hint
    perturb_grads = G saves a pass. `.wrap_optimizer(opt)` also hands opt the extra arg
    `trained` (`hfjax.train.optim.layerwise_adamw` reads it)."""
    if not rho >= 0:
        raise DefenseError(f"T-Vaccine's rho must be >= 0, got {rho}")
    for name, value in (("layers", layers), ("sample_every", sample_every),
                        ("estimate_every", estimate_every),
                        ("harmful_batch_size", harmful_batch_size)):
        if value < 1:
            raise DefenseError(f"T-Vaccine's {name} must be >= 1, got {value}")
    if scope not in SCOPES:
        raise DefenseError(f"T-Vaccine's scope must be one of {SCOPES}, got {scope!r}")

    def init_fn(params) -> TVaccineState:
        n = _num_layers(params)
        return TVaccineState(jnp.zeros((), jnp.int32), jnp.full((n,), 1.0 / n, jnp.float32),
                             jnp.zeros((n,), bool))

    def update_fn(updates, state: TVaccineState, params=None, *, loss_fn=None, batches=None,
                  rng=None, **hints: Unpack[Hints]):
        del updates
        check_update("t_vaccine", params, loss_fn, batches, (ALIGN, HARMFUL))
        if rng is None:
            raise DefenseError("t_vaccine needs the extra arg rng (a jax.random key) to sample "
                               "its layers")
        n = _num_layers(params)
        if layers > n:
            raise DefenseError(f"T-Vaccine samples layers={layers} of a {n}-layer model; "
                               f"pass layers <= {n}")
        t, batch = state.count, batches[ALIGN]
        probs = jax.lax.cond(
            t % estimate_every == 0,
            lambda: layer_probabilities(_activation_grads(loss_fn, params, batches[HARMFUL])),
            lambda: state.probs)
        active = jnp.where(t % sample_every == 0, sample_layers(rng, probs, layers),
                           state.active)
        perturb_grads = hints.get("perturb_grads")
        if perturb_grads is None:
            perturb_grads = _activation_grads(loss_fn, params, batch)
        m = active.reshape(-1, *(1,) * (perturb_grads.ndim - 1)).astype(perturb_grads.dtype)
        eps = jax.lax.stop_gradient(vaccine_perturbation(perturb_grads * m, rho))
        grads = jax.grad(lambda p: loss_fn(p, batch, perturb=eps)[0])(params)
        return mask_lora(grads, trained_layers(active, scope)), TVaccineState(t + 1, probs, active)

    def trained(updates: LoRA, state: TVaccineState) -> dict:
        return {"trained": layer_masks(updates, trained_layers(state.active, scope))}

    return around_optimizer(optax.GradientTransformationExtraArgs(init_fn, update_fn),
                            inner_args=trained)
