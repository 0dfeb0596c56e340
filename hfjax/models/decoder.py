"""One decoder-only transformer for every supported family, as pure functions.

    h_0 = E[x] (· sqrt(D) for Gemma 2)
    a_l = W_o Attn(Norm(h_l)) + ε_l                     (ε_l: optional `perturb`)
    h'_l = h_l + PostNorm(a_l)
    m_l = MLP(Norm(h'_l)),   MLP(x) = W_down(act(W_gate x) ⊙ W_up x)
    h_{l+1} = h'_l + PostNorm(m_l)
    logits = softcap(Norm(h_L) @ W_out)

PostNorm is Gemma 2's post-attention / post-feed-forward RMSNorm (the identity for the other
families). a_l and m_l are the outputs of HF's attention and MLP modules (o_proj and down_proj),
where the official defense code's forward hooks read and perturb them (Vaccine, RepNoise).
Norms, softmax and logits run in max(dtype, float32) (`config.at_least_float32`).

Layers run under `jax.lax.scan` over the stacked parameters (optionally under `jax.checkpoint`),
so compile time does not depend on depth. Positions come from the attention mask
(cumsum − 1), so a left-padded row gives the same logits as the unpadded sequence.
A prefix (`models.prefix`: P virtual key/value tokens per layer) sits in front of each layer's
keys and values, unrotated and always attended to; real tokens' positions then start at P.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hfjax.models import attention as attention_lib
from hfjax.models import lora as lora_lib
from hfjax.models import prefix as prefix_lib
from hfjax.models.config import ModelConfig, at_least_float32

CAPTURE_NAMES = ("attn_out", "mlp_out", "residual", "proj_inputs", "proj_outputs")
"""What `forward(capture=...)` can return, each stacked over layers [L, B, T, ...]:
attn_out: the attention module's output (o_proj's) before perturbation, Gemma 2's post-attention
norm and the residual add; mlp_out: the MLP module's output m_l (down_proj's) before Gemma 2's
post-feed-forward norm; residual: the residual stream h_{l+1} after the layer;
proj_inputs: {projection name: its input activations} for all seven projections;
proj_outputs: {projection name: its output x W (+ bias) (+ LoRA branch)} for all seven."""

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies θ^(-2i/d), with HF's 'linear' and 'llama3' scaling, computed in
    max(cfg.dtype, float32)."""
    dim = cfg.head_dim
    dtype = at_least_float32(cfg.dtype)
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=dtype) / dim))
    scaling = cfg.rope_scaling_dict
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(dtype)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, 1, hd] of the RoPE angles positions · θ_i (each frequency twice),
    computed in inv_freq's dtype and returned in `dtype`."""
    freqs = positions.astype(inv_freq.dtype)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate [B, T, H, hd] by positions [B, T] as HF does (rotate_half on two halves)."""
    return _rotate(x, *rope_tables(positions, inv_freq, x.dtype))


def rms_norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x / sqrt(mean(x²) + eps) · w  (Gemma 2: · (1 + w)), normalized in max(x.dtype, float32)."""
    wide = at_least_float32(x.dtype)
    xf = x.astype(wide)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    if cfg.norm_weight_offset:
        return (normed * (cfg.norm_weight_offset + weight.astype(wide))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def _project(x, layer, layer_lora, name, scale, proj_io, forward_mode_ad=False,
             dropout=0.0, dropout_key=None):
    """x @ W (+ bias) (+ LoRA branch, its input under LoRA dropout p = `dropout` when
    `dropout_key` is given: `lora.apply`); records the input and the output in
    proj_io = (inputs, outputs) for capturing.

    The matmuls run on x flattened to [B·T, in]: autodiff of a 2-D LoRA branch gives weight
    gradients dot(h, ∂y) contracting over tokens, which XLA CPU runs without transposing ∂y
    (with [B, T, in] it materialized a transposed copy of every ∂y: ~15% of the LoRA step).
    """
    proj_io[0][name] = x
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = layer[name]
    y = x2 @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    delta = lora_lib.apply(x2, layer_lora, name, scale, forward_mode_ad=forward_mode_ad,
                           dropout=dropout, dropout_key=dropout_key)
    y = y if delta is None else y + delta
    y = proj_io[1][name] = y.reshape(*lead, y.shape[-1])
    return y


def _gated(cfg: ModelConfig, g: jax.Array, u: jax.Array) -> jax.Array:
    """act(g) ⊙ u, rematerialized: the backward pass keeps only g and u (which it needs anyway)
    and recomputes the elementwise terms, instead of saving four more [B, T, F] tensors."""
    return jax.checkpoint(lambda g, u: _mlp_activation(cfg, g) * u)(g, u)


def _mlp_activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.mlp_activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for incremental decoding.

    k, v: [L, B, S, Hkv, hd]; valid: [B, S] (slot holds a real token); index: next slot to write;
    next_pos: [B] the RoPE position of each row's next token (left padding is skipped).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None,
               prefix: prefix_lib.Prefix | None = None) -> KVCache:
        """An empty cache of max_len slots; with a prefix, its P keys/values fill slots
        [0, P) (valid), writing starts at slot P and positions at P (`forward(prefix=)`)."""
        dtype = dtype or jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        cache = cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                    next_pos=jnp.zeros((batch,), jnp.int32))
        if prefix is None:
            return cache
        n = prefix.num_virtual_tokens
        if n > max_len:
            raise ValueError(f"a cache of {max_len} slots cannot hold {n} prefix tokens")
        pk, pv = (jnp.broadcast_to(x[:, None], (cfg.num_layers, batch, *x.shape[1:]))
                  for x in prefix_lib.layer_kv(cfg, prefix, dtype))
        return cls(k=cache.k.at[:, :, :n].set(pk), v=cache.v.at[:, :, :n].set(pv),
                   valid=cache.valid.at[:, :n].set(True), index=jnp.asarray(n, jnp.int32),
                   next_pos=jnp.full((batch,), n, jnp.int32))


def _layer(cfg, rope, q_index, k_valid, lora_scale, lora_dropout, capture, forward_mode_ad, h,
           xs):
    """One decoder layer.

    xs = (layer params, layer LoRA or None, window, ε_l or None, (k, v) cache slices or None,
    the layer's LoRA dropout key or None, the layer's prefix (k, v) [P, Hkv, hd] or None).
    With a cache, the new keys/values are written at slots q_index and attention runs over all
    S slots (k_valid marks the filled ones); the updated slices are returned with the captures.
    With a prefix, its keys/values (not rotated) go in front of the T new ones: key slots
    [0, P + T), queries at slots q_index = P + t.
    rope = (cos, sin) tables from `rope_tables`, computed once for all layers.
    forward_mode_ad: the LoRA branches without their custom VJP (`lora.apply`).
    """
    layer, layer_lora, window, eps, kv, drop_key, pre = xs
    b, t, _ = h.shape
    proj_inputs: dict = {}
    proj_outputs: dict = {}
    proj = lambda x, name: _project(  # noqa: E731
        x, layer, layer_lora, name, lora_scale, (proj_inputs, proj_outputs), forward_mode_ad,
        lora_dropout, drop_key)

    x = rms_norm(h, layer["attn_norm"], cfg)
    q = proj(x, "q_proj").reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = proj(x, "k_proj").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = proj(x, "v_proj").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = _rotate(q, *rope), _rotate(k, *rope)
    k_index = q_index
    if kv is not None:
        start = (0, q_index[0], 0, 0)
        k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
        v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
        k_index = jnp.arange(k.shape[1])
    if pre is not None:
        k, v = (jnp.concatenate([jnp.broadcast_to(p[None], (b, *p.shape)), x], 1)
                for p, x in zip(pre, (k, v), strict=True))
        k_index = jnp.arange(k.shape[1])
    allowed = attention_lib.mask(q_index, k_index, k_valid, window)
    attn = attention_lib.attend(cfg, q, k, v, allowed, cached=kv is not None or pre is not None)
    attn = attn.reshape(b, t, cfg.num_heads * cfg.head_dim)
    a = attn_out = proj(attn, "o_proj")
    if eps is not None:
        a = a + eps.astype(a.dtype)
    if cfg.sandwich_norms:
        a = rms_norm(a, layer["attn_post_norm"], cfg)
    h = h + a

    x = rms_norm(h, layer["mlp_norm"], cfg)
    m = mlp_out = proj(_gated(cfg, proj(x, "gate_proj"), proj(x, "up_proj")), "down_proj")
    if cfg.sandwich_norms:
        m = rms_norm(m, layer["mlp_post_norm"], cfg)
    h = h + m

    everything = {"attn_out": attn_out, "mlp_out": mlp_out, "residual": h,
                  "proj_inputs": proj_inputs, "proj_outputs": proj_outputs}
    return h, ({name: everything[name] for name in capture}, None if kv is None else (k, v))


def head_weights(cfg: ModelConfig, params: dict) -> jax.Array:
    """The output projection W_out [D, V]: the tied embeddings' transpose, or `lm_head`."""
    w, vocab_major = stored_head(cfg, params)
    return w.T if vocab_major else w


def stored_head(cfg: ModelConfig, params: dict) -> tuple[jax.Array, bool]:
    """The output projection as stored: (embeddings [V, D], vocab_major=True) when tied, else
    (`lm_head` [D, V], False). `head_matmul` contracts with it in place: a transpose op in
    front of the matmul makes XLA:CPU run a bf16 head as an f32 GEMM on upcast copies
    (512 × 576 × 49152: 131 GFLOP/s against 260 with the contraction on the stored axis)."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"], True
    return params["lm_head"], False


def head_matmul(h: jax.Array, w: jax.Array, vocab_major: bool) -> jax.Array:
    """h [..., D] · W_out, accumulated and returned in max(h.dtype, float32): [..., V].
    w: a `stored_head` weight, [V, D] when vocab_major else [D, V]; cast to h's dtype."""
    dims = (((h.ndim - 1,), (1 if vocab_major else 0,)), ((), ()))
    return jax.lax.dot_general(h, w.astype(h.dtype), dims,
                               preferred_element_type=at_least_float32(h.dtype))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Token positions that skip left padding: cumsum(mask) − 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward(
    cfg: ModelConfig,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    lora: lora_lib.LoRA | None = None,
    prefix: prefix_lib.Prefix | None = None,
    perturb: jax.Array | None = None,
    capture: Sequence[str] = (),
    kv_cache: KVCache | None = None,
    apply_head: bool = True,
    forward_mode_ad: bool = False,
    dropout_rng: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
):
    """Logits [B, T, V] (float32; float64 for a float64 model) of a batch of token ids [B, T].

    attention_mask: [B, T], 1 for tokens and 0 for padding (left or right); None = all tokens.
    lora: adapters added to the targeted projections (unmerged).
    prefix: P virtual key/value tokens in front of every layer's keys and values (PEFT's prefix
      tuning, `models.prefix`): the T real tokens take positions P + (cumsum(mask) − 1) and
      attend to the whole prefix; the logits are those of the T real tokens. With a kv_cache
      the prefix goes into the cache instead (`KVCache.create(..., prefix=)`).
    perturb: [L, B, T, D] added to every layer's attention output a_l (o_proj's output, before
      Gemma 2's post-attention norm: Vaccine's ε).
    capture: names from CAPTURE_NAMES; when given, returns (logits, {name: [L, ...]}).
    kv_cache: continue from a cache (prefill or decode step): the T tokens are written at slots
      [index, index + T) and attend to every filled slot; returns (logits, updated cache).
      attention_mask then marks which of the T new tokens are real (left padding in prefill).
    apply_head: False returns the final-normed hidden states [B, T, D] (cfg.dtype) instead of
      the logits, for a loss that applies `head_weights` itself (`train.loss.head_cross_entropy`).
    forward_mode_ad: differentiate the LoRA branches by plain autodiff, so that forward mode
      (`jax.jvp`) works; by default their custom VJP (reverse mode only, faster: `lora.branch`).
    dropout_rng: a key for LoRA dropout (training): with it and lora.dropout = p > 0, every LoRA
      branch reads its input under inverted dropout, with masks drawn from
      `lora.dropout_keys(dropout_rng, L)[l]` for layer l and `lora.dropout_mask` per target
      module. Without it (evaluation, generation) or with p = 0 no dropout op is traced.
    inputs_embeds: [B, T, D] token embeddings used instead of the lookup E[input_ids] (HF's
      `inputs_embeds`: rows of E, e.g. one-hot @ E to differentiate w.r.t. the tokens; Gemma's
      √D scale is still applied); input_ids may then be None (else it must be [B, T]).
    """
    if kv_cache is not None and not apply_head:
        raise ValueError("apply_head=False is not supported together with kv_cache")
    if kv_cache is not None and prefix is not None:
        raise ValueError("with a kv_cache, pass the prefix to KVCache.create (it fills the "
                         "cache's first slots), not to forward")
    unknown = set(capture) - set(CAPTURE_NAMES)
    if unknown:
        raise ValueError(f"unknown capture names {sorted(unknown)}; choose from {CAPTURE_NAMES}")
    if inputs_embeds is not None:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, time, {cfg.hidden_size}], got shape "
                             f"{inputs_embeds.shape}")
        if input_ids is not None and tuple(jnp.shape(input_ids)) != inputs_embeds.shape[:2]:
            raise ValueError(f"input_ids shape {jnp.shape(input_ids)} != inputs_embeds' [B, T] "
                             f"{inputs_embeds.shape[:2]}")
        b, t = inputs_embeds.shape[:2]
    else:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
        b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    elif tuple(attention_mask.shape) != (b, t):
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(b, t)}")
    want = (cfg.num_layers, b, t, cfg.hidden_size)
    if perturb is not None and tuple(perturb.shape) != want:
        raise ValueError(f"perturb must have shape {want} [L, B, T, D], got {perturb.shape}")
    dtype = jnp.dtype(cfg.dtype)
    h = params["embed_tokens"][input_ids] if inputs_embeds is None else inputs_embeds
    h = h.astype(dtype)
    if cfg.scale_embeddings:
        h = h * jnp.asarray(cfg.hidden_size**0.5, dtype)

    pre = None
    if kv_cache is None:
        positions, q_index, k_valid, kv = (positions_from_mask(attention_mask), jnp.arange(t),
                                           attention_mask.astype(bool), None)
        if prefix is not None:
            n = prefix.num_virtual_tokens
            positions, q_index = positions + n, q_index + n
            k_valid = jnp.concatenate([jnp.ones((b, n), bool), k_valid], axis=1)
            pre = prefix_lib.layer_kv(cfg, prefix, dtype)
    else:
        if capture:
            raise ValueError("capture is not supported together with kv_cache")
        positions = kv_cache.next_pos[:, None] + positions_from_mask(attention_mask)
        q_index = kv_cache.index + jnp.arange(t)
        k_valid = jax.lax.dynamic_update_slice(kv_cache.valid, attention_mask.astype(bool),
                                               (0, kv_cache.index))
        kv = (kv_cache.k, kv_cache.v)
    # cos/sin once, outside the layer loop (XLA does not hoist them out of the scan)
    rope = rope_tables(positions, rope_inv_freq(cfg), dtype)
    dropout = lora.dropout if lora is not None and dropout_rng is not None else 0.0
    body = lambda carry, xs: _layer(  # noqa: E731
        cfg, rope, q_index, k_valid, lora.scale if lora is not None else 0.0, dropout,
        tuple(capture), forward_mode_ad, carry, xs,
    )
    if cfg.remat:
        body = jax.checkpoint(body)
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)
    drop_keys = lora_lib.dropout_keys(dropout_rng, cfg.num_layers) if dropout else None
    xs = (params["layers"], lora.weights if lora is not None else None, windows, perturb, kv,
          drop_keys, pre)
    h, (captured, new_kv) = jax.lax.scan(body, h, xs,
                                         unroll=min(cfg.scan_unroll, cfg.num_layers))

    h = rms_norm(h, params["final_norm"], cfg)
    if not apply_head:
        return (h, captured) if capture else h
    logits = head_matmul(h, *stored_head(cfg, params))
    logits = attention_lib.softcap(logits, cfg.final_logit_softcap)
    if kv_cache is not None:
        seen = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)
        return logits, KVCache(k=new_kv[0], v=new_kv[1], valid=k_valid, index=kv_cache.index + t,
                               next_pos=kv_cache.next_pos + seen)
    return (logits, captured) if capture else logits
