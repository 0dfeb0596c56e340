"""RepNoise: noise the harmful representations while keeping safe behaviour (alignment stage).

Rosati et al. 2024, "Representation Noising: A Defence Mechanism Against Harmful Finetuning",
arXiv:2405.14577 (domenicrosati/representation-noising @03689ff,
representation_noising/loss.py:74-130 `rep_noise_loss`). On a harmful batch x_h and a safe
(refusal) batch x_s of one shape [B, T]:

    L(θ) = CE(x_s) + β · R_mmd(θ) − α · log(1 + R_lens(θ))
    R_mmd = (1/L) Σ_l MMD(m ⊙ h_l(x_h), m ⊙ ε_l),   ε_l ~ N(0, I) (fresh every step)

h_l: the MLP block output of layer l (hfjax's `mlp_out`); s_l: the residual stream entering
layer l (s_0 the embeddings, s_L the last one); W: the output projection; Norm: the final norm.
Each sample is one vector m ⊙ h_l ∈ R^{T·D}, and

    MMD(X, Y) = mean(K_XX + K_YY − K_XY − K_YX),   K = Σ_{i<5} exp(−‖z − z'‖² / (b · 2^i)),
    b = sg(Σ_{z,z' ∈ X∪Y} ‖z − z'‖² / (n² − n)) / 2^2     (n = 2B rows; sg = stop_gradient)

as in the authors' `MMD_loss` (kernel_mul 2, kernel_num 5, data-dependent bandwidth, detached).
Defaults α = 1, β = 0.001 (git-disl's port: α 0.1, β 0.001).

variant="official" (default): the authors' code, term by term.
    m_bt = [ids_h[b, t] ≠ ids_s[b, t]]   (paired rows: where the answers differ, including
                                          where one of them is already padding)
    CE_m(z, x) = ( Σ_{t ∈ C, m_{t−1}} nll(z_{t−1}, x_t) + |{t ∈ C : ¬m_{t−1}}| · log V ) / |C|,
                 C = {t ≥ 1 : m_t, x_t ≠ 0},  V the vocabulary size
i.e. `masked_token_ce_loss` (loss.py:52-71): the logits z_{t−1} are multiplied by m_{t−1}, so a
token after an unmasked one (the first answer token) is predicted from zero logits (cost log V,
no gradient), and a label equal to token id 0 never counts.
    CE(x_s) = CE_m(softcap(W Norm(s_L(x_s))), x_s)
    R_lens  = ( CE_m(softcap(W Norm(s_L)), x_h) + Σ_{l<L} CE_m(W Norm(s_l), x_h)
                + CE_m(W Norm(Norm(s_L)), x_h) ) / (L + 1)
the model's own CE plus HF's L + 1 `hidden_states` lenses, the last of which is already normed
(normed twice), over L + 1.

variant="labels": the mask and the CEs from the batches' labels (what hfjax trained before):
m = the response tokens of x_h (labels ≠ −100), CE the plain response-token CE, and
R_lens = (1/(L+1)) Σ_{l=0..L} CE(softcap(W Norm(s_l)), x_h).

Batches (hyper-parameter `pairing`): "paired" (default, the authors' data): x_h and x_s hold
the same prompts in the same rows (harmful answer, refusal), padded to one length. "unpaired":
independent harmful and safety batches padded to one length, as git-disl's port
(git-disl/Booster loss_func/repnoise_loss.py, RepNoiseTrainer) draws them; there the official
mask compares unrelated rows and marks nearly every token of either row, prompts included: what
git-disl's port computes, except that it cuts or zero-pads the other batch to each one's length
where hfjax pads both to the longer one.
The official variant needs x_h and x_s of one shape (a DefenseError otherwise).

Where the official variant still differs from the authors' code: Gemma 2's h_l is hfjax's
`mlp_out` after the post-MLP norm (the authors hook the MLP module, before it); a batch with no
counted token gives CE_m = 0 where PyTorch's mean gives NaN.

Two ways to train with it:
- `repnoise_loss(cfg, frozen, ...)` is the whole objective `(θ, batches, rng) -> (loss, aux)`:
  2 forwards (x_h with captures, x_s) and one backward sweep through both (2F+2B counted).
- `repnoise(...)` (registered) is an optax `GradientTransformationExtraArgs`. Official: it
  replaces the incoming gradient by ∇L (put it first in the chain); the step's own pass on
  "align" gives only the metrics, so the train step costs 3F+3B. Labels: the step's gradient is
  ∇CE(x_s) (primary batch "align") and the transform adds ∇[β R_mmd − α log(1 + R_lens)] on
  x_h (2F+2B).
Both take the noise as the extra arg / keyword `noise` ([L, B, T, D], replayed as given) or draw
ε = gaussian.standard_normal(rng, [L, B, T, D]). Everything is computed in
max(model dtype, float32).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from hfjax import gaussian
from hfjax.defenses.api import ALIGN, HARMFUL, Cost, DefenseError, StepOptions, register
from hfjax.models import forward
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.decoder import head_matmul, rms_norm, stored_head
from hfjax.models.lora import LoRA
from hfjax.train.loss import IGNORE_INDEX, head_cross_entropy

PAPER = ("Rosati et al. 2024, Representation Noising: A Defence Mechanism Against Harmful "
         "Finetuning, arXiv:2405.14577")
VARIANTS = ("official", "labels")
PAIRINGS = ("paired", "unpaired")


def mmd(x: jax.Array, y: jax.Array, kernel_mul: float = 2.0, kernel_num: int = 5) -> jax.Array:
    """MMD² estimate between rows of x [n, d] and y [n, d] with the authors' kernel sum.

    K(z, z') = Σ_{i<kernel_num} exp(−‖z − z'‖² / (b · kernel_mul^i)), with the base bandwidth
    b = sg(mean off-diagonal ‖z − z'‖² over x ∪ y) / kernel_mul^(kernel_num // 2).
    Distances come from the Gram matrix at HIGHEST precision, clipped at 0, diagonal exactly 0;
    computed in max(input dtype, float32).
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"mmd needs two [n, d] arrays of one shape, got {x.shape} and {y.shape}")
    n = x.shape[0]
    dtype = at_least_float32(jnp.result_type(x, y))
    z = jnp.concatenate([x, y]).astype(dtype)
    sq = jnp.sum(z * z, axis=-1)
    gram = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    d2 = jnp.where(jnp.eye(2 * n, dtype=bool), 0.0, d2)
    pairs = (2 * n) ** 2 - 2 * n
    base = jax.lax.stop_gradient(jnp.sum(d2) / pairs)
    base = jnp.maximum(base, jnp.finfo(dtype).tiny) / kernel_mul ** (kernel_num // 2)
    k = sum(jnp.exp(-d2 / (base * kernel_mul**i)) for i in range(kernel_num))
    return jnp.mean(k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n])


def lens_logits(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """The logit lens of a residual state h [B, T, D]: softcap(Norm_final(h) @ W_out), float32."""
    h = rms_norm(h, params["final_norm"], cfg)
    logits = head_matmul(h, *stored_head(cfg, params))
    cap = cfg.final_logit_softcap
    return cap * jnp.tanh(logits / cap) if cap else logits


def official_mask(harmful_ids: jax.Array, safe_ids: jax.Array) -> jax.Array:
    """m = [ids_h ≠ ids_s] (bool [B, T]), the authors' `~torch.eq(ids_h, ids_s)`."""
    if harmful_ids.shape != safe_ids.shape:
        raise DefenseError(
            f"RepNoise's official mask compares the harmful and safe batches token by token: they "
            f"need one [B, T] shape, got {tuple(harmful_ids.shape)} and {tuple(safe_ids.shape)} "
            "(pad both to one length, or use variant='labels')")
    return jnp.asarray(harmful_ids) != jnp.asarray(safe_ids)


def official_targets(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The official masked CE's tokens as (labels, n_uniform, n_tokens).

    Counted tokens C = {t ≥ 1 : m_t, ids_t ≠ 0}. labels [B, T] (hfjax's convention: logits at
    t − 1 predict labels[t]) hold ids_t for t ∈ C with m_{t−1}, −100 elsewhere; the n_uniform
    tokens of C with ¬m_{t−1} are predicted from zero logits (nll = log V each); n_tokens = |C|.
    """
    ids = jnp.asarray(ids)
    counted = mask & (ids != 0)
    counted = counted.at[:, 0].set(False)
    prev = jnp.concatenate([jnp.zeros_like(mask[:, :1]), mask[:, :-1]], axis=1)
    labels = jnp.where(counted & prev, ids, IGNORE_INDEX).astype(jnp.int32)
    return labels, jnp.sum(counted & ~prev), jnp.sum(counted)


def masked_ce(hidden: jax.Array, head: jax.Array, vocab_major: bool, softcap: float | None,
              targets: tuple) -> tuple[jax.Array, dict]:
    """The official CE_m of the logits softcap(hidden W) (module docstring), `targets` from
    `official_targets`: (loss_sum over the labels + n_uniform · log V) / max(n_tokens, 1)."""
    labels, n_uniform, n_tokens = targets
    _, aux = head_cross_entropy(hidden, head, labels, vocab_major=vocab_major, softcap=softcap)
    vocab = head.shape[0 if vocab_major else 1]
    dtype = at_least_float32(hidden.dtype)
    total = aux["loss_sum"].astype(dtype) + n_uniform.astype(dtype) * jnp.log(
        jnp.asarray(vocab, dtype))
    return total / jnp.maximum(n_tokens, 1).astype(dtype), {**aux, "tokens": n_tokens}


def _model_inputs(trainable, frozen):
    """(base params, LoRA or None): LoRA mode when trainable is a LoRA, else full fine-tuning."""
    if isinstance(trainable, LoRA):
        if frozen is None:
            raise ValueError("RepNoise with a LoRA needs the frozen base params")
        return frozen, trainable
    return trainable, None


def _noise(noise: jax.Array | None, key: jax.Array | None, shape: tuple, dtype) -> jax.Array:
    """The given noise (checked against [L, B, T, D]) or gaussian.standard_normal(key, shape)."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise DefenseError(f"RepNoise's noise must have the MLP outputs' shape [L, B, T, D] "
                               f"= {tuple(shape)}, got {tuple(noise.shape)}")
        return jnp.asarray(noise).astype(dtype)
    if key is None:
        raise DefenseError("RepNoise draws Gaussian noise: pass rng= (a jax.random key) or the "
                           "noise itself (noise=, [L, B, T, D])")
    return gaussian.standard_normal(key, shape).astype(dtype)


def _mmd_term(mlp_out: jax.Array, mask: jax.Array, noise: jax.Array | None,
              key: jax.Array | None, kernel_mul: float, kernel_num: int) -> jax.Array:
    """R_mmd = (1/L) Σ_l MMD(m ⊙ h_l, m ⊙ ε_l), each row one vector of T·D values."""
    dtype = at_least_float32(mlp_out.dtype)
    m = mask.astype(dtype)[None, :, :, None]                            # [1, B, T, 1]
    hidden = mlp_out.astype(dtype) * m                                  # [L, B, T, D]
    eps = _noise(noise, key, hidden.shape, dtype) * m
    n_layers, b = hidden.shape[:2]
    per_layer = jax.vmap(lambda x, y: mmd(x, y, kernel_mul, kernel_num))(
        hidden.reshape(n_layers, b, -1), eps.reshape(n_layers, b, -1))
    return jnp.mean(per_layer)


def _embeddings(cfg: ModelConfig, params: dict, ids: jax.Array, dtype) -> jax.Array:
    """s_0: the (Gemma: scaled) token embeddings, as `forward` computes them."""
    embed = params["embed_tokens"][ids].astype(dtype)
    if cfg.scale_embeddings:
        embed = embed * jnp.asarray(cfg.hidden_size**0.5, dtype)
    return embed


def harmful_regularizer(cfg: ModelConfig, frozen: dict | None, trainable, batch: dict,
                        key: jax.Array | None, *, alpha: float = 1.0, beta: float = 1e-3,
                        kernel_mul: float = 2.0, kernel_num: int = 5,
                        noise: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """variant="labels": β · R_mmd − α · log(1 + R_lens) on the harmful batch, one forward pass.

    m: the batch's response tokens (labels ≠ −100). The L + 1 lens CEs go one state at a time
    (`lax.map`) through `head_cross_entropy`, which never keeps a state's [B, T, V] logits:
    differentiated, each state costs 2 head matmuls of 2·B·T·D·V FLOPs (the logits and ∂s).
    For small models with large vocabularies (SmolLM2: D 576, V 49152) the lens dominates.
    Returns (value, aux) with aux {mmd, lens_ce, ce_harmful (the final-logit CE)}.
    """
    params, lora = _model_inputs(trainable, frozen)
    ids, labels = batch["input_ids"], batch["labels"]
    _, cap = forward(cfg, params, ids, batch["attention_mask"], lora=lora,
                     capture=("mlp_out", "residual"), apply_head=False)
    mmd_mean = _mmd_term(cap["mlp_out"], labels != IGNORE_INDEX, noise, key, kernel_mul,
                         kernel_num)
    residual = cap["residual"]
    states = jnp.concatenate([_embeddings(cfg, params, ids, residual.dtype)[None], residual])
    head, vocab_major = stored_head(cfg, params)
    state_ce = lambda h: head_cross_entropy(  # noqa: E731
        rms_norm(h, params["final_norm"], cfg), head, labels, vocab_major=vocab_major,
        softcap=cfg.final_logit_softcap)[0]
    ces = jax.lax.map(state_ce, states)  # the last is the model's CE
    lens_ce = jnp.mean(ces)
    value = beta * mmd_mean - alpha * jnp.log1p(lens_ce)
    return value, {"mmd": mmd_mean, "lens_ce": lens_ce, "ce_harmful": ces[-1]}


def official_objective(cfg: ModelConfig, frozen: dict | None, trainable, harmful: dict,
                       safe: dict, key: jax.Array | None, *, alpha: float = 1.0,
                       beta: float = 1e-3, kernel_mul: float = 2.0, kernel_num: int = 5,
                       noise: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """variant="official": the authors' whole `rep_noise_loss` (module docstring), 2 forwards.

    Returns (L, aux) with aux {tokens, accuracy (of x_s's non-uniform tokens), loss_sum,
    ce_safe, ce_harmful, lens_ce (R_lens), mmd}.
    """
    params, lora = _model_inputs(trainable, frozen)
    ids_h, ids_s = harmful["input_ids"], safe["input_ids"]
    m = official_mask(ids_h, ids_s)
    last, cap = forward(cfg, params, ids_h, harmful["attention_mask"], lora=lora,
                        capture=("mlp_out", "residual"), apply_head=False)
    mmd_mean = _mmd_term(cap["mlp_out"], m, noise, key, kernel_mul, kernel_num)

    head, vocab_major = stored_head(cfg, params)
    softcap = cfg.final_logit_softcap or None
    targets_h = official_targets(ids_h, m)
    ce_harmful = masked_ce(last, head, vocab_major, softcap, targets_h)[0]
    # HF's hidden_states: s_0 .. s_{L-1}, then Norm(s_L) (= `last`); each lens norms again
    states = jnp.concatenate([_embeddings(cfg, params, ids_h, last.dtype)[None],
                              cap["residual"][:-1], last[None]])
    lens = jax.lax.map(lambda h: masked_ce(rms_norm(h, params["final_norm"], cfg), head,
                                            vocab_major, None, targets_h)[0], states)
    lens_ce = (ce_harmful + jnp.sum(lens)) / states.shape[0]

    hidden_s = forward(cfg, params, ids_s, safe["attention_mask"], lora=lora, apply_head=False)
    ce_safe, aux = masked_ce(hidden_s, head, vocab_major, softcap, official_targets(ids_s, m))
    value = ce_safe + beta * mmd_mean - alpha * jnp.log1p(lens_ce)
    return value, {**aux, "ce_safe": ce_safe, "ce_harmful": ce_harmful, "lens_ce": lens_ce,
                   "mmd": mmd_mean}


def _check(variant: str, pairing: str, kernel_mul: float, kernel_num: int) -> None:
    if variant not in VARIANTS:
        raise DefenseError(f"RepNoise's variant must be one of {VARIANTS}, got {variant!r}")
    if pairing not in PAIRINGS:
        raise DefenseError(f"RepNoise's pairing must be one of {PAIRINGS}, got {pairing!r}")
    if kernel_num < 1 or kernel_mul <= 0:
        raise DefenseError(f"RepNoise needs kernel_num >= 1 and kernel_mul > 0, got "
                           f"{kernel_num}, {kernel_mul}")


def repnoise_loss(cfg: ModelConfig, frozen: dict | None, alpha: float = 1.0, beta: float = 1e-3,
                  key: jax.Array | None = None, *, harmful: str = HARMFUL, safe: str = ALIGN,
                  kernel_mul: float = 2.0, kernel_num: int = 5, variant: str = "official"
                  ) -> Callable:
    """The RepNoise objective `loss_fn(trainable, batches, rng=None, noise=None) -> (loss, aux)`.

    L = CE(batches[safe]) + β · R_mmd − α · log(1 + R_lens) of `variant` (module docstring);
    2F+2B under `jax.value_and_grad`. The noise is `noise` ([L, B, T, D]) if given, else drawn
    from `rng` (pass a fresh one every step), else from `key`. trainable is a `LoRA` over
    `frozen`, or the full params (then frozen is unused). aux: tokens and accuracy of the safe
    batch (the step's metrics), ce_safe, ce_harmful, lens_ce, mmd.
    """
    _check(variant, PAIRINGS[0], kernel_mul, kernel_num)
    terms = dict(alpha=alpha, beta=beta, kernel_mul=kernel_mul, kernel_num=kernel_num)

    def loss_fn(trainable, batches: dict, rng: jax.Array | None = None,
                noise: jax.Array | None = None):
        for name in (harmful, safe):
            if name not in batches:
                raise KeyError(f"RepNoise needs a {name!r} batch; got batches {sorted(batches)}")
        noise_key = key if rng is None else rng
        if variant == "official":
            return official_objective(cfg, frozen, trainable, batches[harmful], batches[safe],
                                      noise_key, noise=noise, **terms)
        params, lora = _model_inputs(trainable, frozen)
        safe_batch = batches[safe]
        hidden = forward(cfg, params, safe_batch["input_ids"], safe_batch["attention_mask"],
                         lora=lora, apply_head=False)
        head, vocab_major = stored_head(cfg, params)
        ce_safe, aux = head_cross_entropy(hidden, head, safe_batch["labels"],
                                          vocab_major=vocab_major,
                                          softcap=cfg.final_logit_softcap)
        reg, reg_aux = harmful_regularizer(cfg, frozen, trainable, batches[harmful], noise_key,
                                           noise=noise, **terms)
        return ce_safe + reg, {**aux, **reg_aux, "ce_safe": ce_safe}

    return loss_fn


def _options(pairing: str = "paired", harmful: str = HARMFUL, **_) -> StepOptions:
    """Paired (the authors'): every batch holds the same prompts with their refusal ("align")
    and their harmful answer; unpaired (git-disl's port): two independent streams."""
    return StepOptions(primary=ALIGN, paired=(ALIGN, harmful) if pairing == "paired" else ())


@register("repnoise", stage="alignment", level="gradient", cost=Cost(3, 3),
          batches=(ALIGN, HARMFUL), paper=PAPER, options=_options)
def repnoise(alpha: float = 1.0, beta: float = 1e-3, harmful: str = HARMFUL,
             kernel_mul: float = 2.0, kernel_num: int = 5, variant: str = "official",
             pairing: str = "paired") -> optax.GradientTransformationExtraArgs:
    """RepNoise as a gradient transformation on the step's "align" (x_s) and `harmful` batches.

    variant="official": g ← ∇θ L(θ), the authors' objective; the incoming gradient is dropped,
    so chain it first (train step: 3F+3B, the step's pass on "align" giving the metrics).
    variant="labels": g ← g + ∇θ[β R_mmd − α log(1 + R_lens)](θ), where the incoming g must be
    ∇CE(x_s) (the step's primary batch "align"), so that the sum is ∇L (2F+2B).
    pairing: how the pipeline draws x_h and x_s, "paired" (same prompts, same rows) or
    "unpaired" (module docstring); the transform computes the same thing for both.
    `update` reads the extra args `batches` (with "align" and `harmful`), `rng` (fresh noise
    every step) or `noise` ([L, B, T, D], replayed as given), `cfg` and `frozen` (the base
    params; unused for full fine-tuning).
    """
    _check(variant, pairing, kernel_mul, kernel_num)
    terms = dict(alpha=alpha, beta=beta, kernel_mul=kernel_mul, kernel_num=kernel_num)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, batches=None, rng=None, cfg=None, frozen=None,
               noise=None, **extra):
        del extra
        if params is None or batches is None or cfg is None:
            raise DefenseError("repnoise.update needs params and the extra args batches=, cfg=, "
                               "rng= or noise= (and frozen= for a LoRA)")
        for name in (ALIGN, harmful):
            if name not in batches:
                raise DefenseError(f"RepNoise needs a {name!r} batch; got batches "
                                   f"{sorted(batches)}")
        if variant == "official":
            loss = lambda theta: official_objective(  # noqa: E731
                cfg, frozen, theta, batches[harmful], batches[ALIGN], rng, noise=noise,
                **terms)[0]
            return jax.grad(loss)(params), state
        reg = lambda theta: harmful_regularizer(  # noqa: E731
            cfg, frozen, theta, batches[harmful], rng, noise=noise, **terms)[0]
        return jax.tree.map(jnp.add, updates, jax.grad(reg)(params)), state

    return optax.GradientTransformationExtraArgs(init, update)
