"""Adapter types behind one interface: what a training stage trains and how it travels.

    kind = hfjax.models.adapters.get("lora")      # or "full"
    trainable = kind.init(cfg, key, params, settings)
    kind.save(path, cfg, trainable, base_model="org/name")   # PEFT folder / HF model folder
    trainable = kind.load(path, cfg)
    params2 = kind.merge(cfg, params, trainable)              # weights the next stage starts from

lora  a `LoRA` pytree beside the frozen base (`models.lora`); saved in PEFT's format
full  the whole params pytree (full fine-tuning; the train step's `full_finetune`); saved as an
      HF safetensors folder; merging returns it
Prefix tuning (virtual key/value tokens) is the next type this interface takes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from hfjax.errors import UserError
from hfjax.models import hf_io, lora
from hfjax.models.config import ModelConfig
from hfjax.models.params import PROJECTIONS
from hfjax.registry import Registry


class AdapterError(UserError, ValueError):
    """An unknown adapter type, or an operation it does not have."""


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """What an adapter is made of: its type and (for LoRA) rank, alpha, targets and dropout."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = PROJECTIONS
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class AdapterType:
    """One adapter type. `full_finetune`: the trainable is the whole model (the train step and
    loss treat it as the params, not as a LoRA beside frozen params)."""

    name: str
    full_finetune: bool
    init: Callable[[ModelConfig, jax.Array, dict, AdapterSettings], Any]
    save: Callable[..., None]
    load: Callable[[str | os.PathLike, ModelConfig], Any]
    merge: Callable[[ModelConfig, dict, Any], dict]
    about: str


REGISTRY: Registry[AdapterType] = Registry("adapter type", AdapterError)


def get(name: str) -> AdapterType:
    return REGISTRY.get(name)


def available() -> list[str]:
    return REGISTRY.available()


def _lora_init(cfg: ModelConfig, key: jax.Array, params: dict, s: AdapterSettings) -> lora.LoRA:
    del params
    return lora.init(cfg, key, rank=s.rank, alpha=s.alpha, targets=s.targets, dropout=s.dropout)


def _lora_save(path: str | os.PathLike, cfg: ModelConfig, trainable: lora.LoRA, *,
               base_model: str | None = None) -> None:
    lora.save_peft(path, cfg, trainable, base_model_name_or_path=base_model)


def _full_init(cfg: ModelConfig, key: jax.Array, params: dict, s: AdapterSettings) -> dict:
    del cfg, key, s
    return jax.tree.map(lambda x: x, params)  # a new pytree of the same arrays (not donated)


def _full_save(path: str | os.PathLike, cfg: ModelConfig, trainable: dict, *,
               base_model: str | None = None) -> None:
    del base_model
    hf_io.save_hf(Path(path), cfg, jax.device_get(trainable))


def _full_load(path: str | os.PathLike, cfg: ModelConfig) -> dict:
    _, params = hf_io.load_hf(path, dtype=cfg.dtype)
    return params


REGISTRY.add("lora", AdapterType(
    "lora", False, _lora_init, _lora_save, lora.load_peft, lora.merge,
    "low-rank adapter beside the frozen base (PEFT format)"))
REGISTRY.add("full", AdapterType(
    "full", True, _full_init, _full_save, _full_load, lambda cfg, params, trainable: trainable,
    "full fine-tuning of every weight (HF safetensors folder)"))
