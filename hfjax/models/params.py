"""The parameter pytree of a decoder: layout, shapes, logical axes, random init.

Layers are stacked on a leading axis L so the forward pass can `lax.scan` over them.
Kernels are stored for `x @ W` (shape [in, out]), the transpose of HF's nn.Linear [out, in].

    {
      "embed_tokens": [V, D],
      "layers": {
        "attn_norm": [L, D],                       # HF input_layernorm
        "q_proj": {"kernel": [L, D, Hq*hd], "bias": [L, Hq*hd]},   # bias: Qwen2 only
        "k_proj": {"kernel": [L, D, Hkv*hd], ...}, "v_proj": {...},
        "o_proj": {"kernel": [L, Hq*hd, D]},
        "attn_post_norm": [L, D],                  # Gemma 2 only (HF post_attention_layernorm)
        "mlp_norm": [L, D],                        # HF post_attention_layernorm (Llama),
                                                   #    pre_feedforward_layernorm (Gemma 2)
        "gate_proj": {"kernel": [L, D, F]}, "up_proj": {...}, "down_proj": {"kernel": [L, F, D]},
        "mlp_post_norm": [L, D],                   # Gemma 2 only
      },
      "final_norm": [D],
      "lm_head": [D, V],                           # absent when embeddings are tied
    }

Norm weights are stored as in HF (Gemma's 1 + w offset is applied by the forward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hfjax.models.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Logical axis names of a kernel's (in, out) dimensions, per projection.
_KERNEL_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }


def layer_norm_names(cfg: ModelConfig) -> tuple[str, ...]:
    if cfg.sandwich_norms:
        return ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm")
    return ("attn_norm", "mlp_norm")


def _layout(cfg: ModelConfig) -> dict:
    """Pytree of (shape, logical axes) pairs; the single source of the layout."""
    n, d, v = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    layers: dict = {name: ((n, d), ("layers", "norm")) for name in layer_norm_names(cfg)}
    for name, (fin, fout) in projection_dims(cfg).items():
        entry = {"kernel": ((n, fin, fout), ("layers", *_KERNEL_AXES[name]))}
        if cfg.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            entry["bias"] = ((n, fout), ("layers", _KERNEL_AXES[name][1]))
        layers[name] = entry
    tree = {
        "embed_tokens": ((v, d), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ((d,), ("norm",)),
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = ((d, v), ("embed", "vocab"))
    return tree


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """Pytree of `jax.ShapeDtypeStruct` with the layout above."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], dtype), _layout(cfg), is_leaf=_is_spec)


def logical_axes(cfg: ModelConfig) -> dict:
    """Pytree of logical axis-name tuples, one per parameter (same structure as params)."""
    return jax.tree.map(lambda s: s[1], _layout(cfg), is_leaf=_is_spec)


def init_random(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random parameters (normal(0, std) kernels, unit-ish norms) for tests and benchmarks."""
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, sd), k in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            base = 0.0 if cfg.norm_weight_offset else 1.0
            out.append((base + 0.1 * jax.random.normal(k, sd.shape)).astype(dtype))
        else:
            out.append((std * jax.random.normal(k, sd.shape)).astype(dtype))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)
