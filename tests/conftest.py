"""Test-wide setup, before any JAX operation.

- 8 simulated CPU devices, so sharding is tested on every run.
- XLA's backend optimization level 0: the suite is dominated by compiling many small
  programs; level 0 roughly halves compile time (measured: tests/test_decoder.py 23 s → 14 s
  of CPU) and does not change the computed values beyond the tolerances the tests use.
  Subprocesses started by tests inherit it. Set XLA_FLAGS yourself to override.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
