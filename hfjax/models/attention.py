"""Grouped-query attention and the choice of its kernel.

    out = softmax(s · q kᵀ + mask) v,   s = cfg.attention_scale,  q [B,T,Hq,hd], k/v [B,S,Hkv,hd]

Two implementations (`ModelConfig.attention`):
  "xla"    hfjax's einsum over [B, Hkv, G, T, S] scores, softcap and softmax in max(dtype,
           float32) (float64 for a float64 model; softcap supported), under
           `jax.checkpoint`: the backward recomputes scores and probabilities from q, k, v
           instead of keeping two [B, H, T, S] tensors per layer. Every backend, every shape.
  "cudnn"  cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`:
           no [T, S] tensor in memory, the causal upper triangle skipped, O(T) residuals. GPU,
           bf16/f16, no logit softcap, head_dim a multiple of 8 up to 128, even T and S, and
           keys aligned with the queries: no KV cache and no prefix (decoding steps and prefix
           tuning, whose keys hold earlier positions, always use "xla").
  "auto"   (default) "cudnn" where all of that holds and cuDNN is found, else "xla". On CPU it
           is always "xla" (BUILD_NOTES: `jax.nn.dot_product_attention`'s XLA path measured no
           faster there).

Both read the same boolean mask (causal, key padding, sliding window: `mask`), so padded and
windowed batches mean the same on either kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.models.config import ModelConfig, at_least_float32

_NEG_INF = float(np.finfo(np.float32).min)
_CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_MAX_HEAD_DIM = 128


def mask(q_index: jax.Array, k_index: jax.Array, key_valid: jax.Array,
         window: jax.Array) -> jax.Array:
    """Boolean [B, 1, T, S]: causal, key not padding, within the sliding window (0: none)."""
    delta = q_index[:, None] - k_index[None, :]
    allowed = (delta >= 0) & ((window == 0) | (delta < window))
    return (allowed[None] & key_valid[:, None, :])[:, None]


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """c · tanh(x / c) (Gemma 2), or x when cap is None/0."""
    return x if not cap else cap * jnp.tanh(x / cap)


def einsum_attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
                     allowed: jax.Array) -> jax.Array:
    """The "xla" kernel without its remat: q [B,T,Hq,hd], k/v [B,S,Hkv,hd] -> [B,T,Hq,hd]."""
    b, t, hq, hd = q.shape
    groups = hq // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(cfg.attention_scale, q.dtype)
    scores = softcap(scores.astype(at_least_float32(scores.dtype)), cfg.attn_logit_softcap)
    scores = jnp.where(allowed[:, :, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, hd)


_einsum_attention_remat = jax.checkpoint(einsum_attention, static_argnums=(0,))


def fused_attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
                    allowed: jax.Array, *, implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with hfjax's mask and scale (no cache: causal).

    The mask already is causal; is_causal=True adds nothing to it but lets cuDNN skip the blocks
    above the diagonal. implementation="xla" runs the same call through JAX's reference path,
    which is how the tests check these arguments on a machine without cuDNN.
    """
    if cfg.attn_logit_softcap:
        raise ValueError("jax.nn.dot_product_attention has no logit softcap (Gemma 2): "
                         "use attention='xla'")
    return jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=cfg.attention_scale,
                                        is_causal=True, implementation=implementation)


@functools.cache
def _cudnn_found() -> str | None:
    """None when JAX finds cuDNN, else the reason it does not."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        check_cudnn_version()
    except Exception as e:  # ImportError, RuntimeError: no cuDNN in this JAX install
        return f"{type(e).__name__}: {e}"
    return None


def cudnn_unsupported(cfg: ModelConfig, *, dtype, t: int, s: int, cached: bool,
                      backend: str | None = None) -> str | None:
    """Why cuDNN flash attention cannot run this call (None: it can)."""
    backend = backend or jax.default_backend()
    reasons = []
    if backend != "gpu":
        reasons.append(f"the backend is {backend!r}, not 'gpu'")
    if jnp.dtype(dtype).name not in _CUDNN_DTYPES:
        reasons.append(f"dtype {jnp.dtype(dtype).name} is not bfloat16/float16")
    if cfg.attn_logit_softcap:
        reasons.append("the model uses an attention logit softcap")
    if cfg.head_dim % 8 or cfg.head_dim > _CUDNN_MAX_HEAD_DIM:
        reasons.append(f"head_dim {cfg.head_dim} is not a multiple of 8 up to "
                       f"{_CUDNN_MAX_HEAD_DIM}")
    if t % 2 or s % 2:
        reasons.append(f"query/key lengths {t}/{s} are not even")
    if cached:
        reasons.append("it reads a KV cache or prefix keys (keys before the queries)")
    missing = None if reasons else _cudnn_found()
    if missing:
        reasons.append(f"cuDNN is not available ({missing})")
    return "; ".join(reasons) or None


def choose_kernel(cfg: ModelConfig, *, dtype, t: int, s: int, cached: bool,
                   backend: str | None = None) -> str:
    """"xla" or "cudnn" for cfg.attention (module docstring). An explicit "cudnn" that cannot
    run raises ValueError naming why, except with `cached` keys (KV-cache decoding or a prefix:
    keys at positions before the queries), which always use "xla"."""
    choice = cfg.attention  # one of ATTENTION_IMPLEMENTATIONS (ModelConfig checks it)
    if choice == "xla" or (choice == "cudnn" and cached):
        return "xla"
    why = cudnn_unsupported(cfg, dtype=dtype, t=t, s=s, cached=cached, backend=backend)
    if why is None:
        return "cudnn"
    if choice == "cudnn":
        raise ValueError(f"attention='cudnn' cannot run here: {why}")
    return "xla"


def attend(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *,
           cached: bool) -> jax.Array:
    """Attention with the kernel `choose_kernel` picks; q [B,T,Hq,hd], k/v [B,S,Hkv,hd].
    cached: the keys start before the queries (a KV cache or a prefix)."""
    kernel = choose_kernel(cfg, dtype=q.dtype, t=q.shape[1], s=k.shape[1], cached=cached)
    if kernel == "cudnn":
        return fused_attention(cfg, q, k, v, allowed)
    return _einsum_attention_remat(cfg, q, k, v, allowed)
