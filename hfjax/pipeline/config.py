"""The settings of one run, as nested sub-configs, and the stage keys derived from them.

    RunConfig
      run       where and how: run folder, stage cache, seed, mesh, checkpoints, which models to
                evaluate, speed knobs that do not change results (scan unroll, attention kernel),
                the fine-tuning settings the attack's protocol supplied (a record: their values
                are in `finetune`)
      model     the base model (path, dtype)
      data      every data role's source, the task, template, lengths, row order, streams' size
      align     the alignment stage: its training (epochs, batch, optimizer, adapter, defenses)
                and its data (refusals, benign rows)
      finetune  the fine-tuning stage: its training, the attack and its budget (n, p), whether the
                adapter starts fresh or continues the alignment's, the service's guard model
      repair    the post-fine-tuning defenses
      eval      HS and FA: sizes, generation budgets, judge, match, the inference-time attack

Built from the command line's flat flags by `hfjax.pipeline.flags.to_config`. A stage's key is
the JSON of the whole sub-configs it reads (`key_of`), so a setting added to a sub-config enters
every key that reads it without anyone listing it; only `run` (execution, not results) stays out,
except its seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hfjax.defenses.compose import DefenseChoice
from hfjax.errors import UserError
from hfjax.models.adapters import AdapterSettings
from hfjax.train.optim import OptimizerConfig

NONE = "none"
MODEL_NAMES = ("base", "aligned", "final")


class ConfigError(UserError, ValueError):
    """An impossible or malformed experiment setting."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where and how a run executes; none of it changes a result but the seed."""

    run_dir: str
    overwrite: bool = False
    stage_cache: str = ""
    seed: int = 0
    mesh: tuple[int, int, int] = (1, -1, 1)
    checkpoint_every: int = 50
    progress: bool = True
    eval_batch_size: int = 50
    scan_unroll: int = 1
    attention: str = "auto"
    models_to_eval: tuple[str, ...] = MODEL_NAMES
    attack_protocol: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str = ""  # a folder, a .gguf file or a hub id; "" = the embedded default
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The data roles' sources (`NAME:SPLIT` / `NAME:PATH[?k=v]`, "" = the task's or the
    offline default) and how rows are taken and tokenized."""

    source: str = "offline"
    task: str = "sentiment"
    data_seed: int = 0
    harmful_train: str = ""
    harmful_eval: str = ""
    task_train: str = ""
    task_test: str = ""
    align_benign: str = ""
    attack: str = ""
    task_metric: str = ""
    harmful_eval_rows: str = "harmful"
    template: str = "chat"
    max_length: int = 128
    pad_multiple: int = 16
    row_order: str = "random"
    safety_stream: str = "refusal"
    defense_data_size: int = 200


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One training stage: how long, in what batches, with what optimizer, adapter and
    (chained) gradient or data defenses."""

    epochs: int
    batch_size: int
    optimizer: OptimizerConfig
    adapter: AdapterSettings
    defenses: tuple[DefenseChoice, ...] = ()
    nonfinite: str = "error"


@dataclasses.dataclass(frozen=True)
class AttackChoice:
    name: str = "hft"
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AlignSettings:
    train: TrainSettings
    refusals: int = 200
    benign: int = 200


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    train: TrainSettings
    num_samples: int = 200
    harmful_ratio: float = 0.1
    attack: AttackChoice = AttackChoice()
    init: str = "fresh"  # or "continue": LoRA #1 trained further on the base
    guard: str = ""  # the guard model (`hfjax.eval.guard.load_guard`; "": the embedded model)


@dataclasses.dataclass(frozen=True)
class RepairSettings:
    defenses: tuple[DefenseChoice, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    eval_size: int = 100
    task_eval_size: int = 100
    max_new_tokens: int = 32
    task_max_new_tokens: int = 8
    judge: str = "keyword"
    judge_max_length: int = 512
    task_match: str = "contains"
    framings: tuple[str, ...] = ()  # () = the prompts as they are; else each in every framing
    attack_format: bool = True  # ask the attacked model as the attack's `eval_prompt` says
    inference_attack: AttackChoice | None = None  # e.g. prefilling, on every evaluated model


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run: RunSettings
    model: ModelSettings
    data: DataSettings
    align: AlignSettings
    finetune: FinetuneSettings
    repair: RepairSettings
    eval: EvalSettings

    def defenses(self) -> dict[str, tuple[DefenseChoice, ...]]:
        """{stage: chosen defenses} for "alignment", "finetune", "post"."""
        return {"alignment": self.align.train.defenses, "finetune": self.finetune.train.defenses,
                "post": self.repair.defenses}


def key_of(value: Any) -> Any:
    """A settings object as plain JSON: dataclasses field by field (so a new field is in every
    key that holds its sub-config), a defense as its name and hyper-parameters."""
    if isinstance(value, DefenseChoice):
        return {"name": value.name, "hparams": key_of(dict(value.hparams))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: key_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): key_of(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [key_of(v) for v in value]
    return value
