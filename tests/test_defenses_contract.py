"""The gradient contract (hfjax.defenses.api): every registered gradient defense, in a plain
optax loop that hands it only the oracle, the batches and a key, trains exactly as hfjax's train
step with the registry's step options (which also hands it hints); and every one says what is
missing when an argument, a batch or a sane hyper-parameter is."""

import math

import jax
import numpy as np
import optax
import pytest
from defense_fixtures import (
    BASE,
    CFG,
    LORA,
    LOSS_FN,
    build_run,
    compile_fast,
    fast_jit,
    grad_at,
    named_batches,
    pad_to_one_length,
    value_at,
)

from hfjax import defenses
from hfjax.defenses.compose import DefenseChoice
from hfjax.train import builder, optim, step
from hfjax.train.loss import make_loss_fn

GRADIENT = [n for n in defenses.available() if defenses.get(n).level == "gradient"]
# Lisa switches state within the steps below (align, align, user, align)
HPARAMS = {"lisa": {"align_steps": 2, "finetune_steps": 1},
           "t_vaccine": {"layers": 1, "sample_every": 2, "estimate_every": 3},
           "salora": {"safety_rank": 8},
           "tar": {"inner_steps": 2, "tr_every": 1, "adversary_rows": 4, "heldout": "harmful"}}
STEPS, LR, SEED = 4, 1e-3, 0


def run_batches(name: str) -> list[dict]:
    """STEPS steps of the named batches the defense and its step read, paired ones padded."""
    spec = defenses.get(name)
    options = spec.step_options(**HPARAMS.get(name, {}))
    names = set(spec.batches) | set(options.batch_names)
    return [pad_to_one_length({n: b for n, b in named_batches(i).items() if n in names},
                              options.paired) for i in range(STEPS)]


def primary_of(name: str, t: int) -> str:
    """The batch a user differentiates at step t: the step options' primary, or for a tuple
    (Lisa's phases) the one of the current state."""
    spec = defenses.get(name)
    hp = {**spec.hyperparameters, **HPARAMS.get(name, {})}
    primary = spec.step_options(**HPARAMS.get(name, {})).primary
    if isinstance(primary, str):
        return primary
    return primary[0 if defenses.in_alignment(t, hp["align_steps"], hp["finetune_steps"]) else 1]


def step_keys() -> list[jax.Array]:
    """The key of each step: (key, r) = split(key) from PRNGKey(SEED), as hfjax's step."""
    key, keys = jax.random.PRNGKey(SEED), []
    for _ in range(STEPS):
        key, r = jax.random.split(key)
        keys.append(r)
    return keys


def user_loop(name: str, batches: list[dict]):
    """docs/defenses.md's loop with defense `name`: (losses, θ before each step and at the end).
    A defense that wraps the optimizer wraps AdamW, per layer where its options ask for it."""
    spec = defenses.get(name)
    loss_fn = make_loss_fn(CFG, BASE)
    layerwise = spec.step_options(**HPARAMS.get(name, {})).layerwise_optimizer
    adamw = optim.layerwise_adamw(LR) if layerwise else optax.adamw(LR)
    opt = optim.chain_around([spec.build(**HPARAMS.get(name, {}))], adamw)

    @fast_jit
    def train_step(theta, opt_state, batch, batches, rng):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(theta, batch)
        updates, opt_state = opt.update(grads, opt_state, theta, loss_fn=loss_fn,
                                        batches=batches, rng=rng)
        return optax.apply_updates(theta, updates), opt_state, loss

    theta, opt_state, losses, thetas = LORA, opt.init(LORA), [], [LORA]
    for t, (b, rng) in enumerate(zip(batches, step_keys(), strict=True)):
        theta, opt_state, loss = train_step(theta, opt_state, b[primary_of(name, t)], b, rng)
        losses.append(float(loss))
        thetas.append(theta)
    return np.array(losses), thetas


def hfjax_steps(name: str, batches: list[dict]):
    """hfjax's train step (1 device) with the defense before AdamW(LR, weight decay 1e-4, as
    optax.adamw's default) and the registry's step options: (losses, final θ)."""
    c = optim.OptimizerConfig(learning_rate=LR, weight_decay=1e-4)
    mesh, fn, st, frozen = build_run((1, 1, 1), name, opt_cfg=c, **HPARAMS.get(name, {}))
    placed = [step.put_batches(b, mesh) for b in batches]
    compiled = compile_fast(fn, st, frozen, placed[0])
    losses = []
    for b in placed:
        st, metrics = compiled(st, frozen, b)
        losses.append(float(metrics["loss"]))
    return np.array(losses), st.trainable


def step_loss(name: str, theta, batch: dict, rng: jax.Array) -> float:
    """The loss hfjax's step reports: at the perturbed activations where its options perturb its
    pass (random Vaccine), else the plain loss."""
    perturb = defenses.get(name).step_options(**HPARAMS.get(name, {})).primary_perturb
    if perturb is None:
        return float(value_at(theta, batch))
    shape = (CFG.num_layers, *batch["input_ids"].shape, CFG.hidden_size)
    return float(value_at(theta, batch, perturb(rng, shape)))


def test_every_registered_gradient_defense_is_covered():
    assert {"vaccine", "random_vaccine", "booster", "booster_perturb_aware", "repnoise", "lisa",
            "safe_instr"} <= set(GRADIENT)


@pytest.mark.parametrize("name", GRADIENT)
def test_plain_optax_loop_without_hints_equals_the_hfjax_step(name):
    """Losses and weights of a user's optax loop (oracle, batches, rng only) and of hfjax's step
    (which also hands over G or ε where its options compute them) agree to float32 rounding."""
    batches = run_batches(name)
    losses, thetas = user_loop(name, batches)
    step_losses, final = hfjax_steps(name, batches)

    want = [step_loss(name, thetas[t], batches[t][primary_of(name, t)], rng)
            for t, rng in enumerate(step_keys())]
    np.testing.assert_allclose(step_losses, want, rtol=1e-6)
    if defenses.get(name).step_options(**HPARAMS.get(name, {})).primary_perturb is None:
        np.testing.assert_allclose(step_losses, losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(thetas[-1]), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    assert float(optax.tree.norm(optax.tree.sub(thetas[-1], LORA))) > 1e-3


# --- misuse ----------------------------------------------------------------------------------


def _update(name: str, **extra):
    """The defense's update of the primary batch's gradient at θ = LORA with these extra args
    (jitted; the oracle, if given, closed over)."""
    tx = defenses.get(name).build(**HPARAMS.get(name, {}))
    grads = grad_at(LORA, run_batches(name)[0][primary_of(name, 0)])
    oracle = {k: extra.pop(k) for k in ("loss_fn",) if k in extra}
    return fast_jit(lambda g, e: tx.update(g, tx.init(LORA), LORA, **oracle, **e)[0])(
        grads, extra)


def _full_args(name: str) -> dict:
    return {"loss_fn": LOSS_FN, "batches": run_batches(name)[0], "rng": jax.random.key(3)}


@pytest.mark.parametrize("name", GRADIENT)
def test_each_argument_is_either_unread_or_its_absence_raises_a_defense_error_naming_it(name):
    """Without loss_fn, batches, rng or one of its batches a defense either computes the same
    update (it does not read it) or raises DefenseError naming what is missing."""
    full = _full_args(name)
    want = _update(name, **full)
    cases = {what: {k: v for k, v in full.items() if k != what} for what in full}
    cases.update({repr(n): {**full, "batches": {k: v for k, v in full["batches"].items()
                                                 if k != n}}
                  for n in full["batches"]})
    for what, args in cases.items():
        try:
            got = _update(name, **args)
        except defenses.DefenseError as e:
            assert what in str(e), (what, str(e))
            continue
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} without {what}")
    tx = defenses.get(name).build(**HPARAMS.get(name, {}))
    with pytest.raises(defenses.DefenseError, match="params"):
        tx.update(LORA, tx.init(LORA), None, **full)


@pytest.mark.parametrize("name", GRADIENT)
def test_negative_or_nan_numeric_hyperparameters_raise_a_defense_error(name):
    spec = defenses.get(name)
    numeric = {k: v for k, v in spec.hyperparameters.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    assert numeric, name
    for key, default in numeric.items():
        for bad in ((-1,) if isinstance(default, int) else (-1.0, math.nan)):
            with pytest.raises(defenses.DefenseError):
                spec.build(**{key: bad})


def _received_by_a_defense(name: str, lora) -> set[str]:
    """The extra-arg names a transform chained before AdamW receives from hfjax's step built
    with `name`'s step options (traced, not run)."""
    received: set[str] = set()

    def update(updates, state, params=None, **extra):
        received.update(extra)
        return updates, state

    spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    mesh = build_run((1, 1, 1), None)[0]
    t = builder.build_training(CFG, lora, mesh=mesh, pre=[spy],
                               defenses=[DefenseChoice.named(name)])
    jax.make_jaxpr(t.step.fn)(t.state, BASE, step.put_batches(named_batches(0), mesh))
    return received


def test_the_step_hands_a_defense_the_oracle_batches_rng_and_hints_only():
    contract = {"loss_fn", "batches", "rng"}
    assert _received_by_a_defense("vaccine", LORA) == contract | {"perturb_grads"}
    assert _received_by_a_defense("random_vaccine", LORA) == contract | {"perturbation"}
    dropout = LORA.replace(dropout=0.1)
    assert _received_by_a_defense("booster", dropout) == contract | {"dropout_rng"}
    assert {"perturb_grads", "perturbation", "dropout_rng"} <= set(defenses.HINTS)
