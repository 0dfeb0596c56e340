"""Test-wide setup, before any JAX operation.

- 8 simulated CPU devices, so sharding is tested on every run.
- XLA's backend optimization level 0: the suite is dominated by compiling many small
  programs; level 0 roughly halves compile time (measured: tests/test_decoder.py 23 s → 14 s
  of CPU) and does not change the computed values beyond the tolerances the tests use.
  Subprocesses started by tests inherit it. Set XLA_FLAGS yourself to override.
- After each test module, JAX's compiled programs are dropped (`jax.clear_caches`): every
  executable holds memory mappings, and one process running the whole suite passed Linux's
  default limit of 65,530 mappings (vm.max_map_count) about 900 tests in, after which every
  compilation failed or aborted (measured: test_attack_virus.py and test_defense_tar.py add
  9,500 and 11,500 mappings; about 1,250 remain after clearing).
"""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Each module's compiled programs are dropped after it (module docstring)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for a module (and its subprocesses), for modules that run the
    pipeline: the stages build the same train step and generation loop many times; each
    compiles once. Pipeline modules use it with `pytestmark = usefixtures(...)`."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    folder = tmp_path_factory.mktemp("xla")
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    cc.reset_cache()
    jax.config.update(keys[0], str(folder))
    jax.config.update(keys[1], 0.0)
    yield folder
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()
