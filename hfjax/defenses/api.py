"""The defense API: what a defense is, what it costs, and the registry the binaries use.

A defense acts at one of three levels:
  data      `records -> records` before tokenization (safety-data mixing, BEA triggers);
  gradient  an optax `GradientTransformationExtraArgs` chained before the optimizer;
  weights   `(cfg, params, lora, **inputs) -> lora` applied after training (SafeLoRA, Antidote).
Every defense declares its cost per step in forward/backward passes (including the step's own
gradient of the primary batch) and the named batches it reads; a test counts the passes.

The gradient contract. Every gradient defense's update is

    update(updates, state, params, *, loss_fn, batches, rng, **hints) -> (updates, state)

and reads nothing else: `params` θ; the gradient oracle
`loss_fn(θ, batch, *, perturb=None, capture=()) -> (loss, aux)` (`hfjax.train.loss.make_loss_fn`:
`perturb` [L, B, T, D] is added to the attention outputs, `capture` names come back in
aux["captured"], activations and the logit lens, from the same forward pass); `batches`, the
named batches of this step; `rng`, a fresh key per step; and the optional `Hints`, results the
train step computed anyway. A hint only saves passes: without it the defense computes the same
thing from the oracle, so a plain optax loop gives hfjax's step's update. Model config and base
weights never reach a defense; whatever it needs of them, the oracle computes. A missing
argument, batch, capture or a bad hyper-parameter raises `DefenseError` saying what is missing.

The binaries select a defense by name and pass its hyper-parameters as flags; the training
builder chains it and gives the train step its `StepOptions`:

    training = hfjax.train.builder.build_training(
        cfg, lora, mesh=mesh, optimizer=OptimizerConfig(...),
        defenses=[DefenseChoice.named("booster", lam=5.0, alpha=0.1)])

`StepOptions` is what a gradient defense asks of hfjax's train step so that its declared cost is
what runs: which batch the step differentiates (`primary`, or one per phase), whether the same
backward also returns ∂L/∂a_l (`activation_grads`, handed on as the hint `perturb_grads`), and
a perturbation for the step's own forward pass (`primary_perturb`, handed on as the hint
`perturbation`).

Cost unit: one forward (F) or backward (B) pass of the model over one batch, as counted in the
jitted step's jaxpr (forward and reversed layer scans). A loss summing two batches' losses
costs 2F+2B in this unit even if PyTorch code calls backward() once.

Batch names: "user" (fine-tuning data), "align" (safety data: harmful prompt -> refusal),
"harmful" (harmful prompt -> harmful answer).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import jax

from hfjax.errors import UserError
from hfjax.registry import hyperparameters

STAGES = ("alignment", "finetune", "post")
LEVELS = ("data", "gradient", "weights", "inference")
USER, ALIGN, HARMFUL = "user", "align", "harmful"


class DefenseError(UserError, ValueError):
    """An unknown defense, a bad hyper-parameter, or an update missing what it reads."""


class Hints(TypedDict, total=False):
    """The hint vocabulary: keyword arguments of a gradient defense's `update` that hfjax's train
    step hands over because it computed them anyway. All optional.

    perturb_grads: G_l = ∂L/∂a_l [L, B, T, D] at a zero perturbation, from the step's own
      backward on the primary batch (`StepOptions.activation_grads`; Vaccine's first pass).
    perturbation: ε [L, B, T, D] that the step added to a_l in its own forward pass
      (`StepOptions.primary_perturb`, drawn from the step's `rng`); the incoming gradient is then
      the gradient at a + ε (random Vaccine's pass).
    dropout_rng: the key of the step's LoRA dropout masks; the oracle the step passes already
      applies it (informational).
    noise: RepNoise's Gaussian ε_l [L, B, T, D], used as given instead of drawn from `rng`
      (to replay a draw).
    """

    perturb_grads: jax.Array
    perturbation: jax.Array
    dropout_rng: jax.Array
    noise: jax.Array


HINTS = tuple(Hints.__annotations__)
"""The hint names, in `Hints`' order."""

UPDATE_CALL = "opt.update(g, state, θ, loss_fn=..., batches=..., rng=...)"


def check_update(defense: str, params, loss_fn: Callable | None, batches: dict | None,
                 names: Sequence[str] = ()) -> None:
    """Raise one `DefenseError` listing what `defense`'s update lacks of what it reads: θ, the
    oracle `loss_fn`, `batches` and the batch `names` in them."""
    missing = [what for what, absent in (("params θ", params is None),
                                         ("the extra arg loss_fn", loss_fn is None),
                                         ("the extra arg batches", batches is None)) if absent]
    missing += [f"a {n!r} batch" for n in names if batches is not None and n not in batches]
    if missing:
        got = "" if batches is None else f" (got batches {sorted(batches)})"
        raise DefenseError(f"{defense} needs {', '.join(missing)}{got}: {UPDATE_CALL}")


def captures(aux: dict, names: Sequence[str], defense: str) -> dict:
    """{name: aux["captured"][name]} of an oracle call with `capture=names`, or a `DefenseError`
    naming the captures the oracle did not return."""
    got = aux.get("captured", {})
    missing = [n for n in names if n not in got]
    if missing:
        raise DefenseError(
            f"{defense} reads the captures {missing} of loss_fn(θ, batch, capture="
            f"{tuple(names)}) from aux['captured'], but the oracle returned {sorted(got)}; "
            "hfjax.train.loss.make_loss_fn's oracle returns them")
    return {n: got[n] for n in names}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Forward and backward passes per training step (the step's own pass included)."""

    forward: int
    backward: int

    def __str__(self) -> str:
        return f"{self.forward}F+{self.backward}B"


@dataclasses.dataclass(frozen=True)
class CostOf:
    """A cost that depends on the hyper-parameters (TAR's K inner steps): `of(**hparams) -> Cost`
    with every hyper-parameter given, `formula` the cost as the docs write it."""

    of: Callable[..., Cost]
    formula: str

    def __str__(self) -> str:
        return self.formula


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Keywords of `hfjax.train.step.make_train_step` that a gradient defense needs.

    primary: the batch the step differentiates, or a tuple of batch names chosen per step by
      `primary_phase(opt_state) -> index` (a select of same-shaped batches, else one
      `lax.switch` branch: still 1F+1B).
    activation_grads: the step's backward also returns G_l = ∂L/∂a_l (w.r.t. a zero
      perturbation) and passes them as the hint `perturb_grads`.
    primary_perturb: `(rng, [L, B, T, D]) -> ε` added to a_l in the step's own forward pass;
      ε is passed on as the hint `perturbation`.
    batch_sizes: rows per batch of named extra streams where the method fixes them (SafeInstr's
      alignment batch of 4); other streams take the run's batch size. Not a step keyword.
    paired: batch names that come from one record list row by row, padded to one length (RepNoise:
      ("align", "harmful") = each harmful prompt with its refusal and with its harmful answer);
      the first reads the records' "refusal", the others their "response". Not a step keyword.
    layerwise_optimizer: hfjax's AdamW keeps its state per layer slice of every LoRA leaf
      (torch's one parameter per layer and module) and skips, as torch's AdamW skips a parameter
      without a gradient, the slices that the extra arg `trained` marks False, which the
      defense's `wrap_optimizer` hands it (T-Vaccine; `hfjax.train.optim.layerwise_adamw`).
      Not a step keyword: the builder's optimizer.
    """

    primary: str | tuple[str, ...] = USER
    primary_phase: Callable[[Any], Any] | None = None
    activation_grads: bool = False
    primary_perturb: Callable[[Any, tuple[int, ...]], Any] | None = None
    batch_sizes: tuple[tuple[str, int], ...] = ()
    paired: tuple[str, ...] = ()
    layerwise_optimizer: bool = False

    def step_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `make_train_step`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("batch_sizes", "paired", "layerwise_optimizer")}

    @property
    def batch_names(self) -> tuple[str, ...]:
        """The batches the step itself differentiates."""
        return (self.primary,) if isinstance(self.primary, str) else tuple(self.primary)


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """A registered defense: how to build it and what it needs."""

    name: str
    stage: str
    level: str
    factory: Callable[..., Any]
    cost: Cost | CostOf | None
    batches: tuple[str, ...]
    paper: str
    options: Callable[..., StepOptions] | None = None
    other_stages: tuple[str, ...] = ()  # a data defense usable at more than one stage

    @property
    def stages(self) -> tuple[str, ...]:
        """Every stage the defense may be chosen for, its home `stage` first."""
        return (self.stage, *self.other_stages)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments of the factory with their defaults (the paper's values)."""
        return hyperparameters(self.factory)

    def cost_for(self, **hparams) -> Cost | None:
        """The passes per step with these hyper-parameters (the defaults for the others)."""
        self._check_names(hparams)
        if isinstance(self.cost, CostOf):
            return self.cost.of(**{**self.hyperparameters, **hparams})
        return self.cost

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


def register(name: str, *, stage: str | tuple[str, ...], level: str,
             cost: Cost | CostOf | None = None,
             batches: tuple[str, ...] = (), paper: str = "",
             options: Callable[..., StepOptions] | None = None):
    """Decorator registering a defense factory under `name`.

    `stage`: its stage, or a tuple of stages for a data defense that applies at several (the
    first is its home stage, the one `--defense NAME` picks). `options(**hyperparameters) ->
    StepOptions` states what the train step must do for it (default: the plain step on "user").
    A factory may carry `finalize(trainable, opt_state) -> trainable`, which the pipeline applies
    after the stage's last step (Panacea's θ + ε); a data defense's built transform may carry
    `eval_prompt(record, ...) -> record`, how the final model is asked (BEA's secret, PTST's
    safety system prompt). A gradient defense whose update must also act after the optimizer
    returns `hfjax.defenses.compose.around_optimizer(transform, ...)`: its built transform then
    carries `wrap_optimizer(inner) -> transform`, and the builder's chain
    (`hfjax.train.optim.chain_around`) puts it around `inner`, everything chained after it
    (the later defenses, clipping, AdamW and its accumulation), instead of before it: SaLoRA
    projects AdamW's update as well; T-Vaccine hands AdamW the layers that train (the extra
    arg `trained`, with `StepOptions(layerwise_optimizer=True)`). In a plain optax loop the
    same is `transform.wrap_optimizer(optimizer)`.
    `cost`: a `Cost`, or a `CostOf` where the passes depend on the hyper-parameters (TAR's inner
    steps; `DefenseSpec.cost_for(**hparams)` gives the `Cost`).
    """
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    if not stages or any(s not in STAGES for s in stages) or level not in LEVELS:
        raise DefenseError(f"bad stage/level {stage!r}/{level!r}; stages {STAGES}, levels {LEVELS}")
    if len(stages) > 1 and level != "data":
        raise DefenseError(f"{name}: only a data defense may be registered for several stages")

    def wrap(factory):
        if name in _REGISTRY:
            raise DefenseError(f"defense {name!r} is registered twice")
        _REGISTRY[name] = DefenseSpec(name, stages[0], level, factory, cost, tuple(batches),
                                      paper, options, stages[1:])
        return factory

    return wrap


def get(name: str) -> DefenseSpec:
    if name not in _REGISTRY:
        raise DefenseError(f"unknown defense {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available(stage: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if stage is None or stage in s.stages)


def step_options(name: str | DefenseSpec, **hparams) -> StepOptions:
    """`get(name).step_options(**hparams)`: the make_train_step keywords a defense needs."""
    spec = name if isinstance(name, DefenseSpec) else get(name)
    return spec.step_options(**hparams)
