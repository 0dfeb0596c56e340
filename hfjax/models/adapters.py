"""Adapter types behind one interface: what a training stage trains and how it travels.

    kind = hfjax.models.adapters.get("lora")      # or "full", "prefix"
    trainable = kind.init(cfg, key, params, settings)
    kind.save(path, cfg, trainable, base_model="org/name")   # PEFT folder / HF model folder
    trainable = kind.load(path, cfg)
    params2 = kind.merge(cfg, params, trainable)              # weights the next stage starts from
    forward(cfg, params, ids, mask, **kind.forward_kwargs(trainable))   # lora= / prefix=

lora    a `LoRA` pytree beside the frozen base (`models.lora`); saved in PEFT's format
full    the whole params pytree (full fine-tuning; the train step's `full_finetune`); saved as
        an HF safetensors folder; merging returns it
prefix  a `Prefix` of P virtual key/value tokens per layer beside the frozen base
        (`models.prefix`); saved in PEFT's format; it cannot be merged into the weights
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from hfjax.errors import UserError
from hfjax.models import hf_io, lora, prefix
from hfjax.models.config import ModelConfig
from hfjax.models.params import PROJECTIONS
from hfjax.registry import Registry


class AdapterError(UserError, ValueError):
    """An unknown adapter type, or an operation it does not have."""


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """What an adapter is made of: its type, (for LoRA) rank, alpha, targets and dropout, and
    (for a prefix) the number of virtual tokens and the projection MLP's hidden size (None: the
    table itself is trained, PEFT's default)."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = PROJECTIONS
    dropout: float = 0.0
    num_virtual_tokens: int = 20
    prefix_projection: int | None = None


@dataclasses.dataclass(frozen=True)
class AdapterType:
    """One adapter type. `full_finetune`: the trainable is the whole model (the train step and
    loss treat it as the params, not as an adapter beside frozen params). `forward_keyword`:
    the `forward` argument that takes the trainable beside the params (None: it is the
    params)."""

    name: str
    full_finetune: bool
    init: Callable[[ModelConfig, jax.Array, dict, AdapterSettings], Any]
    save: Callable[..., None]
    load: Callable[[str | os.PathLike, ModelConfig], Any]
    merge: Callable[[ModelConfig, dict, Any], dict]
    about: str
    forward_keyword: str | None = "lora"

    def forward_kwargs(self, trainable) -> dict:
        """The keyword arguments that apply `trainable` in `models.forward` / `generate`."""
        return {} if self.forward_keyword is None else {self.forward_keyword: trainable}


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


def _prefix_init(cfg: ModelConfig, key: jax.Array, params: dict,
                 s: AdapterSettings) -> prefix.Prefix:
    del params
    return prefix.init(cfg, key, num_virtual_tokens=s.num_virtual_tokens,
                       projection=s.prefix_projection)


def _prefix_save(path: str | os.PathLike, cfg: ModelConfig, trainable: prefix.Prefix, *,
                 base_model: str | None = None) -> None:
    prefix.save_peft(path, cfg, trainable, base_model_name_or_path=base_model)


def _prefix_merge(cfg: ModelConfig, params: dict, trainable: prefix.Prefix) -> dict:
    del cfg, params, trainable
    raise AdapterError("a prefix cannot be merged into the weights: its virtual key/value "
                       "tokens are extra attention inputs, not a weight update; keep it "
                       "beside the base (forward's prefix=)")


REGISTRY.add("lora", AdapterType(
    "lora", False, _lora_init, _lora_save, lora.load_peft, lora.merge,
    "low-rank adapter beside the frozen base (PEFT format)"))
REGISTRY.add("full", AdapterType(
    "full", True, _full_init, _full_save, _full_load, lambda cfg, params, trainable: trainable,
    "full fine-tuning of every weight (HF safetensors folder)", forward_keyword=None))
REGISTRY.add("prefix", AdapterType(
    "prefix", False, _prefix_init, _prefix_save, prefix.load_peft, _prefix_merge,
    "prefix tuning: P virtual key/value tokens per layer (PEFT format)",
    forward_keyword="prefix"))
