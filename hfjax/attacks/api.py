"""The attack registry (`hfjax.registry`): an attack is a factory of a records transform.

Two kinds (`KINDS`):
  data       `factory(**hparams) -> fn(benign, harmful, *, n, p, seed, order) -> records`: the
             user data the service fine-tunes on (--attack);
  inference  `factory(**hparams) -> fn(records, *, tokenizer) -> records`: the harmful
             evaluation rows as the attacker presents them to the model, e.g. with the start of
             the answer prefilled (--eval_attack); applied to every evaluated model.

An attack's `protocol` is its paper's training settings, by run flag name (`SETTINGS`): the
pipeline applies each one the user did not set (`hfjax.pipeline.flags`). `requires` are
settings the attack cannot run without (pure harmful fine-tuning: harmful_ratio 1); they are
applied the same way, and a value the user set against them is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from hfjax.errors import UserError
from hfjax.registry import Registry, hyperparameters, parse_hparams

DATA, INFERENCE = "data", "inference"
KINDS = (DATA, INFERENCE)
SETTINGS = ("lr", "epochs", "batch_size", "num_samples", "harmful_ratio", "weight_decay",
            "max_grad_norm")
"""The fine-tuning settings a protocol may set (run flag names)."""


class AttackError(UserError, ValueError):
    """An unknown attack or a bad hyper-parameter."""


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A registered attack (module docstring).

    A data attack's function may carry `eval_prompt(record) -> record`: how the attacker asks at
    inference (e.g. under an identity-shifting system prompt); the evaluation of the attacked
    model then asks every harmful prompt that way (`--eval_attack_format`, default on). An
    inference attack's function may carry `score`: "full" (the judge reads the prefilled text
    and the continuation) or "continuation"."""

    name: str
    factory: Callable[..., Callable]
    paper: str
    kind: str = DATA
    protocol: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    requires: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return hyperparameters(self.factory)

    def parse(self, text: str) -> dict[str, Any]:
        """'k=v,k=v' typed like the defaults."""
        return parse_hparams(self.name, self.hyperparameters, text, AttackError)

    def build(self, **hparams) -> Callable:
        unknown = set(hparams) - set(self.hyperparameters)
        if unknown:
            raise AttackError(f"{self.name} has no hyper-parameter(s) {sorted(unknown)}; it "
                              f"takes {sorted(self.hyperparameters)}")
        return self.factory(**hparams)


REGISTRY: Registry[AttackSpec] = Registry("attack", AttackError)


def register(name: str, *, paper: str = "", kind: str = DATA,
             protocol: Mapping[str, Any] | None = None,
             requires: Mapping[str, Any] | None = None):
    """Decorator registering an attack factory under `name` (module docstring)."""
    if kind not in KINDS:
        raise AttackError(f"attack {name!r}: kind must be one of {KINDS}, got {kind!r}")
    settings = {**(protocol or {}), **(requires or {})}
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown or (kind == INFERENCE and settings):
        raise AttackError(f"attack {name!r}: a protocol sets fine-tuning settings {SETTINGS} of a "
                          f"data attack; got {unknown or sorted(settings)} ({kind} attack)")

    def wrap(factory):
        REGISTRY.add(name, AttackSpec(name, factory, paper, kind, dict(protocol or {}),
                                      dict(requires or {})))
        return factory
    return wrap


def get(name: str) -> AttackSpec:
    return REGISTRY.get(name)


def available(kind: str | None = None) -> list[str]:
    """Registered attack names (of `kind` when given)."""
    return REGISTRY.available(None if kind is None else lambda s: s.kind == kind)
