"""Lisa (phases, anchors, proximal term) against a re-implementation of the official trainer's
bookkeeping, Lisa inside hfjax's train step, and SafeInstr's two forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from defense_fixtures import (
    LORA,
    LOSS_FN,
    build_run,
    compile_fast,
    count_passes,
    fast_jit,
    grad_at,
    make_batch,
    named_batches,
    primitives,
    sgd_run,
    value_at,
)

from hfjax import defenses
from hfjax.defenses.api import Cost
from hfjax.train import step

K_A, K_F, STEPS, RHO, LR = 2, 3, 12, 0.5, 0.1


def official_lisa(grads, theta0, proximal_after):
    """git-disl/Lisa's ADMMTrainer bookkeeping (status, clock, switch_model, proximal loss) with
    plain SGD: per step (status, gradient incl. proximal term, anchor_align, anchor_finetune)."""
    status, clock = "alignment", 0
    theta = {k: v.copy() for k, v in theta0.items()}
    anchor_align = {k: v.copy() for k, v in theta0.items()}
    anchor_finetune = {k: v.copy() for k, v in theta0.items()}
    rows = []
    for t, g in enumerate(grads):
        if status == "alignment" and clock % K_A == 0 and t != 0:
            status, clock = "finetune", 0
            anchor_align = {k: v.copy() for k, v in theta.items()}
        elif status == "finetune" and clock % K_F == 0 and t != 0:
            status, clock = "alignment", 0
            anchor_finetune = {k: v.copy() for k, v in theta.items()}
        other = anchor_finetune if status == "alignment" else anchor_align
        rho = RHO if t >= proximal_after else 0.0
        total = {k: g[k] + rho * (theta[k] - other[k]) for k in theta}
        theta = {k: theta[k] - LR * total[k] for k in theta}
        rows.append((status, total, anchor_align, anchor_finetune))
        clock += 1
    return rows


@pytest.mark.parametrize("proximal_after", [0, 4])
def test_lisa_phases_anchors_and_proximal_gradient_follow_the_official_trainer(proximal_after):
    r = np.random.default_rng(0)
    theta0 = {"w": r.normal(size=3).astype(np.float32),
              "b": r.normal(size=(2, 2)).astype(np.float32)}
    grads = [{k: r.normal(size=v.shape).astype(np.float32) for k, v in theta0.items()}
             for _ in range(STEPS)]
    expected = official_lisa(grads, theta0, proximal_after)
    assert [s[0][0] for s in expected] == list("aafffaafffaa")

    tx = defenses.lisa(rho=RHO, align_steps=K_A, finetune_steps=K_F,
                       proximal_after=proximal_after)
    opt = optax.chain(tx, optax.sgd(LR))
    theta, state = jax.tree.map(jnp.asarray, theta0), opt.init(theta0)
    update = jax.jit(opt.update)
    for t, (g, (status, total, anchor_align, anchor_finetune)) in enumerate(
            zip(grads, expected, strict=True)):
        assert int(defenses.phase_index(state, K_A, K_F)) == (0 if status == "alignment" else 1)
        u, state = update(g, state, theta)
        theta = optax.apply_updates(theta, u)
        lisa_state = state[0]
        for k in theta0:
            np.testing.assert_allclose(u[k], -LR * total[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(lisa_state.anchor_align[k], anchor_align[k], rtol=1e-6)
            np.testing.assert_allclose(lisa_state.anchor_finetune[k], anchor_finetune[k],
                                       rtol=1e-6)
        assert int(lisa_state.count) == t + 1


def test_lisa_phase_clock_edge_cases_and_missing_state_error():
    assert [bool(defenses.in_alignment(t, 0, 5)) for t in range(4)] == [False] * 4
    assert [bool(defenses.in_alignment(t, 5, 0)) for t in range(4)] == [True] * 4
    with pytest.raises(defenses.DefenseError, match="Lisa state"):
        defenses.phase_index(optax.adamw(1e-3).init({"w": jnp.zeros(2)}), 1, 1)
    with pytest.raises(defenses.DefenseError, match="K_a"):
        defenses.lisa(align_steps=0, finetune_steps=0)


def test_lisa_in_the_8_device_train_step_differentiates_the_phase_batch_and_snapshots_anchors():
    run = sgd_run((2, 4, 1), "lisa", STEPS, (("align_steps", K_A), ("finetune_steps", K_F)))
    for t in range(STEPS):
        batches = named_batches(t)
        name = "align" if t % (K_A + K_F) < K_A else "user"
        other = "user" if name == "align" else "align"
        want = float(value_at(run["thetas"][t], batches[name]))
        assert run["losses"][t] == pytest.approx(want, rel=1e-5), (t, name)
        assert abs(float(value_at(run["thetas"][t], batches[other])) - want) > 1e-3
    lisa_state = next(s for s in jax.tree.leaves(
        run["state"].opt_state, is_leaf=lambda x: isinstance(x, defenses.LisaState))
        if isinstance(s, defenses.LisaState))
    assert int(lisa_state.count) == STEPS
    # the last switches: the alignment state was left at t = 7, the fine-tune state at t = 10
    for anchor, t in ((lisa_state.anchor_align, 7), (lisa_state.anchor_finetune, 10)):
        for got, want in zip(jax.tree.leaves(anchor), jax.tree.leaves(run["thetas"][t]),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_safe_instr_update_is_user_gradient_plus_lambda_alignment_gradient():
    user, align = make_batch(5), make_batch(6)
    g_user, g_align = grad_at(LORA, user), grad_at(LORA, align)
    tx = defenses.safe_instr(lam=0.1)
    got = fast_jit(lambda g: tx.update(g, tx.init(LORA), LORA, loss_fn=LOSS_FN,
                                      batches={"user": user, "align": align})[0])(g_user)
    for x, a, b in zip(jax.tree.leaves(got), jax.tree.leaves(g_user), jax.tree.leaves(g_align),
                       strict=True):
        np.testing.assert_allclose(x, a + 0.1 * b, rtol=1e-5, atol=1e-7)
    assert float(optax.tree.norm(g_align)) > 1e-3


def _records(n, harmful, source):
    return [{"prompt": f"{source} prompt {i}", "response": "r", "source": source,
             "harmful": harmful} for i in range(n)]


def test_safe_instr_mix_swaps_guide_rows_for_benign_rows_keeping_n_and_every_harmful_row():
    user = _records(90, False, "task") + _records(10, True, "harmful")
    safety = _records(50, False, "safety")
    mixed = defenses.get("safe_instr_mix").build(guide_data_num=20, seed=3)(user, safety)
    assert len(mixed) == 100
    assert sum(r["source"] == "safety" for r in mixed) == 20
    assert sum(r["source"] == "harmful" for r in mixed) == 10
    assert sum(r["source"] == "task" for r in mixed) == 70
    assert len({r["prompt"] for r in mixed}) == 100
    again = defenses.safe_instr_mix(guide_data_num=20, seed=3)(user, safety)
    assert [r["prompt"] for r in again] == [r["prompt"] for r in mixed]
    other = defenses.safe_instr_mix(guide_data_num=20, seed=4)(user, safety)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in mixed]
    with pytest.raises(defenses.DefenseError, match="only 90"):
        defenses.safe_instr_mix(guide_data_num=91)(user, safety)
    with pytest.raises(defenses.DefenseError, match="harmful=False"):
        defenses.safe_instr_mix(guide_data_num=5)(user, _records(5, True, "x"))


def test_lisa_step_selects_between_same_shaped_batches_without_a_cond_and_trains_the_phase_batch():
    """Same-shaped "align" and "user" batches: the step selects the phase's batch elementwise
    (no `cond` in the program, one forward + backward) and still differentiates that batch."""
    mesh, fn, st, frozen = build_run((1, 2, 1), "lisa", opt_cfg=None, align_steps=1,
                                     finetune_steps=1)
    host = [{"user": make_batch(100 + t), "align": make_batch(200 + t)} for t in range(3)]
    batches = [step.put_batches(b, mesh) for b in host]
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, batches[0])
    assert "cond" not in primitives(jaxpr.jaxpr) and "scan" in primitives(jaxpr.jaxpr)
    assert count_passes(jaxpr.jaxpr) == Cost(1, 1)
    compiled = compile_fast(fn, st, frozen, batches[0])
    for t, b in enumerate(batches):
        theta = jax.tree.map(np.asarray, st.trainable)
        st, metrics = compiled(st, frozen, b)
        name = "align" if t % 2 == 0 else "user"
        assert float(metrics["loss"]) == pytest.approx(float(value_at(theta, host[t][name])),
                                                       rel=1e-5), (t, name)


def test_lisa_proximal_warmup_starts_the_term_after_the_official_share_of_the_run():
    """proximal_warmup=0.1 over 2000 steps: the official `steps > 0.1 · total` puts the term on
    from step 201 (floor(200) + 1); before it the incoming gradient passes unchanged."""
    theta = {"w": jnp.ones(3)}
    anchor = {"w": jnp.zeros(3)}
    grads = {"w": jnp.full(3, 0.5)}
    tx = defenses.lisa(rho=2.0, align_steps=1000, finetune_steps=1000, proximal_warmup=0.1,
                       total_steps=2000)
    for t, expected in ((200, 0.5), (201, 2.5)):
        state = defenses.LisaState(jnp.asarray(t, jnp.int32), anchor, anchor)
        updates, _ = tx.update(grads, state, theta)
        np.testing.assert_allclose(updates["w"], expected)
    assert defenses.get("lisa").build_for_run({"proximal_warmup": 0.1}, total_steps=5) \
        is not None
    with pytest.raises(defenses.DefenseError, match="needs the run's total_steps"):
        defenses.lisa(proximal_warmup=0.1)
    with pytest.raises(defenses.DefenseError, match="not both"):
        defenses.lisa(proximal_warmup=0.1, proximal_after=3, total_steps=10)
    assert "total_steps" not in defenses.get("lisa").hyperparameters
