"""Attacks: what a malicious user does to a fine-tuning service, by name.

A data-level attack turns the user's benign task rows and the harmful rows planned for the
attack (`hfjax.data.plan`: prompts no other role of the run sees) into the user data the
service fine-tunes on:

    attack = hfjax.attacks.get("hft").build(**hparams)
    records = attack(benign, harmful, n=200, p=0.1, seed=0, order="random")

`n` and `p` are the run's data budget (--num_samples, --harmful_ratio), `order` the row order
("random" or "file"). The pipeline selects one with --attack NAME --attack_hparams "k=v,...";
naming an attack applies its paper's protocol to the fine-tuning settings the user did not set
(`AttackSpec.protocol`). An inference-time attack (prefilling) changes how the harmful
evaluation prompts are presented: --eval_attack NAME --eval_attack_hparams "k=v,...".

    data       hft, restructure, trigger_poison, pure_harmful, aoa, benign, virus
    inference  prefill
"""

from hfjax.attacks.aoa import aoa
from hfjax.attacks.api import REGISTRY, AttackError, AttackSpec, available, get, register
from hfjax.attacks.benign import benign
from hfjax.attacks.hft import hft
from hfjax.attacks.prefill import prefill
from hfjax.attacks.pure_harmful import pure_harmful
from hfjax.attacks.restructure import restructure
from hfjax.attacks.trigger_poison import trigger_poison
from hfjax.attacks.virus import virus

__all__ = ["REGISTRY", "AttackError", "AttackSpec", "aoa", "available", "benign", "get", "hft",
           "prefill", "pure_harmful", "register", "restructure", "trigger_poison", "virus"]
