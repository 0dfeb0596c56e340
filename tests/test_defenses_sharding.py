"""Every gradient defense inside hfjax's train step gives the same losses and adapter on 8
simulated devices (mesh data 2 x fsdp 4) as on one.

The runs use plain SGD after the defense: Adam divides by √v, which turns float rounding in
near-zero gradient entries into visible parameter differences and would test Adam, not the
defense."""

import jax
import numpy as np
import pytest
from defense_fixtures import sgd_run

STEPS = {"lisa": 12}  # Lisa: K_a 2, K_f 3 over 12 steps (shared with the Lisa phase test)
HPARAMS = {"booster": (), "lisa": (("align_steps", 2), ("finetune_steps", 3)),
           "random_vaccine": (), "safe_instr": (), "vaccine": (),
           "tar": (("inner_steps", 2), ("tr_every", 1), ("adversary_rows", 4),
                   ("heldout", "harmful"))}


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_gradient_defense_on_8_devices_matches_1_device(name):
    steps = STEPS.get(name, 2)
    single = sgd_run((1, 1, 1), name, steps, HPARAMS[name])
    sharded = sgd_run((2, 4, 1), name, steps, HPARAMS[name])
    assert np.all(np.isfinite(single["losses"]))
    np.testing.assert_allclose(sharded["losses"], single["losses"], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(sharded["thetas"][-1]), jax.tree.leaves(single["thetas"][-1]),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(single["thetas"][-1]), jax.tree.leaves(single["thetas"][0]), strict=True))
    assert moved > 1e-4
