"""TAR (hfjax.defenses.alignment.tar): its update against a hand-unrolled adversary (optax.adamw in
a Python loop, losses from the model's forward pass, not the oracle's captures), the oracle's new
captures, its passes in hfjax's step against the declared cost, a plain optax loop against hfjax's
step (LoRA; full fine-tuning on 8 devices), 8 devices = 1, and misuse."""

import functools

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
    assert_8_devices_match_1,
    build_run,
    compile_fast,
    count_passes,
    fast_jit,
    grad_at,
    make_batch,
    named_batches,
)
from defense_fixtures import _sub_jaxprs as sub_jaxprs

from hfjax import defenses
from hfjax.defenses.alignment.tar import schedule_weights
from hfjax.defenses.api import Cost
from hfjax.defenses.compose import DefenseChoice
from hfjax.models import forward
from hfjax.sharding import make_mesh
from hfjax.train import builder, optim, step
from hfjax.train.loss import make_loss_fn

# θ away from θ₀ = LORA, so that the hidden-state distance and the DPO margin are not zero
THETA = jax.tree.map(lambda w: w + 0.05 * jax.random.normal(jax.random.key(5), w.shape), LORA)
LR = 2e-2  # the adversary's learning rate in the hand-derived tests: adapted weights move
ALIGN, HELDOUT = make_batch(11, length=10), make_batch(12, length=13)
SMALL = {"inner_steps": 2, "tr_every": 1, "adversary_rows": 4, "heldout": "harmful"}


def adversary_rows(inner_steps: int, rows: int = 2, seed: int = 13) -> dict:
    return make_batch(seed, batch=inner_steps * rows, length=14)


# --- the update by hand, from forward -----------------------------------------------------------

def logits(theta, batch):
    return forward(CFG, BASE, batch["input_ids"], batch["attention_mask"], lora=theta)


def token_logps(theta, batch):
    """[B, T−1] log p(labels_{t+1} | ≤ t) and the mask of the counted tokens."""
    z = logits(theta, batch)[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    labels = jnp.where(mask, batch["labels"][:, 1:], 0)
    return jnp.take_along_axis(jax.nn.log_softmax(z), labels[..., None], -1)[..., 0], mask


def ce(theta, batch):
    logp, mask = token_logps(theta, batch)
    return -jnp.sum(jnp.where(mask, logp, 0.0)) / mask.sum()


def token_mean(values, batch):
    mask = batch["attention_mask"]
    return jnp.sum(values * mask) / mask.sum()


def neg_entropy(theta, batch):
    """−mean over the tokens of H(softmax(z)) (objectives.py `max_entropy_loss`, padding left
    out)."""
    p = jax.nn.softmax(logits(theta, batch))
    return -token_mean(jnp.sum(-p * jnp.log(p), axis=-1), batch)


def hf_hidden_states(theta, batch):
    """HF's hidden states: embeddings, residual after layers 1..L−1, RMS-normed last residual."""
    _, cap = forward(CFG, BASE, batch["input_ids"], batch["attention_mask"], lora=theta,
                     capture=("residual",))
    res = cap["residual"]
    last = res[-1] * jax.lax.rsqrt(jnp.mean(res[-1] ** 2, -1, keepdims=True) + CFG.rms_norm_eps)
    emb = BASE["embed_tokens"][batch["input_ids"]]
    return jnp.concatenate([emb[None], res[:-1], (last * BASE["final_norm"])[None]])


def distance(theta, reference, batch):
    """(1/(L+1)) Σ_l mean over the tokens of ‖h_l − h⁰_l‖₂ (`obj_model_mse_representations`,
    padding left out)."""
    d = hf_hidden_states(theta, batch) - hf_hidden_states(reference, batch)
    norms = jnp.sqrt(jnp.sum(d * d, -1) + 1e-30)
    return jnp.mean(jnp.stack([token_mean(n, batch) for n in norms]))


def seq_logps(theta, batch):
    logp, mask = token_logps(theta, batch)
    return jnp.sum(jnp.where(mask, logp, 0.0), -1)


def pad_to(batch, length):
    return {k: np.pad(v, ((0, 0), (0, length - v.shape[1])),
                      constant_values=-100 if k == "labels" else 0) for k, v in batch.items()}


def dpo(theta, reference, chosen, rejected, beta=0.1):
    """mean −log σ(β [(ℓ_c − ℓ_r) − (ℓ⁰_c − ℓ⁰_r)]) over rows padded to one length."""
    margin = (seq_logps(theta, chosen) - seq_logps(theta, rejected)) - (
        seq_logps(reference, chosen) - seq_logps(reference, rejected))
    return jnp.mean(-jax.nn.log_sigmoid(beta * margin))


# each piece jitted on its own (the loop over inner steps stays in Python)
ce_grad = fast_jit(jax.grad(ce))
entropy_value_grad = fast_jit(jax.value_and_grad(neg_entropy))
dpo_value_grad = fast_jit(jax.value_and_grad(dpo))
retain_grad = fast_jit(jax.grad(lambda t, ref, b: ce(t, b) + distance(t, ref, b)))


@fast_jit
def adamw_step(theta, opt_state, g, lr):
    u, opt_state = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01).update(
        g, opt_state, theta)
    return optax.apply_updates(theta, u), opt_state


def expected_update(theta, reference, align, harmful, heldout, *, inner_steps, tr_every,
                    lr, tr_loss="entropy", tr_scale=4.0, lam=0.0625, retain_scale=1.0,
                    representations=True, bound=None):
    """The official outer gradient, unrolled: K AdamW(lr, wd 0.01) steps on consecutive row
    blocks of `harmful`, ∇L_TR at the adapted weights after steps i with (i+1) % r = 0, weighted
    4 exp(λ(i − K + 1)), plus the retain gradient; a Python loop, one inner step at a time."""
    rows = harmful["input_ids"].shape[0] // inner_steps
    if tr_loss == "entropy":
        tr = lambda t: entropy_value_grad(t, heldout)  # noqa: E731
    else:
        length = max(align["input_ids"].shape[1], heldout["input_ids"].shape[1])
        chosen, rejected = pad_to(align, length), pad_to(heldout, length)
        tr = lambda t: dpo_value_grad(t, reference, chosen, rejected)  # noqa: E731
    adapted = theta
    opt_state = optax.adamw(lr, weight_decay=0.01).init(theta)
    g_tr, total = jax.tree.map(jnp.zeros_like, theta), 0.0
    for i in range(inner_steps):
        micro = {k: v[i * rows:(i + 1) * rows] for k, v in harmful.items()}
        adapted, opt_state = adamw_step(adapted, opt_state, ce_grad(adapted, micro), lr)
        if (i + 1) % tr_every == 0:
            w = tr_scale * np.exp(lam * (i - (inner_steps - 1)))
            value, g = tr(adapted)
            g_tr = optax.tree.add_scale(g_tr, w, g)
            total += w * float(value)
    g_retain = (retain_grad(theta, reference, align) if representations
                else ce_grad(theta, align))
    keep = 1.0 if bound is None or total >= bound else 0.0
    return jax.tree.map(lambda a, b: retain_scale * a + keep * b, g_retain, g_tr)


@functools.cache
def _tar_update_fn(hparams: tuple):
    tx = defenses.get("tar").build(**dict(hparams))
    return fast_jit(lambda g, t, b, r: tx.update(g, tx.init(LORA), t, loss_fn=LOSS_FN,
                                                 batches=b, rng=r)[0])


def tar_update(hparams: dict, theta, batches: dict, rng=None):
    """The defense's update at θ from the incoming ∇CE(θ; align), θ₀ = LORA (one compilation
    per hyper-parameter set)."""
    fn = _tar_update_fn(tuple(sorted(hparams.items())))
    rng = jax.random.key(0) if rng is None else rng
    return fn(grad_at(theta, batches["align"]), theta, batches, rng)


def assert_trees_close(got, want, rtol=2e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("inner_steps,tr_every", [(3, 1), (3, 2)])
def test_entropy_update_is_the_hand_unrolled_adversary_plus_retain_gradient(inner_steps, tr_every):
    """K = 3 AdamW steps (r = 1: TR after each; r = 2: after the second only, the third step
    changing nothing) against the defense's scanned loop."""
    harmful = adversary_rows(inner_steps)
    hp = dict(inner_steps=inner_steps, tr_every=tr_every, adversary_rows=2, adversary_lrs=(LR,))
    got = tar_update(hp, THETA, {"align": ALIGN, "harmful": harmful, "calibration": HELDOUT})
    want = expected_update(THETA, LORA, ALIGN, harmful, HELDOUT, inner_steps=inner_steps,
                           tr_every=tr_every, lr=LR)
    assert_trees_close(got, want)


def test_tamper_resistance_term_alone_is_the_weighted_sum_of_adapted_entropy_gradients():
    """retain_scale 0: the update is Σ w_i ∇L_TR(θ'_{i+1}) alone, checked to its own size."""
    harmful = adversary_rows(3)
    hp = dict(inner_steps=3, tr_every=1, adversary_rows=2, adversary_lrs=(LR,), retain_scale=0.0)
    got = tar_update(hp, THETA, {"align": ALIGN, "harmful": harmful, "calibration": HELDOUT})
    want = expected_update(THETA, LORA, ALIGN, harmful, HELDOUT, inner_steps=3, tr_every=1,
                           lr=LR, retain_scale=0.0)
    assert_trees_close(got, want)
    assert float(optax.tree.norm(want)) > 1e-2


def test_dpo_update_is_the_hand_unrolled_adversary_with_dpo_against_the_initial_model():
    """tr_loss="dpo": chosen = "align", rejected = the heldout rows (different lengths, padded),
    π_ref = θ₀; retain scale and schedule away from their defaults."""
    harmful, rejected = adversary_rows(3), make_batch(14, length=13)
    hp = dict(inner_steps=3, tr_every=1, adversary_rows=2, adversary_lrs=(LR,), tr_loss="dpo",
              retain_scale=0.5, schedule_lambda=0.3)
    got = tar_update(hp, THETA, {"align": ALIGN, "harmful": harmful, "calibration": rejected})
    want = expected_update(THETA, LORA, ALIGN, harmful, rejected, inner_steps=3, tr_every=1,
                           lr=LR, tr_loss="dpo", retain_scale=0.5, lam=0.3)
    assert_trees_close(got, want)


NO_REPRESENTATIONS = dict(inner_steps=2, tr_every=1, adversary_rows=2, adversary_lrs=(LR,),
                          retain_representations=False)


def test_without_retain_representations_the_retain_gradient_is_the_incoming_ce_gradient():
    harmful = adversary_rows(2)
    got = tar_update(NO_REPRESENTATIONS, THETA,
                     {"align": ALIGN, "harmful": harmful, "calibration": HELDOUT})
    want = expected_update(THETA, LORA, ALIGN, harmful, HELDOUT, inner_steps=2, tr_every=1,
                           lr=LR, representations=False)
    assert_trees_close(got, want)


def test_lower_bound_drops_the_tamper_resistance_gradient_below_it():
    """The official bound: Σ w_i L_TR (negative entropies, about −(4 + 3.8) log 128 here) below
    it drops the TR gradient; at or above it keeps it."""
    harmful = adversary_rows(2)
    batches = {"align": ALIGN, "harmful": harmful, "calibration": HELDOUT}
    kw = dict(inner_steps=2, tr_every=1, lr=LR, representations=False)
    assert_trees_close(tar_update({**NO_REPRESENTATIONS, "tr_lower_bound": 0.0}, THETA, batches),
                       expected_update(THETA, LORA, ALIGN, harmful, HELDOUT, tr_scale=0.0, **kw))
    assert_trees_close(tar_update({**NO_REPRESENTATIONS, "tr_lower_bound": -1e3}, THETA, batches),
                       tar_update(NO_REPRESENTATIONS, THETA, batches), rtol=1e-7)


def test_the_adversary_learning_rate_is_drawn_from_the_set_with_the_step_rng():
    """A key's update equals the update with the one rate jax.random.choice(key, set) gives; over
    a few keys every rate of the set is drawn."""
    batches = {"align": ALIGN, "harmful": adversary_rows(2), "calibration": HELDOUT}
    lrs = (1e-2, 2e-2, 4e-2)
    drawn = {float(jax.random.choice(jax.random.key(s), jnp.asarray(lrs, jnp.float32))): s
             for s in range(12)}
    assert set(drawn) == {float(np.float32(x)) for x in lrs}
    base = dict(inner_steps=2, tr_every=1, adversary_rows=2, retain_representations=False)
    for lr in lrs[:2]:
        key = jax.random.key(drawn[float(np.float32(lr))])
        assert_trees_close(tar_update({**base, "adversary_lrs": lrs}, THETA, batches, key),
                           tar_update({**base, "adversary_lrs": (lr,)}, THETA, batches),
                           rtol=1e-7)


def test_schedule_weights_are_four_exp_lambda_steps_before_the_last_at_the_evaluated_steps():
    w = schedule_weights(64, 4, 4.0, 0.0625)
    assert len(w) == 16
    np.testing.assert_allclose(w, [4 * np.exp(0.0625 * (i - 63)) for i in range(3, 64, 4)])
    assert w[-1] == 4.0


# --- the oracle's captures ----------------------------------------------------------------------

def test_oracle_entropy_and_hidden_states_captures_equal_the_forward_derived_ones():
    aux = LOSS_FN(THETA, ALIGN, capture=("entropy", "hidden_states"))[1]["captured"]
    p = jax.nn.softmax(logits(THETA, ALIGN))
    np.testing.assert_allclose(aux["entropy"], jnp.sum(-p * jnp.log(p), -1), rtol=1e-5)
    np.testing.assert_allclose(aux["hidden_states"], hf_hidden_states(THETA, ALIGN), rtol=1e-5,
                               atol=1e-6)
    assert aux["hidden_states"].shape == (CFG.num_layers + 1, 8, 10, CFG.hidden_size)


# --- passes in hfjax's step -------------------------------------------------------------------

def count_passes_unrolled(jaxpr, lengths: list, num_layers: int = CFG.num_layers) -> Cost:
    """`count_passes`, but a scan that is not a layer scan runs its body `length` times (TAR's
    inner loop: a scan over the evaluations whose body scans r adversary steps); the lengths of
    those scans are appended to `lengths`."""
    fwd = bwd = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == num_layers:
            fwd, bwd = (fwd, bwd + 1) if eqn.params["reverse"] else (fwd + 1, bwd)
            continue
        subs = [count_passes_unrolled(j, lengths, num_layers) for j in sub_jaxprs(eqn)]
        if not subs:
            continue
        times = 1
        if eqn.primitive.name == "scan":
            times = eqn.params["length"]
            lengths.append(times)
        if eqn.primitive.name == "cond":
            worst = max(subs, key=lambda c: (c.forward + c.backward, c.forward))
            fwd, bwd = fwd + worst.forward, bwd + worst.backward
        else:
            fwd += times * sum(c.forward for c in subs)
            bwd += times * sum(c.backward for c in subs)
    return Cost(fwd, bwd)


@pytest.mark.parametrize("hparams,scans", [
    ({"inner_steps": 9, "tr_every": 3}, [3, 3]),
    ({"inner_steps": 10, "tr_every": 3, "tr_loss": "dpo"}, [3, 3]),
    ({"inner_steps": 3, "tr_every": 1, "retain_representations": False}, [3, 1]),
], ids=["entropy", "dpo", "no_representations"])
def test_passes_in_the_train_step_match_the_declared_cost(hparams, scans):
    """Unrolled over the inner loop's scans, the step's jaxpr runs the declared passes; traced, it
    holds one adversary step and one evaluation (the step's pass, the retain terms, 1F+1B each)."""
    spec = defenses.get("tar")
    hp = {"heldout": "harmful", "adversary_rows": 1, **hparams}
    batches = named_batches(0)
    batches["harmful"] = make_batch(300, batch=hp["inner_steps"], length=14)
    batches["align"] = make_batch(200, batch=hp["inner_steps"], length=10)
    mesh, fn, st, frozen = build_run((1, 1, 1), "tar", **hp)
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, step.put_batches(batches, mesh)).jaxpr
    lengths: list = []
    declared = spec.cost_for(**hp)
    assert count_passes_unrolled(jaxpr, lengths) == declared
    assert sorted(lengths) == sorted(scans)  # none of them mistaken for a layer scan (L = 2)
    representations = hp.get("retain_representations", True)
    traced = Cost(1 + 2 + 2 * representations + (hp.get("tr_loss") == "dpo"),
                  1 + 2 + representations)
    assert count_passes(jaxpr) == traced


def test_declared_cost_at_the_official_defaults_is_83F_82B():
    spec = defenses.get("tar")
    assert spec.cost_for() == Cost(83, 82)
    assert spec.cost_for(tr_loss="dpo") == Cost(84, 82)
    assert spec.cost_for(retain_representations=False) == Cost(81, 81)
    assert str(spec.cost) == "(3+⌊K/r⌋(r+1))F+(2+⌊K/r⌋(r+1))B"


def test_registry_entry_and_step_options():
    spec = defenses.get("tar")
    assert (spec.stage, spec.level, spec.batches) == ("alignment", "gradient",
                                                      ("align", "harmful", "calibration"))
    assert "arXiv:2408.00761" in spec.paper
    assert spec.hyperparameters["inner_steps"] == 64
    assert spec.hyperparameters["adversary_lrs"] == (2e-6, 2e-5, 4e-5)
    entropy = defenses.step_options("tar")
    assert (entropy.primary, entropy.paired, entropy.batch_sizes) == (
        "align", (), (("harmful", 256),))
    dpo_opts = defenses.step_options("tar", tr_loss="dpo")
    assert dpo_opts.paired == ("align", "calibration")
    assert dpo_opts.batch_sizes == (("harmful", 256),)
    assert defenses.step_options("tar", tr_loss="dpo", heldout="harmful").batch_sizes == ()


# --- a plain optax loop against hfjax's step ----------------------------------------------------

def optax_loop(hparams: dict, theta0, batches: list[dict], loss_fn, optimizer=None):
    """docs/defenses.md's loop: the oracle, the batches and a key per step only; the defense
    before `optimizer` (AdamW 1e-3 by default)."""
    optimizer = optax.adamw(1e-3) if optimizer is None else optimizer
    opt = optax.chain(defenses.get("tar").build(**hparams), optimizer)

    @fast_jit
    def train_step(theta, opt_state, b, rng):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(theta, b["align"])
        updates, opt_state = opt.update(grads, opt_state, theta, loss_fn=loss_fn, batches=b,
                                        rng=rng)
        return optax.apply_updates(theta, updates), opt_state, loss

    theta, opt_state, losses = theta0, opt.init(theta0), []
    key = jax.random.PRNGKey(0)
    for b in batches:
        key, r = jax.random.split(key)
        theta, opt_state, loss = train_step(theta, opt_state, b, r)
        losses.append(float(loss))
    return np.array(losses), theta


def hfjax_loop(hparams: dict, trainable, batches: list[dict], mesh_shape, full_finetune=False,
               optimizer=None):
    """hfjax's step: the defense before `optimizer` (default: hfjax's AdamW 1e-3, weight decay
    1e-4 as optax.adamw's)."""
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    t = builder.build_training(
        CFG, trainable, mesh=mesh, full_finetune=full_finetune, primary="align",
        optimizer=optimizer or optim.OptimizerConfig(learning_rate=1e-3, weight_decay=1e-4),
        defenses=[DefenseChoice.named("tar", **hparams)])
    frozen = jax.device_put(BASE, t.frozen_shardings)
    placed = [step.put_batches(b, mesh) for b in batches]
    compiled = compile_fast(t.step, t.state, frozen, placed[0])
    st, losses = t.state, []
    for b in placed:
        st, m = compiled(st, frozen, b)
        losses.append(float(m["loss"]))
    return np.array(losses), st.trainable


def loop_batches(steps: int, paired: bool) -> list[dict]:
    out = []
    for i in range(steps):
        b = named_batches(i)
        if paired:  # the pipeline pads paired streams to one length
            length = max(b["align"]["input_ids"].shape[1], b["harmful"]["input_ids"].shape[1])
            b = {**b, "align": pad_to(b["align"], length), "harmful": pad_to(b["harmful"], length)}
        out.append({k: b[k] for k in ("align", "harmful")})
    return out


@pytest.mark.parametrize("tr_loss", ["entropy", "dpo"])
def test_plain_optax_loop_equals_the_hfjax_step_with_lora(tr_loss):
    hp = {**SMALL, "tr_loss": tr_loss}
    batches = loop_batches(3, paired=tr_loss == "dpo")
    losses, theta = optax_loop(hp, LORA, batches, LOSS_FN)
    step_losses, trained = hfjax_loop(hp, LORA, batches, (1, 1, 1))
    np.testing.assert_allclose(step_losses, losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(trained), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    assert float(optax.tree.norm(optax.tree.sub(theta, LORA))) > 1e-3


def test_full_finetuning_on_8_devices_equals_a_plain_optax_loop_on_the_whole_params():
    """trainable = the params pytree (FSDP x tensor sharded in hfjax's step), θ₀ its copy; plain
    SGD after the defense (Adam's 1/√v would magnify float rounding of tiny gradient entries)."""
    batches = loop_batches(2, paired=False)
    full_fn = make_loss_fn(CFG, None, full_finetune=True)
    losses, theta = optax_loop(SMALL, BASE, batches, full_fn, optax.sgd(0.1))
    step_losses, trained = hfjax_loop(SMALL, BASE, batches, (1, 4, 2), full_finetune=True,
                                      optimizer=optax.sgd(0.1))
    np.testing.assert_allclose(step_losses, losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(trained), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert float(optax.tree.norm(optax.tree.sub(theta, BASE))) > 1e-3


@pytest.mark.parametrize("tr_loss", ["entropy", "dpo"])
def test_on_8_devices_matches_1_device(tr_loss):
    assert_8_devices_match_1("tar", 2, tuple({**SMALL, "tr_loss": tr_loss}.items()))


# --- misuse ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    ({"inner_steps": 0}, "inner_steps"),
    ({"tr_every": 65}, "tr_every"),
    ({"adversary_rows": 1.5}, "adversary_rows"),
    ({"adversary_lrs": ()}, "adversary_lrs"),
    ({"adversary_lrs": (2e-5, -1e-5)}, "adversary_lrs"),
    ({"tr_loss": "kl"}, "tr_loss"),
    ({"dpo_beta": 0.0}, "dpo_beta"),
    ({"schedule_lambda": float("inf")}, "schedule_lambda"),
    ({"tr_lower_bound": float("nan")}, "tr_lower_bound"),
    ({"heldout": "align"}, "heldout"),
])
def test_bad_hyperparameters_raise_defense_errors_naming_them(bad, match):
    with pytest.raises(defenses.DefenseError, match=match):
        defenses.get("tar").build(**bad)


def test_bad_batches_and_missing_arguments_raise_defense_errors():
    batches = {"align": ALIGN, "harmful": adversary_rows(3), "calibration": HELDOUT}
    with pytest.raises(defenses.DefenseError, match="3 x 4 = 12 rows"):
        tar_update({"inner_steps": 3, "tr_every": 1}, THETA, batches)
    with pytest.raises(defenses.DefenseError, match="'calibration' batch"):
        tar_update({"inner_steps": 3, "tr_every": 1, "adversary_rows": 2},
                   THETA, {k: v for k, v in batches.items() if k != "calibration"})
    with pytest.raises(defenses.DefenseError, match="pairs chosen and rejected rows"):
        tar_update({"inner_steps": 3, "tr_every": 1, "adversary_rows": 2, "tr_loss": "dpo"},
                   THETA, {**batches, "calibration": make_batch(3, batch=4)})
    tx = defenses.get("tar").build(inner_steps=3, tr_every=1, adversary_rows=2)
    with pytest.raises(defenses.DefenseError, match="rng"):
        tx.update(LORA, tx.init(LORA), LORA, loss_fn=LOSS_FN, batches=batches)
