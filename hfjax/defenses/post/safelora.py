"""SafeLoRA: project the fine-tuned LoRA onto the alignment subspace where it drifts from it.

Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large
Language Models", arXiv:2405.16833 (IBM/SafeLoRA). In HF's [out, in] convention, per layer and
target module, with W_base the unaligned and W_aligned the aligned weight, and the LoRA update
ΔW = B A (lora_B [out, r], lora_A [r, in]):

    V = W_aligned − W_base,   C = V Vᵀ / ‖V‖_F                        ([out, out])
    cos = ⟨C B A, B A⟩_F / (‖C B A‖_F ‖B A‖_F)
    B ← C B   on the modules with cos ≤ the k-th smallest cos over all (layer, module)
              (mode "count", k = 10: the official default, `config.py` select_layers_type
              "number") or with cos ≤ τ (mode "threshold", τ = 0.5)

hfjax stores kernels K = Wᵀ [in, out], A_h = Aᵀ [in, r], B_h = Bᵀ [r, out], so V = ΔKᵀ,
C = ΔKᵀ ΔK / ‖ΔK‖_F (symmetric), the projection is B_h ← B_h C and cos = cos(A_h B_h C, A_h B_h).
Computed without forming C: B_h C = (B_h ΔKᵀ) ΔK / ‖ΔK‖_F, and with G = A_hᵀ A_h [r, r],
⟨A_h X, A_h Y⟩_F = Σ X ⊙ (G Y), so every inner product is an r × out one. One layer at a time
(`lax.map`), so the only large temporary is one layer's ΔK. No training, no data. Computed in
max(dtype, float32) at HIGHEST matmul precision (float64 for float64 weights).

As in the reference code: count mode takes the k-th smallest cos as the threshold, so ties at it
are all projected; the LoRA scale α/r cancels in cos and commutes with the projection.
As torch's cosine_similarity there, an update orthogonal to span(V) (C B A = 0) has cos 0 and is
projected (to B = 0). Unlike it: cos is not rounded to 5 decimals, and a module whose V = 0 (the
alignment did not touch it) or whose B A = 0 gets cos = NaN and is never projected (the original
gets NaN by accident for V = 0, and in count mode would then project nothing); count mode ranks
finite cos only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.defenses.api import DefenseError, register
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.lora import LoRA, _check_against_cfg

PAPER = ("Hsu et al. 2024, Safe LoRA: the Silver Lining of Reducing Safety Risks when "
         "Finetuning Large Language Models, arXiv:2405.16833")
MODES = ("threshold", "count")

_HI = jax.lax.Precision.HIGHEST


def _layer_projection(base_k: jax.Array, aligned_k: jax.Array, a: jax.Array,
                      b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, B_h C) for one layer: kernels [in, out], a [in, r], b [r, out] (hfjax layout)."""
    wide = at_least_float32(jnp.result_type(base_k, aligned_k, a, b))
    dk = aligned_k.astype(wide) - base_k.astype(wide)
    a, b = a.astype(wide), b.astype(wide)
    norm = jnp.sqrt(jnp.sum(dk * dk))
    bc = jnp.matmul(jnp.matmul(b, dk.T, precision=_HI), dk, precision=_HI)
    bc = bc / jnp.where(norm > 0, norm, 1.0)
    g = jnp.matmul(a.T, a, precision=_HI)
    inner = jnp.sum(bc * jnp.matmul(g, b, precision=_HI))
    sq_proj = jnp.sum(bc * jnp.matmul(g, bc, precision=_HI))
    sq_orig = jnp.sum(b * jnp.matmul(g, b, precision=_HI))
    denom = jnp.sqrt(jnp.maximum(sq_proj, 0.0) * jnp.maximum(sq_orig, 0.0))
    cos = inner / jnp.maximum(denom, jnp.finfo(wide).tiny)  # C B A = 0 gives cos 0
    return jnp.where((norm > 0) & (sq_orig > 0), cos, jnp.nan), bc


@jax.jit
def _module_projection(base_k, aligned_k, a, b):
    """Per layer (cos [L], B_h C [L, r, out]) of one target module."""
    return jax.lax.map(lambda xs: _layer_projection(*xs), (base_k, aligned_k, a, b))


def stacked_kernel(params: dict, name: str, which: str, shape: tuple[int, ...],
                   method: str = "SafeLoRA") -> jax.Array:
    """The stacked [layers, in, out] kernel of projection `name` in `params` (the `which`
    model's), or a DefenseError naming `method`, the model and what is missing or misshapen."""
    layers = params.get("layers", {})
    if name not in layers or "kernel" not in layers[name]:
        raise DefenseError(f"{method}: the {which} params have no layers.{name}.kernel")
    kernel = layers[name]["kernel"]
    if tuple(kernel.shape) != shape:
        raise DefenseError(f"{method}: {which} layers.{name}.kernel has shape "
                           f"{tuple(kernel.shape)}, expected {shape} [layers, in, out]")
    return kernel


def safelora(cfg: ModelConfig, base_params: dict, aligned_params: dict, lora: LoRA,
             mode: str = "count", threshold: float = 0.5, num_proj_layers: int = 10
             ) -> tuple[LoRA, dict]:
    """Project the adapter's B onto span(V) on its least aligned modules (module docstring).

    base_params / aligned_params: the unaligned and the aligned model (the adapter was trained on
    the aligned one). Returns (new adapter, report) with report = {"mode", "threshold" (the cos
    cut actually used), "num_projected", "modules": [{"layer", "module", "cos", "projected"},
    ...] in layer-major order} (plain JSON-able values; cos NaN where undefined).
    """
    if mode not in MODES:
        raise DefenseError(f"SafeLoRA mode must be one of {MODES}, got {mode!r}")
    if mode == "count" and (isinstance(num_proj_layers, bool) or int(num_proj_layers) < 1):
        raise DefenseError(f"SafeLoRA count mode needs num_proj_layers >= 1, got "
                           f"{num_proj_layers!r}")
    _check_against_cfg(cfg, lora)
    names = list(lora.weights)
    cos, projected_b = {}, {}
    for name in names:
        a, b = lora.weights[name]["A"], lora.weights[name]["B"]
        shape = (a.shape[0], a.shape[1], b.shape[2])
        base_k = stacked_kernel(base_params, name, "base", shape)
        aligned_k = stacked_kernel(aligned_params, name, "aligned", shape)
        c, pb = _module_projection(base_k, aligned_k, a, b)
        cos[name], projected_b[name] = np.asarray(jax.device_get(c), np.float64), pb

    table = np.stack([cos[n] for n in names], axis=1)  # [L, modules]
    finite = np.sort(table[np.isfinite(table)])
    if mode == "threshold":
        cut = float(threshold)
    elif finite.size:
        cut = float(finite[min(int(num_proj_layers), finite.size) - 1])
    else:
        cut = float("nan")
    with np.errstate(invalid="ignore"):
        chosen = np.isfinite(table) & (table <= cut)

    weights = {}
    for j, name in enumerate(names):
        b = lora.weights[name]["B"]
        pick = jnp.asarray(chosen[:, j])[:, None, None]
        weights[name] = {**lora.weights[name],
                         "B": jnp.where(pick, projected_b[name].astype(b.dtype), b)}
    modules = [{"layer": layer, "module": name, "cos": float(table[layer, j]),
                "projected": bool(chosen[layer, j])}
               for layer in range(table.shape[0]) for j, name in enumerate(names)]
    report = {"mode": mode, "threshold": cut, "num_projected": int(chosen.sum()),
              "modules": modules}
    return lora.replace(weights=weights), report


@register("safelora", stage="post", level="weights", cost=None, batches=(), paper=PAPER)
def safelora_defense(mode: str = "count", threshold: float = 0.5, num_proj_layers: int = 10):
    """Weights-level form: `apply(cfg, params, lora, *, base_params) -> (lora, report)`.

    params: the aligned model the adapter was fine-tuned on; base_params: the unaligned one.
    """
    if mode not in MODES:
        raise DefenseError(f"SafeLoRA mode must be one of {MODES}, got {mode!r}")

    def apply(cfg: ModelConfig, params: dict, lora: LoRA, *, base_params: dict):
        return safelora(cfg, base_params, params, lora, mode=mode, threshold=threshold,
                        num_proj_layers=num_proj_layers)

    return apply
