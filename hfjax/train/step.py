"""The train step: one `jax.jit` function `(state, frozen, batches) -> (state, metrics)`.

    (L, aux), g = value_and_grad(loss_fn)(θ, batches[primary])
    u, opt_state = optimizer.update(g, opt_state, θ, loss_fn=loss_fn, batches=batches, rng=r)
    θ ← θ + u

`batches` is a dict of named batches ("user", and e.g. "harmful" / "align" for defenses). The
optimizer receives the gradient oracle `loss_fn(θ, batch, **forward_kw)` and all batches as extra
args, so a defense chained before AdamW can evaluate losses at perturbed weights or activations
and on other batches. Frozen base weights are an argument (never a jit constant); the state is
donated; every input and output has a sharding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from jax.sharding import Mesh

from hfjax.models.config import ModelConfig
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


def make_train_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformationExtraArgs,
    *,
    mesh: Mesh,
    state_shardings: state_lib.TrainState,
    frozen_shardings,
    full_finetune: bool = False,
    primary: str = "user",
    learning_rate_fn: Callable | None = None,
    accumulation_steps: int = 1,
) -> CompileCounter:
    """Build the jitted, sharded, state-donating train step."""

    def step(state: state_lib.TrainState, frozen, batches: dict):
        loss_fn = make_loss_fn(cfg, frozen, full_finetune=full_finetune)
        rng, sub = jax.random.split(state.rng)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable, batches[primary])
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable,
                                              loss_fn=loss_fn, batches=batches, rng=sub)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": loss,
            "tokens": aux["tokens"],
            "accuracy": aux["accuracy"],
            "grad_norm": optax.tree.norm(grads),
        }
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
    """(state placed with its shardings, the shardings)."""
    shape = jax.eval_shape(lambda t: state_lib.create(t, optimizer, seed), trainable)
    t_sh = state_lib.trainable_shardings(cfg, mesh, shape.trainable, full_finetune)
    s_sh = state_lib.state_shardings(shape, mesh, t_sh)
    init = jax.jit(lambda t: state_lib.create(t, optimizer, seed), in_shardings=(t_sh,),
                   out_shardings=s_sh)
    return init(trainable), s_sh
