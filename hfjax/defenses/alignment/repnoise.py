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
R_lens = (1/(L+1)) (Σ_{l<L} CE(W Norm(s_l), x_h) + CE(x_h)), the model's own CE (softcapped
logits) for s_L and the official lens (no softcap) for the others.

Batches (hyper-parameter `pairing`): "paired" (default, the authors' data): x_h and x_s hold
the same prompts in the same rows (harmful answer, refusal), padded to one length. "unpaired":
independent harmful and safety batches padded to one length, as git-disl's port
(git-disl/Booster loss_func/repnoise_loss.py, RepNoiseTrainer) draws them; there the official
mask compares unrelated rows and marks nearly every token of either row, prompts included: what
git-disl's port computes, except that it cuts or zero-pads the other batch to each one's length
where hfjax pads both to the longer one.
The official variant needs x_h and x_s of one shape (a DefenseError otherwise).

Where the official variant still differs from the authors' code: a batch with no counted token
gives CE_m = 0 where PyTorch's mean gives NaN.

Everything comes from the gradient oracle `loss_fn(θ, batch, capture=("mlp_out", "lens"))`
(`hfjax.train.loss.make_loss_fn`): the harmful batch's MLP outputs h_l and its logit-lens NLL
sums over HF's hidden states come back from one forward pass, its loss is the model's CE, and
the official CE_m is the oracle's NLL sum over `official_targets`' labels plus n_uniform · log V.
Two ways to train with it:
- `repnoise_loss(cfg, frozen, ...)` is the whole objective `(θ, batches, rng) -> (loss, aux)`:
  2 forwards (x_h with captures, x_s) and one backward sweep through both (2F+2B counted).
- `repnoise(...)` (registered) is an optax `GradientTransformationExtraArgs` that needs only the
  oracle. Official: it replaces the incoming gradient by ∇L (put it first in the chain); the
  step's own pass on "align" gives only the metrics, so the train step costs 3F+3B. Labels: the
  step's gradient is ∇CE(x_s) (primary batch "align") and the transform adds
  ∇[β R_mmd − α log(1 + R_lens)] on x_h (2F+2B).
Both take the noise as the hint / keyword `noise` ([L, B, T, D], replayed as given) or draw
ε = gaussian.standard_normal(rng, [L, B, T, D]). Everything is computed in
max(model dtype, float32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Unpack

import jax
import jax.numpy as jnp
import optax

from hfjax import gaussian
from hfjax.defenses.api import (
    ALIGN,
    HARMFUL,
    Cost,
    DefenseError,
    Hints,
    StepOptions,
    captures,
    check_update,
    register,
)
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.lora import LoRA
from hfjax.train.loss import IGNORE_INDEX, make_loss_fn

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


def official_ce(loss_sum: jax.Array, targets: tuple, vocab_size) -> jax.Array:
    """The official CE_m (module docstring) from the NLL sum over the labels of `targets`
    (`official_targets`): (loss_sum + n_uniform · log V) / max(n_tokens, 1); loss_sum may be
    [S] sums (the lens), computed in max(its dtype, float32)."""
    _, n_uniform, n_tokens = targets
    dtype = at_least_float32(jnp.result_type(loss_sum))
    log_v = jnp.log(jnp.asarray(vocab_size, dtype))
    return ((loss_sum.astype(dtype) + n_uniform.astype(dtype) * log_v)
            / jnp.maximum(n_tokens, 1).astype(dtype))


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


HARMFUL_CAPTURES = ("mlp_out", "lens")
"""What RepNoise asks of the oracle on the harmful batch (module docstring)."""


def harmful_regularizer(loss_fn: Callable, theta, batch: dict, key: jax.Array | None, *,
                        alpha: float = 1.0, beta: float = 1e-3, kernel_mul: float = 2.0,
                        kernel_num: int = 5, noise: jax.Array | None = None
                        ) -> tuple[jax.Array, dict]:
    """variant="labels": β · R_mmd − α · log(1 + R_lens) on the harmful batch, one oracle call.

    m: the batch's response tokens (labels ≠ −100). The lens NLL sums come from the oracle's
    "lens" capture, which runs one state at a time through the fused head CE: differentiated,
    each state costs 2 head matmuls of 2·B·T·D·V FLOPs. For small models with large
    vocabularies (SmolLM2: D 576, V 49152) the lens dominates.
    Returns (value, aux) with aux {mmd, lens_ce, ce_harmful (the model's CE)}.
    """
    ce_harmful, aux = loss_fn(theta, batch, capture=HARMFUL_CAPTURES)
    cap = captures(aux, HARMFUL_CAPTURES, "repnoise")
    mmd_mean = _mmd_term(cap["mlp_out"], batch["labels"] != IGNORE_INDEX, noise, key,
                         kernel_mul, kernel_num)
    lens = cap["lens"]
    tokens = jnp.maximum(aux["tokens"], 1).astype(lens.dtype)
    lens_ce = (jnp.sum(lens[:-1]) / tokens + ce_harmful) / lens.shape[0]
    value = beta * mmd_mean - alpha * jnp.log1p(lens_ce)
    return value, {"mmd": mmd_mean, "lens_ce": lens_ce, "ce_harmful": ce_harmful}


def official_objective(loss_fn: Callable, theta, harmful: dict, safe: dict,
                       key: jax.Array | None, *, alpha: float = 1.0, beta: float = 1e-3,
                       kernel_mul: float = 2.0, kernel_num: int = 5,
                       noise: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """variant="official": the authors' whole `rep_noise_loss` (module docstring), two oracle
    calls (x_h with its captures, x_s).

    Returns (L, aux) with aux {tokens, accuracy (of x_s's non-uniform tokens), loss_sum,
    ce_safe, ce_harmful, lens_ce (R_lens), mmd}.
    """
    m = official_mask(harmful["input_ids"], safe["input_ids"])
    targets_h = official_targets(harmful["input_ids"], m)
    _, aux_h = loss_fn(theta, {**harmful, "labels": targets_h[0]}, capture=HARMFUL_CAPTURES)
    cap = captures(aux_h, HARMFUL_CAPTURES, "repnoise")
    mmd_mean = _mmd_term(cap["mlp_out"], m, noise, key, kernel_mul, kernel_num)
    ce_harmful = official_ce(aux_h["loss_sum"], targets_h, aux_h["vocab_size"])
    # the model's CE and HF's L + 1 hidden-state lenses, over L + 1 (as the authors divide)
    lens = official_ce(cap["lens"], targets_h, aux_h["vocab_size"])
    lens_ce = (ce_harmful + jnp.sum(lens)) / lens.shape[0]

    targets_s = official_targets(safe["input_ids"], m)
    _, aux_s = loss_fn(theta, {**safe, "labels": targets_s[0]})
    ce_safe = official_ce(aux_s["loss_sum"], targets_s, aux_s["vocab_size"])
    value = ce_safe + beta * mmd_mean - alpha * jnp.log1p(lens_ce)
    return value, {"tokens": targets_s[2], "accuracy": aux_s["accuracy"],
                   "loss_sum": aux_s["loss_sum"], "ce_safe": ce_safe, "ce_harmful": ce_harmful,
                   "lens_ce": lens_ce, "mmd": mmd_mean}


def _check(variant: str, pairing: str, kernel_mul: float, kernel_num: int) -> None:
    if variant not in VARIANTS:
        raise DefenseError(f"RepNoise's variant must be one of {VARIANTS}, got {variant!r}")
    if pairing not in PAIRINGS:
        raise DefenseError(f"RepNoise's pairing must be one of {PAIRINGS}, got {pairing!r}")
    if kernel_num < 1 or not kernel_mul > 0:
        raise DefenseError(f"RepNoise needs kernel_num >= 1 and kernel_mul > 0, got "
                           f"{kernel_num}, {kernel_mul}")


def _oracle(cfg: ModelConfig, frozen: dict | None, trainable) -> Callable:
    """`make_loss_fn` over `frozen` for a `LoRA` trainable, full fine-tuning otherwise."""
    if not isinstance(trainable, LoRA):
        return make_loss_fn(cfg, None, full_finetune=True)
    if frozen is None:
        raise DefenseError("RepNoise with a LoRA needs the frozen base params")
    return make_loss_fn(cfg, frozen)


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
        oracle = _oracle(cfg, frozen, trainable)
        check_update("repnoise_loss", trainable, oracle, batches, (harmful, safe))
        noise_key = key if rng is None else rng
        if variant == "official":
            return official_objective(oracle, trainable, batches[harmful], batches[safe],
                                      noise_key, noise=noise, **terms)
        ce_safe, aux = oracle(trainable, batches[safe])
        reg, reg_aux = harmful_regularizer(oracle, trainable, batches[harmful], noise_key,
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
    `update` reads the oracle `loss_fn`, `batches` (with "align" and `harmful`) and `rng`
    (fresh noise every step), or the hint `noise` ([L, B, T, D], replayed as given).
    """
    _check(variant, pairing, kernel_mul, kernel_num)
    if not (alpha >= 0 and beta >= 0):
        raise DefenseError(f"RepNoise needs alpha >= 0 and beta >= 0, got {alpha}, {beta}")
    terms = dict(alpha=alpha, beta=beta, kernel_mul=kernel_mul, kernel_num=kernel_num)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, loss_fn=None, batches=None, rng=None,
               **hints: Unpack[Hints]):
        check_update("repnoise", params, loss_fn, batches, (ALIGN, harmful))
        noise = hints.get("noise")
        if variant == "official":
            objective = lambda theta: official_objective(  # noqa: E731
                loss_fn, theta, batches[harmful], batches[ALIGN], rng, noise=noise, **terms)[0]
            return jax.grad(objective)(params), state
        reg = lambda theta: harmful_regularizer(  # noqa: E731
            loss_fn, theta, batches[harmful], rng, noise=noise, **terms)[0]
        return jax.tree.map(jnp.add, updates, jax.grad(reg)(params)), state

    return optax.GradientTransformationExtraArgs(init, update)
