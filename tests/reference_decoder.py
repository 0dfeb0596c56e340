"""A plain-jnp decoder and loss written apart from hfjax.models.decoder, for reference checks.

A Python loop over layers, RoPE from explicit angles (x₁ cos − x₂ sin, x₂ cos + x₁ sin), GQA
by repeating the key/value heads, masks built from the definitions, LoRA as x W + s·x' A B
(x' = x, or the explicitly masked m ⊙ x / (1 − p) under LoRA dropout, with the masks of
`lora.dropout_keys` / `lora.dropout_mask`), and the cross-entropy as a log-softmax.
Everything runs in the params' dtype (no casts), so with float64 params it is a float64
reference. Default RoPE only (no scaling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.models import lora as lora_lib
from hfjax.models.config import ModelConfig


def norm(cfg: ModelConfig, x, w):
    """RMSNorm: x / sqrt(mean(x²) + eps) · (offset + w)."""
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps) * (
        cfg.norm_weight_offset + w)


def rope(x, positions, theta: float):
    """Rotate x [B, T, H, d] by angles positions · θ^(−2i/d) on the pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv_freq = (1.0 / theta ** (np.arange(0, d, 2) / d)).astype(x.dtype)
    angle = positions[:, :, None, None].astype(x.dtype) * inv_freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def activation(cfg: ModelConfig, x):
    if cfg.mlp_activation == "gelu_tanh":
        return 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return x / (1 + jnp.exp(-x))


def softcap(x, cap):
    return cap * jnp.tanh(x / cap) if cap else x


def linear(x, layers: dict, layer: int, name: str, lora, layer_key=None):
    """x W (+ b) (+ s · x' A B); with `layer_key`, x' = m ⊙ x / (1 − p) for the mask m that
    `lora.dropout_mask` draws over the [B·T, in] inputs."""
    y = x @ layers[name]["kernel"][layer]
    if "bias" in layers[name]:
        y = y + layers[name]["bias"][layer]
    if lora is not None and name in lora.weights:
        w = lora.weights[name]
        if layer_key is not None:
            keep = lora_lib.dropout_mask(layer_key, name, lora.dropout,
                                         (x.shape[0] * x.shape[1], x.shape[2]))
            x = jnp.where(keep.reshape(x.shape), x / (1 - lora.dropout), 0.0)
        y = y + lora.scale * (x @ w["A"][layer] @ w["B"][layer])
    return y


def forward(cfg: ModelConfig, params: dict, ids, mask, lora=None, perturb=None,
            perturb_after_post_norm: bool = False, dropout_rng=None):
    """(logits [B, T, V], {"attn_out", "mlp_out", "residual"}: [L, B, T, D] each).

    perturb [L, B, T, D] is added to o_proj's output, before Gemma 2's post-attention norm
    (after it with perturb_after_post_norm: the point a test contrasts with).
    dropout_rng: LoRA dropout with the masks of layer l drawn from `lora.dropout_keys`[l].
    """
    b, t = ids.shape
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = params["layers"]
    h = params["embed_tokens"][ids]
    if cfg.scale_embeddings:
        h = h * np.sqrt(cfg.hidden_size).astype(h.dtype)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    q_pos, k_pos = np.arange(t)[:, None], np.arange(t)[None, :]
    captured = {"attn_out": [], "mlp_out": [], "residual": []}
    keys = (lora_lib.dropout_keys(dropout_rng, cfg.num_layers) if dropout_rng is not None
            else [None] * cfg.num_layers)
    for layer in range(cfg.num_layers):
        proj = lambda x, name, layer=layer: linear(  # noqa: E731
            x, layers, layer, name, lora, keys[layer])
        x = norm(cfg, h, layers["attn_norm"][layer])
        q = proj(x, "q_proj").reshape(b, t, hq, hd)
        k = proj(x, "k_proj").reshape(b, t, hkv, hd)
        v = proj(x, "v_proj").reshape(b, t, hkv, hd)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        k, v = jnp.repeat(k, hq // hkv, axis=2), jnp.repeat(v, hq // hkv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * cfg.attention_scale
        scores = softcap(scores, cfg.attn_logit_softcap)
        window = cfg.layer_windows[layer]
        allowed = (k_pos <= q_pos) & ((window == 0) | (q_pos - k_pos < window))
        allowed = allowed[None, None] & mask.astype(bool)[:, None, None, :]
        scores = jnp.where(allowed, scores, -1e30)
        probs = jnp.exp(scores - scores.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, hq * hd)
        a = proj(o, "o_proj")
        captured["attn_out"].append(a)
        if perturb is not None and not perturb_after_post_norm:
            a = a + perturb[layer]
        if cfg.sandwich_norms:
            a = norm(cfg, a, layers["attn_post_norm"][layer])
        if perturb is not None and perturb_after_post_norm:
            a = a + perturb[layer]
        h = h + a
        x = norm(cfg, h, layers["mlp_norm"][layer])
        m = proj(activation(cfg, proj(x, "gate_proj")) * proj(x, "up_proj"), "down_proj")
        captured["mlp_out"].append(m)
        if cfg.sandwich_norms:
            m = norm(cfg, m, layers["mlp_post_norm"][layer])
        h = h + m
        captured["residual"].append(h)
    h = norm(cfg, h, params["final_norm"])
    head = params["embed_tokens"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = softcap(h @ head, cfg.final_logit_softcap)
    return logits, {k: jnp.stack(v) for k, v in captured.items()}


def loss(cfg: ModelConfig, params: dict, lora, batch: dict, dropout_rng=None):
    """Mean −log p(labels[t + 1] | ≤ t) over the positions whose next label is not −100."""
    logits = forward(cfg, params, batch["input_ids"], batch["attention_mask"], lora,
                     dropout_rng=dropout_rng)[0][:, :-1]
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    log_probs = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.sum(valid)
