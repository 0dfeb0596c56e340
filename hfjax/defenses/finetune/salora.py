"""SaLoRA: LoRA whose branch output is kept out of a fixed safety subspace.

Mingjie Li, Wai Man Si, Michael Backes, Yang Zhang, Yisen Wang. "SaLoRA: Safety-Alignment
Preserved Low-Rank Adaptation". ICLR 2025, arXiv:2501.01765.

SaLoRA adds a fixed "safety module" C to every LoRA branch, computed once from the aligned
model's features on safety data, so that fine-tuning does not move the outputs along the
directions those features occupy. Per target module m and layer l (outputs in R^d):

    Y   = the module's outputs y = x W (+ the branch) of the model at θ₀ on the safety ("align")
          batch, one row per non-padding token                            [N, d]
    V_r = the top-r eigenvectors of Yᵀ Y (the top-r right singular vectors of Y)   [d, r]
    C   = I − V_r V_rᵀ                                                       the safety module
    branch(x) = scale · x A B C          (hfjax's layout: A [in, r_lora], B [r_lora, d])

hfjax keeps B' = B C as the adapter's B, so its plain forward is SaLoRA's forward. The
transform turns the incoming gradient ∂L/∂B' into SaLoRA's ∂L/∂B = (∂L/∂B') C (A unchanged):

    g_B ← g_B − (g_B V_r) V_rᵀ

With plain SGD (with momentum, weight decay) every update then stays in the row space of C and
B' = B C holds exactly. With Adam-type optimizers the elementwise scaling leaves that space, so
the transform also wraps the optimizer (`hfjax.defenses.compose.around_optimizer`) and projects
its update u_B by the same C, from the same state:

    g_B ← g_B C,   u = optimizer(g),   u_B ← u_B C

and then B'_t = B_t C for SaLoRA's B_t trained by that optimizer directly (clipping: the global
norm of the projected gradient is SaLoRA's; weight decay: B'_t C = B_t C C = B'_t). hfjax's
builder does this around its clip → AdamW and accumulation; in a plain optax loop use
`salora_chain(optax.adamw(lr), r)` (= `salora(r).wrap_optimizer(optax.adamw(lr))`).
`optax.chain(salora(r), optimizer)` projects the gradient only: exact for SGD, not for Adam.

C is computed at the first update from batches["align"] with the oracle's `proj_outputs`
capture (at θ₀ = init's params: with PEFT's B₀ = 0 the branch is zero and Y = X W of the aligned
model) and kept in the state; later steps skip it (`lax.cond`), so hfjax's step costs 2F+1B at
step 0 (its pass + the safety forward) and 1F+1B after; the declared cost is the dearer one.
The "align" batch is read at step 0 only.

Measured (tests/test_defenses_wrapped_optimizer.py, tiny Llama, float32 on CPU, B₀ = 0): A and
B' of hfjax's built step (clip 0.05 acting on every step, weight decay 0.1, warm-up + cosine,
with and without accumulation over 2 micro-steps) equal A and B_t C of a reference that trains
B directly (forward with B C) with clip → optax.adamw within 2.6e-8 (weights ~0.1, Adam ε
1e-4). With ε 1e-8 the gap is 6.7e-7 (1.2e-6 to 1.9e-6 with accumulation), the size by which
two float32 formulations of the reference differ from each other (4.5e-7, 5.0e-7): Adam's
m/(√v + ε) magnifies the rounding of A's first, near-zero gradient entries.

Exact to the paper: a fixed projector computed from the aligned model's features on safety data
multiplies the LoRA branch output; LoRA A and B are trained. Assumptions (the paper's §3 was not
reachable here): C = I − V_r V_rᵀ from the uncentred module outputs (all non-padding tokens of
the safety rows), one C per module and layer, r = `safety_rank` (default 32, not the paper's
verified value). Not implemented: the paper's task-specific initialization of A and B.
"""

from __future__ import annotations

from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import optax

from hfjax.defenses.api import (
    ALIGN,
    USER,
    Cost,
    DefenseError,
    Hints,
    StepOptions,
    captures,
    check_update,
    register,
)
from hfjax.defenses.compose import around_optimizer
from hfjax.models.config import at_least_float32
from hfjax.models.lora import LoRA

PAPER = ("Li, Si, Backes, Zhang, Wang. SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation. "
         "ICLR 2025, arXiv:2501.01765")


class SaLoRAState(NamedTuple):
    count: jax.Array  # updates taken so far; the bases are computed at count 0
    bases: dict  # {module: V_r [L, d, r]}, the safety subspace of each module's outputs


def safety_basis(outputs: jax.Array, attention_mask: jax.Array, rank: int) -> jax.Array:
    """V_r [L, d, r]: the top-r eigenvectors of Σ_tokens y yᵀ over the non-padding tokens of the
    module outputs [L, B, T, d], per layer (float32 or wider)."""
    y = outputs.astype(at_least_float32(outputs.dtype))
    y = jnp.where(attention_mask.astype(bool)[None, :, :, None], y, 0.0)
    gram = jnp.einsum("lbtd,lbte->lde", y, y)
    _, vectors = jnp.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[..., -rank:]


def project_out(g: jax.Array, basis: jax.Array) -> jax.Array:
    """g C = g − (g V) Vᵀ for g [L, r_lora, d], V [L, d, r]."""
    v = basis.astype(g.dtype)
    return g - jnp.einsum("lkr,ldr->lkd", jnp.einsum("lkd,ldr->lkr", g, v), v)


def project_lora(updates: LoRA, bases: dict) -> LoRA:
    """The LoRA updates with every module's B projected off its safety subspace (A as is)."""
    return updates.replace(weights={name: {**w, "B": project_out(w["B"], bases[name])}
                                    for name, w in updates.weights.items()})


def _options(**_) -> StepOptions:
    return StepOptions(primary=USER)


@register("salora", stage="finetune", level="gradient", cost=Cost(2, 1), batches=(USER, ALIGN),
          paper=PAPER, options=_options)
def salora(safety_rank: int = 32) -> optax.GradientTransformationExtraArgs:
    """Projects the LoRA B gradient off the safety subspace of each module's outputs, computed at
    the first update from batches["align"]; `.wrap_optimizer(opt)` also projects opt's update
    (see the module doc)."""
    if isinstance(safety_rank, bool) or not isinstance(safety_rank, int) or safety_rank < 1:
        raise DefenseError(f"salora's safety_rank must be an integer >= 1, got {safety_rank!r}")

    def init_fn(params) -> SaLoRAState:
        if not isinstance(params, LoRA):
            raise DefenseError(f"salora projects LoRA branches; the trainable is a "
                               f"{type(params).__name__}, not a LoRA adapter")
        bases = {}
        for name, w in params.weights.items():
            layers, _, d = w["B"].shape
            if safety_rank >= d:
                raise DefenseError(f"salora's safety_rank {safety_rank} must be below {name}'s "
                                   f"output size {d}")
            bases[name] = jnp.zeros((layers, d, safety_rank), at_least_float32(w["B"].dtype))
        return SaLoRAState(jnp.zeros((), jnp.int32), bases)

    def update_fn(updates, state: SaLoRAState, params=None, *, loss_fn=None, batches=None,
                  rng=None, **hints: Unpack[Hints]):
        del rng, hints
        check_update("salora", params, loss_fn, batches, (ALIGN,))
        batch = batches[ALIGN]

        def compute():
            aux = loss_fn(params, batch, capture=("proj_outputs",))[1]
            outputs = captures(aux, ("proj_outputs",), "salora")["proj_outputs"]
            return {name: safety_basis(outputs[name], batch["attention_mask"],
                                       safety_rank).astype(b.dtype)
                    for name, b in state.bases.items()}

        bases = jax.lax.cond(state.count == 0, compute, lambda: state.bases)
        return project_lora(updates, bases), SaLoRAState(state.count + 1, bases)

    return around_optimizer(optax.GradientTransformationExtraArgs(init_fn, update_fn),
                            after=lambda updates, state: project_lora(updates, state.bases))


def salora_chain(optimizer: optax.GradientTransformation,
                 safety_rank: int = 32) -> optax.GradientTransformationExtraArgs:
    """`salora(safety_rank).wrap_optimizer(optimizer)`: SaLoRA's B trained by any optimizer (the
    gradient projected before it, its update after it, by one C)."""
    return salora(safety_rank).wrap_optimizer(optimizer)
