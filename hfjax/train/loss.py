"""Response-only token cross-entropy.

    L = − Σ_t m_t log p_θ(y_{t+1} | y_≤t) / Σ_t m_t,    m_t = [labels_{t+1} ≠ −100]

Labels follow the HF convention: aligned with input_ids, −100 on prompt and padding tokens;
logits at position t predict labels[t + 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from hfjax.data.batching import IGNORE_INDEX
from hfjax.models import forward
from hfjax.models.attention import softcap
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.decoder import CAPTURE_NAMES, head_matmul, rms_norm, stored_head
from hfjax.models.prefix import Prefix


@jax.custom_jvp
def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """−log softmax(logits)[target] per position, logits [..., V] float32 (or float64), targets
    [...] int.

        nll = logsumexp(z) − z_y,      ∂nll/∂z = softmax(z) − onehot(y)

    A custom JVP states the derivative in that closed form, so the backward pass is one fused
    elementwise pass over the logits (no log-softmax tensor, no scatter into zeros).
    """
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    sumexp = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    return (jnp.log(sumexp) - jnp.take_along_axis(shifted, targets[..., None], axis=-1))[..., 0]


@_token_nll.defjvp
def _token_nll_jvp(primals, tangents):
    logits, targets = primals
    dlogits, _ = tangents
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    sumexp = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    nll = (jnp.log(sumexp) - jnp.take_along_axis(shifted, targets[..., None], axis=-1))[..., 0]
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    grad = jnp.exp(shifted) / sumexp - onehot
    return nll, jnp.sum(grad * dlogits, axis=-1)


def _next_token_targets(labels: jax.Array) -> jax.Array:
    """targets_t = labels_{t+1}, the last position IGNORE_INDEX ([B, T] → [B, T])."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Mean CE over response tokens, with aux {tokens, accuracy, loss_sum}.

    The shift is applied to the labels (targets_t = labels_{t+1}, the last position ignored), not
    to the logits, so the [B, T, V] logits are never sliced into a copy.
    """
    targets = _next_token_targets(labels)
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    logits = logits.astype(at_least_float32(logits.dtype))
    nll = _token_nll(logits, safe)
    tokens = mask.sum()
    denom = jnp.maximum(tokens, 1)
    loss_sum = jnp.sum(jnp.where(mask, nll, 0.0))
    # a token is predicted when its logit is the row maximum (argmax up to exact ties): this
    # reuses the max of the log-sum-exp, where a separate argmax pass over [B, T, V] cost ~3%
    # of a LoRA step on CPU
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    top = target_logit >= jnp.max(logits, axis=-1)
    correct = jnp.sum(jnp.where(mask, top, False))
    return loss_sum / denom, {"tokens": tokens, "accuracy": correct / denom, "loss_sum": loss_sum}


LOGITS_CHUNK_ELEMENTS = 1 << 26
"""Most logits `head_cross_entropy` holds at once (64 Mi float32 = 256 MiB): longer batches
go through the head a chunk of tokens at a time."""

HEAD_CHUNK_TOKENS = 256
"""Default tokens per chunk of `head_cross_entropy` (fewer when LOGITS_CHUNK_ELEMENTS asks):
the head runs only over the chunks that hold loss-bearing tokens, so this is the granularity
at which prompt and padding tokens are skipped."""


def head_cross_entropy(hidden: jax.Array, head: jax.Array, labels: jax.Array, *,
                       vocab_major: bool = False, softcap: float | None = None,
                       chunk_tokens: int | None = None) -> tuple[jax.Array, dict]:
    """`token_cross_entropy(softcap(hidden @ W), labels)` without materializing the logits,
    computed at the loss-bearing positions only.

    hidden: final-normed states [B, T, D] (`forward(..., apply_head=False)`); head: W [D, V],
    or its transpose [V, D] with vocab_major=True (tied embeddings as stored: pass
    `*decoder.stored_head(cfg, params)`). Same value and aux as `token_cross_entropy` of the
    logits `forward` would return. Under differentiation the logits' gradient is used where it
    is made: per chunk of tokens, z = softcap(h W accumulated in max(h.dtype, float32)) and

        ∂L_sum/∂h = G Wᵀ,  ∂L_sum/∂W = hᵀ G,  G = m ⊙ (softmax(z) − onehot(y)) ⊙ ∂z/∂(h W),

    so the backward pass keeps ∂h [B·T, D] (and ∂W when W is differentiated, in full
    fine-tuning), not the [B·T, V] logits and their softmax, and it runs no head matmul of its
    own: with a frozen head, 2 matmuls in all (logits, ∂h), as plain autodiff but without its
    [B·T, V] residual, where `jax.checkpoint` around the head (to drop that residual) costs 3.
    The tokens are first ordered loss-bearing first (a stable sort of the mask), and a loop
    runs the head over ⌈#loss tokens / chunk⌉ chunks only: prompt and padding positions, whose
    logits the loss never reads, cost no head FLOPs (a batch with a third of its tokens in
    responses runs a third of the head's 4·B·T·D·V FLOPs, up to the last chunk's padding).
    chunk_tokens: at most this many tokens per chunk (default: HEAD_CHUNK_TOKENS, fewer if
    LOGITS_CHUNK_ELEMENTS asks); the chunks are of equal size, the last one padded.
    """
    b, t, d = hidden.shape
    if labels.shape != (b, t):
        raise ValueError(f"labels shape {labels.shape} != hidden states' [B, T] {(b, t)}")
    if head.ndim != 2 or head.shape[1 if vocab_major else 0] != d:
        want = f"[V, D={d}] (vocab_major)" if vocab_major else f"[D={d}, V]"
        raise ValueError(f"head must be {want}, got shape {head.shape}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = _next_token_targets(labels).reshape(-1)
    mask = targets != IGNORE_INDEX
    n, vocab = b * t, head.shape[0 if vocab_major else 1]
    limit = chunk_tokens or min(HEAD_CHUNK_TOKENS, max(1, LOGITS_CHUNK_ELEMENTS // vocab))
    n_chunks = -(-n // limit)
    chunk = -(-n // n_chunks)
    loss_sum, correct = _fused_head_nll((softcap or None, vocab_major), chunk,
                                        hidden.reshape(n, d), head, jnp.where(mask, targets, 0),
                                        mask)
    tokens = mask.sum()
    denom = jnp.maximum(tokens, 1)
    return loss_sum / denom, {"tokens": tokens, "accuracy": correct / denom,
                              "loss_sum": loss_sum}


def _head_chunk(form, h, head, targets, mask, grad_h: bool, grad_w: bool):
    """One chunk of `_fused_head_nll`: (Σ m·nll, #correct, ∂h or None, ∂W or None).
    form: (softcap, vocab_major); ∂W has head's layout."""
    softcap, vocab_major = form
    w = head.astype(h.dtype)
    z = head_matmul(h, w, vocab_major)
    if softcap:
        z = softcap * jnp.tanh(z / softcap)
    top = jnp.max(z, axis=-1, keepdims=True)
    exp = jnp.exp(z - top)
    sumexp = jnp.sum(exp, axis=-1, keepdims=True)
    z_y = jnp.take_along_axis(z, targets[:, None], axis=-1)
    nll = (jnp.log(sumexp) - (z_y - top))[:, 0]
    loss = jnp.sum(jnp.where(mask, nll, 0.0))
    correct = jnp.sum(mask & (z_y[:, 0] >= top[:, 0]), dtype=jnp.int32)
    if not (grad_h or grad_w):
        return loss, correct, None, None
    onehot = jnp.arange(z.shape[-1], dtype=targets.dtype) == targets[:, None]
    g = jnp.where(mask[:, None], exp / sumexp - onehot, 0.0)
    if softcap:
        g = g * (1.0 - jnp.square(z / softcap))
    g = g.astype(h.dtype)
    # Contractions on the stored axes (no transpose ops: see `decoder.stored_head`).
    dh = _contract(g, w, 1, 0 if vocab_major else 1) if grad_h else None
    dw = None
    if grad_w:  # [V, D] = Gᵀ h when vocab_major, else [D, V] = hᵀ G
        dw = _contract(*((g, h) if vocab_major else (h, g)), 0, 0, at_least_float32(h.dtype))
    return loss, correct, dh, dw


def _contract(a, b, a_axis: int, b_axis: int, out=None):
    """The 2-D product summing a's a_axis against b's b_axis (`lax.dot_general`)."""
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())),
                               preferred_element_type=out)


def _head_chunks(form, chunk, h, head, targets, mask, grad_h=False, grad_w=False):
    """`_head_chunk` over the chunks of tokens that hold loss-bearing ones: sums of the loss,
    #correct and ∂W (max(h.dtype, float32)), and ∂h [N, D] (zero at the tokens without a loss).

    The tokens are ordered loss-bearing first (stable argsort of ¬mask) and padded to whole
    chunks; a loop (a `while` with ⌈#loss tokens / chunk⌉ trips) runs the head over the leading
    chunks only, and ∂h goes back to the original order by the inverse permutation.
    """
    n, d = h.shape
    order = jnp.argsort(~mask, stable=True)
    pad = -n % chunk
    sort = lambda a: jnp.pad(a[order], ((0, pad),) + ((0, 0),) * (a.ndim - 1))  # noqa: E731
    h_s, targets_s, mask_s = sort(h), sort(targets), sort(mask)
    trips = -(-jnp.sum(mask, dtype=jnp.int32) // chunk)

    def body(i, carry):
        loss, correct, dh, dw = carry
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk)  # noqa: E731
        l_c, c_c, dh_c, dw_c = _head_chunk(form, take(h_s), head, take(targets_s), take(mask_s),
                                           grad_h, grad_w)
        if grad_h:
            dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_c, i * chunk, axis=0)
        return loss + l_c, correct + c_c, dh, None if dw is None else dw + dw_c

    acc = at_least_float32(h.dtype)
    init = (jnp.zeros((), acc), jnp.zeros((), jnp.int32),
            jnp.zeros((n + pad, d), h.dtype) if grad_h else None,
            jnp.zeros(head.shape, acc) if grad_w else None)
    loss, correct, dh_s, dw = jax.lax.fori_loop(0, trips, body, init)
    dh = None if dh_s is None else dh_s[jnp.argsort(order)]
    return loss, correct, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_head_nll(form, chunk, h, head, targets, mask):
    """(Σ_t m_t·nll_t, #correct) of the logits softcap(h W); form = (softcap, vocab_major);
    see `head_cross_entropy`."""
    return _head_chunks(form, chunk, h, head, targets, mask)[:2]


def _fused_head_nll_fwd(form, chunk, h, head, targets, mask):
    grad_h, grad_w = h.perturbed, head.perturbed
    loss, correct, dh, dw = _head_chunks(form, chunk, h.value, head.value, targets.value,
                                         mask.value, grad_h, grad_w)
    return (loss, correct), (dh, None if dw is None else dw.astype(head.value.dtype))


def _fused_head_nll_bwd(form, chunk, residuals, cotangents):
    del form, chunk
    dh, dw = residuals
    ct = cotangents[0]
    if isinstance(ct, SymbolicZero):
        return (None, None, None, None)
    scale = lambda a: None if a is None else (a * ct.astype(a.dtype))  # noqa: E731
    return (scale(dh), scale(dw), None, None)


_fused_head_nll.defvjp(_fused_head_nll_fwd, _fused_head_nll_bwd, symbolic_zeros=True)


LOSS_CAPTURES = ("lens", "token_nll", "entropy", "hidden_states")
"""Captures the oracle of `make_loss_fn` computes beyond `forward`'s (`CAPTURE_NAMES`), from the
same forward pass:
lens: the logit lens of HF's hidden states hs = (s_0, …, s_{L−1}, Norm(s_L)) (`hidden_states`):
  [L + 1] sums over the batch's loss tokens of −log softmax(W Norm(hs_l))[y], no softcap (HF's
  `lm_head(norm(hs))`; the last state, already normed, is normed again).
token_nll: [B, T] −log p_θ(labels_{t+1} | y_≤t) of the model's (softcapped) logits at every
  position, 0 where the target is ignored (`token_nll`); differentiable. It runs the head over
  all B·T positions and holds the [B, T, V] logits (the loss itself never does).
entropy: [B, T] −Σ_v p_v log p_v of the model's (softcapped) next-token distribution at every
  position, padding included (`token_entropy`); differentiable; the head over all B·T positions
  as token_nll (TAR's tamper-resistance loss).
hidden_states: HF's `output_hidden_states` [L + 1, B, T, D] (`hidden_states`): the embeddings,
  the residual stream after layers 1 … L − 1 and the final-normed last one (TAR's retain term)."""


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[B, T] −log softmax(logits_t)[labels_{t+1}], 0 where labels_{t+1} = −100 (and at t = T−1):
    the per-token terms whose masked mean is `token_cross_entropy`'s loss."""
    targets = _next_token_targets(labels)
    mask = targets != IGNORE_INDEX
    nll = _token_nll(logits.astype(at_least_float32(logits.dtype)), jnp.where(mask, targets, 0))
    return jnp.where(mask, nll, 0.0)


def token_entropy(logits: jax.Array) -> jax.Array:
    """[B, T] entropy −Σ_v softmax(z)_v log softmax(z)_v of the logits z [B, T, V] at every
    position, computed in max(logits dtype, float32)."""
    logp = jax.nn.log_softmax(logits.astype(at_least_float32(logits.dtype)), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def hidden_states(cfg: ModelConfig, params: dict, input_ids: jax.Array,
                  residual: jax.Array) -> jax.Array:
    """HF's `output_hidden_states` [L + 1, B, T, D] from `forward`'s residual captures
    [L, B, T, D]: s_0 (the token embeddings, Gemma's scaled), s_1 … s_{L−1}, Norm(s_L)."""
    embed = params["embed_tokens"][input_ids].astype(residual.dtype)
    if cfg.scale_embeddings:
        embed = embed * jnp.asarray(cfg.hidden_size**0.5, residual.dtype)
    last = rms_norm(residual[-1], params["final_norm"], cfg)
    return jnp.concatenate([embed[None], residual[:-1], last[None]])


def lens_loss_sums(cfg: ModelConfig, params: dict, states: jax.Array, labels: jax.Array, *,
                   forward_mode_ad: bool = False) -> jax.Array:
    """[S] sums over the loss tokens of −log softmax(W Norm(h))[y] for each state h of states
    [S, B, T, D], no softcap. One state at a time (`lax.map`) through `head_cross_entropy`,
    which never holds a state's [B, T, V] logits (through the logits and
    `token_cross_entropy` with forward_mode_ad)."""
    w, vocab_major = stored_head(cfg, params)

    def one(h):
        h = rms_norm(h, params["final_norm"], cfg)
        if forward_mode_ad:
            return token_cross_entropy(head_matmul(h, w, vocab_major), labels)[1]["loss_sum"]
        return head_cross_entropy(h, w, labels, vocab_major=vocab_major)[1]["loss_sum"]

    return jax.lax.map(one, states)


def make_loss_fn(cfg: ModelConfig, frozen: dict | None, *, full_finetune: bool = False,
                 forward_mode_ad: bool = False) -> Callable:
    """The gradient oracle `loss_fn(trainable, batch, *, capture=(), **forward_kw) -> (loss, aux)`
    closing over the frozen base.

    LoRA mode: trainable is a `LoRA`, the base `frozen` params are fixed.
    Prefix tuning: trainable is a `models.prefix.Prefix` (forward's `prefix=`), the base fixed.
    Full fine-tuning: trainable is the whole params pytree and `frozen` is unused.
    aux: tokens, accuracy, loss_sum (see `token_cross_entropy`) and vocab_size V (the classes
    of the CE, int32). capture: names from `forward`'s CAPTURE_NAMES (activations [L, ...]) and
    LOSS_CAPTURES (the logit lens), returned in aux["captured"], all from the one forward pass.
    Other keyword arguments (`perturb`, `dropout_rng`) go to `forward`.
    forward_mode_ad: False (default): the CE through the fused `head_cross_entropy` and the
    LoRA branches through their custom VJP (`models.lora.branch`), both reverse mode only.
    True: the logits and `token_cross_entropy`, and plain autodiff through the LoRA branches
    (same value and gradient up to rounding); forward mode works too, e.g. for
    Hessian-vector products with `jax.jvp`.
    """

    def loss_fn(trainable, batch: dict, *, capture=(), **forward_kw):
        capture = tuple(capture)
        unknown = set(capture) - set(CAPTURE_NAMES) - set(LOSS_CAPTURES)
        if unknown:
            raise ValueError(f"unknown capture names {sorted(unknown)}; choose from "
                             f"{CAPTURE_NAMES + LOSS_CAPTURES}")
        params = trainable if full_finetune else frozen
        adapter = {} if full_finetune else {
            "prefix" if isinstance(trainable, Prefix) else "lora": trainable}
        from_model = tuple(n for n in capture if n in CAPTURE_NAMES)
        if {"lens", "hidden_states"} & set(capture) and "residual" not in from_model:
            from_model += ("residual",)
        out = forward(cfg, params, batch["input_ids"], batch["attention_mask"], **adapter,
                      apply_head=forward_mode_ad, forward_mode_ad=forward_mode_ad,
                      capture=from_model, **forward_kw)
        out, captured = out if from_model else (out, {})
        w, vocab_major = stored_head(cfg, params)
        if not forward_mode_ad:
            loss, aux = head_cross_entropy(out, w, batch["labels"], vocab_major=vocab_major,
                                           softcap=cfg.final_logit_softcap)
        else:
            loss, aux = token_cross_entropy(out, batch["labels"])
        aux["vocab_size"] = jnp.asarray(w.shape[0 if vocab_major else 1], jnp.int32)
        if {"lens", "hidden_states"} & set(capture):
            states = hidden_states(cfg, params, batch["input_ids"], captured["residual"])
            captured = {**captured, "hidden_states": states}
        if "lens" in capture:
            captured = {**captured, "lens": lens_loss_sums(cfg, params, states, batch["labels"],
                                                           forward_mode_ad=forward_mode_ad)}
        if {"token_nll", "entropy"} & set(capture):
            logits = out if forward_mode_ad else softcap(head_matmul(out, w, vocab_major),
                                                         cfg.final_logit_softcap)
            captured = {**captured, "token_nll": token_nll(logits, batch["labels"]),
                        "entropy": token_entropy(logits)}
        if capture:
            aux["captured"] = {n: captured[n] for n in capture}
        return loss, aux

    return loss_fn
