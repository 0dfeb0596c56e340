"""The attack registry (`hfjax.registry`): an attack is a factory of a records transform."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hfjax.errors import UserError
from hfjax.registry import Registry, hyperparameters, parse_hparams


class AttackError(UserError, ValueError):
    """An unknown attack or a bad hyper-parameter."""


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A registered attack: `factory(**hparams) -> fn(benign, harmful, *, n, p, seed, order)`.

    The returned function may carry `eval_prompt(record) -> record`: how the attacker asks at
    inference (e.g. under an identity-shifting system prompt); the evaluation of the attacked
    model then asks every harmful prompt that way (`--eval_attack_format`, default on)."""

    name: str
    factory: Callable[..., Callable]
    paper: str

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


def register(name: str, *, paper: str = ""):
    """Decorator registering an attack factory under `name`."""
    def wrap(factory):
        REGISTRY.add(name, AttackSpec(name, factory, paper))
        return factory
    return wrap


def get(name: str) -> AttackSpec:
    return REGISTRY.get(name)


def available() -> list[str]:
    return REGISTRY.available()
