"""Shared pytest setup.

pytest imports this file before any test module, so the flag below is set before the first JAX
operation: the CPU backend then exposes 8 simulated devices, which the sharding tests use to
build (data, fsdp, tensor) meshes. Tests that need one device keep working unchanged (they use
the default device).
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
