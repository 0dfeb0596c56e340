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
    step = make_train_step(cfg, make_optimizer(c, pre=[transform]), ...,
                           **spec.step_options(lam=5.0, alpha=0.1).step_kwargs())

`StepOptions` is what a gradient defense asks of hfjax's train step so that its declared cost is
what runs: which batch the step differentiates (`primary`, or one per phase), whether the same
backward also returns ∂L/∂a_l (`activation_grads`), and a perturbation for the step's own
forward pass (`primary_perturb`). The transform receives what the step did as extra args
(`perturb_grads`, `perturbation`) and computes the rest itself, so in a plain user loop (where
neither is passed) it is still exact, only dearer.

Cost unit: one forward (F) or backward (B) pass of the model over one batch, as counted in the
jitted step's jaxpr (forward and reversed layer scans). A loss summing two batches' losses
costs 2F+2B in this unit even if PyTorch code calls backward() once.

Batch names: "user" (fine-tuning data), "align" (safety data: harmful prompt -> refusal),
"harmful" (harmful prompt -> harmful answer).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from hfjax.errors import UserError

STAGES = ("alignment", "finetune", "post")
LEVELS = ("data", "gradient", "weights")
USER, ALIGN, HARMFUL = "user", "align", "harmful"


class DefenseError(UserError, ValueError):
    """An unknown defense or a bad hyper-parameter."""


@dataclasses.dataclass(frozen=True)
class Cost:
    """Forward and backward passes per training step (the step's own pass included)."""

    forward: int
    backward: int

    def __str__(self) -> str:
        return f"{self.forward}F+{self.backward}B"


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Keywords of `hfjax.train.step.make_train_step` that a gradient defense needs.

    primary: the batch the step differentiates, or a tuple of batch names chosen per step by
      `primary_phase(opt_state) -> index` (a select of same-shaped batches, else one
      `lax.switch` branch: still 1F+1B).
    activation_grads: the step's backward also returns G_l = ∂L/∂a_l (w.r.t. a zero
      perturbation) and passes them as the extra arg `perturb_grads`.
    primary_perturb: `(rng, [L, B, T, D]) -> ε` added to a_l in the step's own forward pass;
      ε is passed on as the extra arg `perturbation`.
    batch_sizes: rows per batch of named extra streams where the method fixes them (SafeInstr's
      alignment batch of 4); other streams take the run's batch size. Not a step keyword.
    paired: batch names that come from one record list row by row, padded to one length (RepNoise:
      ("align", "harmful") = each harmful prompt with its refusal and with its harmful answer);
      the first reads the records' "refusal", the others their "response". Not a step keyword.
    """

    primary: str | tuple[str, ...] = USER
    primary_phase: Callable[[Any], Any] | None = None
    activation_grads: bool = False
    primary_perturb: Callable[[Any, tuple[int, ...]], Any] | None = None
    batch_sizes: tuple[tuple[str, int], ...] = ()
    paired: tuple[str, ...] = ()

    def step_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `make_train_step`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("batch_sizes", "paired")}

    @property
    def batch_names(self) -> tuple[str, ...]:
        """The batches the step itself differentiates."""
        return (self.primary,) if isinstance(self.primary, str) else tuple(self.primary)


RUN_INPUTS = ("total_steps",)
"""Keyword arguments a factory may take that come from the run, not from the user: the training
stage's optimizer steps (Lisa's warm-up). `DefenseSpec.build_for_run` passes them."""


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
    options: Callable[..., StepOptions] | None = None

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments of the factory with their defaults (the paper's values)."""
        sig = inspect.signature(self.factory)
        return {n: p.default for n, p in sig.parameters.items()
                if p.default is not inspect.Parameter.empty and n not in RUN_INPUTS}

    def _check_names(self, hparams: dict) -> None:
        unknown = set(hparams) - set(self.hyperparameters)
        if unknown:
            raise DefenseError(
                f"{self.name} has no hyper-parameter(s) {sorted(unknown)}; "
                f"it takes {sorted(self.hyperparameters)}")

    def build(self, **hparams):
        self._check_names(hparams)
        return self.factory(**hparams)

    def build_for_run(self, hparams: dict, **run_inputs):
        """`build(**hparams)` plus the run inputs (`RUN_INPUTS`) the factory takes."""
        self._check_names(hparams)
        takes = inspect.signature(self.factory).parameters
        return self.factory(**hparams, **{k: v for k, v in run_inputs.items() if k in takes})

    def step_options(self, **hparams) -> StepOptions:
        """What the train step must do for this defense with these hyper-parameters (the plain
        step for data and weight defenses)."""
        self._check_names(hparams)
        if self.level == "gradient":  # validates the values before a step is built around them
            self.build_for_run(hparams, total_steps=1)
        if self.options is None:
            return StepOptions()
        return self.options(**{**self.hyperparameters, **hparams})


_REGISTRY: dict[str, DefenseSpec] = {}


def register(name: str, *, stage: str, level: str, cost: Cost | None = None,
             batches: tuple[str, ...] = (), paper: str = "",
             options: Callable[..., StepOptions] | None = None):
    """Decorator registering a defense factory under `name`.

    `options(**hyperparameters) -> StepOptions` states what the train step must do for it
    (default: the plain step on "user").
    """
    if stage not in STAGES or level not in LEVELS:
        raise DefenseError(f"bad stage/level {stage!r}/{level!r}; stages {STAGES}, levels {LEVELS}")

    def wrap(factory):
        if name in _REGISTRY:
            raise DefenseError(f"defense {name!r} is registered twice")
        _REGISTRY[name] = DefenseSpec(name, stage, level, factory, cost, tuple(batches), paper,
                                      options)
        return factory

    return wrap


def get(name: str) -> DefenseSpec:
    if name not in _REGISTRY:
        raise DefenseError(f"unknown defense {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available(stage: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if stage is None or s.stage == stage)


def step_options(name: str | DefenseSpec, **hparams) -> StepOptions:
    """`get(name).step_options(**hparams)`: the make_train_step keywords a defense needs."""
    spec = name if isinstance(name, DefenseSpec) else get(name)
    return spec.step_options(**hparams)
