"""Sweep planning with --case: bundles of settings that go together (an attack with its own
budget) crossed with the grid, each run validated up front."""

import pytest
from absl import flags

from hfjax.pipeline import sweep as sweep_lib
from hfjax.pipeline.config import ConfigError


def _plan(tmp_path, *argv):
    fv = flags.FlagValues()
    sweep_lib.define(fv)
    fv(["sweep", f"--run_dir={tmp_path}", "--data=offline", *argv])
    return sweep_lib.plan(fv, device_count=1)[1]


def test_cases_are_crossed_with_the_grid_and_each_case_keeps_its_own_settings(tmp_path):
    runs = _plan(tmp_path, "--grid=defense=none,lisa", "--case=attack=hft",
                 "--case=attack=pure_harmful;harmful_ratio=1.0;num_samples=20")
    got = sorted((c["defense"], rc.attack, rc.harmful_ratio, rc.num_samples) for c, rc in runs)
    assert got == [("lisa", "hft", 0.1, 200), ("lisa", "pure_harmful", 1.0, 20),
                   ("none", "hft", 0.1, 200), ("none", "pure_harmful", 1.0, 20)]
    assert len({rc.run_dir for _, rc in runs}) == 4
    assert all("defense-" in rc.run_dir and "attack-" in rc.run_dir for _, rc in runs)


def test_a_case_setting_counts_as_given_so_the_attacks_protocol_does_not_override_it(tmp_path):
    ((_, rc),) = _plan(tmp_path, "--case=attack=pure_harmful;harmful_ratio=1.0;lr=0.001")
    resolved = rc.resolved()
    assert resolved.lr == 0.001  # set by the case, not the protocol's 5e-5
    assert resolved.epochs == 5  # not set anywhere: pure_harmful's protocol (Qi et al.)


@pytest.mark.parametrize("case, message", [
    ("defense=lisa", "varied by --grid"), ("attack=hft;attack=aoa", "set twice"),
    ("run_dir=x", "cannot vary"), ("nonsense=1", "unknown flag"), ("attack", "FLAG=V"),
])
def test_bad_cases_are_refused_naming_the_case(tmp_path, case, message):
    with pytest.raises(ConfigError, match=message):
        _plan(tmp_path, "--grid=defense=none,lisa", f"--case={case}")
