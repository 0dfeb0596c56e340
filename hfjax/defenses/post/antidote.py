"""Antidote: prune the LoRA weights that matter most on harmful data (post fine-tuning).

Huang et al. 2024, "Antidote: Post-fine-tuning Safety Alignment for Large Language Models
against Harmful Fine-tuning", arXiv:2408.09600 (git-disl/Antidote, `prune_wanda_outlier`).
Wanda scores of every LoRA matrix on harmful calibration data, in HF's [out, in] convention:

    S_ij = |W_ij| · ‖X_j‖₂        ‖X_j‖₂ over all calibration tokens of input channel j
    W_ij ← 0   for the n − int(n · (1 − ρ)) highest S_ij of each output row i (n its length)

with ρ = `dense_ratio` = 0.1. For lora_A [r, in] the inputs X are the
projection's inputs; for lora_B [out, r] they are the rank-r activations x A (before the α/r
scale). Forward passes only: one per calibration batch with `capture=("proj_inputs",)`.

Following the reference code: the calibration model is the fine-tuned one with its adapter
active (unpruned while scoring); each row is sorted ascending (stable) and everything past the
first int(n · (1 − ρ)) entries is zeroed, i.e. the highest scores ("harmful" weights), per output
row; with no calibration data S = |W| (their sample_num = 0 path). The reference scales ‖X_j‖
by 1/sqrt(#samples), which does not change any ranking. The reference runs the calibration
forward on input_ids alone (`utils.py:460`), so padding tokens are attended to and counted in
‖X_j‖ like any token: `padding="official"` (default) does the same (an all-ones mask);
`padding="masked"` leaves padding (attention_mask 0) out of the forward and of ‖X_j‖.

hfjax stores A_h = lora_Aᵀ [L, in, r] and B_h = lora_Bᵀ [L, r, out], so an HF row is a column of
the hfjax matrix and the ranking runs over axis 1 of [L, in, out]-shaped arrays.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.defenses.api import Cost, DefenseError, register
from hfjax.models import forward
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.lora import LoRA, _check_against_cfg

PAPER = ("Huang et al. 2024, Antidote: Post-fine-tuning Safety Alignment for Large Language "
         "Models against Harmful Fine-tuning, arXiv:2408.09600")


def _sum_squares(cfg: ModelConfig, params: dict, lora: LoRA, input_ids, attention_mask):
    """Σ over real tokens of x_j² per LoRA input channel: {name: {"A": [L, in], "B": [L, r]}},
    in max(dtype, float32)."""
    _, cap = forward(cfg, params, input_ids, attention_mask, lora=lora, capture=("proj_inputs",))
    out = {}
    for name, w in lora.weights.items():
        x = cap["proj_inputs"][name]
        wide = at_least_float32(jnp.result_type(x, w["A"]))
        x = x.astype(wide) * attention_mask.astype(wide)[None, :, :, None]   # [L, B, T, in]
        z = jnp.einsum("lbti,lir->lbtr", x, w["A"].astype(wide),
                       precision=jax.lax.Precision.HIGHEST)                   # [L, B, T, r]
        out[name] = {"A": jnp.sum(x * x, axis=(1, 2)), "B": jnp.sum(z * z, axis=(1, 2))}
    return out


_sum_squares_jit = jax.jit(_sum_squares, static_argnums=0)


PADDINGS = ("official", "masked")


def wanda_scores(cfg: ModelConfig, params: dict, lora: LoRA,
                 calibration_batches: Iterable[dict] | None,
                 padding: str = "official") -> tuple[dict, int]:
    """({name: {"A": S_A [L, in, r], "B": S_B [L, r, out]}}, calibration tokens).

    S_A = |A_h| · ‖X‖ over the in axis, S_B = |B_h| · ‖X A‖ over the r axis (hfjax layout).
    calibration_batches: dicts with input_ids [B, T] and attention_mask [B, T] (labels unused);
    None gives magnitude scores |W| and 0 tokens. padding: "official" counts every position
    (the mask is ignored, as the reference code), "masked" only attention_mask 1.
    """
    _check_against_cfg(cfg, lora)
    if padding not in PADDINGS:
        raise DefenseError(f"Antidote padding must be one of {PADDINGS}, got {padding!r}")
    if calibration_batches is None:
        mags = {n: {p: jnp.abs(w[p]).astype(at_least_float32(w[p].dtype)) for p in ("A", "B")}
                for n, w in lora.weights.items()}
        return mags, 0
    totals, tokens = None, 0
    for i, batch in enumerate(calibration_batches):
        if "input_ids" not in batch:
            raise DefenseError(f"Antidote calibration batch {i} has no input_ids")
        ids = jnp.asarray(batch["input_ids"])
        mask = jnp.asarray(batch.get("attention_mask", jnp.ones_like(ids)))
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise DefenseError(f"Antidote calibration batch {i}: input_ids {ids.shape} and "
                               f"attention_mask {mask.shape} must both be [batch, time]")
        if padding == "official":
            mask = jnp.ones_like(ids)
        sums = _sum_squares_jit(cfg, params, lora, ids, mask)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        tokens += int(jnp.sum(mask))
    if not tokens:
        raise DefenseError("Antidote got no calibration tokens; pass harmful batches (or None "
                           "for magnitude pruning)")
    scores = {}
    for name, w in lora.weights.items():
        norm_in = jnp.sqrt(totals[name]["A"])[:, :, None]    # [L, in, 1]
        norm_mid = jnp.sqrt(totals[name]["B"])[:, :, None]   # [L, r, 1]
        scores[name] = {"A": jnp.abs(w["A"]).astype(norm_in.dtype) * norm_in,
                        "B": jnp.abs(w["B"]).astype(norm_mid.dtype) * norm_mid}
    return scores, tokens


def top_score_mask(scores: jax.Array, dense_ratio: float) -> jax.Array:
    """Bool [L, n, out], True on the entries to zero: per (layer, column), the entries past the
    first int(n · (1 − dense_ratio)) of a stable ascending sort over axis 1 (the top scores)."""
    n = scores.shape[1]
    keep_low = int(n * (1 - dense_ratio))
    order = jnp.argsort(scores, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)  # rank of each entry in the ascending order
    return rank >= keep_low


def antidote(cfg: ModelConfig, params: dict, lora: LoRA,
             calibration_batches: Iterable[dict] | None, dense_ratio: float = 0.1,
             padding: str = "official") -> tuple[LoRA, dict]:
    """Zero the top-`dense_ratio` Wanda-score entries of every LoRA row (module docstring).

    params: the model the adapter sits on; calibration_batches: harmful batches (forward only).
    Returns (pruned adapter, report) with report = {"dense_ratio", "tokens", "pruned":
    {name: {"A": count, "B": count}}, "masks": {name: {"A", "B": bool arrays, True = zeroed}}}.
    """
    if not 0.0 <= float(dense_ratio) <= 1.0:
        raise DefenseError(f"Antidote dense_ratio must be in [0, 1], got {dense_ratio!r}")
    scores, tokens = wanda_scores(cfg, params, lora, calibration_batches, padding)
    weights, masks, pruned = {}, {}, {}
    for name, w in lora.weights.items():
        masks[name] = {p: top_score_mask(scores[name][p], dense_ratio) for p in ("A", "B")}
        weights[name] = {p: jnp.where(masks[name][p], jnp.zeros((), w[p].dtype), w[p])
                         for p in ("A", "B")}
        pruned[name] = {p: int(np.asarray(masks[name][p]).sum()) for p in ("A", "B")}
    report = {"dense_ratio": float(dense_ratio), "tokens": tokens, "pruned": pruned,
              "masks": masks}
    return lora.replace(weights=weights), report


@register("antidote", stage="post", level="weights", cost=Cost(1, 0),
          batches=("harmful",), paper=PAPER)
def antidote_defense(dense_ratio: float = 0.1, padding: str = "official"):
    """Weights-level form: `apply(cfg, params, lora, *, calibration_batches) -> (lora, report)`.

    Cost: one forward pass per calibration batch, no backward (no training steps).
    """
    if not 0.0 <= float(dense_ratio) <= 1.0:
        raise DefenseError(f"Antidote dense_ratio must be in [0, 1], got {dense_ratio!r}")
    if padding not in PADDINGS:
        raise DefenseError(f"Antidote padding must be one of {PADDINGS}, got {padding!r}")

    def apply(cfg: ModelConfig, params: dict, lora: LoRA, *, calibration_batches):
        return antidote(cfg, params, lora, calibration_batches, dense_ratio=dense_ratio,
                        padding=padding)

    return apply
