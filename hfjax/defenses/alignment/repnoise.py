"""RepNoise: noise the harmful representations while keeping safe behaviour (alignment stage).

Rosati et al. 2024, "Representation Noising: A Defence Mechanism Against Harmful Finetuning",
arXiv:2405.14577 (domenicrosati/representation-noising, `rep_noise_loss`). On a paired batch
(x_h harmful answer, x_s refusal, same prompts):

    L(θ) = CE(x_s) + β · R_mmd(θ) − α · log(1 + R_lens(θ))
    R_mmd  = (1/L) Σ_l MMD(m ⊙ h_l(x_h), m ⊙ ε_l),   ε_l ~ N(0, I) (fresh every step)
    R_lens = (1/(L+1)) Σ_{l=0..L} CE(softcap(Norm(s_l) W_out), x_h)

h_l: the MLP block output of layer l (hfjax's `mlp_out`; for Gemma 2 after its post-MLP norm);
s_l: the residual stream entering layer l (s_0 the embeddings), s_L the last one, whose lens is the
model's own logits; m: the response tokens of x_h; CE: response-token cross-entropy. Each sample
is one vector m ⊙ h_l ∈ R^{T·D}, and

    MMD(X, Y) = mean(K_XX + K_YY − K_XY − K_YX),   K = Σ_{i<5} exp(−‖z − z'‖² / (b · 2^i)),
    b = sg(Σ_{z,z' ∈ X∪Y} ‖z − z'‖² / (n² − n)) / 2^2     (n = 2B rows; sg = stop_gradient)

as in the authors' `MMD_loss` (kernel_mul 2, kernel_num 5, data-dependent bandwidth, detached).
Defaults α = 1, β = 0.001 (git-disl's port: α 0.1, β 0.001).

Where this differs from the reference code, on purpose:
- m comes from each batch's labels (response tokens), not from `input_ids_h != input_ids_s`
  (which marks pad positions of the shorter answer and drops coincidentally equal tokens), and
  the CEs are hfjax's response-token CE (the original zeroes the logits that predict the first
  answer token and drops every label equal to token id 0).
- R_lens averages L+1 terms; the original adds the final-logit CE to the L+1 hidden-state lenses
  (HF's last hidden state is already normed, so it is normed twice) and divides L+2 terms by L+1.

Two ways to train with it, the same gradient and FLOPs:
- `repnoise_loss(cfg, frozen, ...)` is the whole objective `(θ, batches, rng) -> (loss, aux)`:
  2 forwards (x_h with captures, x_s) and 1 backward sweep (2F+1B). A train step that takes an
  objective differentiates it instead of the primary-batch loss.
- `repnoise(...)` (registered) is an optax `GradientTransformationExtraArgs` chained before the
  optimizer: the step's own gradient must be ∇CE(x_s) (primary batch "align", the refusals), and
  the transform adds ∇[β R_mmd − α log(1 + R_lens)] on `batches["harmful"]` (2F+2B).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from hfjax import gaussian
from hfjax.defenses.api import ALIGN, HARMFUL, Cost, DefenseError, StepOptions, register
from hfjax.models import forward
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import head_matmul, rms_norm, stored_head
from hfjax.models.lora import LoRA
from hfjax.train.loss import IGNORE_INDEX, head_cross_entropy

PAPER = ("Rosati et al. 2024, Representation Noising: A Defence Mechanism Against Harmful "
         "Finetuning, arXiv:2405.14577")


def mmd(x: jax.Array, y: jax.Array, kernel_mul: float = 2.0, kernel_num: int = 5) -> jax.Array:
    """MMD² estimate between rows of x [n, d] and y [n, d] with the authors' kernel sum.

    K(z, z') = Σ_{i<kernel_num} exp(−‖z − z'‖² / (b · kernel_mul^i)), with the base bandwidth
    b = sg(mean off-diagonal ‖z − z'‖² over x ∪ y) / kernel_mul^(kernel_num // 2).
    Distances come from the Gram matrix at HIGHEST precision, clipped at 0, diagonal exactly 0.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"mmd needs two [n, d] arrays of one shape, got {x.shape} and {y.shape}")
    n = x.shape[0]
    z = jnp.concatenate([x, y]).astype(jnp.float32)
    sq = jnp.sum(z * z, axis=-1)
    gram = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    d2 = jnp.where(jnp.eye(2 * n, dtype=bool), 0.0, d2)
    pairs = (2 * n) ** 2 - 2 * n
    base = jax.lax.stop_gradient(jnp.sum(d2) / pairs)
    base = jnp.maximum(base, jnp.finfo(jnp.float32).tiny) / kernel_mul ** (kernel_num // 2)
    k = sum(jnp.exp(-d2 / (base * kernel_mul**i)) for i in range(kernel_num))
    return jnp.mean(k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n])


def lens_logits(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """The logit lens of a residual state h [B, T, D]: softcap(Norm_final(h) @ W_out), float32."""
    h = rms_norm(h, params["final_norm"], cfg)
    logits = head_matmul(h, *stored_head(cfg, params))
    cap = cfg.final_logit_softcap
    return cap * jnp.tanh(logits / cap) if cap else logits


def _model_inputs(trainable, frozen):
    """(base params, LoRA or None): LoRA mode when trainable is a LoRA, else full fine-tuning."""
    if isinstance(trainable, LoRA):
        if frozen is None:
            raise ValueError("RepNoise with a LoRA needs the frozen base params")
        return frozen, trainable
    return trainable, None


def harmful_regularizer(cfg: ModelConfig, frozen: dict | None, trainable, batch: dict,
                        key: jax.Array, *, alpha: float = 1.0, beta: float = 1e-3,
                        kernel_mul: float = 2.0, kernel_num: int = 5
                        ) -> tuple[jax.Array, dict]:
    """β · R_mmd − α · log(1 + R_lens) on the harmful batch: one forward pass.

    The noise is ε = gaussian.standard_normal(key, mlp_out.shape), float32 (all layers at once).
    The L + 1 lens CEs go one state at a time (`lax.map`) through `head_cross_entropy`, which
    never keeps a state's [B, T, V] logits: differentiated, each state costs 2 head matmuls of
    2·B·T·D·V FLOPs (the logits and ∂s), where keeping L + 1 logits tensors would cost the
    memory and recomputing them under `jax.checkpoint` a third matmul. For small models with
    large vocabularies (SmolLM2: D 576, V 49152) the lens dominates the step.
    Returns (value, aux) with aux {mmd, lens_ce, ce_harmful (the final-logit CE)}.
    """
    params, lora = _model_inputs(trainable, frozen)
    ids, labels = batch["input_ids"], batch["labels"]
    _, cap = forward(cfg, params, ids, batch["attention_mask"], lora=lora,
                     capture=("mlp_out", "residual"), apply_head=False)
    m = (labels != IGNORE_INDEX).astype(jnp.float32)[None, :, :, None]  # [1, B, T, 1]
    hidden = cap["mlp_out"].astype(jnp.float32) * m                     # [L, B, T, D]
    noise = gaussian.standard_normal(key, hidden.shape) * m
    n_layers, b = hidden.shape[:2]
    per_layer = jax.vmap(lambda x, y: mmd(x, y, kernel_mul, kernel_num))(
        hidden.reshape(n_layers, b, -1), noise.reshape(n_layers, b, -1))
    mmd_mean = jnp.mean(per_layer)

    embed = params["embed_tokens"][ids].astype(cap["residual"].dtype)
    if cfg.scale_embeddings:
        embed = embed * jnp.asarray(cfg.hidden_size**0.5, embed.dtype)
    states = jnp.concatenate([embed[None], cap["residual"]])            # s_0 .. s_L
    head, vocab_major = stored_head(cfg, params)
    state_ce = lambda h: head_cross_entropy(  # noqa: E731
        rms_norm(h, params["final_norm"], cfg), head, labels, vocab_major=vocab_major,
        softcap=cfg.final_logit_softcap)[0]
    ces = jax.lax.map(state_ce, states)  # the last is the model's CE
    lens_ce = jnp.mean(ces)

    value = beta * mmd_mean - alpha * jnp.log1p(lens_ce)
    return value, {"mmd": mmd_mean, "lens_ce": lens_ce, "ce_harmful": ces[-1]}


def repnoise_loss(cfg: ModelConfig, frozen: dict | None, alpha: float = 1.0, beta: float = 1e-3,
                  key: jax.Array | None = None, *, harmful: str = HARMFUL, safe: str = ALIGN,
                  kernel_mul: float = 2.0, kernel_num: int = 5) -> Callable:
    """The RepNoise objective `loss_fn(trainable, batches, rng=None) -> (loss, aux)`.

    L = CE(batches[safe]) + β · R_mmd − α · log(1 + R_lens) (module docstring); 2F+1B under
    `jax.value_and_grad`. `rng` draws the noise (pass a fresh one every step); without it `key`
    is used. trainable is a `LoRA` over `frozen`, or the full params (then frozen is unused).
    aux: tokens and accuracy of the safe batch (the step's metrics), ce_safe, ce_harmful,
    lens_ce, mmd.
    """

    def loss_fn(trainable, batches: dict, rng: jax.Array | None = None):
        noise_key = key if rng is None else rng
        if noise_key is None:
            raise ValueError("RepNoise draws Gaussian noise: pass rng= (or build with key=)")
        for name in (harmful, safe):
            if name not in batches:
                raise KeyError(f"RepNoise needs a {name!r} batch; got batches {sorted(batches)}")
        params, lora = _model_inputs(trainable, frozen)
        safe_batch = batches[safe]
        hidden = forward(cfg, params, safe_batch["input_ids"], safe_batch["attention_mask"],
                         lora=lora, apply_head=False)
        head, vocab_major = stored_head(cfg, params)
        ce_safe, aux = head_cross_entropy(hidden, head, safe_batch["labels"],
                                          vocab_major=vocab_major,
                                          softcap=cfg.final_logit_softcap)
        reg, reg_aux = harmful_regularizer(cfg, frozen, trainable, batches[harmful], noise_key,
                                           alpha=alpha, beta=beta, kernel_mul=kernel_mul,
                                           kernel_num=kernel_num)
        return ce_safe + reg, {**aux, **reg_aux, "ce_safe": ce_safe}

    return loss_fn


def _options(**hparams) -> StepOptions:
    del hparams
    return StepOptions(primary=ALIGN)


@register("repnoise", stage="alignment", level="gradient", cost=Cost(2, 2),
          batches=(ALIGN, HARMFUL), paper=PAPER, options=_options)
def repnoise(alpha: float = 1.0, beta: float = 1e-3, harmful: str = HARMFUL,
             kernel_mul: float = 2.0, kernel_num: int = 5
             ) -> optax.GradientTransformationExtraArgs:
    """RepNoise as a gradient transformation: g ← g + ∇θ[β R_mmd − α log(1 + R_lens)](θ).

    Chain it before the optimizer with the step's primary batch "align" = the refusals x_s, so
    that the incoming g = ∇CE(x_s) and the sum is ∇L of the module docstring. `update` reads
    the extra args `batches` (with `harmful`), `rng` (fresh noise every step), `cfg` and
    `frozen` (the base params, for the forward and the logit lens; unused for full fine-tuning).
    Cost: the step's F+B on x_s plus one F+B on x_h (2F+2B; `repnoise_loss` fuses them, 2F+1B).
    """
    if kernel_num < 1 or kernel_mul <= 0:
        raise DefenseError(f"RepNoise needs kernel_num >= 1 and kernel_mul > 0, got "
                           f"{kernel_num}, {kernel_mul}")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, batches=None, rng=None, cfg=None, frozen=None,
               **extra):
        del extra
        if params is None or batches is None or rng is None or cfg is None:
            raise ValueError("repnoise.update needs params and the extra args batches=, rng=, "
                             "cfg= (and frozen= for a LoRA)")
        if harmful not in batches:
            raise KeyError(f"RepNoise needs a {harmful!r} batch; got batches {sorted(batches)}")
        reg = lambda theta: harmful_regularizer(
            cfg, frozen, theta, batches[harmful], rng, alpha=alpha, beta=beta,
            kernel_mul=kernel_mul, kernel_num=kernel_num)[0]
        g_reg = jax.grad(reg)(params)
        return jax.tree.map(jnp.add, updates, g_reg), state

    return optax.GradientTransformationExtraArgs(init, update)
