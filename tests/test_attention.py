"""Attention kernels: the cuDNN route's call (run through JAX's XLA path, since this machine has
no cuDNN) means what hfjax's einsum attention means, and the kernel choice follows its rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax.models import attention, forward
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfigError, from_hf_dict

GQA = from_hf_dict(dict(model_type="llama", vocab_size=128, hidden_size=96, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2)
                  ).replace(query_pre_attn_scalar=24.0)  # a scale that is not head_dim^-1/2
T = 12


def _qkv(dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    hd = GQA.head_dim
    return (jax.random.normal(kq, (3, T, 6, hd), dtype),
            jax.random.normal(kk, (3, T, 2, hd), dtype),
            jax.random.normal(kv, (3, T, 2, hd), dtype))


# key_valid rows: all tokens, left padding, right padding
_VALID = np.array([[1] * T, [0] * 4 + [1] * (T - 4), [1] * (T - 3) + [0] * 3], bool)


@pytest.mark.parametrize("window", [0, 4], ids=["causal", "window-4"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)],
                         ids=["f32", "bf16"])
def test_fused_call_equals_einsum_attention_with_padding_gqa_and_windows(window, dtype, tol):
    """`fused_attention` (mask, scale, is_causal as the cuDNN route passes them) gives the
    einsum kernel's output, values and gradients, at every query that has a valid key."""
    q, k, v = _qkv(dtype)
    allowed = attention.mask(jnp.arange(T), jnp.arange(T), jnp.asarray(_VALID),
                             jnp.asarray(window))
    assert allowed.shape == (3, 1, T, T)
    live = np.asarray(allowed).any(-1)[:, 0]  # [B, T]: queries with at least one valid key
    weights = jax.random.normal(jax.random.key(5), (3, T, 6, GQA.head_dim), jnp.float32)

    def run(fn):
        def loss(q, k, v):
            out = fn(q, k, v).astype(jnp.float32)
            return jnp.sum(jnp.where(live[:, :, None, None], out * weights, 0.0)), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out_e, g_e = run(lambda q, k, v: attention.einsum_attention(GQA, q, k, v, allowed))
    out_f, g_f = run(lambda q, k, v: attention.fused_attention(GQA, q, k, v, allowed,
                                                               implementation="xla"))
    np.testing.assert_allclose(np.asarray(out_f)[live], np.asarray(out_e)[live], atol=tol, rtol=tol)
    for a, b in zip(g_f, g_e, strict=True):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=tol * scale, rtol=tol)


def test_fused_call_refuses_a_logit_softcap():
    cfg = GQA.replace(attn_logit_softcap=50.0)
    q, k, v = _qkv(jnp.bfloat16)
    allowed = attention.mask(jnp.arange(T), jnp.arange(T), jnp.ones((3, T), bool),
                             jnp.asarray(0))
    with pytest.raises(ValueError, match="softcap"):
        attention.fused_attention(cfg, q, k, v, allowed, implementation="xla")


@pytest.fixture
def cudnn_present(monkeypatch):
    monkeypatch.setattr(attention, "_cudnn_found", lambda: None)


def _choose(cfg, backend, dtype="bfloat16", t=128, s=128, cached=False):
    return attention.choose_kernel(cfg, dtype=dtype, t=t, s=s, cached=cached, backend=backend)


def test_auto_picks_cudnn_only_on_a_gpu_in_half_precision_with_supported_shapes(cudnn_present):
    assert _choose(GQA, "gpu") == "cudnn"
    assert _choose(GQA, "gpu", dtype="float16") == "cudnn"
    assert _choose(GQA, "cpu") == "xla"
    assert _choose(GQA, "tpu") == "xla"
    assert _choose(GQA, "gpu", dtype="float32") == "xla"
    assert _choose(GQA, "gpu", t=127, s=127) == "xla"
    assert _choose(GQA, "gpu", cached=True) == "xla"
    assert _choose(GQA.replace(attn_logit_softcap=50.0), "gpu") == "xla"
    assert _choose(GQA.replace(head_dim=72), "gpu") == "cudnn"
    for hd in (100, 256):
        assert _choose(GQA.replace(head_dim=hd), "gpu") == "xla"
    assert _choose(GQA.replace(attention="xla"), "gpu") == "xla"


def test_explicit_cudnn_names_what_stops_it(cudnn_present):
    cudnn = GQA.replace(attention="cudnn")
    assert _choose(cudnn, "gpu") == "cudnn"
    assert _choose(cudnn, "gpu", cached=True) == "xla"  # decoding steps always run on XLA
    with pytest.raises(ValueError, match="backend is 'cpu'"):
        _choose(cudnn, "cpu")
    with pytest.raises(ValueError, match="dtype float32 is not bfloat16/float16"):
        _choose(cudnn, "gpu", dtype="float32")
    with pytest.raises(ValueError, match="head_dim 100"):
        _choose(cudnn.replace(head_dim=100), "gpu")
    with pytest.raises(ValueError, match="127/127 are not even"):
        _choose(cudnn, "gpu", t=127, s=127)


def test_auto_falls_back_when_jax_finds_no_cudnn(monkeypatch):
    monkeypatch.setattr(attention, "_cudnn_found", lambda: "RuntimeError: no cuDNN")
    assert _choose(GQA, "gpu") == "xla"
    with pytest.raises(ValueError, match="cuDNN is not available .RuntimeError: no cuDNN"):
        _choose(GQA.replace(attention="cudnn"), "gpu")


def test_a_jax_without_cudnn_is_detected_and_auto_falls_back():
    """The real cuDNN probe (no monkeypatch) on this CPU-only JAX: even told the backend is a
    GPU, auto falls back to XLA, and an explicit "cudnn" names the probe's reason."""
    if jax.default_backend() == "gpu":
        pytest.skip("this check is about a machine without a GPU")
    assert _choose(GQA, "gpu") == "xla"
    with pytest.raises(ValueError, match=r"cuDNN is not available \(RuntimeError"):
        _choose(GQA.replace(attention="cudnn"), "gpu")
    assert attention.cudnn_unsupported(GQA, dtype="bfloat16", t=8, s=8, cached=False) \
        .startswith(f"the backend is '{jax.default_backend()}'")


def test_config_rejects_an_unknown_attention():
    with pytest.raises(ModelConfigError, match="unknown attention 'flash'"):
        GQA.replace(attention="flash")


MISTRAL = from_hf_dict(dict(model_type="mistral", vocab_size=128, hidden_size=64,
                            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, sliding_window=5))


def test_decoder_on_the_cudnn_route_gives_the_xla_route_logits_and_gradients(monkeypatch):
    """forward() with the kernel choice forced to "cudnn" (its call run through JAX's XLA path)
    equals the default route on a padded, windowed bf16 batch: the decoder hands the cuDNN
    route the same mask, scale and layout."""
    cfg = MISTRAL.replace(dtype="bfloat16")
    params = params_lib.init_random(cfg, jax.random.key(0), jnp.bfloat16, std=0.1)
    ids = jax.random.randint(jax.random.key(1), (2, 10), 0, 128)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 8 + [0, 0]])

    def loss(params):
        logits = forward(cfg, params, ids, mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2), logits

    (_, ref), g_ref = jax.value_and_grad(loss, has_aux=True)(params)
    calls = []
    fused = attention.fused_attention

    def fused_via_xla(cfg, q, k, v, allowed):  # the cuDNN route's call, on JAX's XLA path
        calls.append(q.shape)
        return fused(cfg, q, k, v, allowed, implementation="xla")

    monkeypatch.setattr(attention, "choose_kernel", lambda *a, **kw: "cudnn")
    monkeypatch.setattr(attention, "fused_attention", fused_via_xla)
    (_, out), g_out = jax.value_and_grad(loss, has_aux=True)(params)
    assert calls, "the decoder did not take the cuDNN route"
    live = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(out)[live], np.asarray(ref)[live], atol=0.1, rtol=2e-2)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=3e-2 * np.abs(b).max() + 1e-6, rtol=3e-2)


def test_explicit_cudnn_forward_on_this_cpu_fails_with_the_reason():
    if jax.default_backend() == "gpu":
        pytest.skip("this check is about a machine without a GPU")
    cfg = MISTRAL.replace(dtype="bfloat16", attention="cudnn")
    params = params_lib.init_random(cfg, jax.random.key(0), jnp.bfloat16, std=0.1)
    with pytest.raises(ValueError, match="attention='cudnn' cannot run here: the backend is"):
        forward(cfg, params, jnp.zeros((1, 4), jnp.int32))
