"""Every gradient defense inside hfjax's train step gives the same losses and adapter on 8
simulated devices (mesh data 2 x fsdp 4) as on one.

The runs use plain SGD after the defense: Adam divides by √v, which turns float rounding in
near-zero gradient entries into visible parameter differences and would test Adam, not the
defense."""

import pytest
from defense_fixtures import assert_8_devices_match_1

STEPS = {"lisa": 12}  # Lisa: K_a 2, K_f 3 over 12 steps (shared with the Lisa phase test)
HPARAMS = {"booster": (), "lisa": (("align_steps", 2), ("finetune_steps", 3)),
           "random_vaccine": (), "safe_instr": (), "vaccine": (),
           "tar": (("inner_steps", 2), ("tr_every", 1), ("adversary_rows", 4),
                   ("heldout", "harmful"))}  # TAR's DPO loss: tests/test_defense_tar.py


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_gradient_defense_on_8_devices_matches_1_device(name):
    assert_8_devices_match_1(name, STEPS.get(name, 2), HPARAMS[name])
