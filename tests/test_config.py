"""The run settings: flat flags nest into sub-configs, stage keys follow every field of the
sub-configs a stage reads, defenses compose from flags, and the registries (attacks, tasks,
adapter types) share one API."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from hfjax import attacks, data, defenses, tasks
from hfjax.defenses import compose
from hfjax.defenses.compose import DefenseChoice
from hfjax.models import adapters
from hfjax.pipeline import ConfigError, RunFlags, to_config, validate
from hfjax.pipeline.config import DataSettings, key_of
from hfjax.pipeline.run_folder import fingerprint

FLAGS = RunFlags(run_dir="r")


def test_flags_nest_into_sub_configs_with_typed_lists_and_stage_twins():
    rc = to_config(validate(FLAGS.replace(
        lora_targets="q_proj, v_proj", align_lora_rank=4, align_schedule="cosine",
        align_warmup_ratio=0.1, lr=5e-4, eval_models="base,final", mesh="2,-1,1")))
    assert rc.finetune.train.adapter.targets == ("q_proj", "v_proj")
    assert rc.align.train.adapter.rank == 4 and rc.finetune.train.adapter.rank == 8
    assert rc.align.train.optimizer.schedule == "cosine"
    assert rc.finetune.train.optimizer.schedule == "constant"
    assert rc.align.train.optimizer.warmup_ratio == 0.1
    assert rc.finetune.train.optimizer.learning_rate == 5e-4
    assert rc.finetune.train.optimizer.max_grad_norm == 1.0
    assert rc.run.models_to_eval == ("base", "final") and rc.run.mesh == (2, -1, 1)
    assert to_config(FLAGS.replace(max_grad_norm=0.0)).finetune.train.optimizer.max_grad_norm \
        is None


def test_a_field_added_to_a_sub_config_enters_the_key_without_being_listed():
    """key_of walks every field: a subclass of DataSettings with one more field changes the
    fingerprint, and changing that field's value changes it again."""
    @dataclasses.dataclass(frozen=True)
    class Extended(DataSettings):
        new_knob: int = 3

    rc = to_config(FLAGS)
    plain = fingerprint(key_of(rc.data))
    extended = Extended(**{f.name: getattr(rc.data, f.name)
                           for f in dataclasses.fields(DataSettings)})
    assert fingerprint(key_of(extended)) != plain
    assert fingerprint(key_of(dataclasses.replace(extended, new_knob=4))) != \
        fingerprint(key_of(extended))
    assert key_of(rc.finetune)["train"]["optimizer"]["learning_rate"] == 2e-4
    assert key_of(rc.align)["train"]["defenses"] == []


def test_defenses_compose_from_flags_into_one_chain_and_step():
    rc = to_config(validate(FLAGS.replace(
        align_defense="vaccine+booster",
        align_defense_hparams="vaccine.rho=5.0,booster.lam=5.0,booster.alpha=0.1")))
    chosen = rc.align.train.defenses
    assert [c.name for c in chosen] == ["vaccine", "booster"]
    assert chosen[0].hparams == {"rho": 5.0} and chosen[1].hparams == {"lam": 5.0, "alpha": 0.1}
    options = compose.step_options(chosen, "align")
    assert options.primary == "align" and options.activation_grads
    assert compose.cost(chosen) == defenses.get("booster_perturb_aware").cost
    assert compose.batches(chosen) == ("align", "harmful")
    with pytest.raises(ConfigError, match="NAME.KEY=VALUE"):
        validate(FLAGS.replace(align_defense="vaccine+booster", align_defense_hparams="rho=5"))
    with pytest.raises(defenses.DefenseError, match="cannot run in one step"):
        compose.step_options([DefenseChoice.named("lisa"), DefenseChoice.named("safe_instr")],
                             "user")
    with pytest.raises(ConfigError, match="names a defense twice"):
        validate(FLAGS.replace(align_defense="vaccine+vaccine"))


def test_the_composed_chain_equals_booster_perturb_aware():
    """vaccine(rho)+booster(lam, alpha) from flags is the registered perturbation-aware
    Booster: the same update from the same oracle."""
    from defense_fixtures import BASE, CFG, LORA, LOSS_FN, named_batches

    batches = named_batches(0)
    grads = jax.grad(lambda t: LOSS_FN(t, batches["align"])[0])(LORA)
    chain = compose.chain([DefenseChoice.named("vaccine", rho=5.0),
                           DefenseChoice.named("booster", lam=5.0, alpha=0.1)])
    registered = defenses.get("booster_perturb_aware").build(rho=5.0, lam=5.0, alpha=0.1)
    del BASE, CFG
    a, _ = chain.update(grads, chain.init(LORA), LORA, loss_fn=LOSS_FN, batches=batches)
    b, _ = registered.update(grads, registered.init(LORA), LORA, loss_fn=LOSS_FN,
                             batches=batches)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
    assert optax.tree.norm(optax.tree.sub(a, grads)) > 1e-3


def test_attacks_tasks_and_adapter_types_share_the_registry_api():
    assert {"hft", "restructure"} <= set(attacks.available())
    assert tasks.available(offline=True) == ["sentiment", "topic"]  # generated only, no hub
    assert set(tasks.available()) >= {
        "sst2", "ag_news", "financial_sentiment", "boolq", "hellaswag", "winogrande", "arc",
        "gsm8k", "xsum", "billsum", "cnn_dailymail", "wmt14_en_fr", "mbpp", "humaneval",
        "wikitext", "aeslc"}
    assert all("offline" in tasks.get(t).sources for t in tasks.available())
    assert adapters.available() == ["full", "lora", "prefix"]
    with pytest.raises(attacks.AttackError, match="unknown attack 'nope'; available"):
        attacks.get("nope")
    with pytest.raises(tasks.TaskError, match="unknown task 'nope'"):
        tasks.get("nope")
    with pytest.raises(adapters.AdapterError, match="unknown adapter type"):
        adapters.get("prefix_nope")
    benign = data.default_data(0).task_train
    harmful = data.default_data(0).harmful_train[:20]
    rows = attacks.get("hft").build()(benign, harmful, n=40, p=0.25, seed=3)
    assert len(rows) == 40 and sum(r["harmful"] for r in rows) == 10
    assert rows == data.mix_user_data(benign, harmful, 40, 0.25, 3)
    train, test = tasks.get("topic").load(0)
    assert len(test) == 500 and tasks.get("topic").accuracy([test[0]["label"]],
                                                            [test[0]["label"]]) == 1.0
    with pytest.raises(attacks.AttackError, match="hft has no hyper-parameter 'p'"):
        validate(FLAGS.replace(attack_hparams="p=0.3"))


def test_the_task_flag_picks_the_task_and_the_old_flags_still_do():
    assert to_config(FLAGS).data.task == "sentiment"
    assert to_config(FLAGS.replace(offline_task="topic")).data.task == "topic"
    assert to_config(FLAGS.replace(task_test_data="sst2:validation")).data.task == "sst2"
    assert to_config(FLAGS.replace(task="gsm8k")).data.task == "gsm8k"
    with pytest.raises(tasks.TaskError, match="unknown task"):
        validate(FLAGS.replace(task="chess"))


def test_full_fine_tuning_is_refused_for_defenses_that_map_a_lora():
    with pytest.raises(ConfigError, match="maps a LoRA adapter"):
        validate(FLAGS.replace(adapter="full", repair_defense="safelora"))
    rc = to_config(validate(FLAGS.replace(adapter="full")))
    assert rc.align.train.adapter.kind == rc.finetune.train.adapter.kind == "full"


def test_docs_tasks_table_lists_every_registered_task_with_its_family_and_metric():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| `") and line.count("|") == 8]
    table = {r[0].strip("`"): r for r in rows}
    assert sorted(table) == tasks.available()
    for name, row in table.items():
        assert (row[1], row[5].strip("`")) == (tasks.get(name).family, tasks.get(name).metric)
