"""Constrained SFT, LDIFS and SaLoRA: each update against one derived by hand from the model's
forward pass (not the oracle's captures), their passes in hfjax's step, 8 devices = 1, misuse."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from defense_fixtures import (
    BASE,
    CFG,
    LORA,
    LOSS_FN,
    build_run,
    count_passes,
    fast_jit,
    grad_at,
    make_batch,
    named_batches,
    sgd_run,
)

from hfjax import defenses
from hfjax.defenses.finetune import constrained_sft, ldifs, salora, salora_chain
from hfjax.defenses.finetune.constrained_sft import token_betas
from hfjax.models import forward
from hfjax.models import lora as lora_lib
from hfjax.train import step

SALORA = {"safety_rank": 8}  # below the tiny model's smallest projection output (32)
BATCH = make_batch(7)
# θ away from the reference θ₀ = LORA, so that Δ_t ≠ 0 and the features differ
THETA = jax.tree.map(lambda w: w + 0.05 * jax.random.normal(jax.random.key(5), w.shape), LORA)


logits_at = fast_jit(lambda theta, batch: forward(CFG, BASE, batch["input_ids"],
                                                  batch["attention_mask"], lora=theta))


def token_logps(theta, batch) -> np.ndarray:
    """log π_θ(labels_{t+1} | ≤ t) [B, T−1] from forward's logits (float64)."""
    logits = np.asarray(logits_at(theta, batch), np.float64)[:, :-1]
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    labels = np.where(batch["labels"][:, 1:] == -100, 0, batch["labels"][:, 1:])
    return np.take_along_axis(logits, labels[..., None], -1)[..., 0] - logz


def official_betas(length: int, beta=0.1, bias_factor=20.0, first=5.0, bias_length=5):
    """`get_beta_list` of Unispac/shallow-vs-deep-alignment trainer.py:873-894."""
    prefix = [beta * bias_factor] * bias_length
    if bias_length:
        prefix[0] = beta * first
    return prefix[:length] if length <= bias_length else prefix + [beta] * (length - bias_length)


def official_weights(policy, reference, labels) -> np.ndarray:
    """The detached weights of `soft_sft_loss` (trainer.py:896-936), row by row over the loss
    tokens in order, scattered back to [B, T−1] (0 off the loss tokens)."""
    mask = labels[:, 1:] != -100
    w = np.zeros(policy.shape)
    for i in range(policy.shape[0]):
        idx = np.nonzero(mask[i])[0]
        beta = np.array(official_betas(len(idx)))
        delta = policy[i, idx] - reference[i, idx]
        w[i, idx] = np.maximum(2 * (1 - 1 / (1 + np.exp(-beta * delta))), 1e-3)
    return w


def weighted_ce_grad(theta, batch, weights: np.ndarray):
    """∇θ of Σ_t w_t · (−log π_θ(y_t)) / N with the weights as constants, from forward."""
    mask = batch["labels"][:, 1:] != -100
    labels = jnp.where(mask, batch["labels"][:, 1:], 0)

    def loss(t):
        logits = forward(CFG, BASE, batch["input_ids"], batch["attention_mask"], lora=t)[:, :-1]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(mask, weights * logp, 0.0)) / mask.sum()

    return fast_jit(jax.grad(loss))(theta)


def run_update(tx, theta, batches, incoming=None, init=LORA):
    """tx.update of `incoming` (default: ∇CE on "user") at θ, state from init(init)."""
    g = grad_at(theta, batches["user"]) if incoming is None else incoming
    return fast_jit(lambda g, p, b: tx.update(g, tx.init(init), p, loss_fn=LOSS_FN, batches=b,
                                              rng=jax.random.key(0))[0])(g, theta, batches)


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# --- Constrained SFT -------------------------------------------------------------------------


def test_constrained_sft_defaults_and_betas_are_the_official_ones():
    assert defenses.get("constrained_sft").hyperparameters == {
        "beta": 0.1, "first_token_bias_factor": 5.0, "bias_factor": 20.0, "bias_length": 5}
    t = jnp.arange(8)
    np.testing.assert_allclose(token_betas(t, 0.1, 5.0, 20.0, 5), official_betas(8), rtol=1e-6)
    np.testing.assert_allclose(token_betas(t, 0.1, 5.0, 20.0, 5)[:3], official_betas(3),
                               rtol=1e-6)
    np.testing.assert_allclose(official_betas(6), [0.5, 2, 2, 2, 2, 0.1], rtol=1e-6)


def test_constrained_sft_update_is_the_official_detached_weight_times_ce_gradient():
    ref, pol = token_logps(LORA, BATCH), token_logps(THETA, BATCH)
    weights = official_weights(pol, ref, BATCH["labels"])
    assert weights.max() > 1.01 and 1e-3 < weights[weights > 0].min() < 0.99  # Δ moves w both ways
    want = weighted_ce_grad(THETA, BATCH, weights)
    got = run_update(constrained_sft(), THETA, {"user": BATCH})
    assert_trees_close(got, want, rtol=2e-4, atol=1e-7)


def test_constrained_sft_at_the_reference_is_the_plain_ce_gradient():
    got = run_update(constrained_sft(), LORA, {"user": BATCH})
    assert_trees_close(got, grad_at(LORA, BATCH), rtol=1e-4, atol=1e-7)


def test_token_nll_capture_is_minus_the_log_prob_of_each_next_label():
    aux = LOSS_FN(THETA, BATCH, capture=("token_nll",))[1]
    nll = np.asarray(aux["captured"]["token_nll"])
    mask = BATCH["labels"][:, 1:] != -100
    np.testing.assert_allclose(nll[:, :-1], np.where(mask, -token_logps(THETA, BATCH), 0.0),
                               rtol=1e-5, atol=1e-6)
    assert np.all(nll[:, -1] == 0)
    np.testing.assert_allclose(nll.sum() / mask.sum(), LOSS_FN(THETA, BATCH)[0], rtol=1e-5)


# --- LDIFS ----------------------------------------------------------------------------------


def features(theta, batch, name):
    return forward(CFG, BASE, batch["input_ids"], batch["attention_mask"], lora=theta,
                   capture=(name,))[1][name]


features_at = fast_jit(features, static_argnames="name")


def test_ldifs_paper_update_adds_alpha_times_the_normalized_feature_distance_gradient():
    alpha = 0.05
    ref = np.asarray(features_at(LORA, BATCH, "residual"), np.float64)
    valid = BATCH["attention_mask"].astype(bool)

    def distance(t):  # (1/L) Σ_l mean over real tokens of ‖φ/‖φ‖ − φ⁰/‖φ⁰‖‖²
        f = features(t, BATCH, "residual")
        unit = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
        unit_ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
        per_token = jnp.sum((unit - unit_ref) ** 2, -1)
        return jnp.mean(jnp.stack([jnp.sum(jnp.where(valid, p, 0)) / valid.sum()
                                   for p in per_token]))

    assert float(fast_jit(distance)(THETA)) > 1e-4
    g = grad_at(THETA, BATCH)
    want = optax.tree.add_scale(g, alpha, fast_jit(jax.grad(distance))(THETA))
    got = run_update(ldifs(alpha=alpha), THETA, {"user": BATCH}, incoming=g)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-7)


def test_ldifs_gitdisl_keeps_only_the_layers_whose_proximal_term_is_below_the_threshold():
    rho = 1e-2
    ref = np.asarray(features_at(LORA, BATCH, "mlp_out"), np.float64)
    terms = rho / 2 * np.sum((np.asarray(features_at(THETA, BATCH, "mlp_out")) - ref) ** 2,
                             axis=(1, 2, 3))
    assert terms[0] != pytest.approx(terms[1], rel=0.1)
    kept = int(np.argmin(terms))
    threshold = float(terms.mean())  # between the two layers' terms: one is dropped

    def kept_term(t):
        return rho / 2 * jnp.sum((features(t, BATCH, "mlp_out")[kept] - ref[kept]) ** 2)

    g = grad_at(THETA, BATCH)
    want = optax.tree.add(g, fast_jit(jax.grad(kept_term))(THETA))
    tx = ldifs(variant="gitdisl", rho=rho, threshold=threshold)
    assert_trees_close(run_update(tx, THETA, {"user": BATCH}, incoming=g), want, rtol=1e-4,
                       atol=1e-7)
    everything = ldifs(variant="gitdisl", rho=rho, threshold=1e9)
    both_terms = lambda t: rho / 2 * jnp.sum((features(t, BATCH, "mlp_out") - ref) ** 2)  # noqa: E731
    grad_both = fast_jit(jax.grad(both_terms))
    assert_trees_close(run_update(everything, THETA, {"user": BATCH}, incoming=g),
                       optax.tree.add(g, grad_both(THETA)), rtol=1e-4, atol=1e-7)


# --- SaLoRA ---------------------------------------------------------------------------------


def hand_projectors(lora0, batch, rank):
    """C = I − V Vᵀ per module and layer, V the top right singular vectors of Y = X W over the
    real tokens, X the projection inputs (B₀ = 0: the outputs are the base's)."""
    cap = forward(CFG, BASE, batch["input_ids"], batch["attention_mask"], lora=lora0,
                  capture=("proj_inputs",))[1]["proj_inputs"]
    valid = batch["attention_mask"].astype(bool)
    out = {}
    for name in lora0.weights:
        cs = []
        for layer in range(CFG.num_layers):
            x = np.asarray(cap[name][layer], np.float64)[valid]
            y = x @ np.asarray(BASE["layers"][name]["kernel"][layer], np.float64)
            v = np.linalg.svd(y, full_matrices=False)[2][:rank].T
            cs.append(np.eye(y.shape[1]) - v @ v.T)
        out[name] = np.stack(cs)
    return out


def test_salora_with_adamw_trains_b_times_the_fixed_safety_module_exactly():
    """SaLoRA's model (branch x A B C, raw B trained by AdamW) against hfjax's adapter trained by
    `salora_chain(adamw)`: B' = B C and the same A after every step."""
    rank, lr, steps = 8, 1e-2, 3
    zero_b = lora_lib.LoRA({n: {"A": w["A"], "B": jnp.zeros_like(w["B"])}
                            for n, w in LORA.weights.items()}, alpha=LORA.alpha)
    align = make_batch(11, length=10)
    c = hand_projectors(zero_b, align, rank)
    effective = lambda raw: raw.replace(weights={  # noqa: E731
        n: {"A": w["A"], "B": jnp.einsum("lkd,lde->lke", w["B"], c[n].astype(np.float32))}
        for n, w in raw.weights.items()})
    ref_opt = optax.adamw(lr, weight_decay=0.1)
    opt = salora_chain(optax.adamw(lr, weight_decay=0.1), safety_rank=rank)

    @fast_jit
    def both(raw, ref_state, theta, state, batch):
        g_raw = jax.grad(lambda r: LOSS_FN(effective(r), batch)[0])(raw)
        u, ref_state = ref_opt.update(g_raw, ref_state, raw)
        g = jax.grad(lambda t: LOSS_FN(t, batch)[0])(theta)
        v, state = opt.update(g, state, theta, loss_fn=LOSS_FN,
                              batches={"user": batch, "align": align}, rng=jax.random.key(0))
        return (optax.apply_updates(raw, u), ref_state, optax.apply_updates(theta, v), state)

    raw, ref_state, theta, state = zero_b, ref_opt.init(zero_b), zero_b, opt.init(zero_b)
    for i in range(steps):
        raw, ref_state, theta, state = both(raw, ref_state, theta, state, make_batch(20 + i))
        # Adam's 1/√v magnifies the float32 rounding of C (float64 SVD in the reference)
        assert_trees_close(theta, effective(raw), rtol=1e-4, atol=3e-5)
    b = np.asarray(theta.weights["q_proj"]["B"])
    assert np.abs(b).max() > 1e-3
    np.testing.assert_allclose(np.einsum("lkd,lde->lke", b, c["q_proj"]), b, atol=2e-6)


def test_salora_projects_the_b_gradient_and_leaves_a_alone():
    align = make_batch(11, length=10)
    c = hand_projectors(LORA.replace(weights={n: {"A": w["A"], "B": 0 * w["B"]}
                                              for n, w in LORA.weights.items()}), align, 8)
    init = LORA.replace(weights={n: {"A": w["A"], "B": 0 * w["B"]} for n, w in
                                 LORA.weights.items()})
    g = grad_at(THETA, BATCH)
    got = run_update(salora(safety_rank=8), init, {"user": BATCH, "align": align},
                     incoming=g, init=init)
    for n, w in g.weights.items():
        np.testing.assert_array_equal(got.weights[n]["A"], w["A"])
        np.testing.assert_allclose(got.weights[n]["B"], np.einsum("lkd,lde->lke", w["B"], c[n]),
                                   rtol=1e-4, atol=1e-6)


def test_proj_outputs_capture_is_each_projection_output_with_its_lora_branch():
    cap = forward(CFG, BASE, BATCH["input_ids"], BATCH["attention_mask"], lora=THETA,
                  capture=("proj_inputs", "proj_outputs"))[1]
    x, y = cap["proj_inputs"]["v_proj"][1], cap["proj_outputs"]["v_proj"][1]
    w = THETA.weights["v_proj"]
    want = x @ BASE["layers"]["v_proj"]["kernel"][1] + THETA.scale * (x @ w["A"][1] @ w["B"][1])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert cap["proj_outputs"]["gate_proj"].shape == (2, 8, 12, CFG.intermediate_size)


# --- cost, sharding, misuse -----------------------------------------------------------------

HPARAMS = {"constrained_sft": {}, "ldifs": {}, "salora": SALORA}


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_passes_in_the_jitted_train_step_match_the_declared_cost(name):
    mesh, fn, st, frozen = build_run((1, 1, 1), name, **HPARAMS[name])
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, step.put_batches(named_batches(0), mesh))
    assert count_passes(jaxpr.jaxpr) == defenses.get(name).cost


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_defense_on_8_devices_matches_1_device(name):
    hp = tuple(HPARAMS[name].items())
    single, sharded = sgd_run((1, 1, 1), name, 2, hp), sgd_run((2, 4, 1), name, 2, hp)
    np.testing.assert_allclose(sharded["losses"], single["losses"], atol=1e-5, rtol=0)
    assert_trees_close(sharded["thetas"][-1], single["thetas"][-1], atol=1e-5, rtol=0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(single["thetas"][-1]), jax.tree.leaves(single["thetas"][0]), strict=True))
    assert moved > 1e-4


def test_bad_options_raise_defense_errors_naming_the_problem():
    with pytest.raises(defenses.DefenseError, match="variant"):
        ldifs(variant="nope")
    with pytest.raises(defenses.DefenseError, match="does not use"):
        ldifs(variant="paper", rho=1.0)
    with pytest.raises(defenses.DefenseError, match="does not use"):
        ldifs(variant="gitdisl", alpha=1.0)
    with pytest.raises(defenses.DefenseError, match="bias_length"):
        constrained_sft(bias_length=2.5)
    with pytest.raises(defenses.DefenseError, match="output size 32"):
        salora(safety_rank=32).init(LORA)
    with pytest.raises(defenses.DefenseError, match="not a LoRA"):
        salora(safety_rank=8).init({"w": jnp.zeros((2, 3))})
    with pytest.raises(defenses.DefenseError, match="'align' batch"):
        run_update(salora(safety_rank=8), LORA, {"user": BATCH})
