"""absl flags generated from `RunConfig`'s fields, shared by every experiment binary.

    from hfjax.pipeline import flags as pflags
    pflags.define()                         # at import time of the binary
    rc = pflags.config_from_flags()         # in main()

`--flagfile=experiments/presets/quick.cfg` loads a preset; flags after it override it.
`--distributed` calls `jax.distributed.initialize()` first (TPU pods, SLURM);
`--compilation_cache` keeps compiled XLA programs across runs (default ~/.cache/hfjax/xla).
`--keep_freed_memory` (default on) applies `hfjax.host.keep_freed_memory()` (see hfjax/host.py).
"""

from __future__ import annotations

import dataclasses
import typing

from absl import flags

from hfjax.pipeline.config import RunConfig

FLAGS = flags.FLAGS


def define(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define one flag per RunConfig field (idempotent) and --distributed."""
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in flag_values:
            continue
        help_text = f.metadata.get("help", f.name)
        kind = hints[f.name]
        if f.metadata.get("choices"):
            flags.DEFINE_enum(f.name, f.default, list(f.metadata["choices"]), help_text,
                              flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_bool(f.name, f.default, help_text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(f.name, f.default, help_text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(f.name, f.default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(f.name, f.default, help_text, flag_values=flag_values)
    if "distributed" not in flag_values:
        flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first "
                          "(multi-host: TPU pod or SLURM)", flag_values=flag_values)
        flags.DEFINE_string("compilation_cache", "~/.cache/hfjax/xla",
                            "persistent XLA compilation cache folder ('' = off): identical "
                            "train steps and generation loops compile once across runs",
                            flag_values=flag_values)
        flags.DEFINE_bool("keep_freed_memory", True,
                          "glibc keeps freed memory mapped (hfjax.host.keep_freed_memory): no "
                          "page faults on XLA:CPU's per-step temp buffer; the process keeps its "
                          "peak footprint", flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = FLAGS, **overrides) -> RunConfig:
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(RunConfig)}
    values.update(overrides)
    return RunConfig(**values)


def parse_value(name: str, text: str, flag_values: flags.FlagValues = FLAGS):
    """A flag value from text with the flag's own parser (for sweep grids)."""
    if name not in flag_values or name not in {f.name for f in dataclasses.fields(RunConfig)}:
        raise flags.ValidationError(f"unknown flag {name!r} in the sweep grid")
    return flag_values[name].parser.parse(text)


def setup_runtime(flag_values: flags.FlagValues = FLAGS) -> None:
    """glibc malloc settings, `jax.distributed.initialize()` with --distributed, the persistent
    compilation cache. Call before JAX runs anything."""
    import os

    import jax

    from hfjax import host

    if flag_values["keep_freed_memory"].value:
        host.keep_freed_memory()

    if flag_values["distributed"].value:
        jax.distributed.initialize()
    if flag_values["compilation_cache"].value:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.expanduser(flag_values["compilation_cache"].value))
