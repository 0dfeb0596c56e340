"""Batched generation of left-padded prompts in one jitted loop.

With the KV cache (default): one prefill pass over the prompts, then one single-token pass per
new token (`lax.fori_loop`). Without it: every step recomputes the forward pass over a fixed
[B, P + N] buffer (the reference the cache is tested against). Greedy by default; temperature /
top-p sampling with a seed. Rows stop at their first EOS; later positions hold `pad_id`.
A prefix (`models.prefix`) fills the cache's first P slots and shifts positions by P; without
the cache every step passes it to `forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.errors import UserError
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import KVCache, forward


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (ids [B, P], mask [B, P]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


def _choose(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy when temperature == 0, else nucleus sampling from softmax(logits / T)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        keep_sorted = cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


@partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "eos_ids",
        "pad_id",
        "use_cache",
        "temperature",
        "top_p",
    ),
)
def _generate(
    cfg,
    params,
    lora,
    prefix,
    ids,
    mask,
    forced,
    key,
    *,
    max_new_tokens,
    eos_ids,
    pad_id,
    use_cache,
    temperature,
    top_p,
):
    b, p = ids.shape
    eos = jnp.asarray(eos_ids, ids.dtype)
    out = jnp.full((b, max_new_tokens), pad_id, ids.dtype)

    def pick(i, logits, done, key):
        nxt = _choose(logits, jax.random.fold_in(key, i), temperature, top_p).astype(ids.dtype)
        f = forced[:, jnp.minimum(i, forced.shape[1] - 1)]
        nxt = jnp.where((i < forced.shape[1]) & (f >= 0), f, nxt)
        nxt = jnp.where(done, pad_id, nxt)
        return nxt, done | jnp.isin(nxt, eos)

    if use_cache:
        virtual = 0 if prefix is None else prefix.num_virtual_tokens
        cache = KVCache.create(cfg, b, virtual + p + max_new_tokens, prefix=prefix)
        logits, cache = forward(cfg, params, ids, mask, lora=lora, kv_cache=cache)
        nxt, done = pick(0, logits[:, -1], jnp.zeros((b,), bool), key)
        out = out.at[:, 0].set(nxt)

        def step(i, carry):
            out, cache, done = carry
            tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, 1)
            logits, cache = forward(cfg, params, tok, jnp.ones_like(tok), lora=lora, kv_cache=cache)
            nxt, done = pick(i, logits[:, -1], done, key)
            return jax.lax.dynamic_update_index_in_dim(out, nxt, i, 1), cache, done

        out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, done))
        return out

    buf = jnp.concatenate([ids, out], axis=1)
    buf_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)

    def step_nocache(i, carry):
        buf, buf_mask, done = carry
        logits = forward(cfg, params, buf, buf_mask, lora=lora, prefix=prefix)
        nxt, new_done = pick(
            i, jax.lax.dynamic_index_in_dim(logits, p + i - 1, 1, False), done, key
        )
        buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, p + i, 1)
        buf_mask = jax.lax.dynamic_update_index_in_dim(
            buf_mask, (~done).astype(mask.dtype), p + i, 1
        )
        return buf, buf_mask, new_done

    buf, _, _ = jax.lax.fori_loop(
        0, max_new_tokens, step_nocache, (buf, buf_mask, jnp.zeros((b,), bool))
    )
    return buf[:, p:]


class ContextLengthError(UserError, ValueError):
    """A prompt plus its generation budget does not fit the model's context."""


def generate(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    lora=None,
    prefix=None,
    use_cache: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    forced_prefix: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Continuations of each prompt, cut after the first EOS (EOS included).

    forced_prefix: per prompt, tokens forced as the first generated tokens (the prefilling
    attack); decoding continues freely after them.
    prefix: a `models.prefix.Prefix` (prefix tuning), its P virtual tokens counted in the
    context.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    longest = max((len(x) for x in prompts), default=0)
    virtual = 0 if prefix is None else prefix.num_virtual_tokens
    if virtual + longest + max_new_tokens > cfg.max_position_embeddings:
        with_prefix = f" and {virtual} prefix tokens" if virtual else ""
        raise ContextLengthError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens}{with_prefix} "
            f"exceeds the model's context of {cfg.max_position_embeddings} tokens")
    eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    pad = (
        pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    )
    ids, mask = left_pad(prompts, pad)
    width = max([len(f) for f in forced_prefix] + [1]) if forced_prefix else 1
    forced = np.full((len(prompts), width), -1, np.int32)
    for i, f in enumerate(forced_prefix or ()):
        forced[i, : len(f)] = f
    out = np.asarray(
        _generate(
            cfg,
            params,
            lora,
            prefix,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jnp.asarray(forced),
            jax.random.key(seed),
            max_new_tokens=max_new_tokens,
            eos_ids=eos,
            pad_id=pad,
            use_cache=use_cache,
            temperature=float(temperature),
            top_p=float(top_p),
        )
    )
    results = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results


def greedy_generate(
    cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], **kw
) -> list[list[int]]:
    """Greedy `generate` (temperature 0)."""
    return generate(cfg, params, prompts, temperature=0.0, **kw)
