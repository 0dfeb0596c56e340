"""What an optimization attack reads besides the records: the victim as fine-tuning starts it.

A data attack is `attack(benign, harmful, *, n, p, seed, order) -> records`. An attack that
optimizes its rows against the model (Virus) also declares keyword-only inputs by name, which
the pipeline passes (`hfjax.pipeline.training.Trainer.user_records`):

    victim  a `Victim`: the model the user data will fine-tune, as the fine-tuning starts;
    guard   a `hfjax.eval.guard.Guard`: the service's moderation model (--guard).

The pipeline builds an input only when the attack's signature names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hfjax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Victim:
    """The fine-tuning's model: config, the weights it trains on (`params`: the frozen base of
    an adapter, unused with full fine-tuning) and its trainable as the training initializes it
    (a LoRA, a prefix, or the whole params with `full_finetune`), the tokenizer, and how user
    rows become tokens (`template`, `max_length`: `hfjax.data.tokenize_records`)."""

    cfg: ModelConfig
    params: dict | None
    trainable: Any
    tokenizer: Any
    template: str = "chat"
    max_length: int = 256
    full_finetune: bool = False
