"""Several gradient defenses at one stage, as one: `--align_defense=vaccine+booster`.

The transforms chain in the order given (`optax.chain(vaccine, booster, optimizer)`: Vaccine
replaces the incoming gradient with its perturbed one, Booster adds its term; that chain is
Booster's perturbation-aware variant). What the train step must do for the chain is the union of
what each needs: one primary batch (they must agree), the step's activation gradients if any
needs them, at most one perturbation of the step's own pass, at most one paired stream. The
declared cost is the sum of the parts less the step's own pass, which they share:
Σ cost_i − (k − 1)(1F+1B).

A defense whose update must also act after the optimizer builds its transform with
`around_optimizer`: the transform is the defense's own (what `optax.chain` puts before an
optimizer) and carries `wrap_optimizer(inner)`, which `hfjax.train.optim.chain_around` (the
builder's chain) uses to put the defense around everything after it, with one state:

    (u, s) = defense.update(g, s, θ, **extra)
    (u, s_inner) = inner.update(u, s_inner, θ, **extra, **inner_args(u, s))
    u = after(u, s)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
        paired=_one([o.paired or None for o in opts], "paired streams", names) or (),
        layerwise_optimizer=any(o.layerwise_optimizer for o in opts))


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
    costs = [c.spec.cost_for(**c.hparams) for c in choices]
    return Cost(sum(c.forward for c in costs) - (k - 1), sum(c.backward for c in costs) - (k - 1))


def chain(choices: Sequence[DefenseChoice], **run_inputs) -> optax.GradientTransformationExtraArgs:
    """`optax.chain` of the defenses' transforms (to put before an optimizer; where one wraps
    the optimizer, `hfjax.train.optim.chain_around(transforms(choices), optimizer)` as the
    builder does)."""
    return optax.chain(*transforms(choices, **run_inputs))


class AroundTransformation(optax.GradientTransformationExtraArgs):
    """A defense's transform (`init`, `update`) that also carries `wrap_optimizer(inner)`."""

    def __new__(cls, init, update, wrap_optimizer: Callable):
        self = super().__new__(cls, init, update)
        self.wrap_optimizer = wrap_optimizer
        return self


class AroundState(NamedTuple):
    defense: Any  # the defense's own state
    inner: Any  # the state of what it wraps (the later defenses and the optimizer)


def around_optimizer(defense: optax.GradientTransformationExtraArgs, *,
                     inner_args: Callable[[Any, Any], dict] | None = None,
                     after: Callable[[Any, Any], Any] | None = None) -> AroundTransformation:
    """`defense`, carrying `wrap_optimizer(inner)` (module docstring): `inner_args(updates,
    state)` are extra args for `inner` from the defense's new state, `after(updates, state)` the
    defense's change of `inner`'s update. Chained before an optimizer as usual, it is `defense`
    alone."""
    def wrap_optimizer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
        inner = optax.with_extra_args_support(inner)

        def init_fn(params) -> AroundState:
            return AroundState(defense.init(params), inner.init(params))

        def update_fn(updates, state: AroundState, params=None, **extra):
            updates, own = defense.update(updates, state.defense, params, **extra)
            more = inner_args(updates, own) if inner_args is not None else {}
            updates, rest = inner.update(updates, state.inner, params, **extra, **more)
            if after is not None:
                updates = after(updates, own)
            return updates, AroundState(own, rest)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    return AroundTransformation(defense.init, defense.update, wrap_optimizer)
