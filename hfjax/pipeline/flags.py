"""The command line of the experiment binaries: flat flags, checked, turned into a `RunConfig`.

    from hfjax.pipeline import flags as pflags
    pflags.define()                         # at import time of the binary
    f = pflags.flags_from_absl()            # RunFlags, in main()
    rc = pflags.to_config(validate(f))      # the nested RunConfig the pipeline runs

`RunFlags` holds every flag (its field help texts are the flags' help; tests build it directly).
`validate` rejects impossible combinations before any model is loaded, naming the flag: p outside
[0, 1], a defense at a stage that does not run, an unknown defense, attack, task or
hyper-parameter, a mesh larger than the devices. `to_config` nests the flags into the sub-configs
of `hfjax.pipeline.config` (the --align_* twins fall back to the fine-tuning values; comma lists
become tuples; `a+b` defense lists become chains). `--flagfile=experiments/presets/quick.cfg`
loads a preset; flags after it override it.

Naming an attack applies its paper's protocol (`hfjax.attacks.AttackSpec.protocol`: lr, epochs,
batch size, n, p, ...) to every one of those settings the user did not give: `RunFlags.given`
names the flags given on the command line or in a flagfile (absl's `present`), the values a
sweep grid or `replace` sets, and, for flags built in code without it, the fields that differ
from their defaults. `resolved` applies the protocol; run.json shows the resulting settings and,
under config.run.attack_protocol, which of them the protocol supplied. A setting the attack
requires (`requires`, e.g. pure_harmful's --harmful_ratio=1) given with another value is an
error. --eval_attack selects an inference-time attack (prefilling) for every evaluated model.

`--distributed` calls `jax.distributed.initialize()` first (TPU pods, SLURM);
`--compilation_cache` keeps compiled XLA programs across runs (default ~/.cache/hfjax/xla);
`--keep_freed_memory` (default on) applies `hfjax.host.keep_freed_memory()` (see
hfjax/host.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import typing
from pathlib import Path
from typing import Any

from absl import flags

import hfjax.defenses
from hfjax import attacks, tasks
from hfjax.data import framings as framings_lib
from hfjax.defenses import api as defenses_api
from hfjax.defenses import compose
from hfjax.defenses.compose import DefenseChoice
from hfjax.eval import judges as judges_lib
from hfjax.eval import metrics as metrics_lib
from hfjax.models.adapters import AdapterSettings
from hfjax.models.adapters import available as adapter_kinds
from hfjax.models.config import ATTENTION_IMPLEMENTATIONS
from hfjax.pipeline.config import (
    MODEL_NAMES,
    NONE,
    AlignSettings,
    AttackChoice,
    ConfigError,
    DataSettings,
    EvalSettings,
    FinetuneSettings,
    ModelSettings,
    RepairSettings,
    RunConfig,
    RunSettings,
    TrainSettings,
)
from hfjax.registry import parse_hparams as parse_typed
from hfjax.registry import split_top_level
from hfjax.train.optim import OptimizerConfig

FLAGS = flags.FLAGS
STAGE_OF_FLAG = {"align_defense": "alignment", "finetune_defense": "finetune",
                 "repair_defense": "post"}
def load_defenses() -> None:
    """Import every module under hfjax.defenses, so each defense registers itself."""
    for info in pkgutil.walk_packages(hfjax.defenses.__path__, "hfjax.defenses."):
        importlib.import_module(info.name)


load_defenses()


def _f(default, help: str, **meta):  # noqa: A002 - mirrors absl's argument name
    return dataclasses.field(default=default, metadata={"help": help, **meta})


METRIC_FAMILIES = {
    **dict.fromkeys(("offline", "sst2", "agnews", "ag_news", "financial_sentiment"),
                    {"classification"}),
    "gsm8k": {"math"}, "choice": {"choice"}, "pass_at_1": {"code"},
    **dict.fromkeys(("rouge", "translation"), {"summarization", "translation", "completion"})}
"""The task families whose gold each built-in metric reads (`hfjax.tasks`: a label, a number,
{label, options}, {tests, ...}, a reference text); perplexity and registered metrics: any."""


def split_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """Every flag of a run. Field help texts become the binaries' flag help."""

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
    # --- model and adapter
    model: str = _f("", "HF folder or .gguf file (empty: the embedded SmolLM2-135M-Instruct)")
    adapter: str = _f("lora", "what both training stages train (hfjax.models.adapters): lora (a "
                              "LoRA beside the frozen base), full (every weight), prefix "
                              "(prefix tuning: P virtual key/value tokens per layer), or "
                              "another registered adapter type")
    lora_rank: int = _f(8, "LoRA rank r (the fine-tuning stage; the alignment's too unless "
                           "--align_lora_rank)")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale alpha / r)")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "comma-separated LoRA target projections")
    lora_dropout: float = _f(0.0, "LoRA dropout p (PEFT's: on the branch input, training only; "
                                  "both stages)")
    num_virtual_tokens: int = _f(20, "prefix tuning: virtual tokens P (--adapter=prefix)")
    prefix_projection: int = _f(0, "prefix tuning: hidden size of the reparameterization MLP "
                                   "(PEFT's prefix_projection; 0: the table itself is trained)")
    # --- data
    data: str = _f("offline", "'offline' (the embedded default data) or 'hub' (each role's "
                              "source flag must then be set)")
    task: str = _f("", "the user's task (hfjax.tasks, e.g. sst2, ag_news, financial_sentiment, "
                       "boolq, hellaswag, winogrande, arc, gsm8k, xsum, billsum, cnn_dailymail, "
                       "wmt14_en_fr, mbpp, humaneval, wikitext, aeslc; --data=offline uses its "
                       "generator): its train and test data, metric and generation budget; empty: "
                       "--offline_task, or the task --task_test_data names")
    offline_task: str = _f("sentiment", "the offline task when --task is empty: sentiment or "
                                        "topic", choices=("sentiment", "topic"))
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
    task_metric: str = _f("", "FA metric (hfjax.eval.metrics, e.g. offline, sst2, gsm8k, choice, "
                              "rouge, translation, pass_at_1, perplexity; empty: the task's)")
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
    align_defense: str = _f(NONE, "alignment-stage defense(s), e.g. vaccine or vaccine+booster "
                                  "(chained in that order), or none")
    align_defense_hparams: str = _f("", "their hyper-parameters: 'rho=2' (one defense) or "
                                        "'vaccine.rho=2,booster.lam=5'")
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
    attack: str = _f("hft", "the attack that makes the user data (hfjax.attacks: hft, "
                            "restructure, trigger_poison, pure_harmful, aoa, benign); its paper's "
                            "protocol sets the fine-tuning settings not given (lr, epochs, "
                            "batch size, n, p)")
    attack_hparams: str = _f("", "its hyper-parameters, e.g. 'k=v'")
    guard: str = _f("", "the service's guard model, prompted as Llama Guard 2 (hfjax.eval.guard): "
                        "a local HF folder or .gguf file ('': the embedded model); the virus "
                        "attack optimizes against it, the guard_filter defense drops the user "
                        "rows it flags")
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
    task_max_new_tokens: int = _f(0, "greedy tokens per task prompt (0: the task's budget, "
                                     "hfjax.tasks)")
    eval_batch_size: int = _f(50, "prompts per generation batch")
    judge: str = _f("keyword", "keyword (refusal phrases), answered (Jan et al.'s rubric: any "
                               "answer but a clear refusal), beaver_dam:PATH (BeaverTails "
                               "moderation folder), harmbench:PATH (the HarmBench Llama-2-13B "
                               "classifier folder) or hf:PATH (a transformers sequence "
                               "classifier)")
    judge_max_length: int = _f(512, "tokens of prompt + answer a classifier judge reads (the "
                                    "official evaluations cut at 256)")
    harmful_eval_rows: str = _f("harmful", "HS prompts: the harmful rows of "
                                           "--harmful_eval_data, or all its rows (Lisa's "
                                           "evaluation)", choices=("harmful", "all"))
    task_match: str = _f("contains", "FA for label tasks: the gold label in the answer "
                                     "(contains) or the answer equal to it (exact)",
                         choices=("contains", "exact"))
    eval_models: str = _f("base,aligned,final", "models to evaluate (base, aligned, final)")
    eval_framings: str = _f("", "present every harmful evaluation prompt in each of these task "
                                "framings (hfjax.data.framings: plain, classification, "
                                "translation, code, summarization; 'all' for every one) and "
                                "report HS per framing; empty: the prompts as they are")
    eval_attack_format: bool = _f(True, "ask the attacked model's harmful prompts in the "
                                        "attack's own format where it has one (restructure with "
                                        "an AOA strategy: under the AOA persona)")
    eval_attack: str = _f(NONE, "an inference-time attack on every evaluated model's harmful "
                                "prompts (hfjax.attacks, e.g. prefill: the first k tokens of a "
                                "harmful answer forced), or none")
    eval_attack_hparams: str = _f("", "its hyper-parameters, e.g. 'k=10'")
    # --- not a flag: which settings were given (module docstring)
    given: tuple[str, ...] | None = _f(None, "the flags given explicitly; None: those that "
                                             "differ from their defaults", flag=False)

    # ------------------------------------------------------------------ derived
    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return parse_mesh(self.mesh)

    @property
    def models_to_eval(self) -> tuple[str, ...]:
        return split_list(self.eval_models)

    @property
    def framing_names(self) -> tuple[str, ...]:
        if self.eval_framings.strip() == "all":
            return framings_lib.FRAMINGS
        return split_list(self.eval_framings)

    def replace(self, **changes) -> RunFlags:
        """A copy with `changes`, which count as given (a sweep's grid values)."""
        given = None if self.given is None else tuple(sorted({*self.given, *changes}))
        return dataclasses.replace(self, **changes, given=given)

    def to_dict(self) -> dict[str, Any]:
        """The flags' values (`given` is not a flag)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k in FLAG_NAMES}

    def given_flags(self) -> set[str]:
        """The flags given explicitly (module docstring)."""
        if self.given is not None:
            return set(self.given)
        return {f.name for f in dataclasses.fields(self)
                if f.name in FLAG_NAMES and getattr(self, f.name) != f.default}

    def attack_protocol(self) -> dict[str, Any]:
        """{setting: value} the attack's protocol and requirements supply: the ones not given."""
        spec = attacks.get(self.attack)
        given = self.given_flags()
        return {k: v for k, v in {**spec.protocol, **spec.requires}.items() if k not in given}

    def resolved(self) -> RunFlags:
        """`--defense NAMES` moved onto the flag of the stage the registry gives them, and the
        attack's protocol applied to the settings not given (module docstring)."""
        out = self._defense_resolved()
        return dataclasses.replace(out, **out.attack_protocol(),
                                   given=tuple(sorted(out.given_flags())))

    def _defense_resolved(self) -> RunFlags:
        if not self.defense:
            return self
        if self.defense == NONE:
            return self.replace(defense="", defense_hparams="")
        names = _names(self.defense)
        stages = {defenses_api.get(n).stage for n in names}
        if len(stages) > 1:
            raise ConfigError(f"--defense={self.defense} mixes defenses of the stages "
                              f"{sorted(stages)}; set each stage's flag instead")
        flag = {v: k for k, v in STAGE_OF_FLAG.items()}[stages.pop()]
        current = getattr(self, flag)
        if current not in (NONE, self.defense):
            raise ConfigError(f"--defense={self.defense} is a {STAGE_OF_FLAG[flag]} defense but "
                              f"--{flag}={current} is also set")
        return self.replace(**{flag: self.defense, f"{flag}_hparams": self.defense_hparams,
                               "defense": "", "defense_hparams": ""})

    def stage_defenses(self) -> dict[str, str]:
        """{flag: defense names} of the stages whose defense is set."""
        return {f: getattr(self, f) for f in STAGE_OF_FLAG if getattr(self, f) != NONE}

    def defense_label(self) -> str:
        """'none' or the set defenses joined by '+' (for tables)."""
        names = list(self.resolved().stage_defenses().values())
        return "+".join(names) if names else NONE

    def task_name(self) -> str:
        """--task, else the task --task_test_data's source names, else --offline_task."""
        if self.task:
            return self.task
        if self.task_test_data:
            source = self.task_test_data.partition(":")[0].lower()
            return source if source in tasks.available() else self.offline_task
        return self.offline_task


FLAG_NAMES = frozenset(f.name for f in dataclasses.fields(RunFlags) if f.metadata.get("flag", True))


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


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split("+") if n.strip()]


def parse_hparams(name: str, text: str) -> dict[str, Any]:
    """'rho=2,lam=5' -> {rho: 2.0, lam: 5.0}, typed like defense `name`'s defaults."""
    return parse_typed(name, defenses_api.get(name).hyperparameters, text, ConfigError)


def parse_defenses(names: str, hparams: str, flag: str) -> tuple[DefenseChoice, ...]:
    """'vaccine+booster', 'vaccine.rho=5,booster.lam=5' -> the chosen defenses, in order. One
    defense takes plain 'k=v' hyper-parameters; several take 'name.k=v'."""
    chosen = [] if names == NONE else _names(names)
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"--{flag}={names} names a defense twice")
    if not chosen:
        if hparams.strip():
            raise ConfigError(f"--{flag}_hparams is set but --{flag} is none")
        return ()
    if len(chosen) == 1:
        return (DefenseChoice(defenses_api.get(chosen[0]), parse_hparams(chosen[0], hparams)),)
    per: dict[str, list[str]] = {n: [] for n in chosen}
    for item in split_top_level(hparams):
        head, dot, rest = item.partition(".")
        if not dot or head not in per:
            raise ConfigError(f"--{flag}_hparams={hparams!r}: with several defenses each "
                              f"hyper-parameter is NAME.KEY=VALUE, NAME one of {chosen}")
        per[head].append(rest)
    return tuple(DefenseChoice(defenses_api.get(n), parse_hparams(n, ",".join(items)))
                 for n, items in per.items())


def validate(cfg: RunFlags, device_count: int | None = None) -> RunFlags:
    """Check the flags and return them with `--defense` resolved; raise ConfigError /
    DefenseError / AttackError / TaskError naming the flag."""
    cfg = cfg.resolved()
    if not cfg.run_dir:
        raise ConfigError("--run_dir is required")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{f.name} must be one of {', '.join(choices)}, got "
                              f"{getattr(cfg, f.name)!r}")
    if cfg.guard and not Path(cfg.guard).expanduser().exists():
        raise ConfigError(f"--guard={cfg.guard}: no such folder or file")
    if isinstance(cfg.harmful_ratio, bool) or not 0.0 <= float(cfg.harmful_ratio) <= 1.0 or \
            math.isnan(float(cfg.harmful_ratio)):
        raise ConfigError(f"--harmful_ratio must be in [0, 1], got {cfg.harmful_ratio}")
    positive = ("num_samples", "batch_size", "align_batch_size", "lora_rank", "eval_size",
                "judge_max_length",
                "task_eval_size", "max_new_tokens", "eval_batch_size",
                "checkpoint_every", "max_length", "defense_data_size", "pad_multiple",
                "scan_unroll")
    for f in positive:
        if getattr(cfg, f) < 1:
            raise ConfigError(f"--{f} must be >= 1, got {getattr(cfg, f)}")
    for f in ("epochs", "align_epochs", "align_refusals", "align_benign", "task_max_new_tokens"):
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
    if cfg.eval_framings.strip():
        try:
            framings_lib.check_framings(cfg.framing_names)
        except ValueError as e:
            raise ConfigError(f"--eval_framings={cfg.eval_framings!r}: {e}") from None
    kind, colon, path = cfg.judge.partition(":")
    if kind not in judges_lib.JUDGES.available() or bool(colon) != judges_lib.JUDGES.get(
            kind).takes_path:
        raise ConfigError(f"--judge must be keyword, answered, beaver_dam:PATH, harmbench:PATH "
                          f"or hf:PATH, got {cfg.judge!r}")
    from hfjax.models.lora import _check_targets  # LoRAError names the bad target

    _check_targets(split_list(cfg.lora_targets))
    if cfg.align_lora_targets.strip():
        _check_targets(split_list(cfg.align_lora_targets))
    if cfg.num_virtual_tokens < 1 or cfg.prefix_projection < 0:
        raise ConfigError(f"--num_virtual_tokens must be >= 1 and --prefix_projection >= 0, got "
                          f"{cfg.num_virtual_tokens} and {cfg.prefix_projection}")
    if cfg.adapter == "prefix" and cfg.align_epochs and cfg.epochs and \
            cfg.finetune_adapter == "fresh":
        raise ConfigError("--adapter=prefix with an alignment stage and --finetune_adapter=fresh: "
                          "a prefix cannot be merged into the aligned model for a fresh "
                          "fine-tuning prefix; use --finetune_adapter=continue or --align_epochs=0")
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
    for flag, want in STAGE_OF_FLAG.items():
        chosen = parse_defenses(getattr(cfg, flag), getattr(cfg, f"{flag}_hparams"), flag)
        for choice in chosen:
            spec = choice.spec
            if want not in spec.stages:
                raise ConfigError(f"--{flag}={choice.name}: {choice.name} is a {spec.stage} "
                                  f"defense, not a {want} one (defenses for {want}: "
                                  f"{defenses_api.available(want)})")
            if not present[want]:
                raise ConfigError(f"--{flag}={choice.name} needs a {want} stage, but "
                                  f"{why[want]}")
            if cfg.adapter != "lora" and spec.level == "weights":
                raise ConfigError(f"--{flag}={choice.name} maps a LoRA adapter; it does not "
                                  f"apply to --adapter={cfg.adapter}")
        for choice in chosen:  # bad values fail now, not when their stage starts
            if choice.spec.level != "gradient":
                choice.spec.build(**choice.hparams)
        compose.step_options(chosen, "align" if want == "alignment" else "user")
    attack = attacks.get(cfg.attack)  # AttackError on a bad name or value
    if attack.kind != attacks.api.DATA:
        raise ConfigError(f"--attack={cfg.attack} is an {attack.kind}-time attack; select it with "
                          f"--eval_attack (data attacks: {attacks.available(attacks.api.DATA)})")
    attack.build(**attack.parse(cfg.attack_hparams))
    for name, value in attack.requires.items():
        if getattr(cfg, name) != value:
            raise ConfigError(f"--{name}={getattr(cfg, name)}: --attack={cfg.attack} needs "
                              f"--{name}={value} (leave it unset)")
    inference_attack(cfg)  # AttackError / ConfigError on a bad name or value
    task = tasks.get(cfg.task_name())  # TaskError on an unknown task
    metric = (cfg.task_metric or task.metric).lower()
    families = METRIC_FAMILIES.get(metric)
    if families is not None and task.family not in families:
        raise ConfigError(f"--task_metric={metric} scores {' or '.join(sorted(families))} "
                          f"tasks; --task={task.name} is a {task.family} task (its metric: "
                          f"{task.metric})")
    if cfg.adapter not in adapter_kinds():
        raise ConfigError(f"--adapter={cfg.adapter} is no registered adapter type; choose one "
                          f"of {adapter_kinds()}")
    if cfg.task_metric and cfg.task_metric.lower() not in (*metrics_lib.METRICS, "perplexity"):
        raise ConfigError(f"--task_metric={cfg.task_metric} is no FA metric; choose one of "
                          f"{sorted(metrics_lib.METRICS)}")
    shape = cfg.mesh_shape
    if device_count is not None:
        fixed = math.prod(s for s in shape if s != -1)
        if fixed > device_count or (-1 in shape and device_count % fixed):
            raise ConfigError(f"--mesh={cfg.mesh} needs {fixed} devices (or a multiple) but "
                              f"{device_count} are available")
    return cfg


def inference_attack(f: RunFlags) -> AttackChoice | None:
    """The --eval_attack choice (None for none), checked."""
    if f.eval_attack == NONE:
        if f.eval_attack_hparams.strip():
            raise ConfigError("--eval_attack_hparams is set but --eval_attack is none")
        return None
    spec = attacks.get(f.eval_attack)
    if spec.kind != attacks.api.INFERENCE:
        raise ConfigError(f"--eval_attack={f.eval_attack} is a {spec.kind} attack; select it with "
                          f"--attack (inference-time attacks: "
                          f"{attacks.available(attacks.api.INFERENCE)})")
    hparams = spec.parse(f.eval_attack_hparams)
    spec.build(**hparams)
    return AttackChoice(f.eval_attack, hparams)


def _optimizer(lr: float, schedule: str, warmup: float, decay: float, clip: float,
               what: str) -> OptimizerConfig:
    try:
        return OptimizerConfig(learning_rate=lr, schedule=schedule, warmup_ratio=warmup,
                               weight_decay=decay, max_grad_norm=clip or None)
    except ValueError as e:
        raise ConfigError(f"{what} optimizer: {e}") from None


def to_config(f: RunFlags) -> RunConfig:
    """The nested `RunConfig` of validated flags (module docstring)."""
    f = f.resolved()
    prefix = dict(num_virtual_tokens=f.num_virtual_tokens,
                  prefix_projection=f.prefix_projection or None)
    ft_adapter = AdapterSettings(f.adapter, f.lora_rank, f.lora_alpha, split_list(f.lora_targets),
                                 f.lora_dropout, **prefix)
    al_adapter = AdapterSettings(f.adapter, f.align_lora_rank or f.lora_rank,
                                 f.align_lora_alpha or f.lora_alpha,
                                 split_list(f.align_lora_targets) or ft_adapter.targets,
                                 f.lora_dropout, **prefix)
    align_opt = _optimizer(f.align_lr, f.align_schedule or f.schedule,
                           f.warmup_ratio if f.align_warmup_ratio < 0 else f.align_warmup_ratio,
                           f.weight_decay if f.align_weight_decay < 0 else f.align_weight_decay,
                           f.max_grad_norm, "the alignment")
    ft_opt = _optimizer(f.lr, f.schedule, f.warmup_ratio, f.weight_decay, f.max_grad_norm,
                        "the fine-tuning")
    attack = attacks.get(f.attack)
    return RunConfig(
        run=RunSettings(f.run_dir, f.overwrite, f.stage_cache, f.seed, f.mesh_shape,
                        f.checkpoint_every, f.progress, f.eval_batch_size, f.scan_unroll,
                        f.attention, f.models_to_eval, f.attack_protocol()),
        model=ModelSettings(f.model, f.dtype),
        data=DataSettings(f.data, f.task_name(), f.data_seed, f.harmful_train_data,
                          f.harmful_eval_data, f.task_train_data, f.task_test_data,
                          f.align_benign_data, f.attack_data, f.task_metric, f.harmful_eval_rows,
                          f.template, f.max_length, f.pad_multiple, f.row_order, f.safety_stream,
                          f.defense_data_size),
        align=AlignSettings(
            TrainSettings(f.align_epochs, f.align_batch_size, align_opt, al_adapter,
                          parse_defenses(f.align_defense, f.align_defense_hparams,
                                         "align_defense"), f.nonfinite),
            f.align_refusals, f.align_benign),
        finetune=FinetuneSettings(
            TrainSettings(f.epochs, f.batch_size, ft_opt, ft_adapter,
                          parse_defenses(f.finetune_defense, f.finetune_defense_hparams,
                                         "finetune_defense"), f.nonfinite),
            f.num_samples, f.harmful_ratio,
            AttackChoice(f.attack, attack.parse(f.attack_hparams)), f.finetune_adapter,
            guard=f.guard),
        repair=RepairSettings(parse_defenses(f.repair_defense, f.repair_defense_hparams,
                                             "repair_defense")),
        eval=EvalSettings(f.eval_size, f.task_eval_size, f.max_new_tokens,
                          f.task_max_new_tokens or tasks.get(f.task_name()).max_new_tokens,
                          f.judge, f.judge_max_length, f.task_match, f.framing_names,
                          f.eval_attack_format, inference_attack(f)))


def define(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define one flag per RunFlags field (idempotent) and --distributed."""
    hints = typing.get_type_hints(RunFlags)
    for f in dataclasses.fields(RunFlags):
        if f.name in flag_values or f.name not in FLAG_NAMES:
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


def flags_from_absl(flag_values: flags.FlagValues = FLAGS, **overrides) -> RunFlags:
    """The parsed absl flags as `RunFlags`; `given`: the flags present on the command line (or
    in a flagfile) and the overrides."""
    values = {name: flag_values[name].value for name in FLAG_NAMES}
    given = {name for name in FLAG_NAMES if flag_values[name].present}
    values.update(overrides)
    return RunFlags(**values, given=tuple(sorted(given | set(overrides))))


def parse_value(name: str, text: str, flag_values: flags.FlagValues = FLAGS):
    """A flag value from text with the flag's own parser (for sweep grids)."""
    if name not in flag_values or name not in FLAG_NAMES:
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
