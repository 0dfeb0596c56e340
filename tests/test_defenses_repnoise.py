"""RepNoise: both variants against independent numpy computations (the official one a line by
line transcription of the authors' `rep_noise_loss`), the official tokens by hand, noise
seeding and replay, dtypes, gradients, passes, the optax form against the fused objective, and
8 devices against one."""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from defense_fixtures import (
    FAST,
    GEMMA_LIKE,
    build_run,
    count_passes,
    named_batches,
    pad_to_one_length,
)
from jax.sharding import NamedSharding, PartitionSpec

from hfjax import gaussian, sharding
from hfjax.defenses import api
from hfjax.defenses.api import Cost
from hfjax.models import lora as lora_lib
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import forward
from hfjax.train import state as state_lib
from hfjax.train import step as step_lib
from hfjax.train.loss import head_cross_entropy, make_loss_fn, token_cross_entropy

# the modules themselves: the packages re-export functions of the same names
rn = importlib.import_module("hfjax.defenses.alignment.repnoise")

CFG = ModelConfig(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, layer_windows=(0, 0), rms_norm_eps=1e-6,
)
BASE = params_lib.init_random(CFG, jax.random.key(0), std=0.1)


def _lora(cfg=CFG):
    lora = lora_lib.init(cfg, jax.random.key(1), rank=4, alpha=8,
                         targets=("q_proj", "v_proj", "down_proj"))
    keys = iter(jax.random.split(jax.random.key(2), 8))
    weights = {n: {**w, "B": 0.05 * jax.random.normal(next(keys), w["B"].shape)}
               for n, w in lora.weights.items()}
    return lora_lib.LoRA(weights=weights, alpha=lora.alpha)


LORA = _lora()


def paired_batches(batch=4, length=14, seed=0):
    """{"harmful", "align"}: the same prompts, different answers, right padding with id 0.

    So that the official mask ids_h ≠ ids_s differs from the harmful labels: rows 1 and 5 share
    their second answer token (equal ids, unmasked), row 2's harmful answer holds token id 0
    (never a label in the official CE), and several refusals are longer than their harmful
    answer (the harmful padding is masked)."""
    r = np.random.default_rng(seed)
    out = {name: {"input_ids": np.zeros((batch, length), np.int32),
                  "attention_mask": np.zeros((batch, length), np.int32),
                  "labels": np.full((batch, length), -100, np.int32)}
           for name in ("harmful", "align")}
    for i in range(batch):
        prompt = r.integers(1, CFG.vocab_size, 3 + i % 3)
        answers = {"harmful": r.integers(1, CFG.vocab_size, 4 + i % 4),
                   "align": r.integers(1, CFG.vocab_size, 3 + (i + 2) % 5)}
        if i % 4 == 1:
            answers["align"][1] = answers["harmful"][1]
        if i == 2:
            answers["harmful"][2] = 0
        for name, ans in answers.items():
            seq = np.concatenate([prompt, ans])
            b = out[name]
            b["input_ids"][i, :len(seq)] = seq
            b["attention_mask"][i, :len(seq)] = 1
            b["labels"][i, len(prompt):len(seq)] = ans
    return out


BATCHES = paired_batches(batch=8)


# --------------------------------------------------------------------------------------------
# numpy references


def np_mmd(x, y, kernel_mul=2.0, kernel_num=5):
    """The authors' MMD_loss, in float64 with explicit pairwise differences."""
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = ((z[None, :, :] - z[:, None, :]) ** 2).sum(-1)
    n2 = len(z)
    bw = d2.sum() / (n2 * n2 - n2) / kernel_mul ** (kernel_num // 2)
    k = sum(np.exp(-d2 / (bw * kernel_mul**i)) for i in range(kernel_num))
    n = len(x)
    return np.mean(k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n])


def np_rms_norm(h, w, eps, offset=0.0):
    h = h.astype(np.float64)
    return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * (offset + w)


def np_ce(logits, labels):
    logits, targets = logits[:, :-1].astype(np.float64), labels[:, 1:]
    mask = targets != -100
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.where(mask, targets, 0)[..., None], -1)[..., 0]
    return (nll * mask).sum() / mask.sum()


def np_masked_token_ce(logits, ids, mask):
    """The authors' masked_token_ce_loss (loss.py:52-71), line by line."""
    shift_logits = logits[:, :-1].astype(np.float64) * mask[:, :-1, None]
    shift_labels = ids[:, 1:] * mask[:, 1:]
    shift_labels = np.where(shift_labels == 0, -100, shift_labels)
    return np_ce(np.concatenate([shift_logits, shift_logits[:, :1]], 1),
                 np.concatenate([np.full_like(shift_labels[:, :1], -100), shift_labels], 1))


def np_head(cfg, params):
    p = jax.tree.map(np.asarray, params)
    return p["embed_tokens"].T if cfg.tie_word_embeddings else p["lm_head"]


def np_norm(cfg, params, h):
    return np_rms_norm(h, np.asarray(params["final_norm"]), cfg.rms_norm_eps,
                       cfg.norm_weight_offset)


def np_lens(cfg, params, h):
    logits = np_norm(cfg, params, h) @ np_head(cfg, params)
    cap = cfg.final_logit_softcap
    return cap * np.tanh(logits / cap) if cap else logits


def np_embed(cfg, params, ids):
    embed = np.asarray(params["embed_tokens"], np.float64)[ids]
    return embed * cfg.hidden_size**0.5 if cfg.scale_embeddings else embed


def np_mmd_term(mlp, mask, noise):
    m = mask[:, :, None]
    n_layers, b = mlp.shape[:2]
    return np.mean([np_mmd((mlp[i] * m).reshape(b, -1), (noise[i] * m).reshape(b, -1))
                    for i in range(n_layers)])


def np_official(cfg, params, lora, batches, noise, alpha, beta):
    """The authors' rep_noise_loss (loss.py:74-130) in numpy from hfjax's captures:
    {loss, ce_safe, ce_harmful, lens_ce, mmd}."""
    h, s = batches["harmful"], batches["align"]
    logits_h, cap = forward(cfg, params, h["input_ids"], h["attention_mask"], lora=lora,
                            capture=("mlp_out", "residual"))
    logits_s = forward(cfg, params, s["input_ids"], s["attention_mask"], lora=lora)
    mask = h["input_ids"] != s["input_ids"]
    mmd = np_mmd_term(np.asarray(cap["mlp_out"], np.float64), mask, np.asarray(noise))
    residual = [np.asarray(x, np.float64) for x in cap["residual"]]
    hidden_states = ([np_embed(cfg, params, h["input_ids"])] + residual[:-1]
                     + [np_norm(cfg, params, residual[-1])])
    ce_harmful = np_masked_token_ce(np.asarray(logits_h), h["input_ids"], mask)
    harmful_losses = ce_harmful
    for hs in hidden_states:
        harmful_losses += np_masked_token_ce(np_norm(cfg, params, hs) @ np_head(cfg, params),
                                             h["input_ids"], mask)
    lens_ce = harmful_losses / len(hidden_states)
    ce_safe = np_masked_token_ce(np.asarray(logits_s), s["input_ids"], mask)
    return {"loss": ce_safe + beta * mmd - alpha * np.log(lens_ce + 1), "ce_safe": ce_safe,
            "ce_harmful": ce_harmful, "lens_ce": lens_ce, "mmd": mmd}


# --------------------------------------------------------------------------------------------
# pieces


def test_mmd_matches_numpy_with_explicit_pairwise_differences():
    r = np.random.default_rng(0)
    x, y = r.normal(size=(5, 300)) * 0.3 + 0.1, r.normal(size=(5, 300))
    got = float(rn.mmd(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    assert got == pytest.approx(np_mmd(x, y), rel=1e-5, abs=1e-7)
    assert float(rn.mmd(jnp.asarray(y, jnp.float32), jnp.asarray(y, jnp.float32))) == \
        pytest.approx(0.0, abs=1e-6)


def test_mmd_gradient_treats_the_bandwidth_as_a_constant():
    r = np.random.default_rng(1)
    x, y = jnp.asarray(r.normal(size=(3, 20)), jnp.float32), jnp.asarray(r.normal(size=(3, 20)))
    z = np.concatenate([np.asarray(x), np.asarray(y)]).astype(np.float64)
    d2 = ((z[None] - z[:, None]) ** 2).sum(-1)
    bw = float(d2.sum() / 30 / 4)  # fixed at the value the data gives, 6 rows: 36 - 6 pairs

    def fixed(x):
        zz = jnp.concatenate([x, y])
        dd = jnp.sum((zz[None] - zz[:, None]) ** 2, -1)
        k = sum(jnp.exp(-dd / (bw * 2.0**i)) for i in range(5))
        return jnp.mean(k[:3, :3] + k[3:, 3:] - k[:3, 3:] - k[3:, :3])

    np.testing.assert_allclose(jax.jit(jax.grad(rn.mmd))(x, y), jax.jit(jax.grad(fixed))(x),
                               rtol=1e-4, atol=1e-7)


def test_mmd_computes_in_float32_for_bfloat16_and_in_float64_for_float64():
    r = np.random.default_rng(2)
    x, y = r.normal(size=(4, 50)), r.normal(size=(4, 50))
    low = rn.mmd(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert low.dtype == jnp.float32
    with jax.enable_x64(True):
        got = rn.mmd(jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))
        assert got.dtype == jnp.float64
        # float32 rounding alone would leave ~1e-7 relative
        assert float(got) == pytest.approx(np_mmd(x, y), rel=1e-12)


@pytest.mark.parametrize("cfg", [CFG, GEMMA_LIKE], ids=["llama", "gemma2-like"])
@pytest.mark.parametrize("forward_mode_ad", [False, True], ids=["fused", "logits"])
def test_oracle_lens_is_the_nll_of_hfs_hidden_states_through_norm_and_head(cfg, forward_mode_ad):
    """loss_fn(θ, batch, capture=("mlp_out", "lens")): the NLL sums of W Norm(hs_l) over HF's
    hidden states (s_0, ..., s_{L-1}, Norm(s_L)), from the pass that gives the unchanged loss."""
    params = params_lib.init_random(cfg, jax.random.key(3), std=0.1)
    b = BATCHES["harmful"]
    loss_fn = make_loss_fn(cfg, None, full_finetune=True, forward_mode_ad=forward_mode_ad)
    run = jax.jit(lambda p, capture: loss_fn(p, b, capture=capture), static_argnums=1)
    loss, aux = run(params, ("mlp_out", "lens"))
    assert sorted(aux["captured"]) == ["lens", "mlp_out"]
    assert float(loss) == float(run(params, ())[0])
    assert int(aux["vocab_size"]) == cfg.vocab_size

    _, cap = forward(cfg, params, b["input_ids"], b["attention_mask"],
                     capture=("mlp_out", "residual"))
    np.testing.assert_allclose(aux["captured"]["mlp_out"], cap["mlp_out"], rtol=1e-6)
    residual = [np.asarray(x, np.float64) for x in cap["residual"]]
    states = ([np_embed(cfg, params, b["input_ids"])] + residual[:-1]
              + [np_norm(cfg, params, residual[-1])])
    tokens = int(np.sum(b["labels"][:, 1:] != -100))
    want = [np_ce(np_norm(cfg, params, h) @ np_head(cfg, params), b["labels"]) * tokens
            for h in states]
    assert len(want) == cfg.num_layers + 1
    np.testing.assert_allclose(aux["captured"]["lens"], want, rtol=2e-5)


def test_official_targets_by_hand():
    # prompt 7 8; the answers differ at t = 2 and 4..6, agree at t = 3; the harmful answer ends
    # at t = 5 (pad 0 at t = 6), the safe one runs on with token 2 at t = 5, 6
    ids_h = np.array([[7, 8, 3, 4, 5, 6, 0]])
    ids_s = np.array([[7, 8, 9, 4, 1, 2, 2]])
    m = rn.official_mask(ids_h, ids_s)
    np.testing.assert_array_equal(m, [[0, 0, 1, 0, 1, 1, 1]])
    # harmful: counted t ∈ {2, 4, 5} (t = 6 is id 0); 2 and 4 follow an unmasked token
    labels, uniform, tokens = rn.official_targets(ids_h, m)
    np.testing.assert_array_equal(labels, [[-100, -100, -100, -100, -100, 6, -100]])
    assert (int(uniform), int(tokens)) == (2, 3)
    # safe: counted t ∈ {2, 4, 5, 6}; the harmful batch's padding is the safe one's tokens
    labels, uniform, tokens = rn.official_targets(ids_s, m)
    np.testing.assert_array_equal(labels, [[-100, -100, -100, -100, -100, 2, 2]])
    assert (int(uniform), int(tokens)) == (2, 4)


def test_official_ce_equals_the_authors_masked_token_ce_loss_by_hand():
    r = np.random.default_rng(3)
    hidden = r.normal(size=(2, 7, 16))
    head = r.normal(size=(16, 11))
    ids = np.array([[4, 5, 6, 7, 0, 3, 9], [4, 5, 1, 2, 10, 8, 0]])
    mask = np.array([[0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]], bool)
    targets = rn.official_targets(ids, mask)
    loss_sum = head_cross_entropy(jnp.asarray(hidden, jnp.float32), jnp.asarray(head, jnp.float32),
                                  targets[0])[1]["loss_sum"]
    got = rn.official_ce(loss_sum, targets, head.shape[1])
    # by hand: the counted tokens (t ≥ 1, m_t, id ≠ 0) are row 0 t ∈ {1, 2, 5, 6} and row 1
    # t ∈ {2, 3, 4}; row 0 t = 1 and row 1 t = 2 follow an unmasked token (zero logits)
    logits = hidden @ head
    terms = []
    for b, t in [(0, 1), (0, 2), (0, 5), (0, 6), (1, 2), (1, 3), (1, 4)]:
        z = logits[b, t - 1] * mask[b, t - 1]
        terms.append(np.log(np.exp(z).sum()) - z[ids[b, t]])
    assert float(got) == pytest.approx(np.mean(terms), rel=1e-5)
    assert float(got) == pytest.approx(np_masked_token_ce(logits, ids, mask), rel=1e-5)


def test_the_fixtures_official_mask_differs_from_the_harmful_labels():
    """The comparisons below can tell the variants apart: ids_h ≠ ids_s is not the response."""
    ids_mask = BATCHES["harmful"]["input_ids"] != BATCHES["align"]["input_ids"]
    labels_mask = BATCHES["harmful"]["labels"] != -100
    assert np.any(ids_mask & ~labels_mask)  # the harmful padding under a longer refusal
    assert np.any(labels_mask & ~ids_mask)  # answer tokens equal in both
    assert np.any(labels_mask & (BATCHES["harmful"]["input_ids"] == 0))


def test_the_official_mask_needs_batches_of_one_shape():
    short = {**BATCHES, "align": jax.tree.map(lambda x: x[:, :10], BATCHES["align"])}
    with pytest.raises(api.DefenseError, match="one .B, T. shape"):
        rn.repnoise_loss(CFG, BASE)(LORA, short, jax.random.key(0))
    rn.repnoise_loss(CFG, BASE, variant="labels")(LORA, short, jax.random.key(0))


# --------------------------------------------------------------------------------------------
# the objective


def objective(t, f, b, k, alpha, beta, variant="official", noise=None):
    return rn.repnoise_loss(CFG, f, alpha, beta, variant=variant)(t, b, k, noise)


@pytest.fixture(scope="module")
def vg():
    """The objective's ((loss, aux), grad), compiled once per variant for the module."""
    return jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnames="variant",
                   compiler_options=FAST)


@pytest.mark.parametrize("cfg", [CFG, GEMMA_LIKE], ids=["llama", "gemma2-like"])
def test_official_objective_equals_a_numpy_transcription_of_rep_noise_loss(cfg):
    params = BASE if cfg is CFG else params_lib.init_random(cfg, jax.random.key(7), std=0.1)
    lora = LORA if cfg is CFG else _lora(cfg)
    alpha, beta, key = 0.7, 1.0, jax.random.key(5)
    loss_fn = rn.repnoise_loss(cfg, params, alpha, beta)
    loss, aux = jax.jit(loss_fn, compiler_options=FAST)(lora, BATCHES, key)
    shape = (cfg.num_layers, *BATCHES["harmful"]["input_ids"].shape, cfg.hidden_size)
    want = np_official(cfg, params, lora, BATCHES, gaussian.standard_normal(key, shape), alpha,
                       beta)
    for name in ("ce_safe", "ce_harmful", "lens_ce", "mmd"):
        assert float(aux[name]) == pytest.approx(want[name], rel=1e-5), name
    assert float(loss) == pytest.approx(want["loss"], rel=1e-5)
    assert want["mmd"] > 1e-3  # the noise term is not trivially zero on this batch
    labels = rn.repnoise_loss(cfg, params, alpha, beta, variant="labels")(lora, BATCHES, key)[0]
    assert abs(float(labels) - want["loss"]) > 1e-2  # the variants differ on this batch


def test_official_objective_stays_float64_for_a_float64_model():
    with jax.enable_x64(True):
        cfg = dataclasses.replace(CFG, dtype="float64")
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), BASE)
        lora = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), LORA)
        key = jax.random.key(5)
        loss, aux = jax.jit(rn.repnoise_loss(cfg, params, 0.7, 1.0))(lora, BATCHES, key)
        assert loss.dtype == jnp.float64 and aux["mmd"].dtype == jnp.float64
        shape = (CFG.num_layers, *BATCHES["harmful"]["input_ids"].shape, CFG.hidden_size)
        want = np_official(cfg, params, lora, BATCHES, gaussian.standard_normal(key, shape),
                           0.7, 1.0)
        # float32 anywhere on the way would leave ~1e-7 relative
        assert float(loss) == pytest.approx(want["loss"], rel=1e-11)


def test_labels_objective_equals_an_independent_numpy_computation(vg):
    alpha, beta, key = 0.7, 1.0, jax.random.key(5)
    (loss, aux), _ = vg(LORA, BASE, BATCHES, key, alpha, beta, variant="labels")

    h, s = BATCHES["harmful"], BATCHES["align"]
    run = jax.jit(lambda b, capture: forward(CFG, BASE, b["input_ids"], b["attention_mask"],
                                             lora=LORA, capture=capture), static_argnums=1)
    logits_h, cap = run(h, ("mlp_out", "residual"))
    logits_s = run(s, ())
    mlp = np.asarray(cap["mlp_out"], np.float64)                      # [L, B, T, D]
    noise = np.asarray(gaussian.standard_normal(key, mlp.shape), np.float64)
    want_mmd = np_mmd_term(mlp, h["labels"] != -100, noise)
    states = [np_embed(CFG, BASE, h["input_ids"])] + [np.asarray(x) for x in cap["residual"]]
    want_lens = np.mean([np_ce(np_lens(CFG, BASE, st), h["labels"]) for st in states])
    want_ce_safe = np_ce(np.asarray(logits_s), s["labels"])
    want = want_ce_safe + beta * want_mmd - alpha * np.log(1 + want_lens)

    assert float(aux["mmd"]) == pytest.approx(want_mmd, rel=1e-4)
    assert float(aux["lens_ce"]) == pytest.approx(want_lens, rel=1e-5)
    assert float(aux["ce_safe"]) == pytest.approx(want_ce_safe, rel=1e-5)
    assert float(aux["ce_harmful"]) == pytest.approx(np_ce(np.asarray(logits_h), h["labels"]),
                                                     rel=1e-5)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert want_mmd > 1e-3


def test_repnoise_noise_is_seeded_by_rng_and_replayed_from_the_noise_argument(vg):
    def run(key, noise=None):
        (_, aux), g = vg(LORA, BASE, BATCHES, key, 1.0, 1.0, noise=noise)
        return float(aux["mmd"]), g

    (a, ga), (b, _), (c, _) = run(jax.random.key(11)), run(jax.random.key(11)), \
        run(jax.random.key(12))
    assert a == b and a != c
    shape = (CFG.num_layers, *BATCHES["harmful"]["input_ids"].shape, CFG.hidden_size)
    replayed, g_replayed = run(None, gaussian.standard_normal(jax.random.key(11), shape))
    assert replayed == a
    for x, y in zip(jax.tree.leaves(g_replayed), jax.tree.leaves(ga), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(api.DefenseError, match="rng"):
        rn.repnoise_loss(CFG, BASE)(LORA, BATCHES)
    with pytest.raises(api.DefenseError, match=r"\[L, B, T, D\]"):
        rn.repnoise_loss(CFG, BASE)(LORA, BATCHES, noise=np.zeros((1, 8, 14, 64), np.float32))


def test_repnoise_gradients_are_finite_and_reach_every_lora_matrix(vg):
    (loss, _), g = vg(LORA, BASE, BATCHES, jax.random.key(0), 1.0, 1e-3)
    assert np.isfinite(float(loss))
    for name, w in g.weights.items():
        for part in ("A", "B"):
            arr = np.asarray(w[part])
            assert np.all(np.isfinite(arr)), (name, part)
            assert np.abs(arr).max() > 0, (name, part)


@pytest.mark.parametrize("variant", rn.VARIANTS)
def test_repnoise_loss_runs_two_forwards_and_one_backward_sweep_through_both(variant):
    args = (LORA, BASE, BATCHES, jax.random.key(1), 1.0, 1e-3, variant)
    # One value_and_grad sweep: the layer scans of x_harm (with captures) and x_safe, reversed.
    jaxpr = jax.make_jaxpr(jax.value_and_grad(objective, has_aux=True),
                           static_argnums=6)(*args)
    assert count_passes(jaxpr.jaxpr, CFG.num_layers) == Cost(2, 2)
    forward_only = jax.make_jaxpr(objective, static_argnums=6)(*args)
    assert count_passes(forward_only.jaxpr, CFG.num_layers) == Cost(2, 0)


@pytest.mark.parametrize("variant, cost", [("official", Cost(3, 3)), ("labels", Cost(2, 2))])
def test_passes_in_the_jitted_train_step_are_the_declared_ones(variant, cost):
    """Official: the step's pass on "align" plus the whole objective here; labels: the step's
    pass plus one on the harmful batch. The registry declares the default's."""
    mesh, fn, st, frozen = build_run((1, 1, 1), "repnoise", variant=variant)
    batches = pad_to_one_length(named_batches(0), ("align", "harmful"))
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, step_lib.put_batches(batches, mesh))
    assert count_passes(jaxpr.jaxpr) == cost
    assert api.get("repnoise").cost == Cost(3, 3)


def test_repnoise_full_finetuning_on_merged_weights_equals_the_lora_loss(vg):
    merged = lora_lib.merge(CFG, BASE, LORA)
    full = jax.jit(lambda p, b, k: rn.repnoise_loss(CFG, None)(p, b, k), compiler_options=FAST)
    key = jax.random.key(6)
    got = full(merged, BATCHES, key)
    want = vg(LORA, BASE, BATCHES, key, 1.0, 1e-3)[0]
    for name in ("ce_safe", "ce_harmful", "lens_ce", "mmd"):
        assert float(got[1][name]) == pytest.approx(float(want[1][name]), rel=1e-4), name


def _transform_update(**hparams):
    tx = api.get("repnoise").build(**hparams)
    update = lambda g, s, t, b, k, f: tx.update(  # noqa: E731
        g, s, t, loss_fn=make_loss_fn(CFG, f), batches=b, rng=k)
    return tx, jax.jit(update, compiler_options=FAST), update


def test_official_transform_replaces_the_gradient_by_the_objectives(vg):
    rng = jax.random.key(9)
    (_, _), want = vg(LORA, BASE, BATCHES, rng, 0.5, 0.01)
    tx, update, _ = _transform_update(alpha=0.5, beta=0.01)
    for incoming in (jnp.zeros_like, jnp.ones_like):
        got, _ = update(jax.tree.map(incoming, LORA), tx.init(LORA), LORA, BATCHES, rng, BASE)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_labels_transform_adds_the_gradient_of_the_harmful_terms(vg):
    rng = jax.random.key(9)
    # With no response token in the align batch CE(x_s) = 0, so the objective's gradient is the
    # gradient of β R_mmd − α log(1 + R_lens) alone: what the transform adds to the step's g.
    no_align = {**BATCHES, "align": {**BATCHES["align"],
                                     "labels": np.full_like(BATCHES["align"]["labels"], -100)}}
    (_, _), want = vg(LORA, BASE, no_align, rng, 0.5, 0.01, variant="labels")
    tx, update, plain = _transform_update(alpha=0.5, beta=0.01, variant="labels")
    args = (jax.tree.map(jnp.ones_like, LORA), tx.init(LORA), LORA, BATCHES, rng, BASE)
    got, _ = update(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a) - 1.0, b, rtol=1e-4, atol=1e-6)
    # the transform adds one F+B on the harmful batch (the step's own pass is the align one)
    assert count_passes(jax.make_jaxpr(plain)(*args).jaxpr, CFG.num_layers) == Cost(1, 1)


@pytest.mark.parametrize("variant", rn.VARIANTS)
def test_repnoise_chains_with_adamw_in_a_plain_user_loop(vg, variant):
    opt = optax.chain(rn.repnoise(alpha=1.0, beta=1e-3, variant=variant), optax.adamw(1e-2))
    align = BATCHES["align"]

    @functools.partial(jax.jit, compiler_options=FAST)
    def step(lora, state, frozen, batches, rng):
        ce = lambda t: token_cross_entropy(  # noqa: E731
            forward(CFG, frozen, align["input_ids"], align["attention_mask"], lora=t),
            align["labels"])[0]
        u, state = opt.update(jax.grad(ce)(lora), state, lora,
                              loss_fn=make_loss_fn(CFG, frozen), batches=batches, rng=rng)
        return optax.apply_updates(lora, u), state

    lora, state = LORA, opt.init(LORA)
    loss = lambda t: float(vg(t, BASE, BATCHES, jax.random.key(0), 1.0, 1e-3,  # noqa: E731
                              variant=variant)[0][0])
    before = loss(lora)
    for i in range(5):
        lora, state = step(lora, state, BASE, BATCHES, jax.random.key(i))
    assert loss(lora) < before - 0.05


def test_repnoise_is_registered_with_its_defaults_cost_and_step_options():
    spec = api.get("repnoise")
    assert (spec.stage, spec.level) == ("alignment", "gradient")
    hp = spec.hyperparameters
    assert (hp["alpha"], hp["beta"], hp["variant"], hp["pairing"]) == \
        (1.0, 1e-3, "official", "paired")
    assert str(spec.cost) == "3F+3B"
    assert set(spec.batches) == {"align", "harmful"}
    assert spec.step_options().primary == "align"
    assert spec.step_options(variant="labels", pairing="unpaired").primary == "align"
    assert isinstance(spec.build(), optax.GradientTransformationExtraArgs)
    for bad in ({"gamma": 1.0}, {"variant": "paper"}, {"pairing": "shuffled"},
                {"kernel_num": 0}):
        with pytest.raises(api.DefenseError):
            spec.build(**bad)


def test_repnoise_on_8_devices_equals_one_device(vg):
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1, devices=jax.devices()[:8])
    rng = jax.random.key(4)
    (l1, _), g1 = vg(LORA, BASE, BATCHES, rng, 1.0, 1.0)
    rep = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    frozen = jax.device_put(BASE, state_lib.params_shardings(CFG, mesh))
    lora = jax.device_put(LORA, jax.tree.map(lambda _: rep, LORA))
    batches = jax.device_put(BATCHES, jax.tree.map(lambda _: rows, BATCHES))
    (l8, _), g8 = vg(lora, frozen, batches, rng, 1.0, 1.0)
    assert len(batches["harmful"]["input_ids"].sharding.device_set) == 8
    assert float(l8) == pytest.approx(float(l1), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
