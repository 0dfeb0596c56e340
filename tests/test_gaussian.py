"""hfjax.gaussian: Threefry-2x32 words checked against a numpy Threefry with the Random123
known-answer vectors, the word → sample map against scipy's erfinv, the samples' distribution,
and sharded generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import special, stats

from hfjax import gaussian

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)


def np_threefry2x32(k0: int, k1: int, c0: np.ndarray, c1: np.ndarray):
    """Threefry-2x32, 20 rounds (Salmon et al., SC 2011), in numpy uint32 arithmetic."""
    u32 = np.uint32
    ks = (u32(k0), u32(k1), u32(k0) ^ u32(k1) ^ u32(0x1BD11BDA))
    x0, x1 = (c0.astype(u32) + ks[0]), (c1.astype(u32) + ks[1])
    with np.errstate(over="ignore"):
        for group in range(5):
            for r in _ROTATIONS[4 * (group % 2): 4 * (group % 2) + 4]:
                x0 = x0 + x1
                x1 = (x1 << u32(r)) | (x1 >> u32(32 - r))
                x1 = x1 ^ x0
            s = group + 1
            x0 = x0 + ks[s % 3]
            x1 = x1 + ks[(s + 1) % 3] + u32(s)
    return x0, x1


@pytest.mark.parametrize("key,counter,want", [
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
])
def test_numpy_threefry_reference_meets_the_random123_known_answers(key, counter, want):
    y0, y1 = np_threefry2x32(*key, np.array([counter[0]], np.uint32),
                             np.array([counter[1]], np.uint32))
    assert (int(y0[0]), int(y1[0])) == want


def expected_words(key_data, shape):
    """Both words of block (0, i), i row-major over shape[:-1] x ceil(D/2), cut to D."""
    half = (shape[-1] + 1) // 2
    blocks = (*shape[:-1], half)
    i = np.arange(np.prod(blocks), dtype=np.uint32).reshape(blocks)
    y0, y1 = np_threefry2x32(*(int(k) for k in key_data), np.zeros_like(i), i)
    return np.concatenate([y0, y1], axis=-1)[..., : shape[-1]]


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (7,), (1, 1)])
def test_threefry_words_are_both_outputs_of_one_block_per_counter(shape):
    key = jax.random.key(1234)
    got = np.asarray(gaussian.threefry_words(key, shape))
    want = expected_words(np.asarray(jax.random.key_data(key)), shape)
    np.testing.assert_array_equal(got, want)


def test_scalar_shape_gives_a_scalar_word():
    key = jax.random.key(9)
    got = gaussian.threefry_words(key, ())
    assert got.shape == ()
    assert int(got) == int(expected_words(np.asarray(jax.random.key_data(key)), (1,))[0])


def test_words_map_to_samples_as_jax_random_normal_does():
    words = np.array([0, 1, 511, 512, 2**31, 2**32 - 512, 2**32 - 1, 0x12345678], np.uint32)
    # u in float32 arithmetic, as jax.random.uniform computes it; erf⁻¹ in float64
    u01 = ((words >> 9) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)
    low = np.nextafter(np.float32(-1), np.float32(0))
    u = np.maximum(low, u01 * (np.float32(1) - low) + low)
    want = np.sqrt(2) * special.erfinv(u.astype(np.float64))
    got = np.asarray(gaussian.words_to_normal(jnp.asarray(words)), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    assert np.all(np.isfinite(got))  # the smallest word maps to lo > -1, not to -inf


def test_standard_normal_samples_pass_a_kolmogorov_smirnov_test_and_halves_are_uncorrelated():
    out = gaussian.standard_normal(jax.random.key(0), (256, 4096))
    assert out.dtype == jnp.float32 and out.shape == (256, 4096)
    z = np.asarray(out, np.float64)
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    assert abs(z.mean()) < 3e-3 and abs(z.std() - 1) < 3e-3
    # y0 fills the first half of each row, y1 the second: the two words of a block
    first, second = z[:, :2048].ravel(), z[:, 2048:].ravel()
    assert abs(np.corrcoef(first, second)[0, 1]) < 5e-3
    assert abs(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]) < 5e-3  # neighbouring rows


def test_standard_normal_is_seeded_and_accepts_raw_and_typed_keys():
    shape = (4, 6)
    a = gaussian.standard_normal(jax.random.key(3), shape)
    np.testing.assert_array_equal(a, gaussian.standard_normal(jax.random.PRNGKey(3), shape))
    np.testing.assert_array_equal(a, jax.jit(gaussian.standard_normal, static_argnums=1)(
        jax.random.key(3), shape))
    assert not np.allclose(a, gaussian.standard_normal(jax.random.key(4), shape))


def test_other_prng_implementations_fall_back_to_jax_random_normal():
    key = jax.random.key(5, impl="rbg")
    np.testing.assert_array_equal(gaussian.standard_normal(key, (3, 8)),
                                  jax.random.normal(key, (3, 8), jnp.float32))


def test_batch_sharded_generation_equals_unsharded():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    shape = (3, 8, 5, 6)
    fn = jax.jit(lambda k: gaussian.standard_normal(k, shape), out_shardings=sharding)
    got = fn(jax.random.key(11))
    assert got.sharding == sharding
    np.testing.assert_array_equal(got, gaussian.standard_normal(jax.random.key(11), shape))


def test_more_blocks_than_one_counter_word_is_an_error():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        gaussian.threefry_words(jax.random.key(0), (2**33 + 2,))
