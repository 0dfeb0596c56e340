"""Decoder LMs as pure functions, weight IO (HF safetensors, GGUF, PEFT), LoRA and prefix tuning.

    cfg, params = models.load_pretrained(path)          # HF folder or .gguf file
    logits = models.forward(cfg, params, input_ids, attention_mask, lora=lora)
    logits = models.forward(cfg, params, input_ids, attention_mask, prefix=prefix)
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from hfjax.models import lora, prefix
from hfjax.models.config import ATTENTION_IMPLEMENTATIONS, ModelConfig, ModelConfigError
from hfjax.models.decoder import CAPTURE_NAMES, KVCache, forward
from hfjax.models.embedded import DefaultModelNotFoundError, default_model_path, load_default
from hfjax.models.gguf_io import (
    GGUFError,
    MissingTensorError,
    UnsupportedArchitectureError,
    load_gguf,
)
from hfjax.models.hf_io import load_hf, save_hf
from hfjax.models.params import PROJECTIONS, init_random, logical_axes, param_shapes
from hfjax.models.safetensors_reader import (
    MissingWeightError,
    SafetensorsError,
    WeightShapeError,
)
from hfjax.models.tokenizer import TokenizerError, TokenizerNotFoundError, load_tokenizer
from hfjax.sharding import tree_shardings

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "CAPTURE_NAMES",
    "DefaultModelNotFoundError",
    "GGUFError",
    "KVCache",
    "MissingTensorError",
    "MissingWeightError",
    "PROJECTIONS",
    "SafetensorsError",
    "TokenizerError",
    "TokenizerNotFoundError",
    "UnsupportedArchitectureError",
    "WeightShapeError",
    "ModelConfig",
    "ModelConfigError",
    "default_model_path",
    "forward",
    "init_random",
    "load_default",
    "load_gguf",
    "load_hf",
    "load_pretrained",
    "load_tokenizer",
    "logical_axes",
    "lora",
    "param_shapes",
    "prefix",
    "save_hf",
]


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, mesh=None):
    """(ModelConfig, params) from an HF folder (config.json + safetensors) or a .gguf file.

    dtype: float32, bfloat16, float16, or float64 (after `jax.config.update("jax_enable_x64",
    True)`; norms, softmax, logits and losses then run in float64 too).

    With `mesh`, every parameter is created sharded: from safetensors each device reads only
    its slice; a GGUF tensor is dequantized whole on the host, then placed sharded.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelConfigError(f"model path {path} is a file but not a .gguf; pass a .gguf file "
                               f"or the folder that holds config.json and the *.safetensors")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelConfigError(f"model folder {path} has no config.json (an HF model folder "
                               f"holds config.json and *.safetensors; or pass a .gguf file)")
    if path.suffix == ".gguf":
        cfg, params = load_gguf(path, dtype=dtype)
        if mesh is not None:
            shardings = tree_shardings(logical_axes(cfg), param_shapes(cfg), mesh)
            params = jax.device_put(params, shardings)
        return cfg, params
    return load_hf(path, dtype=dtype, mesh=mesh)
