"""The defense registry and step wiring, the passes each defense costs inside hfjax's train step
(counted in the step's jaxpr), and the documented user loop."""

import importlib
import re
from pathlib import Path

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
    count_passes,
    make_batch,
    named_batches,
)

from hfjax import defenses
from hfjax.defenses import Cost
from hfjax.train import builder, optim, step

DOCS = Path(__file__).parents[1] / "docs" / "defenses.md"
GRADIENT = ("booster", "booster_perturb_aware", "lisa", "random_vaccine", "safe_instr", "vaccine")
METHODS = GRADIENT + ("safe_instr_mix",)
ARXIV = re.compile(r"arXiv:\d{4}\.\d{5}")


def test_registry_declares_stage_level_cost_batches_and_paper_of_each_method():
    table = {n: (s.stage, s.level, str(s.cost), s.batches)
             for n in METHODS for s in [defenses.get(n)]}
    assert table == {
        "vaccine": ("alignment", "gradient", "2F+2B", ("align",)),
        "random_vaccine": ("alignment", "gradient", "1F+1B", ("align",)),
        "booster": ("alignment", "gradient", "3F+3B", ("align", "harmful")),
        "booster_perturb_aware": ("alignment", "gradient", "4F+4B", ("align", "harmful")),
        "lisa": ("finetune", "gradient", "1F+1B", ("align", "user")),
        "safe_instr": ("finetune", "gradient", "2F+2B", ("user", "align")),
        "safe_instr_mix": ("finetune", "data", "1F+1B", ("user",)),
    }
    assert set(METHODS) <= set(defenses.available())
    for name in METHODS:
        spec = defenses.get(name)
        assert ARXIV.search(spec.paper), name
        assert ARXIV.search(importlib.import_module(spec.factory.__module__).__doc__), name


def test_hyperparameters_are_factory_kwargs_with_the_papers_defaults():
    assert {n: defenses.get(n).hyperparameters for n in METHODS} == {
        "vaccine": {"rho": 2.0},
        "random_vaccine": {"rho": 2.0},
        "booster": {"lam": 5.0, "alpha": 0.1},
        "booster_perturb_aware": {"lam": 5.0, "alpha": 0.1, "rho": 5.0},
        "lisa": {"rho": 1.0, "align_steps": 100, "finetune_steps": 900, "proximal_after": 0,
                 "proximal_warmup": 0.0},
        "safe_instr": {"lam": 0.1, "align_batch_size": 4},
        "safe_instr_mix": {"guide_data_num": 100, "seed": 0},
    }
    with pytest.raises(defenses.DefenseError, match="no hyper-parameter"):
        defenses.get("booster").build(rho=1.0)
    with pytest.raises(defenses.DefenseError, match="unknown defense"):
        defenses.get("nope")
    with pytest.raises(defenses.DefenseError, match="lam"):
        defenses.step_options("safe_instr", lam=-1.0)


def test_step_options_come_from_the_registry():
    assert defenses.step_options("vaccine").step_kwargs() == dict(
        primary="align", primary_phase=None, activation_grads=True, primary_perturb=None)
    assert defenses.step_options("booster").batch_names == ("align",)
    assert defenses.step_options("safe_instr").batch_names == ("user",)
    lisa = defenses.step_options("lisa", align_steps=2, finetune_steps=3)
    assert lisa.batch_names == ("align", "user")
    state = optax.chain(defenses.lisa(align_steps=2, finetune_steps=3),
                        optax.adamw(1e-3)).init(LORA)
    assert int(lisa.primary_phase(state)) == 0
    shape = (2, 2, 3, 4)
    eps = defenses.step_options("random_vaccine", rho=3.0).primary_perturb(jax.random.key(0), shape)
    np.testing.assert_array_equal(eps, defenses.random_perturbation(jax.random.key(0), shape, 3.0))


@pytest.mark.parametrize("name", (None,) + GRADIENT)
def test_passes_in_the_jitted_train_step_match_the_declared_cost(name):
    hparams = {"align_steps": 2, "finetune_steps": 3} if name == "lisa" else {}
    mesh, fn, st, frozen = build_run((1, 1, 1), name, **hparams)
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, step.put_batches(named_batches(0), mesh))
    assert count_passes(jaxpr.jaxpr) == (defenses.get(name).cost if name else Cost(1, 1))


def test_vaccine_without_the_step_options_computes_G_itself_one_pass_dearer():
    mesh = build_run((1, 1, 1), None)[0]
    t = builder.build_training(CFG, LORA, mesh=mesh, pre=[defenses.vaccine()], primary="align")
    jaxpr = jax.make_jaxpr(t.step.fn)(t.state, BASE, step.put_batches(named_batches(0), mesh))
    assert count_passes(jaxpr.jaxpr) == Cost(3, 3)


def test_pass_counter_sees_two_reversed_scans_in_one_gradient_of_a_two_batch_loss():
    user, align = make_batch(0), make_batch(1, length=10)
    joint = jax.make_jaxpr(jax.grad(lambda t: LOSS_FN(t, user)[0] + 0.1 * LOSS_FN(t, align)[0]))
    assert count_passes(joint(LORA).jaxpr) == Cost(2, 2)
    forward_only = jax.make_jaxpr(lambda t: LOSS_FN(t, user)[0])
    assert count_passes(forward_only(LORA).jaxpr) == Cost(1, 0)


def docs_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, f"no python example in {DOCS}"
    return blocks[0]


def test_docs_user_loop_with_optax_chain_equals_the_hfjax_train_step():
    scope: dict = {}
    exec(compile(docs_example(), str(DOCS), "exec"), scope)  # the docs' code, verbatim
    batches = [make_batch(10 + i) for i in range(3)]
    lora, losses = scope["train"](CFG, BASE, LORA, batches)
    assert len(losses) == 3 and np.all(np.isfinite(losses))

    # optax.adamw(1e-3) defaults: b1 0.9, b2 0.999, eps 1e-8, weight decay 1e-4
    c = optim.OptimizerConfig(learning_rate=1e-3, weight_decay=1e-4)
    mesh, fn, st, frozen = build_run((1, 1, 1), "vaccine", opt_cfg=c, rho=2.0)
    placed = [step.put_batches({"align": b}, mesh) for b in batches]
    compiled = compile_fast(fn, st, frozen, placed[0])
    for b, loss in zip(placed, losses, strict=True):
        st, m = compiled(st, frozen, b)
        assert float(m["loss"]) == pytest.approx(loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(st.trainable), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    moved = optax.tree.norm(optax.tree.sub(lora, LORA))
    assert float(moved) > 1e-3


def test_the_docs_table_lists_every_registered_defense_with_its_stage_level_and_cost():
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    table = {r[0].strip("`"): r for r in rows}
    assert sorted(table) == defenses.available()
    for name, (_, stage, level, _, cost, *_) in table.items():
        spec = defenses.get(name)
        assert (stage, level) == (", ".join(spec.stages), spec.level), name
        if spec.cost is not None and spec.level == "gradient":
            assert cost.startswith(str(spec.cost)), (name, cost, spec.cost)


def test_a_data_defense_registered_for_two_stages_is_offered_at_both_and_a_gradient_one_is_not(
        monkeypatch):
    from hfjax.defenses import api as defenses_api

    monkeypatch.setattr(defenses_api, "_REGISTRY", dict(defenses_api._REGISTRY))

    @defenses_api.register("two_stage_mix", stage=("finetune", "alignment"), level="data")
    def two_stage_mix():
        return lambda records: records

    spec = defenses_api.get("two_stage_mix")
    assert spec.stage == "finetune" and spec.stages == ("finetune", "alignment")
    assert "two_stage_mix" in defenses_api.available("alignment")
    assert "two_stage_mix" in defenses_api.available("finetune")
    assert "two_stage_mix" not in defenses_api.available("post")
    with pytest.raises(defenses_api.DefenseError, match="only a data defense"):
        defenses_api.register("two_stage_grad", stage=("finetune", "alignment"),
                              level="gradient")(lambda: None)
