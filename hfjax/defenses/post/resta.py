"""RESTA: add the safety vector back to the fine-tuned weights (task arithmetic).

Rishabh Bhardwaj, Do Duc Anh, Soujanya Poria. "Language Models are Homer Simpson! Safety
Re-Alignment of Fine-tuned Language Models through Task Arithmetic". ACL 2024, arXiv:2402.11746
(declare-lab/resta). With θ_sft the fine-tuned weights and the safety vector
δ = θ_aligned − θ_unaligned,

    θ_resta = θ_sft + s · δ                                               (s = 0.5)

In hfjax's protocol θ_unaligned is the base model, θ_aligned the base with the alignment adapter
merged and θ_sft = θ_aligned + scale · A B on the target modules (kernels K [in, out], A [in, r],
B [r, out]). Per target module and layer, with ΔK = K_aligned − K_base of numerical rank k_l
(singular values above σ_max · max(in, out) · eps, NumPy's matrix_rank) and its SVD U S Vᵀ:

    scale' · A' B' = scale · A B + s · ΔK      A' = [A | U_k √S_k],  B' = [B | (s/scale) √S_k Vᵀ_k]

a LoRA of rank r' = r + k (k = max k_l over modules and layers; a layer of lower rank has zero
columns) with alpha' = scale · r', so scale' = scale and the merged model is θ_resta on the target
modules up to the SVD's rounding. Exact as a whole when the alignment changed only the adapter's
target modules (hfjax's alignment adapter merged into the same targets); the report lists every
other weight where the aligned and the base model differ, which RESTA would shift too and a LoRA
cannot carry. Not implemented: the paper's optional DARE step on the fine-tuning delta (RESTA_d).
The SVDs run in max(dtype, float32), one layer at a time; the new factors take the adapter's
dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.defenses.api import DefenseError, register
from hfjax.defenses.post.safelora import stacked_kernel
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.lora import LoRA, _check_against_cfg

PAPER = ("Bhardwaj et al. Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned "
         "Language Models through Task Arithmetic, ACL 2024, arXiv:2402.11746")


def _delta(base_k: jax.Array, aligned_k: jax.Array) -> jax.Array:
    wide = at_least_float32(jnp.result_type(base_k, aligned_k))
    return aligned_k.astype(wide) - base_k.astype(wide)


@jax.jit
def _numerical_ranks(base_k: jax.Array, aligned_k: jax.Array) -> jax.Array:
    """[L] numerical rank of each layer's ΔK (NumPy's matrix_rank tolerance)."""
    def rank(xs):
        dk = _delta(*xs)
        s = jnp.linalg.svd(dk, compute_uv=False)
        tol = s[0] * max(dk.shape) * jnp.finfo(dk.dtype).eps
        return jnp.sum(s > tol)

    return jax.lax.map(rank, (base_k, aligned_k))


@functools.partial(jax.jit, static_argnums=2)
def _factors(base_k: jax.Array, aligned_k: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Per layer (U_k √S_k [L, in, k], √S_k Vᵀ_k [L, k, out]) with the singular values at or
    below the rank tolerance set to zero."""
    def factor(xs):
        dk = _delta(*xs)
        u, s, vt = jnp.linalg.svd(dk, full_matrices=False)
        tol = s[0] * max(dk.shape) * jnp.finfo(dk.dtype).eps
        root = jnp.sqrt(jnp.where(s > tol, s, 0.0))[:k]
        return u[:, :k] * root, root[:, None] * vt[:k]

    return jax.lax.map(factor, (base_k, aligned_k))


def changed_outside(base_params: dict, aligned_params: dict, targets: tuple[str, ...]
                    ) -> list[str]:
    """The paths of the weights, other than the targets' kernels, where the two models differ."""
    skip = {f"['layers']['{name}']['kernel']" for name in targets}
    base = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(base_params)}
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(aligned_params):
        name = jax.tree_util.keystr(path)
        if name in skip:
            continue
        other = base.get(name)
        if other is None or np.shape(other) != np.shape(leaf) or \
                not bool(jnp.array_equal(other, leaf)):
            out.append(name)
    return out


def resta(cfg: ModelConfig, base_params: dict, aligned_params: dict, lora: LoRA,
          safety_scale: float = 0.5) -> tuple[LoRA, dict]:
    """The adapter whose merge is θ_sft + s · (θ_aligned − θ_base) on its target modules
    (module docstring), and a report {"safety_scale", "rank", "added_rank", "safety_ranks":
    {module: [k_l per layer]}, "changed_outside_targets": [paths]}.

    base_params / aligned_params: the unaligned and the aligned model (the adapter was trained
    on the aligned one).
    """
    if not math.isfinite(float(safety_scale)):
        raise DefenseError(f"RESTA's safety_scale must be a finite number, got {safety_scale!r}")
    _check_against_cfg(cfg, lora)
    if not lora.scale:
        raise DefenseError("RESTA needs an adapter with a non-zero scale alpha / r")
    kernels, ranks = {}, {}
    for name, w in lora.weights.items():
        shape = (w["A"].shape[0], w["A"].shape[1], w["B"].shape[2])
        kernels[name] = (stacked_kernel(base_params, name, "base", shape, "RESTA"),
                         stacked_kernel(aligned_params, name, "aligned", shape, "RESTA"))
        ranks[name] = [int(x) for x in jax.device_get(_numerical_ranks(*kernels[name]))]
    k = max(max(r) for r in ranks.values())
    ratio = float(safety_scale) / lora.scale
    weights = {}
    for name, w in lora.weights.items():
        if k:
            left, right = _factors(*kernels[name], k)
            w = {**w, "A": jnp.concatenate([w["A"], left.astype(w["A"].dtype)], axis=2),
                 "B": jnp.concatenate([w["B"], (ratio * right).astype(w["B"].dtype)], axis=1)}
        weights[name] = w
    rank = lora.rank + k
    report = {"safety_scale": float(safety_scale), "rank": rank, "added_rank": k,
              "safety_ranks": ranks,
              "changed_outside_targets": changed_outside(base_params, aligned_params,
                                                         lora.targets)}
    return lora.replace(weights=weights, alpha=lora.scale * rank), report


@register("resta", stage="post", level="weights", cost=None, batches=(), paper=PAPER)
def resta_defense(safety_scale: float = 0.5):
    """Weights-level form: `apply(cfg, params, lora, *, base_params) -> (lora, report)`.

    params: the aligned model the adapter was fine-tuned on; base_params: the unaligned one.
    """
    if not math.isfinite(float(safety_scale)):
        raise DefenseError(f"RESTA's safety_scale must be a finite number, got {safety_scale!r}")

    def apply(cfg: ModelConfig, params: dict, lora: LoRA, *, base_params: dict):
        return resta(cfg, base_params, params, lora, safety_scale=safety_scale)

    return apply
