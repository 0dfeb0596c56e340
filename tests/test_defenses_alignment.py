"""Vaccine, random Vaccine and Booster equal independent computations from separate jax.grad
calls on a tiny Llama with LoRA, both as plain optax transforms and fed by hfjax's step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from defense_fixtures import CFG, LORA, LOSS_FN, fast_jit, grad_at, loss_at, make_batch

from hfjax import defenses, gaussian
from hfjax.train.step import primary_gradient

BATCH = make_batch(0)
HARMFUL = make_batch(1)
SHAPE = (CFG.num_layers, *BATCH["input_ids"].shape, CFG.hidden_size)


@fast_jit
def activation_grads():
    """G = ∂f/∂a_l: the gradient w.r.t. an additive perturbation of the attention outputs at 0."""
    return jax.grad(lambda e: loss_at(LORA, BATCH, e))(jnp.zeros(SHAPE))


def vaccine_expected():
    g = activation_grads()
    return grad_at(LORA, BATCH, 2.0 * g / (jnp.sqrt(jnp.sum(g**2)) + 1e-7))


def update(opt, grads, **extra):
    """The transform's update of `grads` at θ = LORA (jitted), extra args as given."""
    run = fast_jit(lambda g, e: opt.update(g, opt.init(LORA), LORA, loss_fn=LOSS_FN, **e)[0])
    return run(grads, extra)


def step_pass(**options):
    """hfjax's step pass on BATCH as "align": (loss, aux, ∇θ, extra args for the optimizer)."""
    return fast_jit(lambda rng: primary_gradient(CFG, LOSS_FN, LORA, None, {"align": BATCH}, rng,
                                                primary="align", **options))(jax.random.key(7))


def assert_trees_close(a, b, atol=1e-6, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def tree_distance(a, b) -> float:
    return float(optax.tree.norm(optax.tree.sub(a, b)))


def test_vaccine_perturbation_has_global_norm_rho_along_the_activation_gradient():
    g = activation_grads()
    eps = defenses.vaccine_perturbation(g, 2.0)
    per_layer = [float(jnp.linalg.norm(eps[i])) for i in range(CFG.num_layers)]
    assert float(np.sqrt(np.sum(np.square(per_layer)))) == pytest.approx(2.0, rel=1e-5)
    expected = 2.0 * np.asarray(g) / (np.sqrt(np.sum(np.asarray(g, np.float64) ** 2)) + 1e-7)
    np.testing.assert_allclose(eps, expected, rtol=1e-5, atol=1e-8)


def test_vaccine_update_is_the_gradient_at_the_perturbed_attention_outputs():
    plain = grad_at(LORA, BATCH)
    got = update(defenses.vaccine(rho=2.0), plain, batches={"align": BATCH})
    assert_trees_close(got, vaccine_expected())
    assert tree_distance(got, plain) > 1e-2 * float(optax.tree.norm(plain))


def test_train_step_pass_returns_dloss_da_and_vaccine_turns_it_into_the_same_update():
    loss, _, grads, extra = step_pass(activation_grads=True)
    assert float(loss) == pytest.approx(float(loss_at(LORA, BATCH)), rel=1e-6)
    assert_trees_close(grads, grad_at(LORA, BATCH))
    np.testing.assert_allclose(extra["perturb_grads"], activation_grads(), rtol=1e-5, atol=1e-8)
    got = update(defenses.vaccine(rho=2.0), grads, batches={"align": BATCH},
                 perturb_grads=extra["perturb_grads"])
    assert_trees_close(got, vaccine_expected())


def test_random_vaccine_noise_is_seeded_gaussian_with_variance_rho():
    shape = (2, 8, 64, 64)
    eps = defenses.random_perturbation(jax.random.key(3), shape, 5.0)
    assert eps.shape == shape
    assert float(jnp.mean(eps)) == pytest.approx(0.0, abs=0.03)
    assert float(jnp.var(eps)) == pytest.approx(5.0, rel=0.03)
    np.testing.assert_array_equal(eps, defenses.random_perturbation(jax.random.key(3), shape, 5.0))
    np.testing.assert_allclose(
        eps, np.sqrt(5.0) * gaussian.standard_normal(jax.random.key(3), shape), rtol=1e-6)
    assert not np.allclose(eps, defenses.random_perturbation(jax.random.key(4), shape, 5.0))


def test_random_vaccine_update_is_the_gradient_at_noisy_activations_in_loop_and_step():
    rng = jax.random.key(7)
    expected = grad_at(LORA, BATCH, np.sqrt(2.0) * gaussian.standard_normal(rng, SHAPE))
    opt = defenses.random_vaccine(rho=2.0)
    plain = grad_at(LORA, BATCH)
    in_loop = update(opt, plain, batches={"align": BATCH}, rng=rng)
    assert_trees_close(in_loop, expected)
    assert tree_distance(in_loop, plain) > 1e-2 * float(optax.tree.norm(plain))

    _, _, grads, extra = step_pass(
        primary_perturb=functools.partial(defenses.random_perturbation, rho=2.0))
    assert_trees_close(grads, expected)
    assert_trees_close(update(opt, grads, batches={"align": BATCH}, rng=rng, **extra), expected)


def test_booster_update_is_g_f_plus_lambda_times_the_harmful_gradient_gap():
    lam, alpha = 5.0, 0.1
    g_f = grad_at(LORA, BATCH)
    got = update(defenses.booster(lam=lam, alpha=alpha), g_f,
                 batches={"align": BATCH, "harmful": HARMFUL})

    g_h = grad_at(LORA, HARMFUL)
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g_h)))
    shifted = jax.tree.map(lambda p, g: p - alpha * g / (norm + 1e-7), LORA, g_h)
    g_h2 = grad_at(shifted, HARMFUL)
    expected = jax.tree.map(lambda f, a, b: f + lam * (a - b), g_f, g_h, g_h2)
    assert_trees_close(got, expected)
    assert tree_distance(got, g_f) > 1e-3 * float(optax.tree.norm(g_f))


def test_gradient_defenses_explain_what_extra_args_they_miss():
    g = jax.tree.map(jnp.zeros_like, LORA)
    with pytest.raises(defenses.DefenseError, match="harmful"):
        defenses.booster().update(g, optax.EmptyState(), LORA, loss_fn=LOSS_FN,
                                  batches={"align": BATCH})
    with pytest.raises(defenses.DefenseError, match="align"):
        defenses.vaccine().update(g, optax.EmptyState(), LORA, loss_fn=LOSS_FN,
                                  batches={"user": BATCH})
    with pytest.raises(defenses.DefenseError, match="rng"):
        defenses.random_vaccine().update(g, optax.EmptyState(), LORA, loss_fn=LOSS_FN,
                                         batches={"align": BATCH})
    with pytest.raises(defenses.DefenseError, match="rho"):
        defenses.vaccine(rho=-1.0)
