"""Standard normal noise from both words of each Threefry-2x32 block (half the hash work).

`jax.random.normal` (with `jax_threefry_partitionable`, JAX's default) hashes one counter per
output element and keeps the XOR of the block's two output words, so every sample costs a full
20-round Threefry-2x32 block. Here a block (key k, counter (0, i)) gives two samples:

    (y₀, y₁) = Threefry2x32_k(0, i),   i = 0 … ⌈D/2⌉ − 1 along the last axis (and on over the
                                        leading ones, row-major)
    words    = concat(y₀, y₁) along the last axis, cut to D
    u        = lo + (1 − lo) · (bitcast_f32((w >> 9) | 0x3F800000) − 1),  lo = nextafter(−1, 0)
    z        = √2 · erf⁻¹(u)

which is `jax.random.normal`'s map from a word to a sample, so only the counter layout differs:
the same distribution, a different stream. Every block has its own counter, so the words are
as independent as Threefry's outputs, and the computation is elementwise in the leading axes
(batch-sharded noise is generated where it lives). Measured: [30, 4, 128, 576] float32 on 2 CPU
cores, 108 ms against 189 ms for `jax.random.normal` (commit c8d0a93). Keys of another
PRNG implementation (rbg, unsafe_rbg) go to `jax.random.normal`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

_ONE_BITS = np.uint32(0x3F800000)  # float32 1.0
_LOW = np.nextafter(np.float32(-1.0), np.float32(0.0))


def threefry_words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 words of `shape`: both outputs of Threefry2x32_key(0, i), laid out as above."""
    shape = tuple(int(d) for d in shape)
    if not shape:
        return threefry_words(key, (1,)).reshape(())
    half = (shape[-1] + 1) // 2
    blocks = shape[:-1] + (half,)
    if math.prod(blocks) >= 2**32:
        raise ValueError(f"threefry_words: {shape} needs {math.prod(blocks)} counters, more "
                         "than the 2**32 of one counter word")
    k0, k1 = jax.random.key_data(key)
    counter = jax.lax.iota(jnp.uint32, math.prod(blocks)).reshape(blocks)
    y0, y1 = threefry2x32_p.bind(k0, k1, jnp.zeros_like(counter), counter)
    return jnp.concatenate([y0, y1], axis=-1)[..., :shape[-1]]


def words_to_normal(words: jax.Array) -> jax.Array:
    """float32 N(0, 1) samples from uint32 words: √2 · erf⁻¹(u), u uniform on (−1, 1)."""
    mantissa = (words >> np.uint32(9)) | _ONE_BITS
    u01 = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)  # [0, 1)
    u = jnp.maximum(_LOW, u01 * (np.float32(1.0) - _LOW) + _LOW)
    return np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(u)


def standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 N(0, 1) samples of `shape` (a typed or a raw uint32 key)."""
    if str(jax.random.key_impl(key)) != "threefry2x32":
        return jax.random.normal(key, shape, jnp.float32)
    return words_to_normal(threefry_words(key, shape))
