"""Several gradient defenses at one stage, as one: `--align_defense=vaccine+booster`.

The transforms chain in the order given (`optax.chain(vaccine, booster, optimizer)`: Vaccine
replaces the incoming gradient with its perturbed one, Booster adds its term; that chain is
Booster's perturbation-aware variant). What the train step must do for the chain is the union of
what each needs: one primary batch (they must agree), the step's activation gradients if any
needs them, at most one perturbation of the step's own pass, at most one paired stream. The
declared cost is the sum of the parts less the step's own pass, which they share:
Σ cost_i − (k − 1)(1F+1B).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import optax

from hfjax.defenses.api import Cost, DefenseError, DefenseSpec, StepOptions, get


@dataclasses.dataclass(frozen=True)
class DefenseChoice:
    """A defense picked by name with its hyper-parameters."""

    spec: DefenseSpec
    hparams: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def named(cls, name: str, **hparams) -> DefenseChoice:
        return cls(get(name), hparams)


def _one(values: list, what: str, names: list[str]):
    distinct = [v for i, v in enumerate(values) if v is not None and v not in values[:i]]
    if len(distinct) > 1:
        raise DefenseError(f"{' + '.join(names)} cannot run in one step: they need different "
                           f"{what} ({distinct})")
    return distinct[0] if distinct else None


def step_options(choices: Sequence[DefenseChoice], default_primary: str) -> StepOptions:
    """What the train step must do for the chained gradient defenses (module docstring)."""
    if not choices:
        return StepOptions(primary=default_primary)
    names = [c.name for c in choices]
    opts = [c.spec.step_options(**c.hparams) for c in choices]
    sizes: dict[str, int] = {}
    for o in opts:
        for name, size in o.batch_sizes:
            if sizes.setdefault(name, size) != size:
                raise DefenseError(f"{' + '.join(names)} read {name!r} batches of different "
                                   f"sizes ({sizes[name]} and {size})")
    return StepOptions(
        primary=_one([o.primary for o in opts], "primary batches", names),
        primary_phase=_one([o.primary_phase for o in opts], "phase clocks", names),
        activation_grads=any(o.activation_grads for o in opts),
        primary_perturb=_one([o.primary_perturb for o in opts], "perturbations of the step's "
                             "own pass", names),
        batch_sizes=tuple(sizes.items()),
        paired=_one([o.paired or None for o in opts], "paired streams", names) or ())


def transforms(choices: Sequence[DefenseChoice], **run_inputs) -> list:
    """The chained optax transforms of gradient defenses, built with the run inputs
    (`total_steps`) they take."""
    other = [(c.name, c.spec.level) for c in choices if c.spec.level != "gradient"]
    if other:
        raise DefenseError(f"only gradient defenses chain into the optimizer; got {other}")
    return [c.spec.build_for_run(c.hparams, **run_inputs) for c in choices]


def batches(choices: Sequence[DefenseChoice]) -> tuple[str, ...]:
    """Every batch name the chain reads, in order of first use."""
    return tuple(dict.fromkeys(n for c in choices for n in c.spec.batches))


def cost(choices: Sequence[DefenseChoice]) -> Cost | None:
    """Σ cost_i − (k − 1)(1F+1B): the step's own pass is shared."""
    if not choices or any(c.spec.cost is None for c in choices):
        return None
    k = len(choices)
    return Cost(sum(c.spec.cost.forward for c in choices) - (k - 1),
                sum(c.spec.cost.backward for c in choices) - (k - 1))


def chain(choices: Sequence[DefenseChoice], **run_inputs) -> optax.GradientTransformationExtraArgs:
    """`optax.chain` of the defenses' transforms (to put before an optimizer)."""
    return optax.chain(*transforms(choices, **run_inputs))
