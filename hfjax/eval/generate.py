"""Greedy decoding of left-padded prompt batches in one jitted loop.

Each step recomputes the forward pass over a fixed [B, P + N] buffer (no KV cache yet), so the
loop compiles once per (B, P, N). Rows stop at their first EOS; later positions hold `pad_id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.models.config import ModelConfig
from hfjax.models.decoder import forward


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (ids [B, P], mask [B, P]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id"))
def _greedy(cfg, params, lora, ids, mask, *, max_new_tokens, eos_ids, pad_id):
    b, p = ids.shape
    buf = jnp.concatenate([ids, jnp.full((b, max_new_tokens), pad_id, ids.dtype)], axis=1)
    buf_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)

    def step(i, carry):
        buf, buf_mask, done = carry
        logits = forward(cfg, params, buf, buf_mask, lora=lora)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + i - 1, 1, False), axis=-1)
        nxt = jnp.where(done, pad_id, nxt).astype(buf.dtype)
        buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, p + i, 1)
        buf_mask = jax.lax.dynamic_update_index_in_dim(buf_mask, (~done).astype(mask.dtype), p + i, 1)
        done = done | jnp.isin(nxt, jnp.asarray(eos_ids, buf.dtype))
        return buf, buf_mask, done

    buf, _, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf, buf_mask, jnp.zeros((b,), bool)))
    return buf[:, p:]


def greedy_generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int = 128, eos_ids: Sequence[int] | None = None,
                    pad_id: int | None = None, lora=None) -> list[list[int]]:
    """Greedy continuations of each prompt, cut after the first EOS (EOS included)."""
    eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    ids, mask = left_pad(prompts, pad)
    out = np.asarray(_greedy(cfg, params, lora, jnp.asarray(ids), jnp.asarray(mask),
                             max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad))
    results = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results
