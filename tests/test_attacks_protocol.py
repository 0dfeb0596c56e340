"""Naming an attack applies its paper's protocol to the fine-tuning settings the user did not
give: given means present on the command line or in a flagfile (not equal to the default), a
sweep's grid values count as given, the applied settings are recorded in the run config, the
main job (hft) is unchanged, a required setting given against the attack is refused, and every
attack also runs with full fine-tuning."""

import pytest
from absl import flags

from hfjax import attacks
from hfjax.pipeline import ConfigError, RunFlags
from hfjax.pipeline import flags as pflags
from hfjax.pipeline import sweep as sweep_lib
from hfjax.pipeline.flags import to_config, validate

QI = {"pure_harmful": {"lr": 5e-5, "epochs": 5, "batch_size": 10, "num_samples": 10,
                       "harmful_ratio": 1.0},
      "aoa": {"lr": 5e-5, "epochs": 10, "batch_size": 10, "num_samples": 10,
              "harmful_ratio": 0.0},
      "benign": {"lr": 2e-5, "epochs": 1, "batch_size": 128, "harmful_ratio": 0.0}}


def parsed(argv: list[str], *, sweep: bool = False) -> flags.FlagValues:
    fv = flags.FlagValues()
    (sweep_lib.define if sweep else pflags.define)(fv)
    fv(["prog", *argv])
    return fv


@pytest.mark.parametrize("name", sorted(QI))
def test_naming_an_attack_applies_its_protocol_and_records_it(name):
    f = validate(RunFlags(run_dir="r", attack=name))
    assert {k: getattr(f, k) for k in QI[name]} == QI[name]
    assert f.max_grad_norm == 0.0 and f.weight_decay == 0.0
    rc = to_config(f)
    assert dict(rc.run.attack_protocol) == {**attacks.get(name).protocol,
                                            **attacks.get(name).requires}
    train = rc.finetune.train
    assert (train.optimizer.learning_rate, train.epochs, train.batch_size,
            train.optimizer.max_grad_norm) == (QI[name]["lr"], QI[name]["epochs"],
                                               QI[name]["batch_size"], None)
    assert rc.finetune.harmful_ratio == QI[name]["harmful_ratio"]
    assert validate(f) == f  # resolving twice changes nothing


def test_a_flag_given_on_the_command_line_keeps_its_value_even_when_it_equals_the_default():
    f = validate(pflags.flags_from_absl(parsed(["--run_dir=r", "--attack=aoa", "--lr=1e-4",
                                                "--epochs=3"])))
    assert (f.lr, f.epochs, f.batch_size, f.num_samples) == (1e-4, 3, 10, 10)
    assert set(to_config(f).run.attack_protocol) == {"batch_size", "num_samples", "harmful_ratio",
                                                     "weight_decay", "max_grad_norm"}


def test_a_flag_set_in_a_flagfile_counts_as_given(tmp_path):
    preset = tmp_path / "preset.cfg"
    preset.write_text("--attack=pure_harmful\n--epochs=3\n")
    f = validate(pflags.flags_from_absl(parsed(["--run_dir=r", f"--flagfile={preset}"])))
    assert (f.epochs, f.lr) == (3, 5e-5)


def test_flags_built_in_code_count_the_settings_that_differ_from_the_defaults_as_given():
    f = validate(RunFlags(run_dir="r", attack="pure_harmful", lr=1e-3, num_samples=50))
    assert (f.lr, f.num_samples, f.epochs) == (1e-3, 50, 5)
    explicit = validate(RunFlags(run_dir="r", attack="pure_harmful", epochs=3, given=("epochs",)))
    assert (explicit.epochs, explicit.lr) == (3, 5e-5)


def test_a_sweep_s_grid_values_count_as_given():
    fv = parsed(["--run_dir=s", "--attack=pure_harmful", "--grid=lr=1e-4,3e-4",
                 "--grid=num_samples=10,50"], sweep=True)
    _, runs = sweep_lib.plan(fv)
    assert sorted((f.lr, f.num_samples) for _, f in runs) == [
        (1e-4, 10), (1e-4, 50), (3e-4, 10), (3e-4, 50)]
    assert all((f.epochs, f.batch_size, f.harmful_ratio) == (5, 10, 1.0) for _, f in runs)
    fv = parsed(["--run_dir=s", "--grid=attack=hft,aoa"], sweep=True)
    epochs = {f.attack: f.epochs for _, f in sweep_lib.plan(fv)[1]}
    assert epochs == {"hft": 3, "aoa": 10}


def test_the_main_job_is_unchanged_and_given_is_no_flag():
    plain = RunFlags(run_dir="r")
    f = validate(plain)
    assert f.to_dict() == plain.to_dict() and "given" not in f.to_dict()
    assert to_config(f).run.attack_protocol == {}
    assert validate(RunFlags(**plain.to_dict())).to_dict() == f.to_dict()
    assert "given" not in parsed([])


@pytest.mark.parametrize("flags_, match", [
    ({"attack": "pure_harmful", "harmful_ratio": 0.5}, "needs --harmful_ratio=1.0"),
    ({"attack": "aoa", "harmful_ratio": 0.1, "given": ("harmful_ratio",)},
     "needs --harmful_ratio=0.0"),
    ({"attack": "prefill"}, "select it with --eval_attack"),
    ({"eval_attack": "hft"}, "select it with --attack"),
    ({"eval_attack_hparams": "k=5"}, "--eval_attack is none"),
])
def test_impossible_attack_settings_fail_before_any_work(flags_, match):
    with pytest.raises(ConfigError, match=match):
        validate(RunFlags(run_dir="r", **flags_))


@pytest.mark.parametrize("name", attacks.available("data"))
def test_every_data_attack_validates_with_full_fine_tuning(name):
    f = validate(RunFlags(run_dir="r", attack=name, adapter="full"))
    assert to_config(f).finetune.train.adapter.kind == "full"


def test_the_inference_attack_is_an_evaluation_setting():
    f = validate(RunFlags(run_dir="r", eval_attack="prefill", eval_attack_hparams="k=20"))
    choice = to_config(f).eval.inference_attack
    assert (choice.name, dict(choice.hparams)) == ("prefill", {"k": 20})
    assert to_config(validate(RunFlags(run_dir="r"))).eval.inference_attack is None


def test_docs_attacks_table_lists_every_registered_attack_with_its_kind():
    from pathlib import Path

    from hfjax import attacks

    text = (Path(__file__).resolve().parents[1] / "docs" / "attacks.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| `")]
    kinds = {r[0].strip("`"): r[1].split()[0] for r in rows}
    assert sorted(kinds) == attacks.available()
    assert kinds == {n: attacks.get(n).kind for n in kinds}
