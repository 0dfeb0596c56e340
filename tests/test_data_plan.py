"""Harmful prompts per role: the attack's prompts reach no other role, own streams are apart,
shared streams reuse the alignment's prompts, the alignment does not move with the attack's
size, the attack does not move with the defenses, and every preset's plan keeps the attack
apart."""

import pytest
from absl import flags
from test_pipeline import ROOT

from hfjax import data
from hfjax.data.plan import ALIGNMENT, ATTACK, plan_roles
from hfjax.data.records import prompt_key
from hfjax.pipeline import resources as resources_lib
from hfjax.pipeline import sweep as sweep_lib
from hfjax.pipeline.flags import to_config

POOL = [data.make_record(f"Explain placeholder task {i}", f"Sure, here is task {i}", "t", True)
        for i in range(300)]
POOLS = {"pool": POOL}


def _prompts(plan, role, pools=POOLS):
    return {prompt_key(r) for r in plan.take(pools, role)}


def _assert_attack_apart(plan, pools):
    """The attack's prompts are in no other role; own streams are in no other role either."""
    attack = _prompts(plan, ATTACK, pools)
    for role in plan.rows:
        if role != ATTACK:
            assert not attack & _prompts(plan, role, pools), f"{role} shares attack prompts"


def test_roles_get_their_sizes_the_attack_and_own_streams_apart_shared_streams_reuse_alignment():
    plan = plan_roles(POOL, 0, alignment=100, attack=20,
                      shared_streams={"alignment:harmful": 60, "finetune:align": 150},
                      own_streams={"post:harmful": 30})
    assert {k: len(v) for k, v in plan.rows.items()} == {
        ALIGNMENT: 100, ATTACK: 20, "alignment:harmful": 60, "finetune:align": 150,
        "post:harmful": 30}
    _assert_attack_apart(plan, POOLS)
    align = _prompts(plan, ALIGNMENT)
    assert _prompts(plan, "alignment:harmful") < align  # Booster: its alignment's prompts
    assert _prompts(plan, "finetune:align") > align  # larger: the alignment's and more
    assert not _prompts(plan, "post:harmful") & (align | _prompts(plan, "finetune:align"))


def test_alignment_ignores_the_attack_and_the_attack_ignores_the_defenses():
    base = plan_roles(POOL, 3, alignment=100, attack=10)
    bigger_attack = plan_roles(POOL, 3, alignment=100, attack=40,
                               own_streams={"finetune:harmful": 50})
    with_streams = plan_roles(POOL, 3, alignment=100, attack=10,
                              shared_streams={"alignment:harmful": 160},
                              own_streams={"post:harmful": 20})
    assert _prompts(base, ALIGNMENT) == _prompts(bigger_attack, ALIGNMENT) == \
        _prompts(with_streams, ALIGNMENT)
    assert _prompts(base, ATTACK) == _prompts(with_streams, ATTACK)
    assert _prompts(base, ATTACK) < _prompts(bigger_attack, ATTACK)  # a prefix, p nested
    assert _prompts(plan_roles(POOL, 4, alignment=100, attack=10), ATTACK) != \
        _prompts(base, ATTACK)  # the seed draws another permutation


def test_file_order_gives_the_alignment_the_first_prompts():
    plan = plan_roles(POOL, 0, alignment=5, attack=3, order="file")
    assert sorted(plan.rows[ALIGNMENT]) == [0, 1, 2, 3, 4]
    assert sorted(plan.rows[ATTACK]) == [297, 298, 299]


def test_a_separate_attack_source_never_gives_the_attack_another_role_s_prompt():
    attack_source = POOL[:80] + [data.make_record(f"Other placeholder {i}", "x", "a", True)
                                 for i in range(20)]
    pools = {"pool": POOL, "attack": attack_source}
    plan = plan_roles(POOL, 1, alignment=150, attack=40, attack_pool=attack_source)
    assert plan.sources[ATTACK] == "attack" and len(plan.rows[ATTACK]) == 40
    _assert_attack_apart(plan, pools)
    with pytest.raises(data.DataError, match="attack source"):
        plan_roles(POOL, 1, alignment=290, attack=40, attack_pool=attack_source)


def test_a_prompt_answered_twice_goes_to_one_role_and_a_small_pool_is_named():
    doubled = POOL[:50] + [dict(r, response="another answer") for r in POOL[:50]]
    plan = plan_roles(doubled, 0, alignment=25, attack=25)
    _assert_attack_apart(plan, {"pool": doubled})
    assert not _prompts(plan, ALIGNMENT, {"pool": doubled}) & \
        _prompts(plan, ATTACK, {"pool": doubled})
    with pytest.raises(data.DataError, match="has 50 distinct prompts but the run's roles need 51"):
        plan_roles(doubled, 0, alignment=25, attack=25, own_streams={"post:harmful": 1})


def test_the_offline_default_attack_no_longer_shares_prompts_with_alignment_or_booster():
    """The overlap that flattered Booster: with seed 0 the independent draws shared attack
    prompts with the alignment set and Booster's harmful stream."""
    pool = data.default_data(0).harmful_train
    plan = plan_roles(pool, 0, alignment=200, attack=20,
                      shared_streams={"alignment:harmful": 200})
    _assert_attack_apart(plan, {"pool": pool})
    independent_attack = {prompt_key(r) for r in data.sample(pool, 20, 0)}
    independent_align = {prompt_key(r) for r in data.sample(pool, 200, 1)}
    assert independent_attack & independent_align  # what independent sampling gave


@pytest.mark.parametrize("preset", ["quick", "full", "smollm2_offline", "vaccine_paper",
                                    "lisa_paper", "booster_paper", "booster_perturb_aware",
                                    "repnoise_gitdisl", "safe_instr_gitdisl", "antidote_paper"])
def test_every_run_of_every_preset_has_a_disjoint_data_plan(preset, tmp_path, monkeypatch):
    """Offline presets on the real offline pool; hub presets on a pool of distinct placeholder
    prompts as large as the run needs (the plan is disjoint by construction; the size a preset
    needs is what its source must hold)."""
    monkeypatch.chdir(ROOT)
    fv = flags.FlagValues()
    sweep_lib.define(fv)
    args = [f"--flagfile=experiments/presets/{preset}.cfg"]
    if preset == "smollm2_offline":
        args.append("--grid=defense=none,booster,lisa,antidote")
    fv(["sweep", *args, f"--run_dir={tmp_path}"])
    _, configs = sweep_lib.plan(fv, device_count=8)
    offline = data.default_data(0).harmful_train
    for _, flags_ in configs:
        rc = to_config(flags_)
        pool = offline if rc.data.source == "offline" else [
            data.make_record(f"placeholder request {i}", "placeholder answer", "t", True)
            for i in range(40000)]
        # an attack source (--attack_data) that shares half its prompts with the pool
        attack_pool = pool[:200] + [data.make_record(f"other request {i}", "x", "t", True)
                                    for i in range(5000)] if rc.data.attack else ()
        plan = resources_lib.role_plan(rc, pool, attack_pool)
        _assert_attack_apart(plan, {"pool": pool, "attack": attack_pool})
        attack = data.harmful_count(rc.finetune.num_samples, rc.finetune.harmful_ratio)
        assert len(plan.rows.get(ATTACK, ())) == attack


@pytest.mark.parametrize("preset", ["quick", "full", "smollm2_offline", "vaccine_paper",
                                    "lisa_paper", "booster_paper", "booster_perturb_aware",
                                    "repnoise_gitdisl", "safe_instr_gitdisl", "antidote_paper"])
def test_every_preset_states_gradient_clipping_at_the_official_1(preset):
    """HF Trainer's max_grad_norm 1.0, under which every official script runs, is written in
    the preset's flagfile chain (not only the default)."""
    seen, todo = [], [ROOT / "experiments" / "presets" / f"{preset}.cfg"]
    while todo:
        text = todo.pop().read_text()
        seen += [line for line in text.splitlines() if line.startswith("--max_grad_norm=")]
        todo += [ROOT / line.split("=", 1)[1] for line in text.splitlines()
                 if line.startswith("--flagfile=")]
    assert seen == ["--max_grad_norm=1.0"]
