"""The train state pytree and its shardings.

TrainState = (step, trainable, opt_state, rng). `trainable` is a `LoRA` (default) or the whole
params pytree (full fine-tuning); a defense keeps its state in its optax transformation's state
(inside opt_state). Optimizer-state leaves that mirror a parameter (Adam's μ, ν) get that
parameter's sharding, so full fine-tuning shards the optimizer state like the weights (FSDP).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hfjax import sharding as sh
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def create(trainable, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.PRNGKey(seed),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def params_shardings(cfg: ModelConfig, mesh: Mesh, rules=sh.RULES):
    """Shardings of the base params from their logical axes (FSDP on embed, tensor on heads/mlp)."""
    return sh.tree_shardings(
        params_lib.logical_axes(cfg), params_lib.param_shapes(cfg), mesh, rules
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split over (data, fsdp) on their leading axis."""
    return NamedSharding(mesh, PartitionSpec(sh.RULES["batch"]))


def _path_suffix_lookup(reference_tree, default):
    """A function path -> sharding of the reference leaf whose path is a suffix of `path`."""
    table = {tuple(p): s for p, s in jax.tree_util.tree_flatten_with_path(reference_tree)[0]}

    def lookup(path):
        path = tuple(path)
        for start in range(len(path)):
            if path[start:] in table:
                return table[path[start:]]
        return default

    return lookup


def state_shardings(state_shape: TrainState, mesh: Mesh, trainable_shardings) -> TrainState:
    """Shardings for every leaf of a TrainState (shape tree from `jax.eval_shape`)."""
    rep = replicated(mesh)
    lookup = _path_suffix_lookup(trainable_shardings, rep)

    def opt_leaf(path, leaf):
        return lookup(path) if getattr(leaf, "ndim", 0) else rep

    opt = jax.tree_util.tree_map_with_path(opt_leaf, state_shape.opt_state)
    return TrainState(
        step=rep,
        trainable=trainable_shardings,
        opt_state=opt,
        rng=rep,
    )


def trainable_shardings(
    cfg: ModelConfig, mesh: Mesh, trainable_shape, full_finetune: bool, rules=sh.RULES
):
    """Full fine-tuning: the params' shardings. LoRA: replicated (small)."""
    if full_finetune:
        return params_shardings(cfg, mesh, rules)
    return jax.tree.map(lambda _: replicated(mesh), trainable_shape)
