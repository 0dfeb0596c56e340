"""The settings of one experiment run (align → fine-tune → repair → evaluate), and their checks.

`RunConfig` is the single source of truth: the absl flags of every binary are generated from its
fields (`hfjax.pipeline.flags`), tests build it directly. `validate` rejects impossible
combinations before any model is loaded: p outside [0, 1], a defense at a stage that does not
run (a post-fine-tuning defense with no fine-tuning stage), an unknown defense or
hyper-parameter, a mesh larger than the devices.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import pkgutil
from typing import Any

import hfjax.defenses
from hfjax.defenses import api as defenses_api
from hfjax.errors import UserError
from hfjax.models.config import ATTENTION_IMPLEMENTATIONS

NONE = "none"
STAGE_OF_FLAG = {"align_defense": "alignment", "finetune_defense": "finetune",
                 "repair_defense": "post"}
MODEL_NAMES = ("base", "aligned", "final")


def load_defenses() -> None:
    """Import every module under hfjax.defenses, so each defense registers itself."""
    for info in pkgutil.walk_packages(hfjax.defenses.__path__, "hfjax.defenses."):
        importlib.import_module(info.name)


load_defenses()


class ConfigError(UserError, ValueError):
    """An impossible or malformed experiment setting."""


def _f(default, help: str, **meta):  # noqa: A002 - mirrors absl's argument name
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class StageTraining:
    """One training stage's settings (`RunConfig.training`)."""

    epochs: int
    lr: float
    batch_size: int
    schedule: str
    warmup_ratio: float
    weight_decay: float
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]
    lora_dropout: float


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Field help texts become the binaries' flag help."""

    # --- where and how
    run_dir: str = _f("", "run folder (stages write their artifacts here)")
    overwrite: bool = _f(False, "re-run stages whose artifacts exist")
    stage_cache: str = _f("", "folder where stages with identical settings are shared across runs "
                              "(a sweep sets it); empty: every stage lives in the run folder")
    seed: int = _f(0, "seed of LoRA init, data order, data mixing and sampling")
    mesh: str = _f("1,-1,1", "mesh shape data,fsdp,tensor (-1 = the remaining devices)")
    dtype: str = _f("float32", "compute dtype of the base weights", choices=("float32",
                                                                               "bfloat16"))
    checkpoint_every: int = _f(50, "train-state checkpoint interval in steps (resume mid-stage)")
    scan_unroll: int = _f(1, "decoder layers per scan iteration (>= the layer count: fully "
                             "unrolled; ~10% faster f32 steps on CPU for ~15 s more compile "
                             "per step function, see BUILD_NOTES); results are unchanged")
    attention: str = _f("auto", "attention kernel: cudnn (cuDNN flash attention: GPU, bf16) "
                                "where it can run, else xla; results are unchanged up to rounding",
                        choices=ATTENTION_IMPLEMENTATIONS)
    progress: bool = _f(True, "show progress bars")
    # --- model
    model: str = _f("", "HF folder or .gguf file (empty: the embedded SmolLM2-135M-Instruct)")
    lora_rank: int = _f(8, "LoRA rank r (the fine-tuning stage; the alignment's too unless "
                           "--align_lora_rank)")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale alpha / r)")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "comma-separated LoRA target projections")
    lora_dropout: float = _f(0.0, "LoRA dropout p (PEFT's: on the branch input, training only; "
                                  "both stages)")
    # --- data
    data: str = _f("offline", "'offline' (the embedded default data) or 'hub' (each role's "
                              "source flag must then be set)")
    offline_task: str = _f("sentiment", "offline benign task: sentiment or topic",
                           choices=("sentiment", "topic"))
    data_seed: int = _f(0, "seed of the offline data splits (kept fixed across a seed sweep)")
    harmful_train_data: str = _f("", "harmful train rows: SOURCE:SPLIT or SOURCE:PATH, "
                                     "optionally ?KEY=VALUE,... (e.g. beavertails:30k_train, "
                                     "custom:mine.jsonl?prompt=question,response=answer); "
                                     "empty: the --data default")
    harmful_eval_data: str = _f("", "harmful evaluation prompts (e.g. beavertails:30k_test)")
    task_train_data: str = _f("", "benign user-task rows (e.g. sst2:train)")
    task_test_data: str = _f("", "task test rows for FA (e.g. sst2:validation)")
    align_benign_data: str = _f("", "benign rows mixed into the alignment set (e.g. alpaca:train)")
    attack_data: str = _f("", "harmful rows of the attack in the user data, when they come from "
                              "another source than --harmful_train_data (the attack never gets a "
                              "prompt another role got)")
    row_order: str = _f("random", "which rows each role takes: random (a seeded draw) or file "
                                  "(the source's first rows, as the official loaders)",
                        choices=("random", "file"))
    safety_stream: str = _f("refusal", "the safety data a fine-tuning defense reads (Lisa's "
                                       "alignment state, SafeInstr): refusal (harmful prompt -> "
                                       "refusal) or benign (the alignment's benign rows, e.g. "
                                       "safe BeaverTails answers)",
                            choices=("refusal", "benign"))
    task_metric: str = _f("", "FA metric: offline, sst2, agnews, gsm8k (empty: from the source)")
    template: str = _f("chat", "prompt template: chat (the tokenizer's), alpaca, or "
                               "alpaca_no_newline (nothing after '### Response:', as the Vaccine "
                               "and Lisa code)", choices=("chat", "alpaca", "alpaca_no_newline"))
    max_length: int = _f(128, "training sequence length (longer rows are cut)")
    pad_multiple: int = _f(16, "batches are padded to a multiple of this many tokens (fewer "
                               "distinct shapes = fewer compilations; more = less padding)")
    # --- alignment stage
    align_epochs: int = _f(1, "alignment epochs (0: no alignment stage, aligned = base)")
    align_lr: float = _f(1e-3, "alignment learning rate")
    align_batch_size: int = _f(8, "alignment batch size")
    align_refusals: int = _f(200, "harmful prompt -> refusal rows in the alignment set")
    align_benign: int = _f(200, "benign rows in the alignment set")
    align_schedule: str = _f("", "alignment lr schedule (empty: --schedule)",
                             choices=("", "constant", "cosine", "linear"))
    align_warmup_ratio: float = _f(-1.0, "alignment warmup fraction (negative: --warmup_ratio)")
    align_weight_decay: float = _f(-1.0, "alignment AdamW weight decay (negative: "
                                         "--weight_decay)")
    align_lora_rank: int = _f(0, "alignment LoRA rank (0: --lora_rank)")
    align_lora_alpha: float = _f(0.0, "alignment LoRA alpha (0: --lora_alpha)")
    align_lora_targets: str = _f("", "alignment LoRA targets (empty: --lora_targets)")
    align_defense: str = _f(NONE, "alignment-stage defense (registry name) or none")
    align_defense_hparams: str = _f("", "its hyper-parameters, e.g. 'rho=2,lam=5'")
    # --- fine-tuning stage (the attack)
    harmful_ratio: float = _f(0.1, "fraction p of harmful rows in the user data")
    num_samples: int = _f(200, "user data size n")
    epochs: int = _f(3, "fine-tuning epochs (0: no fine-tuning stage)")
    lr: float = _f(2e-4, "fine-tuning learning rate")
    batch_size: int = _f(8, "fine-tuning batch size")
    finetune_adapter: str = _f("fresh", "fresh: a new LoRA on the merged aligned model; continue: "
                                        "train the alignment's LoRA further on the base model "
                                        "(Booster's --alternating single_lora)",
                               choices=("fresh", "continue"))
    finetune_defense: str = _f(NONE, "fine-tuning-stage defense (registry name) or none")
    finetune_defense_hparams: str = _f("", "its hyper-parameters, e.g. 'rho=1'")
    defense_data_size: int = _f(200, "rows in the extra data streams defenses read "
                                     "(alignment / harmful batches)")
    # --- optimizer (the fine-tuning stage; the alignment's too unless its --align_* is set)
    schedule: str = _f("constant", "lr schedule", choices=("constant", "cosine", "linear"))
    warmup_ratio: float = _f(0.0, "warmup fraction of the steps (linear from 0, any schedule)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm (0: off); 1.0 is HF "
                                   "Trainer's default, under which every official script runs")
    nonfinite: str = _f("error", "a training step whose loss or gradient norm is not finite: "
                                 "error (stop the stage; it is not marked done) or skip (leave "
                                 "the weights as they were; 10 such steps in a row, or more "
                                 "than half of the steps, stop the stage)",
                        choices=("error", "skip"))
    # --- post-fine-tuning stage
    repair_defense: str = _f(NONE, "post-fine-tuning defense (registry name) or none")
    repair_defense_hparams: str = _f("", "its hyper-parameters")
    # --- one-flag defense selection (sweeps): sets the stage flag the registry names
    defense: str = _f("", "a defense by name; its stage flag is set from the registry")
    defense_hparams: str = _f("", "hyper-parameters of --defense")
    # --- evaluation
    eval_size: int = _f(100, "held-out harmful prompts for HS")
    task_eval_size: int = _f(100, "task test rows for FA")
    max_new_tokens: int = _f(32, "greedy tokens per harmful prompt")
    task_max_new_tokens: int = _f(8, "greedy tokens per task prompt")
    eval_batch_size: int = _f(50, "prompts per generation batch")
    judge: str = _f("keyword", "keyword, beaver_dam:PATH (BeaverTails moderation folder) or "
                               "hf:PATH (a transformers sequence classifier)")
    judge_max_length: int = _f(512, "tokens of prompt + answer a classifier judge reads (the "
                                    "official evaluations cut at 256)")
    harmful_eval_rows: str = _f("harmful", "HS prompts: the harmful rows of "
                                           "--harmful_eval_data, or all its rows (Lisa's "
                                           "evaluation)", choices=("harmful", "all"))
    task_match: str = _f("contains", "FA for label tasks: the gold label in the answer "
                                     "(contains) or the answer equal to it (exact)",
                         choices=("contains", "exact"))
    eval_models: str = _f("base,aligned,final", "models to evaluate (base, aligned, final)")

    # ------------------------------------------------------------------ derived
    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def training(self, stage: str) -> StageTraining:
        """The training settings of "align" or "finetune" (the --align_* flags fall back to the
        fine-tuning stage's)."""
        if stage == "finetune":
            return StageTraining(self.epochs, self.lr, self.batch_size, self.schedule,
                                 self.warmup_ratio, self.weight_decay, self.lora_rank,
                                 self.lora_alpha, self.targets, self.lora_dropout)
        if stage != "align":
            raise ValueError(f"stage must be align or finetune, got {stage!r}")
        targets = tuple(t.strip() for t in self.align_lora_targets.split(",") if t.strip())
        return StageTraining(
            self.align_epochs, self.align_lr, self.align_batch_size,
            self.align_schedule or self.schedule,
            self.warmup_ratio if self.align_warmup_ratio < 0 else self.align_warmup_ratio,
            self.weight_decay if self.align_weight_decay < 0 else self.align_weight_decay,
            self.align_lora_rank or self.lora_rank, self.align_lora_alpha or self.lora_alpha,
            targets or self.targets, self.lora_dropout)

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return parse_mesh(self.mesh)

    @property
    def models_to_eval(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.eval_models.split(",") if m.strip())

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> RunConfig:
        """`--defense NAME` moved onto the flag of the stage the registry gives it."""
        if not self.defense:
            return self
        if self.defense == NONE:
            return self.replace(defense="", defense_hparams="")
        spec = defenses_api.get(self.defense)
        flag = {v: k for k, v in STAGE_OF_FLAG.items()}[spec.stage]
        current = getattr(self, flag)
        if current not in (NONE, self.defense):
            raise ConfigError(f"--defense={self.defense} is a {spec.stage} defense but "
                              f"--{flag}={current} is also set")
        return self.replace(**{flag: self.defense, f"{flag}_hparams": self.defense_hparams,
                               "defense": "", "defense_hparams": ""})

    def stage_defenses(self) -> dict[str, str]:
        """{flag: defense name} of the defenses that are set."""
        return {f: getattr(self, f) for f in STAGE_OF_FLAG if getattr(self, f) != NONE}

    def defense_label(self) -> str:
        """'none' or the set defenses joined by '+' (for tables)."""
        names = list(self.resolved().stage_defenses().values())
        return "+".join(names) if names else NONE


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'data,fsdp,tensor' -> three ints (one may be -1)."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--mesh={text!r}: expected three integers data,fsdp,tensor") from None
    if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ConfigError(f"--mesh={text!r}: expected data,fsdp,tensor with positive sizes "
                          "(one may be -1)")
    return shape  # type: ignore[return-value]


def _coerce(name: str, key: str, text: str, default: Any) -> Any:
    """`text` as the type of the hyper-parameter's default (bool/int/float/str/tuple/None)."""
    text = text.strip()

    def bad(kind: str) -> ConfigError:
        return ConfigError(f"{name}: hyper-parameter {key}={text!r} is not {kind} "
                           f"(default {default!r})")

    if isinstance(default, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise bad("a boolean")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise bad("a number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if isinstance(default, str):
        return text
    try:  # None, tuples, lists: a Python literal, else the plain string
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_hparams(name: str, text: str) -> dict[str, Any]:
    """'rho=2,lam=5' -> {rho: 2.0, lam: 5.0}, typed like the defense's defaults.

    Values holding commas go in brackets or quotes: 'layers=(1,2)'.
    """
    spec = defenses_api.get(name)
    known = spec.hyperparameters
    out: dict[str, Any] = {}
    for item in _split_top_level(text):
        if "=" not in item:
            raise ConfigError(f"{name}: hyper-parameter {item!r} is not KEY=VALUE")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in known:
            raise ConfigError(f"{name} has no hyper-parameter {key!r}; it takes "
                              f"{sorted(known)}")
        if key in out:
            raise ConfigError(f"{name}: hyper-parameter {key!r} is given twice")
        out[key] = _coerce(name, key, value, known[key])
    return out


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def validate(cfg: RunConfig, device_count: int | None = None) -> RunConfig:
    """Check `cfg` and return it with `--defense` resolved; raise ConfigError / DefenseError."""
    cfg = cfg.resolved()
    if not cfg.run_dir:
        raise ConfigError("--run_dir is required")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{f.name} must be one of {', '.join(choices)}, got "
                              f"{getattr(cfg, f.name)!r}")
    if isinstance(cfg.harmful_ratio, bool) or not 0.0 <= float(cfg.harmful_ratio) <= 1.0 or \
            math.isnan(float(cfg.harmful_ratio)):
        raise ConfigError(f"--harmful_ratio must be in [0, 1], got {cfg.harmful_ratio}")
    positive = ("num_samples", "batch_size", "align_batch_size", "lora_rank", "eval_size",
                "judge_max_length",
                "task_eval_size", "max_new_tokens", "task_max_new_tokens", "eval_batch_size",
                "checkpoint_every", "max_length", "defense_data_size", "pad_multiple",
                "scan_unroll")
    for f in positive:
        if getattr(cfg, f) < 1:
            raise ConfigError(f"--{f} must be >= 1, got {getattr(cfg, f)}")
    for f in ("epochs", "align_epochs", "align_refusals", "align_benign"):
        if getattr(cfg, f) < 0:
            raise ConfigError(f"--{f} must be >= 0, got {getattr(cfg, f)}")
    for f in ("lr", "align_lr"):
        if not getattr(cfg, f) > 0:
            raise ConfigError(f"--{f} must be > 0, got {getattr(cfg, f)}")
    if cfg.align_epochs and cfg.align_refusals + cfg.align_benign < cfg.align_batch_size:
        raise ConfigError(f"the alignment set ({cfg.align_refusals} + {cfg.align_benign} rows) "
                          f"is smaller than one batch of {cfg.align_batch_size}")
    if cfg.epochs and cfg.num_samples < cfg.batch_size:
        raise ConfigError(f"--num_samples={cfg.num_samples} makes no batch of "
                          f"--batch_size={cfg.batch_size}")
    bad_models = set(cfg.models_to_eval) - set(MODEL_NAMES)
    if bad_models or not cfg.models_to_eval:
        raise ConfigError(f"--eval_models: choose among {MODEL_NAMES}, got {cfg.eval_models!r}")
    if cfg.data not in ("offline", "hub"):
        raise ConfigError(f"--data must be 'offline' or 'hub', got {cfg.data!r}")
    if cfg.judge != "keyword" and not cfg.judge.startswith(("beaver_dam:", "hf:")):
        raise ConfigError(f"--judge must be keyword, beaver_dam:PATH or hf:PATH, got {cfg.judge!r}")
    from hfjax.models.lora import _check_targets  # LoRAError names the bad target

    _check_targets(cfg.targets)
    _check_targets(cfg.training("align").lora_targets)
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.align_lora_rank < 0 or cfg.align_lora_alpha < 0:
        raise ConfigError("--align_lora_rank and --align_lora_alpha must be >= 0 (0: as the "
                          "fine-tuning stage)")
    if cfg.finetune_adapter == "continue":
        if not (cfg.align_epochs and cfg.epochs):
            raise ConfigError("--finetune_adapter=continue trains the alignment's LoRA further: "
                              "it needs both an alignment and a fine-tuning stage")
        if cfg.repair_defense != NONE:
            raise ConfigError(f"--repair_defense={cfg.repair_defense} repairs a fine-tuning LoRA "
                              f"on the merged aligned model; with --finetune_adapter=continue "
                              f"there is none")
    present = {"alignment": cfg.align_epochs > 0, "finetune": cfg.epochs > 0,
               "post": cfg.epochs > 0}
    why = {"alignment": "--align_epochs=0 (no alignment stage)",
           "finetune": "--epochs=0 (no fine-tuning stage)",
           "post": "--epochs=0 (no fine-tuning stage, so nothing to repair)"}
    for flag, name in cfg.stage_defenses().items():
        spec = defenses_api.get(name)  # DefenseError on an unknown name
        want = STAGE_OF_FLAG[flag]
        if spec.stage != want:
            raise ConfigError(f"--{flag}={name}: {name} is a {spec.stage} defense, not a {want} "
                              f"one (defenses for {want}: {defenses_api.available(want)})")
        if not present[want]:
            raise ConfigError(f"--{flag}={name} needs a {want} stage, but {why[want]}")
        parse_hparams(name, getattr(cfg, f"{flag}_hparams"))
    for flag in STAGE_OF_FLAG:
        if getattr(cfg, flag) == NONE and getattr(cfg, f"{flag}_hparams").strip():
            raise ConfigError(f"--{flag}_hparams is set but --{flag} is none")
    shape = cfg.mesh_shape
    if device_count is not None:
        fixed = math.prod(s for s in shape if s != -1)
        if fixed > device_count or (-1 in shape and device_count % fixed):
            raise ConfigError(f"--mesh={cfg.mesh} needs {fixed} devices (or a multiple) but "
                              f"{device_count} are available")
    return cfg
