"""The fused head cross-entropy (`train.loss.head_cross_entropy`) against autodiff through the
logits: values, gradients, what the backward keeps, which matmuls it runs, and the model's loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from defense_fixtures import CFG, GEMMA_LIKE

from hfjax.models import lora as lora_lib
from hfjax.models import params as params_lib
from hfjax.models.decoder import KVCache, forward, head_weights
from hfjax.train import loss as loss_lib
from hfjax.train.loss import head_cross_entropy, make_loss_fn, token_cross_entropy

B, T, D, V = 2, 7, 16, 50
# a final softcap of 3 bends logits of this size (30 would leave them almost linear)
GEMMA_LIKE = GEMMA_LIKE.replace(final_logit_softcap=3.0)


def _inputs(dtype=jnp.float32):
    """Hidden states, a head, and labels with masked prompt/padding tokens, where some
    response tokens are the logits' argmax (so the accuracy is neither 0 nor 1)."""
    r = np.random.default_rng(0)
    h = r.standard_normal((B, T, D)).astype(np.float32)
    w = (0.5 * r.standard_normal((D, V))).astype(np.float32)
    labels = r.integers(0, V, (B, T))
    top = np.argmax(h @ w, axis=-1)
    labels[:, 1:4] = top[:, :3]  # position t predicts labels[t + 1]
    labels[0, :2] = -100
    labels[1, 5:] = -100
    return jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(labels, jnp.int32)


def _via_logits(h, w, labels, softcap):
    z = (h @ w).astype(jnp.float32)
    if softcap:
        z = softcap * jnp.tanh(z / softcap)
    return token_cross_entropy(z, labels)


CASES = [(None, None), (None, 3), (None, 5), (3.0, None), (3.0, 4)]


@pytest.mark.parametrize("softcap,chunk", CASES)
def test_head_cross_entropy_equals_the_token_cross_entropy_of_the_logits(softcap, chunk):
    h, w, labels = _inputs()
    got_loss, got = jax.jit(lambda h, w: head_cross_entropy(
        h, w, labels, softcap=softcap, chunk_tokens=chunk))(h, w)
    want_loss, want = _via_logits(h, w, labels, softcap)
    assert 0.0 < float(want["accuracy"]) < 1.0
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=1e-6)
    assert int(got["tokens"]) == int(want["tokens"]) == 9
    assert float(got["accuracy"]) == float(want["accuracy"])


@pytest.mark.parametrize("softcap,chunk", CASES)
def test_head_cross_entropy_gradients_equal_autodiff_through_the_logits(softcap, chunk):
    h, w, labels = _inputs()
    fused = lambda h, w: head_cross_entropy(h, w, labels, softcap=softcap, chunk_tokens=chunk)[0]  # noqa: E731
    plain = lambda h, w: _via_logits(h, w, labels, softcap)[0]  # noqa: E731
    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(h, w)
    want = jax.grad(plain, argnums=(0, 1))(h, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
    # a cotangent other than 1 scales both gradients
    got3 = jax.grad(lambda h, w: 3.0 * fused(h, w), argnums=(0, 1))(h, w)
    for g, r in zip(got3, want, strict=True):
        np.testing.assert_allclose(g, 3.0 * r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("softcap,chunk", CASES)
def test_vocab_major_head_gives_the_loss_and_gradients_of_its_transpose(softcap, chunk):
    h, w, labels = _inputs()
    def loss(h, w, vocab_major):
        return head_cross_entropy(h, w, labels, vocab_major=vocab_major, softcap=softcap,
                                  chunk_tokens=chunk)
    (got, got_aux), (gh, gw) = jax.jit(jax.value_and_grad(
        lambda h, w: loss(h, w, True), argnums=(0, 1), has_aux=True))(h, w.T)
    (want, want_aux), (wh, ww) = jax.value_and_grad(
        lambda h, w: loss(h, w, False), argnums=(0, 1), has_aux=True)(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(got_aux["accuracy"]) == float(want_aux["accuracy"])
    assert gw.shape == (V, D)
    np.testing.assert_allclose(gh, wh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw, ww.T, rtol=1e-5, atol=1e-7)


def _sparse_labels(keep: float, seed: int = 1, b: int = 3, t: int = 11) -> tuple:
    """Hidden states [b, t, D], a head and labels where only a `keep` fraction of the tokens,
    scattered over rows and positions, carries a loss."""
    r = np.random.default_rng(seed)
    h = jnp.asarray(r.standard_normal((b, t, D)), jnp.float32)
    w = jnp.asarray(0.5 * r.standard_normal((D, V)), jnp.float32)
    labels = np.where(r.random((b, t)) < keep, r.integers(0, V, (b, t)), -100)
    return h, w, jnp.asarray(labels, jnp.int32)


@pytest.mark.parametrize("keep,chunk", [(0.3, 3), (0.3, None), (0.7, 4), (1.0, 5)])
def test_scattered_loss_tokens_give_the_logits_loss_and_gradients(keep, chunk):
    h, w, labels = _sparse_labels(keep)
    fused = lambda h, w: head_cross_entropy(h, w, labels, chunk_tokens=chunk)  # noqa: E731
    (got, got_aux), got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(h, w)
    (want, want_aux), want_g = jax.value_and_grad(
        lambda h, w: _via_logits(h, w, labels, None), argnums=(0, 1), has_aux=True)(h, w)
    assert 0 < int(want_aux["tokens"]) <= labels.size
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert int(got_aux["tokens"]) == int(want_aux["tokens"])
    assert float(got_aux["accuracy"]) == float(want_aux["accuracy"])
    for g, r in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def _head_trips(monkeypatch, h, w, labels, chunk) -> int:
    """How many chunks the head ran over in one value-and-gradient call."""
    trips = []
    inner = loss_lib._head_chunk

    def counted(form, h_c, *args):
        jax.debug.callback(lambda: trips.append(1))
        return inner(form, h_c, *args)

    monkeypatch.setattr(loss_lib, "_head_chunk", counted)
    loss = lambda h: head_cross_entropy(h, w, labels, chunk_tokens=chunk)[0]  # noqa: E731
    jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(h))
    jax.effects_barrier()
    return len(trips)


def test_the_head_runs_only_over_the_chunks_that_hold_loss_tokens(monkeypatch):
    h, w, labels = _sparse_labels(0.3)  # 33 tokens, 3 × 11
    n_loss = int(jnp.sum(loss_lib._next_token_targets(labels) != -100))
    assert 0 < n_loss <= 12  # 4 chunks of 3 hold them all, out of 11
    assert _head_trips(monkeypatch, h, w, labels, chunk=3) == -(-n_loss // 3)
    # every token but each row's last (which predicts nothing): 30 of 33, 10 of the 11 chunks
    everything = jnp.asarray(np.ones(labels.shape, np.int32))
    assert _head_trips(monkeypatch, h, w, everything, chunk=3) == 10


def test_a_batch_without_loss_tokens_runs_no_head_and_has_zero_loss_and_gradient(monkeypatch):
    h, w, _ = _sparse_labels(0.3)
    none = jnp.full((h.shape[0], h.shape[1]), -100, jnp.int32)
    (loss, aux), (gh, gw) = jax.value_and_grad(
        lambda h, w: head_cross_entropy(h, w, none, chunk_tokens=4), argnums=(0, 1),
        has_aux=True)(h, w)
    assert float(loss) == 0.0 and int(aux["tokens"]) == 0 and float(aux["accuracy"]) == 0.0
    assert not np.any(np.asarray(gh)) and not np.any(np.asarray(gw))
    assert _head_trips(monkeypatch, h, w, none, chunk=4) == 0


def _eqns(jaxpr, primitive: str) -> list:
    """Every equation of a primitive in a jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            out.append(eqn)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _eqns(inner, primitive)
    return out


def _transposed_shapes(jaxpr) -> list[tuple]:
    """Input shapes of every transpose in a jaxpr, sub-jaxprs included."""
    return [tuple(e.invars[0].aval.shape) for e in _eqns(jaxpr, "transpose")]


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_tied_head_is_contracted_as_stored_without_transposing_the_embeddings(full_finetune):
    """A transpose in front of the head matmul makes XLA:CPU run bf16 heads as f32 GEMMs on
    upcast copies (commit 837ab85): the loss, its gradient and the logits contract
    the [V, D] embeddings on their stored axis."""
    cfg = GEMMA_LIKE.replace(dtype="bfloat16")
    params = params_lib.init_random(cfg, jax.random.key(0), std=0.1)
    lora = lora_lib.init(cfg, jax.random.key(1), rank=4, alpha=8)
    trainable = params if full_finetune else lora
    batch = _batch(cfg)
    grad = jax.grad(lambda t: make_loss_fn(cfg, params, full_finetune=full_finetune)(t, batch)[0])
    embed_shape = (cfg.vocab_size, cfg.hidden_size)
    assert embed_shape not in _transposed_shapes(jax.make_jaxpr(grad)(trainable).jaxpr)
    logits = jax.make_jaxpr(lambda p: forward(cfg, p, batch["input_ids"]))(params).jaxpr
    assert embed_shape not in _transposed_shapes(logits)
    # the check can fail: contracting head_weights' [D, V] transpose has one
    transposed = jax.make_jaxpr(lambda p, h: h @ head_weights(cfg, p))(
        params, jnp.ones((3, cfg.hidden_size), jnp.bfloat16)).jaxpr
    assert embed_shape in _transposed_shapes(transposed)


def _residual_sizes(fn, *args):
    _, vjp_fn = jax.vjp(fn, *args)
    return [x.size for x in jax.tree.leaves(vjp_fn) if hasattr(x, "size")]


def test_differentiated_head_loss_keeps_no_logits_sized_residual():
    h, w, labels = _inputs()
    fused = _residual_sizes(lambda h: head_cross_entropy(h, w, labels)[0], h)
    plain = _residual_sizes(lambda h: _via_logits(h, w, labels, None)[0], h)
    assert max(plain) >= B * T * V  # autodiff through the logits keeps a [B·T, V] tensor
    assert max(fused) <= B * T * D  # the fused loss keeps ∂h only


def _dots(jaxpr) -> list[tuple]:
    """Output shapes of every dot_general in a jaxpr, sub-jaxprs included."""
    return [tuple(e.outvars[0].aval.shape) for e in _eqns(jaxpr, "dot_general")]


def test_a_frozen_head_costs_two_matmuls_and_a_trained_head_three():
    h, w, labels = _inputs()
    loss = lambda h, w: head_cross_entropy(h, w, labels)[0]  # noqa: E731
    frozen = _dots(jax.make_jaxpr(jax.grad(loss))(h, w).jaxpr)
    trained = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w).jaxpr)
    assert sorted(frozen) == sorted([(B * T, V), (B * T, D)])
    assert sorted(trained) == sorted([(B * T, V), (B * T, D), (D, V)])


def test_bfloat16_head_loss_is_close_to_the_float32_one():
    h, w, labels = _inputs()
    got, _ = head_cross_entropy(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), labels)
    want, _ = _via_logits(h, w, labels, None)
    g = jax.grad(lambda h: head_cross_entropy(h, w.astype(jnp.bfloat16), labels)[0])(
        h.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(got), float(want), rtol=2e-2)


def test_bad_shapes_raise_clear_errors():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match="labels shape"):
        head_cross_entropy(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match=r"head must be \[D=16, V\]"):
        head_cross_entropy(h, w.T, labels)
    with pytest.raises(ValueError, match=r"head must be \[V, D=16\] \(vocab_major\)"):
        head_cross_entropy(h, w, labels, vocab_major=True)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        head_cross_entropy(h, w, labels, chunk_tokens=0)


@pytest.mark.parametrize("cfg", [CFG, GEMMA_LIKE], ids=["llama", "gemma2-like"])
def test_forward_without_head_returns_the_states_whose_head_gives_the_logits(cfg):
    params = params_lib.init_random(cfg, jax.random.key(0), std=0.1)
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
    logits = forward(cfg, params, ids)
    hidden = forward(cfg, params, ids, apply_head=False)
    z = hidden @ head_weights(cfg, params)
    if cfg.final_logit_softcap:
        z = cfg.final_logit_softcap * jnp.tanh(z / cfg.final_logit_softcap)
    np.testing.assert_allclose(z, logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="apply_head=False"):
        forward(cfg, params, ids, kv_cache=KVCache.create(cfg, 2, 8), apply_head=False)


def _batch(cfg):
    r = np.random.default_rng(1)
    ids = r.integers(0, cfg.vocab_size, (3, 9)).astype(np.int32)
    labels = ids.copy()
    labels[:, :4] = -100
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    labels[2, 7:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logits_loss_fn(cfg, frozen, full_finetune):
    """make_loss_fn as it was before the fused head: logits, then token_cross_entropy."""
    def loss_fn(trainable, batch):
        params, lora = (trainable, None) if full_finetune else (frozen, trainable)
        logits = forward(cfg, params, batch["input_ids"], batch["attention_mask"], lora=lora)
        return token_cross_entropy(logits, batch["labels"])
    return loss_fn


@pytest.mark.parametrize("cfg", [CFG, GEMMA_LIKE], ids=["llama", "gemma2-like"])
@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_model_loss_and_gradients_equal_the_logits_path(cfg, full_finetune):
    params = params_lib.init_random(cfg, jax.random.key(0), std=0.1)
    lora = lora_lib.init(cfg, jax.random.key(1), rank=4, alpha=8)
    lora = lora_lib.LoRA(weights=jax.tree.map(lambda a: a + 0.05, lora.weights),
                         alpha=lora.alpha)
    trainable = params if full_finetune else lora
    batch = _batch(cfg)
    fused = make_loss_fn(cfg, params, full_finetune=full_finetune)
    plain = _logits_loss_fn(cfg, params, full_finetune)
    (got, got_aux), got_g = jax.jit(jax.value_and_grad(fused, has_aux=True))(trainable, batch)
    (want, want_aux), want_g = jax.value_and_grad(plain, has_aux=True)(trainable, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(got_aux["accuracy"]) == float(want_aux["accuracy"])
    for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_default_chunk_keeps_a_chunks_logits_under_the_limit(monkeypatch):
    h, w, labels = _inputs()
    # at most 4 tokens per chunk: 14 tokens go as 4 chunks of 4 (2 padding), not 5 of 3 or 4 + 2
    monkeypatch.setattr(loss_lib, "LOGITS_CHUNK_ELEMENTS", 4 * V)
    jaxpr = jax.make_jaxpr(lambda h: head_cross_entropy(h, w, labels)[0])(h).jaxpr
    assert [s for s in _dots(jaxpr) if s[-1] == V] == [(4, V)]
    want, _ = _via_logits(h, w, labels, None)
    np.testing.assert_allclose(head_cross_entropy(h, w, labels)[0], want, rtol=1e-6)


def test_unfused_loss_supports_forward_mode_and_equals_the_fused_one():
    params = params_lib.init_random(CFG, jax.random.key(0), std=0.1)
    lora = lora_lib.init(CFG, jax.random.key(1), rank=4, alpha=8)
    lora = lora_lib.LoRA(weights=jax.tree.map(lambda a: a + 0.05, lora.weights),
                         alpha=lora.alpha)
    batch = _batch(CFG)
    fused = lambda t: make_loss_fn(CFG, params)(t, batch)[0]  # noqa: E731
    plain = lambda t: make_loss_fn(CFG, params, forward_mode_ad=True)(t, batch)[0]  # noqa: E731
    np.testing.assert_allclose(fused(lora), plain(lora), rtol=1e-6)
    tangent = jax.tree.map(jnp.ones_like, lora)
    # a Hessian-vector product: forward mode over the gradient
    hvp = jax.jvp(jax.grad(plain), (lora,), (tangent,))[1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(hvp))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(fused, (lora,), (tangent,))
