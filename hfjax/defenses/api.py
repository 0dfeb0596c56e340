"""The defense API: what a defense is, what it costs, and the registry the binaries use.

A defense acts at one of three levels:
  data      `records -> records` before tokenization (safety-data mixing, BEA triggers);
  gradient  an optax `GradientTransformationExtraArgs` chained before the optimizer; its
            `update(g, state, θ, *, loss_fn, batches, rng, **extra)` may call the gradient
            oracle `loss_fn(θ, batch, **forward_kw) -> (loss, aux)` on any named batch;
  weights   `(cfg, params, lora, **inputs) -> lora` applied after training (SafeLoRA, Antidote).
Every defense declares its cost per step in forward/backward passes (including the step's own
gradient of the primary batch) and the named batches it reads; a test counts the passes.

The binaries select a defense by name and pass its hyper-parameters as flags:

    spec = defenses.get("booster"); transform = spec.build(lam=5.0, alpha=0.1)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

STAGES = ("alignment", "finetune", "post")
LEVELS = ("data", "gradient", "weights")


class DefenseError(ValueError):
    """An unknown defense or a bad hyper-parameter."""


@dataclasses.dataclass(frozen=True)
class Cost:
    """Forward and backward passes per training step (the step's own pass included)."""

    forward: int
    backward: int

    def __str__(self) -> str:
        return f"{self.forward}F+{self.backward}B"


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """A registered defense: how to build it and what it needs."""

    name: str
    stage: str
    level: str
    factory: Callable[..., Any]
    cost: Cost | None
    batches: tuple[str, ...]
    paper: str

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments of the factory with their defaults (the paper's values)."""
        sig = inspect.signature(self.factory)
        return {n: p.default for n, p in sig.parameters.items()
                if p.default is not inspect.Parameter.empty}

    def build(self, **hparams):
        unknown = set(hparams) - set(self.hyperparameters)
        if unknown:
            raise DefenseError(
                f"{self.name} has no hyper-parameter(s) {sorted(unknown)}; "
                f"it takes {sorted(self.hyperparameters)}")
        return self.factory(**hparams)


_REGISTRY: dict[str, DefenseSpec] = {}


def register(name: str, *, stage: str, level: str, cost: Cost | None = None,
             batches: tuple[str, ...] = (), paper: str = ""):
    """Decorator registering a defense factory under `name`."""
    if stage not in STAGES or level not in LEVELS:
        raise DefenseError(f"bad stage/level {stage!r}/{level!r}; stages {STAGES}, levels {LEVELS}")

    def wrap(factory):
        if name in _REGISTRY:
            raise DefenseError(f"defense {name!r} is registered twice")
        _REGISTRY[name] = DefenseSpec(name, stage, level, factory, cost, tuple(batches), paper)
        return factory

    return wrap


def get(name: str) -> DefenseSpec:
    if name not in _REGISTRY:
        raise DefenseError(f"unknown defense {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available(stage: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if stage is None or s.stage == stage)
