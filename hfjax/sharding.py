"""Meshes and the logical-axis rules table that maps parameter axes to mesh axes.

Mesh axes are (data, fsdp, tensor). Every parameter carries logical axis names
(`hfjax.models.params.logical_axes`); `RULES` maps each name to a mesh axis (or None =
replicated). A logical name missing from the rules is an error, never a silent replication.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis. Base weights are FSDP-sharded on their model dimension and
# tensor-sharded on heads / MLP width; layers, norms, LoRA ranks and prefixes (P virtual
# tokens × L·2·H_kv·head_dim features, the projection MLP's hidden width) are replicated.
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
    "prefix_tokens": None,
    "prefix_features": None,
    "prefix_hidden": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) > len(devices):
        raise ValueError(
            f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} needs {int(np.prod(shape))} "
            f"devices but only {len(devices)} are available"
        )
    n = int(np.prod(shape))
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:n]
    )


def partition_spec(
    axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules: Mapping = RULES
) -> PartitionSpec:
    """PartitionSpec for one array; an axis the mesh axis size does not divide is replicated."""
    spec = []
    used: set[str] = set()
    for name, size in zip(axes, shape, strict=True):
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        target = rules[name]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        n = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or n == 1 or size % n:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Mapping = RULES):
    """NamedSharding for every leaf of `shapes_tree` from the matching logical axes."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    return jax.tree.map(
        lambda axes, s: NamedSharding(mesh, partition_spec(axes, s.shape, mesh, rules)),
        axes_tree,
        shapes_tree,
        is_leaf=is_axes,
    )
