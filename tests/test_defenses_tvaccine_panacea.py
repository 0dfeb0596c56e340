"""T-Vaccine and Panacea equal independent computations from separate jax.grad calls on a tiny
Llama with LoRA, count their declared passes in hfjax's jitted step, and train the same on 8
simulated devices as on one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from defense_fixtures import (
    CFG,
    LORA,
    LOSS_FN,
    _sub_jaxprs,
    build_run,
    count_passes,
    fast_jit,
    grad_at,
    loss_at,
    make_batch,
    named_batches,
    sgd_run,
    value_at,
)

from hfjax import defenses
from hfjax.defenses.alignment.t_vaccine import (
    layer_probabilities,
    sample_layers,
    t_vaccine,
    trained_layers,
)
from hfjax.defenses.api import Cost
from hfjax.defenses.finetune.panacea import clamp_max, panacea, panacea_final
from hfjax.train import step

ALIGN, USER, HARMFUL = make_batch(0), make_batch(2), make_batch(1)
SHAPE = (CFG.num_layers, *ALIGN["input_ids"].shape, CFG.hidden_size)
MLP = ("gate_proj", "up_proj", "down_proj")


_grad_perturb = fast_jit(jax.grad(lambda e, b: loss_at(LORA, b, e)))


def activation_grads(batch):
    """∂L/∂a_l at a zero perturbation of the attention outputs [L, B, T, D]."""
    return _grad_perturb(jnp.zeros(SHAPE), batch)


def global_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                             for x in jax.tree.leaves(tree))))


def assert_trees_close(a, b, atol=1e-6, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def cond_branch_costs(jaxpr) -> list[list[Cost]]:
    """The passes of each branch of every `cond` (in the jaxpr and its sub-jaxprs) that has any."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            costs = [count_passes(b.jaxpr) for b in eqn.params["branches"]]
            if any(c != Cost(0, 0) for c in costs):
                found.append(costs)
        for sub in _sub_jaxprs(eqn):
            found += cond_branch_costs(sub)
    return found


# --- T-Vaccine --------------------------------------------------------------------------------


def test_layer_probabilities_are_harmful_activation_gradient_norms_over_their_sum():
    g = np.asarray(activation_grads(HARMFUL), np.float64)
    s = np.sqrt((g ** 2).reshape(CFG.num_layers, -1).sum(axis=1))
    np.testing.assert_allclose(layer_probabilities(jnp.asarray(g, jnp.float32)), s / s.sum(),
                               rtol=1e-6)


def test_sampled_layers_are_distinct_and_drawn_without_replacement_in_proportion_to_p():
    p = jnp.array([0.7, 0.2, 0.1, 0.0])
    masks = np.asarray(jax.vmap(lambda k: sample_layers(k, p, 2))(
        jax.random.split(jax.random.key(0), 4000)))
    assert (masks.sum(axis=1) == 2).all() and not masks[:, 3].any()
    # successive draws: P(0 in S) = .7 + .2 · .7/.8 + .1 · .7/.9
    assert masks[:, 0].mean() == pytest.approx(0.7 + 0.2 * 0.7 / 0.8 + 0.1 * 0.7 / 0.9, abs=0.02)


def test_official_scope_trains_attention_lora_of_sampled_layers_and_mlp_lora_from_the_first():
    def at(n, idx):
        return jnp.zeros(n, bool).at[jnp.array(idx)].set(True)

    small = trained_layers(at(20, [5, 12]), "attention")
    np.testing.assert_array_equal(small["attention"], at(20, [5, 12]))
    np.testing.assert_array_equal(small["mlp"], np.arange(20) >= 5)
    # above 26 layers the official code also runs layer i - 1 of each sampled i with gradients
    deep = trained_layers(at(32, [5, 12]), "attention")
    np.testing.assert_array_equal(deep["attention"], at(32, [5, 12]))
    np.testing.assert_array_equal(deep["mlp"], np.arange(32) >= 4)
    every = trained_layers(at(32, [5, 12]), "all")
    np.testing.assert_array_equal(every["mlp"], at(32, [5, 12]))


def t_vaccine_update(tx):
    """(updates, state) of `tx` at θ = LORA, jitted once for the given state, batches and rng."""
    return fast_jit(lambda g, s, b, r: tx.update(g, s, LORA, loss_fn=LOSS_FN, batches=b, rng=r))


def expected_t_vaccine(rng, rho, scope):
    """Hand-derived first step: p from the harmful batch, one layer drawn with `rng`, Vaccine's
    ε on that layer only, the gradient at a + ε with the untrained LoRA entries zeroed."""
    g_h = np.asarray(activation_grads(HARMFUL), np.float64).reshape(CFG.num_layers, -1)
    s = np.sqrt((g_h ** 2).sum(axis=1))
    p = jnp.asarray(s / s.sum(), jnp.float32)
    layer = int(jax.random.choice(rng, CFG.num_layers, (1,), replace=False, p=p)[0])
    g = np.asarray(activation_grads(ALIGN), np.float64)
    masked = np.zeros_like(g)
    masked[layer] = g[layer]
    eps = rho * masked / (np.sqrt((masked ** 2).sum()) + 1e-7)
    grads = grad_at(LORA, ALIGN, jnp.asarray(eps, jnp.float32))
    mlp_from = layer if scope == "attention" else None

    def keep(name, i):
        return i == layer or (name in MLP and mlp_from is not None and i >= mlp_from)

    weights = {n: {k: np.stack([w[i] if keep(n, i) else np.zeros_like(w[i])
                                for i in range(CFG.num_layers)]) for k, w in ab.items()}
               for n, ab in grads.weights.items()}
    return layer, p, grads.replace(weights=weights)


def keys_sampling_each_layer(probs) -> dict[int, jax.Array]:
    """{layer: a key whose one-layer draw from probs is that layer}."""
    found = {}
    for i in range(64):
        key = jax.random.key(i)
        found.setdefault(int(jnp.argmax(sample_layers(key, probs, 1))), key)
    assert len(found) == CFG.num_layers
    return found


@pytest.mark.parametrize("scope", ["attention", "all"])
def test_t_vaccine_first_step_is_vaccine_on_one_sampled_layer_with_the_others_lora_zeroed(scope):
    tx = t_vaccine(rho=3.0, layers=1, scope=scope)
    run = t_vaccine_update(tx)
    batches = {"align": ALIGN, "harmful": HARMFUL}
    probs = layer_probabilities(activation_grads(HARMFUL))
    for layer, rng in keys_sampling_each_layer(probs).items():
        got, state = run(grad_at(LORA, ALIGN), tx.init(LORA), batches, rng)
        sampled, p, expected = expected_t_vaccine(rng, 3.0, scope)
        assert sampled == layer
        assert_trees_close(got, expected)
        np.testing.assert_allclose(state.probs, p, rtol=1e-5)
        np.testing.assert_array_equal(state.active, np.arange(CFG.num_layers) == layer)
        assert int(state.count) == 1
        frozen = 1 - layer
        assert not np.any(got.weights["q_proj"]["A"][frozen])
        assert np.abs(got.weights["q_proj"]["A"][layer]).max() > 1e-4
        mlp_trains = scope == "attention" and frozen > layer
        assert np.any(got.weights["down_proj"]["B"][frozen]) == mlp_trains


def test_t_vaccine_resamples_every_sample_every_steps_and_reestimates_every_estimate_every():
    tx = t_vaccine(layers=1, sample_every=2, estimate_every=3)
    run = t_vaccine_update(tx)
    harmful = [make_batch(10 + t) for t in range(4)]
    keys = jax.random.split(jax.random.key(5), 4)
    state, states = tx.init(LORA), []
    for t in range(4):
        _, state = run(grad_at(LORA, ALIGN), state, {"align": ALIGN, "harmful": harmful[t]},
                       keys[t])
        states.append(state)
    p0, p3 = (layer_probabilities(activation_grads(harmful[t])) for t in (0, 3))
    for t, want in enumerate((p0, p0, p0, p3)):
        np.testing.assert_allclose(states[t].probs, want, rtol=1e-5)
    assert not np.allclose(p0, p3)
    for t, (key, probs) in enumerate(((keys[0], p0), (keys[0], p0), (keys[2], p0),
                                      (keys[2], p0))):
        np.testing.assert_array_equal(states[t].active, sample_layers(key, probs, 1))


def test_t_vaccine_misuse_raises_defense_errors_naming_the_problem():
    run = t_vaccine_update(t_vaccine(layers=3))
    with pytest.raises(defenses.DefenseError, match="layers=3 of a 2-layer model"):
        run(LORA, t_vaccine().init(LORA), {"align": ALIGN, "harmful": HARMFUL},
            jax.random.key(0))
    with pytest.raises(defenses.DefenseError, match="scope"):
        t_vaccine(scope="mlp")
    with pytest.raises(defenses.DefenseError, match="LoRA"):
        t_vaccine().init({"w": jnp.zeros((2, 3))})
    with pytest.raises(defenses.DefenseError, match="sample_every"):
        t_vaccine(sample_every=0)


def test_t_vaccine_step_passes_are_the_declared_2F2B_plus_1F1B_in_the_reestimation_branch():
    mesh, fn, st, frozen = build_run((1, 1, 1), "t_vaccine", layers=1)
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, step.put_batches(named_batches(0), mesh)).jaxpr
    declared = defenses.get("t_vaccine").cost
    assert declared == Cost(2, 2)
    assert count_passes(jaxpr) == Cost(3, 3)  # the counter takes a cond's dearest branch
    assert cond_branch_costs(jaxpr) == [[Cost(0, 0), Cost(1, 1)]]  # steady state: declared


# --- Panacea ----------------------------------------------------------------------------------


def expected_panacea(lam, rho, cap):
    """g_g − λ (∇ min(h(θ + ε), c) − ∇h(θ)), ε = ρ ∇h / (‖∇h‖ + 1e-7), from separate grads."""
    g_g, g_h = grad_at(LORA, USER), grad_at(LORA, HARMFUL)
    eps = jax.tree.map(lambda g: rho * g / (global_norm(g_h) + 1e-7), g_h)
    shifted = jax.tree.map(jnp.add, LORA, eps)
    clipped = float(value_at(shifted, HARMFUL)) > cap
    g_h2 = jax.tree.map(jnp.zeros_like, g_h) if clipped else grad_at(shifted, HARMFUL)
    return jax.tree.map(lambda g, a, b: g - lam * (b - a), g_g, g_h, g_h2), eps, clipped


@pytest.mark.parametrize("cap", [5.0, 4.9])
def test_panacea_update_is_g_g_minus_lambda_times_the_adversarial_harmful_gradient_gap(cap):
    lam = 0.5
    opt = optax.chain(panacea(rho=1.0, lam=lam, loss_cap=cap), optax.sgd(1.0))
    g_g = grad_at(LORA, USER)
    got, state = fast_jit(lambda g, s: opt.update(
        g, s, LORA, loss_fn=LOSS_FN, batches={"user": USER, "harmful": HARMFUL}))(
        g_g, opt.init(LORA))
    expected, eps, clipped = expected_panacea(lam, 1.0, cap)
    assert clipped == (cap == 4.9)  # h(θ + ε) lies between the two caps on this model
    assert_trees_close(jax.tree.map(jnp.negative, got), expected)
    assert_trees_close(state[0].epsilon, eps)
    assert global_norm(state[0].epsilon) == pytest.approx(1.0, rel=1e-5)
    assert global_norm(optax.tree.sub(expected, g_g)) > 1e-3 * global_norm(g_g)
    assert_trees_close(panacea_final(LORA, state),
                       jax.tree.map(jnp.add, LORA, eps))


def test_clamp_max_has_torch_clamps_value_and_gradient_at_and_around_the_cap():
    grad = jax.grad(lambda x: clamp_max(x, 5.0))
    assert [float(clamp_max(x, 5.0)) for x in (4.0, 5.0, 6.0)] == [4.0, 5.0, 5.0]
    assert [float(grad(x)) for x in (4.0, 5.0, 6.0)] == [1.0, 1.0, 0.0]


def test_panacea_final_needs_exactly_one_panacea_state_and_bad_values_raise():
    with pytest.raises(defenses.DefenseError, match="found 0"):
        panacea_final(LORA, optax.adamw(1e-3).init(LORA))
    two = optax.chain(panacea(), panacea())
    with pytest.raises(defenses.DefenseError, match="found 2"):
        panacea_final(LORA, two.init(LORA))
    with pytest.raises(defenses.DefenseError, match="loss_cap"):
        panacea(loss_cap=0.0)


def test_panacea_step_passes_match_the_declared_3F3B():
    mesh, fn, st, frozen = build_run((1, 1, 1), "panacea")
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, step.put_batches(named_batches(0), mesh)).jaxpr
    assert count_passes(jaxpr) == defenses.get("panacea").cost == Cost(3, 3)


# --- both: 8 simulated devices ----------------------------------------------------------------


@pytest.mark.parametrize("name,hparams", [("t_vaccine", (("layers", 1),)), ("panacea", ())])
def test_on_8_devices_matches_1_device(name, hparams):
    single = sgd_run((1, 1, 1), name, 2, hparams)
    sharded = sgd_run((2, 4, 1), name, 2, hparams)
    assert np.all(np.isfinite(single["losses"]))
    np.testing.assert_allclose(sharded["losses"], single["losses"], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(sharded["thetas"][-1]), jax.tree.leaves(single["thetas"][-1]),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert global_norm(optax.tree.sub(single["thetas"][-1], single["thetas"][0])) > 1e-4
