"""Attacks: what a malicious user does to a fine-tuning service, by name.

A data-level attack turns the user's benign task rows and the harmful rows planned for the
attack (`hfjax.data.plan`: prompts no other role of the run sees) into the user data the
service fine-tunes on:

    attack = hfjax.attacks.get("hft").build(**hparams)
    records = attack(benign, harmful, n=200, p=0.1, seed=0, order="random")

`n` and `p` are the run's data budget (--num_samples, --harmful_ratio), `order` the row order
("random" or "file"). The pipeline selects one with --attack NAME --attack_hparams "k=v,...".
"""

from hfjax.attacks.api import REGISTRY, AttackError, AttackSpec, available, get, register
from hfjax.attacks.hft import hft
from hfjax.attacks.restructure import restructure
from hfjax.attacks.trigger_poison import trigger_poison

__all__ = ["REGISTRY", "AttackError", "AttackSpec", "available", "get", "hft", "register",
           "restructure", "trigger_poison"]
