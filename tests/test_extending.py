"""docs/extending.md's recipes, followed: a defense, an attack, a task with its own FA metric and
an adapter type registered as the doc says reach the flags, the training builder and the
pipeline by name alone; every supported model family has what the model-family recipe asks
(a config round trip, every checkpoint tensor mapped, a parity fixture)."""

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import test_defenses_contract as contract
from defense_fixtures import build_run, count_passes, named_batches
from test_pipeline import _config

from hfjax import attacks, defenses, tasks
from hfjax.data.records import make_record
from hfjax.defenses import api as defenses_api
from hfjax.defenses.api import ALIGN, USER, Cost, DefenseError, StepOptions, check_update
from hfjax.eval import metrics
from hfjax.models import adapters, hf_io
from hfjax.models import lora as lora_lib
from hfjax.models.config import SUPPORTED_MODEL_TYPES, from_hf_dict, to_hf_dict
from hfjax.pipeline import Pipeline, RunFlags
from hfjax.pipeline.flags import to_config, validate
from hfjax.train import step

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("compilation_cache")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------- the recipes' new entries
def convex_mix(w: float = 0.5) -> optax.GradientTransformationExtraArgs:
    """(1 − w) ∇g(θ; "user") + w ∇f(θ; "align"): the defense recipe's gradient level."""
    if not 0.0 <= w <= 1.0:
        raise DefenseError(f"test_convex_mix's w must be in [0, 1], got {w}")

    def update_fn(updates, state, params=None, *, loss_fn=None, batches=None, rng=None,
                  **hints):
        del rng, hints
        check_update("test_convex_mix", params, loss_fn, batches, (ALIGN,))
        g_f = jax.grad(lambda p: loss_fn(p, batches[ALIGN])[0])(params)
        return jax.tree.map(lambda g, f: (1 - w) * g + w * f, updates, g_f), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def harmful_first(share_cap: float = 1.0):
    """The attack recipe: the ⌊p·n⌋ harmful rows first, then benign rows (no shuffle)."""
    def attack(benign, harmful, *, n, p, seed, order="random"):
        del seed, order
        k = min(math.floor(p * n), math.floor(share_cap * n))
        return [dict(r, harmful=True) for r in harmful[:k]] + \
            [dict(r, harmful=False) for r in benign[:n - k]]
    return attack


def parity_rows(data_seed: int):
    """The task recipe's offline loader: "is N even or odd" rows, split by the data seed."""
    rows = [make_record("Is the number even or odd?", "even" if i % 2 == 0 else "odd",
                        "test_parity", False, input=str(i),
                        label="even" if i % 2 == 0 else "odd") for i in range(120)]
    order = np.random.default_rng(data_seed).permutation(len(rows))
    return [rows[i] for i in order[:100]], [rows[i] for i in order[100:]]


def last_word(answers, golds, exact=False):
    """The task recipe's metric: the answer's last word is the gold label."""
    del exact
    return float(np.mean([bool(a.split()) and a.split()[-1].strip(".").lower() == g
                          for a, g in zip(answers, golds, strict=True)]))


def _attention_lora_init(cfg, key, params, settings):
    del params
    return lora_lib.init(cfg, key, rank=settings.rank, alpha=settings.alpha, targets=ATTENTION,
                         dropout=settings.dropout)


@pytest.fixture
def registered(monkeypatch):
    """Every registry copied (restored after the test), with the recipes' entries added."""
    monkeypatch.setattr(defenses_api, "_REGISTRY", dict(defenses_api._REGISTRY))
    for registry in (attacks.REGISTRY, tasks.REGISTRY, adapters.REGISTRY):
        monkeypatch.setattr(registry, "_specs", dict(registry._specs))
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    defenses_api.register("test_convex_mix", stage="finetune", level="gradient",
                          cost=Cost(2, 2), batches=(USER, ALIGN), paper="docs/extending.md",
                          options=lambda w: StepOptions(primary=USER))(convex_mix)
    attacks.register("test_harmful_first", paper="docs/extending.md")(harmful_first)
    metrics.register_metric("test_last_word", last_word)
    tasks.register("test_parity", metric="test_last_word", max_new_tokens=4, offline=True,
                   about="even or odd")(parity_rows)
    lora = adapters.get("lora")
    adapters.REGISTRY.add("test_lora_attention", adapters.AdapterType(
        "test_lora_attention", False, _attention_lora_init, lora.save, lora.load, lora.merge,
        "LoRA on the attention projections only"))


# ---------------------------------------------------------------- the tests
def test_a_registered_gradient_defense_meets_the_contract_costs_what_it_declares_and_parses(
        registered):
    assert "test_convex_mix" in defenses.available("finetune")
    batches = contract.run_batches("test_convex_mix")
    losses, thetas = contract.user_loop("test_convex_mix", batches)
    step_losses, final = contract.hfjax_steps("test_convex_mix", batches)
    np.testing.assert_allclose(step_losses, losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(thetas[-1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)
    mesh, fn, st, frozen = build_run((1, 1, 1), "test_convex_mix")
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, step.put_batches(named_batches(0), mesh))
    assert count_passes(jaxpr.jaxpr) == Cost(2, 2)
    flags = validate(RunFlags(run_dir="x", defense="test_convex_mix", defense_hparams="w=0.25"))
    chosen = to_config(flags).finetune.train.defenses
    assert [(c.name, c.hparams) for c in chosen] == [("test_convex_mix", {"w": 0.25})]
    with pytest.raises(DefenseError, match="w must be in"):
        validate(RunFlags(run_dir="x", defense="test_convex_mix", defense_hparams="w=2.0"))


def test_a_registered_attack_task_metric_and_adapter_type_run_through_the_pipeline(
        registered, tmp_path, tmp_path_factory):
    from test_pipeline import build_tiny_setup

    setup = build_tiny_setup(tmp_path_factory.mktemp("extending"))
    run = tmp_path / "run"
    flags = _config(setup, run, attack="test_harmful_first", task="test_parity",
                    task_train_data="", task_test_data="", task_max_new_tokens=0,
                    adapter="test_lora_attention", finetune_defense="test_convex_mix",
                    eval_models="final")
    pipe = Pipeline(flags)
    user = pipe.trainer.user_records()
    k = math.floor(flags.harmful_ratio * flags.num_samples)
    assert [r["harmful"] for r in user] == [True] * k + [False] * (flags.num_samples - k)
    assert all(r["source"] == "test_parity" for r in user[k:])
    res = pipe.run()
    for stage in ("align", "finetune"):
        config = json.loads((run / stage / "adapter" / "adapter_config.json").read_text())
        assert config["target_modules"] == list(ATTENTION), stage
    assert "test_convex_mix" in (run / "finetune" / "key.json").read_text()
    rows = [json.loads(x) for x in
            (run / "eval_final" / "generations_task.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt"].startswith("Is the number even or odd?") for r in rows)
    assert json.loads((run / "eval_final" / "key.json").read_text())["eval"][
        "task_max_new_tokens"] == 4  # the task's budget
    [final] = res["rows"]
    assert final["task"] == "test_last_word"
    assert final["finetune_accuracy"] == last_word([r["response"] for r in rows],
                                                   [r["gold"] for r in rows])


@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_every_supported_model_family_has_a_parity_fixture_mapped_tensors_and_a_round_trip(
        family):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_parity import CASES

    fixtures = ROOT / "tests" / "fixtures" / "parity"
    cases = [c for c in CASES if json.loads((fixtures / c / "model" / "config.json").read_text())
             ["model_type"] == family]
    assert cases, f"no parity fixture of model_type {family!r} in tests/test_parity.py CASES"
    for case in cases:
        folder = fixtures / case / "model"
        cfg = hf_io.read_config(folder)
        assert from_hf_dict(to_hf_dict(cfg)) == cfg, case
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "np") as f:
            stored = set(f.keys())
        mapped = {m.hf_name.format(i=i) for m in hf_io.weight_mappings(cfg)
                  for i in (range(cfg.num_layers) if "{i}" in m.hf_name else [0])}
        assert stored == mapped, (case, sorted(stored ^ mapped))
