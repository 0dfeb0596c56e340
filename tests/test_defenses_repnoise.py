"""RepNoise: the loss against an independent numpy computation, seeding, gradients, passes,
the optax form against the fused objective, and 8 devices against one."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from defense_fixtures import FAST, GEMMA_LIKE, count_passes
from jax.sharding import NamedSharding, PartitionSpec

from hfjax import gaussian, sharding
from hfjax.defenses import api
from hfjax.defenses.api import Cost
from hfjax.models import lora as lora_lib
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import forward
from hfjax.train import state as state_lib
from hfjax.train.loss import token_cross_entropy

# the modules themselves: the packages re-export functions of the same names
rn = importlib.import_module("hfjax.defenses.alignment.repnoise")

CFG = ModelConfig(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, layer_windows=(0, 0), rms_norm_eps=1e-6,
)
BASE = params_lib.init_random(CFG, jax.random.key(0), std=0.1)


def _lora():
    lora = lora_lib.init(CFG, jax.random.key(1), rank=4, alpha=8,
                         targets=("q_proj", "v_proj", "down_proj"))
    keys = iter(jax.random.split(jax.random.key(2), 8))
    weights = {n: {**w, "B": 0.05 * jax.random.normal(next(keys), w["B"].shape)}
               for n, w in lora.weights.items()}
    return lora_lib.LoRA(weights=weights, alpha=lora.alpha)


LORA = _lora()


def paired_batches(batch=4, length=14, seed=0):
    """{"harmful", "align"}: the same prompts, different answers, right padding."""
    r = np.random.default_rng(seed)
    out = {name: {"input_ids": np.zeros((batch, length), np.int32),
                  "attention_mask": np.zeros((batch, length), np.int32),
                  "labels": np.full((batch, length), -100, np.int32)}
           for name in ("harmful", "align")}
    for i in range(batch):
        prompt = r.integers(1, CFG.vocab_size, 3 + i % 3)
        for name, n_ans in (("harmful", 4 + i % 4), ("align", 3 + (i + 1) % 5)):
            ans = r.integers(1, CFG.vocab_size, n_ans)
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


def np_lens(cfg, params, h):
    p = jax.tree.map(np.asarray, params)
    head = p["embed_tokens"].T if cfg.tie_word_embeddings else p["lm_head"]
    logits = np_rms_norm(h, p["final_norm"], cfg.rms_norm_eps, cfg.norm_weight_offset) @ head
    cap = cfg.final_logit_softcap
    return cap * np.tanh(logits / cap) if cap else logits


# --------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("cfg", [CFG, GEMMA_LIKE], ids=["llama", "gemma2-like"])
def test_logit_lens_of_the_last_residual_is_the_models_logits(cfg):
    params = params_lib.init_random(cfg, jax.random.key(3), std=0.1)
    b = BATCHES["harmful"]

    def run(p, ids, mask):
        logits, cap = forward(cfg, p, ids, mask, capture=("residual",))
        last = cap["residual"][-1]
        return logits, last, rn.lens_logits(cfg, p, last)

    logits, last, lens = jax.jit(run)(params, b["input_ids"], b["attention_mask"])
    np.testing.assert_allclose(lens, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np_lens(cfg, params, np.asarray(last)), logits, rtol=1e-4,
                               atol=1e-4)


def objective(t, f, b, k, alpha, beta):
    return rn.repnoise_loss(CFG, f, alpha, beta)(t, b, k)


@pytest.fixture(scope="module")
def vg():
    """The objective's ((loss, aux), grad), compiled once for the module."""
    return jax.jit(jax.value_and_grad(objective, has_aux=True), compiler_options=FAST)


def test_repnoise_loss_equals_an_independent_numpy_computation(vg):
    alpha, beta, key = 0.7, 1.0, jax.random.key(5)
    (loss, aux), _ = vg(LORA, BASE, BATCHES, key, alpha, beta)

    h, s = BATCHES["harmful"], BATCHES["align"]
    run = jax.jit(lambda b, capture: forward(CFG, BASE, b["input_ids"], b["attention_mask"],
                                             lora=LORA, capture=capture), static_argnums=1)
    logits_h, cap = run(h, ("mlp_out", "residual"))
    logits_s = run(s, ())
    mlp = np.asarray(cap["mlp_out"], np.float64)                      # [L, B, T, D]
    m = (h["labels"] != -100)[None, :, :, None]
    noise = np.asarray(gaussian.standard_normal(key, mlp.shape), np.float64)
    n_layers, b = mlp.shape[:2]
    want_mmd = np.mean([np_mmd((mlp[i] * m[0]).reshape(b, -1), (noise[i] * m[0]).reshape(b, -1))
                        for i in range(n_layers)])
    embed = np.asarray(BASE["embed_tokens"])[h["input_ids"]]
    states = [embed] + [np.asarray(cap["residual"][i]) for i in range(n_layers)]
    want_lens = np.mean([np_ce(np_lens(CFG, BASE, st), h["labels"]) for st in states])
    want_ce_safe = np_ce(np.asarray(logits_s), s["labels"])
    want = want_ce_safe + beta * want_mmd - alpha * np.log(1 + want_lens)

    assert float(aux["mmd"]) == pytest.approx(want_mmd, rel=1e-4)
    assert float(aux["lens_ce"]) == pytest.approx(want_lens, rel=1e-5)
    assert float(aux["ce_safe"]) == pytest.approx(want_ce_safe, rel=1e-5)
    assert float(aux["ce_harmful"]) == pytest.approx(np_ce(np.asarray(logits_h), h["labels"]),
                                                     rel=1e-5)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert want_mmd > 1e-3  # the noise term is not trivially zero on this batch


def test_repnoise_noise_is_seeded_by_rng(vg):
    mmd = lambda k: float(vg(LORA, BASE, BATCHES, k, 1.0, 1e-3)[0][1]["mmd"])  # noqa: E731
    assert mmd(jax.random.key(11)) == mmd(jax.random.key(11))
    assert mmd(jax.random.key(11)) != mmd(jax.random.key(12))
    with pytest.raises(ValueError, match="rng"):
        rn.repnoise_loss(CFG, BASE)(LORA, BATCHES)


def test_repnoise_gradients_are_finite_and_reach_every_lora_matrix(vg):
    (loss, _), g = vg(LORA, BASE, BATCHES, jax.random.key(0), 1.0, 1e-3)
    assert np.isfinite(float(loss))
    for name, w in g.weights.items():
        for part in ("A", "B"):
            arr = np.asarray(w[part])
            assert np.all(np.isfinite(arr)), (name, part)
            assert np.abs(arr).max() > 0, (name, part)


def test_repnoise_loss_runs_two_forwards_and_one_backward_sweep_through_both():
    args = (LORA, BASE, BATCHES, jax.random.key(1), 1.0, 1e-3)
    # One value_and_grad sweep: the layer scans of x_harm (with captures) and x_safe, reversed.
    jaxpr = jax.make_jaxpr(jax.value_and_grad(objective, has_aux=True))(*args)
    assert count_passes(jaxpr.jaxpr, CFG.num_layers) == Cost(2, 2)
    assert count_passes(jax.make_jaxpr(objective)(*args).jaxpr, CFG.num_layers) == Cost(2, 0)


def test_repnoise_full_finetuning_on_merged_weights_equals_the_lora_loss(vg):
    merged = lora_lib.merge(CFG, BASE, LORA)
    full = jax.jit(lambda p, b, k: rn.repnoise_loss(CFG, None)(p, b, k), compiler_options=FAST)
    key = jax.random.key(6)
    got = full(merged, BATCHES, key)
    want = vg(LORA, BASE, BATCHES, key, 1.0, 1e-3)[0]
    for name in ("ce_safe", "ce_harmful", "lens_ce", "mmd"):
        assert float(got[1][name]) == pytest.approx(float(want[1][name]), rel=1e-4), name


def test_repnoise_transform_adds_the_gradient_of_the_harmful_terms(vg):
    rng = jax.random.key(9)
    # With no response token in the align batch CE(x_s) = 0, so the objective's gradient is the
    # gradient of β R_mmd − α log(1 + R_lens) alone: what the transform adds to the step's g.
    no_align = {**BATCHES, "align": {**BATCHES["align"],
                                     "labels": np.full_like(BATCHES["align"]["labels"], -100)}}
    (_, _), want = vg(LORA, BASE, no_align, rng, 0.5, 0.01)
    tx = api.get("repnoise").build(alpha=0.5, beta=0.01)
    update = lambda g, s, t, b, k, f: tx.update(  # noqa: E731
        g, s, t, batches=b, rng=k, cfg=CFG, frozen=f)
    args = (jax.tree.map(jnp.ones_like, LORA), tx.init(LORA), LORA, BATCHES, rng, BASE)
    got, _ = jax.jit(update, compiler_options=FAST)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a) - 1.0, b, rtol=1e-4, atol=1e-6)
    # the transform adds one F+B on the harmful batch (the step's own pass is the align one)
    assert count_passes(jax.make_jaxpr(update)(*args).jaxpr, CFG.num_layers) == Cost(1, 1)


def test_repnoise_chains_with_adamw_in_a_plain_user_loop(vg):
    opt = optax.chain(rn.repnoise(alpha=1.0, beta=1e-3), optax.adamw(1e-2))
    align = BATCHES["align"]

    @functools.partial(jax.jit, compiler_options=FAST)
    def step(lora, state, frozen, batches, rng):
        ce = lambda t: token_cross_entropy(  # noqa: E731
            forward(CFG, frozen, align["input_ids"], align["attention_mask"], lora=t),
            align["labels"])[0]
        u, state = opt.update(jax.grad(ce)(lora), state, lora, batches=batches, rng=rng,
                              cfg=CFG, frozen=frozen)
        return optax.apply_updates(lora, u), state

    lora, state = LORA, opt.init(LORA)
    loss = lambda t: float(vg(t, BASE, BATCHES, jax.random.key(0), 1.0, 1e-3)[0][0])  # noqa
    before = loss(lora)
    for i in range(5):
        lora, state = step(lora, state, BASE, BATCHES, jax.random.key(i))
    assert loss(lora) < before - 0.05


def test_repnoise_is_registered_with_its_defaults_cost_and_step_options():
    spec = api.get("repnoise")
    assert (spec.stage, spec.level) == ("alignment", "gradient")
    assert spec.hyperparameters["alpha"] == 1.0 and spec.hyperparameters["beta"] == 1e-3
    assert str(spec.cost) == "2F+2B"
    assert set(spec.batches) == {"align", "harmful"}
    assert spec.step_options().primary == "align"
    assert isinstance(spec.build(), optax.GradientTransformationExtraArgs)
    with pytest.raises(api.DefenseError):
        spec.build(gamma=1.0)


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
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
