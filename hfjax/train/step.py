"""The train step: one `jax.jit` function `(state, frozen, batches) -> (state, metrics)`.

    (L, aux), g = value_and_grad(loss_fn)(θ, batches[primary])
    u, opt_state = optimizer.update(g, opt_state, θ, loss_fn=loss_fn, batches=batches, rng=r,
                                    **hints)
    θ ← θ + u

`batches` is a dict of named batches ("user", and e.g. "harmful" / "align" for defenses). The
optimizer receives what `hfjax.defenses.api` calls the gradient contract: the oracle
`loss_fn = make_loss_fn(cfg, frozen)` (`loss_fn(θ, batch, *, perturb, capture, ...)`), all
batches, the key r, and the `hfjax.defenses.Hints` the step computed anyway (`perturb_grads`,
`perturbation`, `dropout_rng`); nothing else. A defense chained before AdamW evaluates losses at
perturbed weights or activations and on other batches through the oracle. Frozen base weights
are an argument (never a jit constant); the state is donated; every input and output has a
sharding.

Keys: (next state.rng, r) = split(state.rng); with LoRA dropout (a `LoRA` trainable whose
dropout p > 0) also d = fold_in(state.rng, 2): every pass of the step, the oracle's included,
runs with `forward(..., dropout_rng=d)` (one set of masks per step and batch shape), and d goes
to the optimizer as the hint `dropout_rng`. With p = 0 the step traces no dropout op and no
third key.

Defense options (keyword-only, all off by default; `hfjax.defenses.StepOptions` sets them) change
only what the one forward+backward of the step computes, see `primary_gradient`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hfjax.models import prefix as prefix_lib
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.lora import LoRA
from hfjax.train import state as state_lib
from hfjax.train.loss import make_loss_fn


class CompileCounter:
    """Wraps a jitted step and counts distinct input signatures (each one is a compilation)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.signatures: set = set()

    def __call__(self, state, frozen, batches):
        sig = tuple(sorted((k, tuple(v.shape)) for b in batches.values() for k, v in b.items()))
        self.signatures.add(tuple(sorted(batches)) + sig)
        return self.fn(state, frozen, batches)

    @property
    def compiles(self) -> int:
        return len(self.signatures)


def primary_gradient(
    cfg: ModelConfig,
    loss_fn: Callable,
    trainable,
    opt_state,
    batches: dict,
    rng: jax.Array,
    *,
    primary: str | tuple[str, ...] = "user",
    primary_phase: Callable | None = None,
    activation_grads: bool = False,
    primary_perturb: Callable | None = None,
) -> tuple[jax.Array, dict, object, dict]:
    """The step's one forward + backward: (loss, aux, ∇θ, hints for the optimizer).

        L(θ, ε) = ℓ(θ; primary batch, a_l + ε_l)

    ε = primary_perturb(rng, [L, B, T, D]) if given (the hint `perturbation`), else none.
    With activation_grads the same backward returns G = ∂L/∂ε (the hint `perturb_grads`).
    With a tuple `primary`, the batch is primary[primary_phase(opt_state)]: an elementwise
    select when the batches have the same shapes, else a `lax.switch` (one branch runs).
    """
    names = (primary,) if isinstance(primary, str) else tuple(primary)
    if len(names) > 1 and primary_phase is None:
        raise ValueError(f"primary batches {names} need a primary_phase function")
    if len(names) > 1 and (activation_grads or primary_perturb is not None):
        raise ValueError("phase-dependent primary batches do not combine with activation_grads "
                         "or primary_perturb")

    def objective(theta, eps, batch):
        return loss_fn(theta, batch, **({} if eps is None else {"perturb": eps}))

    hints: dict = {}
    if len(names) > 1 and _same_structure([batches[n] for n in names]):
        # one forward + backward on the selected batch: selecting the (small) id arrays costs
        # nothing, where a `lax.switch` over two value_and_grads cost Lisa ~12% of the step
        batch = select_batch(primary_phase(opt_state), [batches[n] for n in names])
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable, None, batch)
        return loss, aux, grads, hints
    if len(names) > 1:
        def branch(name):
            def run():
                (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(
                    trainable, None, batches[name])
                return loss, aux, g
            return run

        loss, aux, grads = jax.lax.switch(primary_phase(opt_state), [branch(n) for n in names])
        return loss, aux, grads, hints

    batch = batches[names[0]]
    shape = (cfg.num_layers, *batch["input_ids"].shape, cfg.hidden_size)
    eps = None
    if primary_perturb is not None:
        eps = hints["perturbation"] = primary_perturb(rng, shape)
    if activation_grads:
        eps = jnp.zeros(shape, at_least_float32(cfg.dtype)) if eps is None else eps
        (loss, aux), (grads, hints["perturb_grads"]) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(trainable, eps, batch)
    else:
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable, eps, batch)
    return loss, aux, grads, hints


def _same_structure(batches: list[dict]) -> bool:
    """Whether the batches have the same keys and every array the same shape and dtype."""
    def signature(b):
        return jax.tree.structure(b), [(x.shape, x.dtype) for x in jax.tree.leaves(b)]
    return all(signature(b) == signature(batches[0]) for b in batches[1:])


def select_batch(index: jax.Array, batches: list[dict]) -> dict:
    """batches[index] for a traced index, as an elementwise select over same-shaped batches."""
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, len(batches) - 1)
    if len(batches) == 2:
        index = index.astype(bool)
    return jax.tree.map(lambda *xs: jax.lax.select_n(index, *xs), *batches)


def make_train_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformationExtraArgs,
    *,
    mesh: Mesh,
    state_shardings: state_lib.TrainState,
    frozen_shardings,
    full_finetune: bool = False,
    primary: str | tuple[str, ...] = "user",
    learning_rate_fn: Callable | None = None,
    accumulation_steps: int = 1,
    primary_phase: Callable | None = None,
    activation_grads: bool = False,
    primary_perturb: Callable | None = None,
    skip_nonfinite: bool = False,
) -> CompileCounter:
    """Build the jitted, sharded, state-donating train step.

    primary_phase, activation_grads, primary_perturb: what a gradient defense needs from the
    step's own forward+backward (see `primary_gradient`); take them from
    `hfjax.defenses.step_options(name, **hparams).step_kwargs()`.
    skip_nonfinite: a step whose loss or gradient norm is not finite leaves the trainable
    weights and the optimizer state as they were (the step counter and rng still advance, so
    the next step sees the next batch); its metrics row has `skipped` 1.
    """
    defense_options = dict(primary=primary, primary_phase=primary_phase,
                           activation_grads=activation_grads, primary_perturb=primary_perturb)

    def step(state: state_lib.TrainState, frozen, batches: dict):
        loss_fn = make_loss_fn(cfg, frozen, full_finetune=full_finetune)
        rng, sub = jax.random.split(state.rng)
        dropout_kw: dict = {}
        if isinstance(state.trainable, LoRA) and state.trainable.dropout:
            dropout_kw["dropout_rng"] = jax.random.fold_in(state.rng, 2)
            loss_fn = functools.partial(loss_fn, **dropout_kw)
        loss, aux, grads, hints = primary_gradient(cfg, loss_fn, state.trainable, state.opt_state,
                                                   batches, sub, **defense_options)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable,
                                              loss_fn=loss_fn, batches=batches, rng=sub,
                                              **hints, **dropout_kw)
        trainable = optax.apply_updates(state.trainable, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "tokens": aux["tokens"],
            "accuracy": aux["accuracy"],
            "grad_norm": grad_norm,
        }
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            trainable, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (trainable, opt_state), (state.trainable, state.opt_state))
            metrics["skipped"] = (~finite).astype(jnp.float32)
        if learning_rate_fn is not None:
            metrics["lr"] = learning_rate_fn(state.step // accumulation_steps)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                                  rng=rng)
        return new_state, metrics

    batch_sh = state_lib.batch_sharding(mesh)
    rep = state_lib.replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_sh),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
    return CompileCounter(jitted)


def put_batches(batches: dict, mesh: Mesh) -> dict:
    """Host-local numpy batches -> global arrays split over (data, fsdp).

    Each process passes only its own rows; `jax.make_array_from_process_local_data` assembles
    the global batch, so the same call works on one host and on a pod.
    """
    sharding = state_lib.batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batches)


def init_state(cfg: ModelConfig, trainable, optimizer, *, mesh: Mesh, seed: int,
               full_finetune: bool = False) -> tuple[state_lib.TrainState, state_lib.TrainState]:
    """(state placed with its shardings, the shardings). A prefix trainable is placed by its
    logical axes (`models.prefix.logical_axes`), the others by `state.trainable_shardings`."""
    shape = jax.eval_shape(lambda t: state_lib.create(t, optimizer, seed), trainable)
    if isinstance(trainable, prefix_lib.Prefix):
        t_sh = prefix_lib.shardings(shape.trainable, mesh)
    else:
        t_sh = state_lib.trainable_shardings(cfg, mesh, shape.trainable, full_finetune)
    s_sh = state_lib.state_shardings(shape, mesh, t_sh)
    init = jax.jit(lambda t: state_lib.create(t, optimizer, seed), in_shardings=(t_sh,),
                   out_shardings=s_sh)
    return init(trainable), s_sh
