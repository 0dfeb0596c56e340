"""The protocol's stages over a run folder: align → fine-tune → repair → evaluate.

    base ──align (LoRA #1, alignment defense)──► merge ──► aligned
    aligned ──fine-tune (fresh LoRA #2 on n rows, p harmful; fine-tuning defense)──► attacked
    attacked ──repair (post-fine-tuning defense: lora -> lora)──► final
    evaluate base, aligned, final: HS (judge on held-out harmful prompts), FA (task test set)

Each stage writes into its `StageDir` and is skipped when its DONE marker matches the current
settings (resume); a training stage interrupted mid-way resumes from its orbax checkpoint.
Defenses are taken from the registry by name and wired by level: data transforms edit the
user records, gradient transforms are chained before AdamW and get their named batches,
weight transforms map the trained LoRA after training. Loaded models and data sets are cached
per process, so a sweep loads the base model once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfjax import data as data_lib
from hfjax import models, sharding
from hfjax.defenses import api as defenses_api
from hfjax.errors import UserError
from hfjax.eval import judges as judges_lib
from hfjax.eval import metrics as metrics_lib
from hfjax.eval import report as report_lib
from hfjax.eval.generate import greedy_generate
from hfjax.pipeline import inputs as inputs_lib
from hfjax.pipeline.config import (
    MODEL_NAMES,
    NONE,
    ConfigError,
    RunConfig,
    StageTraining,
    parse_hparams,
    validate,
)
from hfjax.pipeline.lock import folder_lock
from hfjax.pipeline.run_folder import (
    StageDir,
    StageMismatchError,
    fingerprint,
    read_json,
    write_json,
    write_manifest,
)
from hfjax.train import loop as loop_lib
from hfjax.train import optim
from hfjax.train import state as state_lib
from hfjax.train import step as step_lib
from hfjax.train.checkpoint import Checkpointer

STAGES = ("align", "finetune", "repair", "eval_base", "eval_aligned", "eval_final")
LABELS = {"base": "unaligned", "aligned": "aligned", "final": "attacked"}


class StageInterrupted(KeyboardInterrupt):
    """Training stopped before its last step (a checkpoint was written; rerun to resume)."""


class MissingStageError(UserError, FileNotFoundError):
    """A stage needs the artifacts of an earlier stage that has not run."""


# --------------------------------------------------------------------------- model and data

@dataclasses.dataclass
class BaseModel:
    path: str
    cfg: models.ModelConfig
    params: dict
    tokenizer: Any


@dataclasses.dataclass
class Datasets:
    """Records per role (see `RunConfig`'s *_data flags) and the FA metric."""

    harmful_train: list  # harmful prompt -> harmful response (+ "refusal")
    harmful_eval: list  # held-out harmful prompts
    task_train: list
    task_test: list
    align_benign: list
    attack: list  # the attack's harmful rows when --attack_data names their own source
    task_metric: str


_MODELS: dict[tuple, BaseModel] = {}
_DATA: dict[str, Datasets] = {}


HUB_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                "special_tokens_map.json", "generation_config.json")


def model_path(rc: RunConfig) -> str:
    """A local model path: --model as given, a hub id ("org/name") fetched with
    `huggingface_hub.snapshot_download` (safetensors, config and tokenizer only), or the
    embedded default."""
    return _resolve_model(rc.model)


@functools.lru_cache(maxsize=8)
def _resolve_model(model: str) -> str:
    if not model:
        return str(models.default_model_path())
    local = Path(model).expanduser()
    if local.exists() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        return str(local.absolute())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, allow_patterns=list(HUB_PATTERNS))
    except Exception as e:  # offline, gated, or unknown repository
        raise FileNotFoundError(f"--model={model} is no local path and the hub download "
                                f"failed ({type(e).__name__}: {e})") from e


def make_mesh(rc: RunConfig) -> jax.sharding.Mesh:
    return sharding.make_mesh(*rc.mesh_shape)


def load_base(rc: RunConfig, mesh: jax.sharding.Mesh) -> BaseModel:
    """The base model placed with its FSDP/tensor shardings (cached per process)."""
    path = model_path(rc)
    key = (path, inputs_lib.model_digest(path), rc.dtype, rc.scan_unroll, rc.attention,
           tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
    if key not in _MODELS:
        _MODELS.clear()  # one base model in memory at a time
        cfg, params = models.load_pretrained(path, dtype=jnp.dtype(rc.dtype))
        cfg = cfg.replace(dtype=rc.dtype, scan_unroll=rc.scan_unroll, attention=rc.attention)
        params = jax.device_put(params, state_lib.params_shardings(cfg, mesh))
        _MODELS[key] = BaseModel(path, cfg, params, models.load_tokenizer(path))
    return _MODELS[key]


def _load_role(spec: str, harmful: bool | None) -> list:
    """The records of one data role's source spec (custom files default to the role's harmful
    flag), keeping the rows whose flag fits the role."""
    rows = data_lib.load_spec(spec, default_harmful=harmful)
    if harmful is not None:
        rows = [r for r in rows if r["harmful"] == harmful]
    if not rows:
        raise data_lib.EmptySourceError(f"data source {spec!r} has no "
                                        f"{'harmful' if harmful else 'benign'} rows")
    return rows


def _dedupe(rows: Sequence) -> list:
    seen, out = set(), []
    for r in rows:
        k = data_lib.prompt_key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def _metric_for(spec: str) -> str:
    name = spec.partition(":")[0].lower()
    return {"sst2": "sst2", "ag_news": "agnews", "gsm8k": "gsm8k"}.get(name, "offline")


TRAIN_ROLES = ("harmful_train", "task_train", "align_benign", "attack")
EVAL_ROLES = ("harmful_eval", "task_test")


def data_key(rc: RunConfig, roles: Sequence[str] = TRAIN_ROLES + EVAL_ROLES) -> dict:
    """The data flags that decide the records of `roles` (content digests are added by
    `Pipeline.data_key`)."""
    flags = ["data", "offline_task", "data_seed", *(f"{r}_data" for r in roles)]
    if "task_test" in roles:
        flags.append("task_metric")
    if "harmful_eval" in roles:
        flags.append("harmful_eval_rows")
    return {f: getattr(rc, f) for f in flags}


def load_datasets(rc: RunConfig) -> Datasets:
    """Every role's records: the offline default, with any role replaced by a source flag."""
    key = fingerprint({**data_key(rc), "files": _data_file_digests(rc)})
    if key in _DATA:
        return _DATA[key]
    roles = {"harmful_train": (rc.harmful_train_data, True),
             "harmful_eval": (rc.harmful_eval_data,
                              True if rc.harmful_eval_rows == "harmful" else None),
             "task_train": (rc.task_train_data, False), "task_test": (rc.task_test_data, False),
             "align_benign": (rc.align_benign_data, False)}
    missing = [f"--{r}_data" for r, (s, _) in roles.items() if not s]
    out: dict = {"attack": _load_role(rc.attack_data, True) if rc.attack_data else []}
    if rc.data == "hub" and missing:
        raise ConfigError(f"--data=hub needs every source flag; missing {missing}")
    offline = data_lib.default_data(rc.data_seed, task=rc.offline_task) if missing else None
    for role, (spec, harmful) in roles.items():
        if spec:
            out[role] = _load_role(spec, harmful)
        else:
            out[role] = getattr(offline, {"align_benign": "benign_train"}.get(role, role))
    out["harmful_eval"] = _dedupe(out["harmful_eval"])
    metric = rc.task_metric or (_metric_for(rc.task_test_data) if rc.task_test_data
                                else "offline")
    data_lib.assert_disjoint({"harmful_eval": out["harmful_eval"], "task_test": out["task_test"]},
                             {"harmful_train": out["harmful_train"],
                              "task_train": out["task_train"],
                              "align_benign": out["align_benign"], "attack": out["attack"]})
    _DATA[key] = Datasets(**out, task_metric=metric)
    return _DATA[key]


def _data_file_digests(rc: RunConfig) -> dict:
    """Digests of the local data files the role flags name (a file replaced in place must not
    be served from this process's cache)."""
    out = {}
    for role in TRAIN_ROLES + EVAL_ROLES:
        spec = getattr(rc, f"{role}_data")
        if spec:
            path = data_lib.parse_source_spec(spec).path
            if path and Path(path).expanduser().is_file():
                out[role] = inputs_lib.file_digest(Path(path).expanduser())
    return out


# --------------------------------------------------------------------------- defenses

@dataclasses.dataclass(frozen=True)
class Defense:
    spec: defenses_api.DefenseSpec
    hparams: dict

    @property
    def name(self) -> str:
        return self.spec.name


def get_defense(rc: RunConfig, flag: str) -> Defense | None:
    name = getattr(rc, flag)
    if name == NONE:
        return None
    return Defense(defenses_api.get(name), parse_hparams(name, getattr(rc, f"{flag}_hparams")))


STREAM_KINDS = {"align": "align", "alignment": "align", "safety": "align", "safe": "align",
                "harmful": "harmful", "calibration": "harmful"}
DATA_DEFENSE_INPUTS = ("safety", "alignment", "harmful")
WEIGHT_DEFENSE_STREAMS = {"calibration_batches": "harmful"}


def stream_kind(name: str) -> str:
    """A defense's stream name as the data it holds: "align" (harmful prompt -> refusal) or
    "harmful" (harmful prompt -> harmful answer)."""
    if name not in STREAM_KINDS:
        raise ConfigError(f"a defense asks for a batch stream {name!r} the pipeline does not "
                          f"know (known: {sorted(STREAM_KINDS)})")
    return STREAM_KINDS[name]


def defense_streams(defense: Defense | None, primary: str) -> set[str]:
    """The kinds of extra data a defense reads beyond its stage's own batches: a gradient
    defense's batches other than `primary`, a data defense's inputs, a weight defense's
    calibration batches."""
    if defense is None:
        return set()
    spec = defense.spec
    if spec.level == "gradient":
        options = spec.step_options(**defense.hparams)
        names = set(options.batch_names) | set(spec.batches)
        return {stream_kind(n) for n in names - {primary, "user", *options.paired}}
    params = set(inspect.signature(spec.build(**defense.hparams)).parameters)
    if spec.level == "data":
        return {stream_kind(n) for n in params & set(DATA_DEFENSE_INPUTS)}
    return {WEIGHT_DEFENSE_STREAMS[n] for n in params & set(WEIGHT_DEFENSE_STREAMS)}


def role_plan(rc: RunConfig, defenses: Mapping[str, Defense | None], pool: Sequence[Mapping],
              attack_pool: Sequence[Mapping] = ()) -> data_lib.RolePlan:
    """Which harmful prompts each role of a run gets (`hfjax.data.plan`): the alignment
    refusals, the attack's rows (from `attack_pool` when --attack_data is set) and the streams
    its defenses read. Streams of the alignment stage and safety streams share the alignment's
    prompts, as the official code does; other harmful streams get their own; the attack's
    prompts go to no other role. `defenses` maps the stage flags to the run's defenses."""
    streams = {stage: defense_streams(defenses[flag], primary) if active else set()
               for stage, flag, primary, active in (
                   ("alignment", "align_defense", "align", rc.align_epochs > 0),
                   ("finetune", "finetune_defense", "user", rc.epochs > 0),
                   ("post", "repair_defense", "", rc.epochs > 0))}
    if rc.safety_stream == "benign":  # the safety stream comes from the benign alignment rows
        streams["finetune"].discard("align")
    shared = {f"alignment:{k}": rc.defense_data_size for k in streams["alignment"]}
    shared.update({f"finetune:{k}": rc.defense_data_size for k in streams["finetune"] & {"align"}})
    own = {f"{stage}:{k}": rc.defense_data_size for stage in ("finetune", "post")
           for k in streams[stage] - ({"align"} if stage == "finetune" else set())}
    return data_lib.plan_roles(
        pool, rc.seed, alignment=rc.align_refusals if rc.align_epochs else 0,
        attack=data_lib.harmful_count(rc.num_samples, rc.harmful_ratio) if rc.epochs else 0,
        shared_streams=shared, own_streams=own, attack_pool=attack_pool or None,
        order=rc.row_order)


def _call_with_inputs(fn: Callable, what: str, args: tuple, inputs: Mapping[str, Callable]):
    """Call fn(*args, **named inputs it asks for); each input is built lazily by its thunk."""
    params = list(inspect.signature(fn).parameters.values())[len(args):]
    kwargs = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in inputs:
            kwargs[p.name] = inputs[p.name]()
        elif p.default is inspect.Parameter.empty:
            raise ConfigError(f"{what} needs an input {p.name!r} the pipeline does not provide "
                              f"(it provides {sorted(inputs)})")
    return fn(*args, **kwargs)


# --------------------------------------------------------------------------- the pipeline

def pad_to_common_length(batches: dict[str, dict]) -> dict[str, dict]:
    """Right-pad every named batch of a step to the longest one's length (mask 0, labels -100),
    so a multi-stream step compiles once per length instead of once per length combination."""
    length = max(b["input_ids"].shape[1] for b in batches.values())
    fill = {"input_ids": 0, "attention_mask": 0, "labels": data_lib.IGNORE_INDEX}

    def pad(b: dict) -> dict:
        extra = length - b["input_ids"].shape[1]
        if not extra:
            return b
        return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=fill[k])
                for k, v in b.items()}

    return {n: pad(b) for n, b in batches.items()}


def loss_token_census(records: Sequence[Mapping], examples: Sequence[data_lib.Example],
                      what: str) -> dict:
    """Rows and loss tokens of a training set: {rows, loss_tokens, rows_without_loss_tokens,
    harmful_rows, harmful_rows_without_loss_tokens}. A row whose response was cut away by
    --max_length trains nothing; a set with no loss token at all is an error (the stage would
    "train" on nothing and report the result as a finding)."""
    counts = [int(np.sum(ex.labels[1:] != data_lib.IGNORE_INDEX)) for ex in examples]
    harmful = [bool(r.get("harmful")) for r in records]
    census = {"rows": len(counts), "loss_tokens": int(sum(counts)),
              "rows_without_loss_tokens": sum(c == 0 for c in counts),
              "harmful_rows": sum(harmful),
              "harmful_rows_without_loss_tokens": sum(c == 0 and h for c, h in
                                                      zip(counts, harmful, strict=True))}
    if census["loss_tokens"] == 0:
        raise data_lib.DataError(
            f"{what} have no response token left to train on ({len(counts)} rows; every "
            f"response was cut away by --max_length or is empty): raise --max_length or "
            f"shorten the prompts")
    if census["rows_without_loss_tokens"]:
        print(f"warning: {census['rows_without_loss_tokens']} of {len(counts)} of {what} "
              f"({census['harmful_rows_without_loss_tokens']} harmful) keep no response token "
              f"after cutting to --max_length and train nothing", flush=True)
    return census


def buckets(max_length: int, step: int = 16) -> tuple[int, ...]:
    """Batch lengths: multiples of `step` below max_length, then max_length."""
    return tuple(range(step, max_length, step)) + (max_length,)


class Pipeline:
    """One run: its settings, run folder, stage folders and the stages themselves."""

    def __init__(self, rc: RunConfig, mesh: jax.sharding.Mesh | None = None):
        self.rc = validate(rc, jax.device_count())
        self.run_dir = Path(self.rc.run_dir).expanduser().absolute()
        self.cache = Path(self.rc.stage_cache).expanduser().absolute() if \
            self.rc.stage_cache else None
        self.mesh = mesh if mesh is not None else make_mesh(self.rc)
        per = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        for f in ("batch_size", "align_batch_size"):
            if getattr(self.rc, f) % per:
                raise ConfigError(f"--{f}={getattr(self.rc, f)} is not divisible by the "
                                  f"mesh's data x fsdp = {per} devices")
        self.defenses = {f: get_defense(self.rc, f) for f in
                         ("align_defense", "finetune_defense", "repair_defense")}
        self._redone: set[str] = set()
        self._aligned: dict | None = None
        self._digests: dict[str, str] = {}
        self._plan: data_lib.RolePlan | None = None
        self.main_process = jax.process_index() == 0

    # ------------------------------------------------------------ lazily loaded state
    @property
    def base(self) -> BaseModel:
        return load_base(self.rc, self.mesh)

    @property
    def data(self) -> Datasets:
        return load_datasets(self.rc)

    # ------------------------------------------------------------ stage keys
    def _digest(self, name: str, compute: Callable[[], str]) -> str:
        if name not in self._digests:
            self._digests[name] = compute()
        return self._digests[name]

    def model_key(self) -> dict:
        """The base model by content (and dtype)."""
        return {"sha256": self._digest("model", lambda: inputs_lib.model_digest(
            model_path(self.rc))), "dtype": self.rc.dtype}

    def data_key(self, roles: Sequence[str]) -> dict:
        """The data flags of `roles` and the content digests of their loaded records."""
        return {**data_key(self.rc, roles), "content": {
            r: self._digest(f"data:{r}", lambda r=r: inputs_lib.records_digest(
                getattr(self.data, r))) for r in roles}}

    def judge_key(self) -> dict:
        kind, _, path = self.rc.judge.partition(":")
        if not path:
            return {"judge": self.rc.judge}
        return {"judge": kind, "sha256": self._digest("judge", lambda: inputs_lib.model_digest(
            Path(path).expanduser()))}

    def _common(self, stage: str) -> dict:
        rc = self.rc
        return {"model": self.model_key(), "data": self.data_key(TRAIN_ROLES),
                "template": rc.template, "max_length": rc.max_length, "seed": rc.seed,
                "pad_multiple": rc.pad_multiple, "row_order": rc.row_order,
                "training": dataclasses.asdict(rc.training(stage)),
                "max_grad_norm": rc.max_grad_norm, "nonfinite": rc.nonfinite}

    def _defense_key(self, flag: str) -> dict | None:
        d = self.defenses[flag]
        return None if d is None else {"name": d.name, "hparams": d.hparams,
                                       "data_size": self.rc.defense_data_size}

    def stage(self, name: str) -> StageDir:
        rc = self.rc
        if name == "align":
            key = {**self._common("align"), "refusals": rc.align_refusals,
                   "benign": rc.align_benign, "defense": self._defense_key("align_defense")}
        elif name == "finetune":
            key = {**self._common("finetune"), "align": self.source_fingerprint("aligned"),
                   "harmful_ratio": rc.harmful_ratio, "num_samples": rc.num_samples,
                   "adapter": rc.finetune_adapter, "safety_stream": rc.safety_stream,
                   "defense": self._defense_key("finetune_defense")}
        elif name == "repair":
            key = {"finetune": self.stage("finetune").fingerprint,
                   "defense": self._defense_key("repair_defense")}
        elif name.startswith("eval_"):
            which = name.removeprefix("eval_")
            source = self.model_key() if self.source_fingerprint(which) == \
                self.source_fingerprint("base") else {"stage": self.source_fingerprint(which)}
            key = {"model": source, "data": self.data_key(EVAL_ROLES),
                   "template": rc.template, "eval_size": rc.eval_size,
                   "task_eval_size": rc.task_eval_size, "max_new_tokens": rc.max_new_tokens,
                   "task_max_new_tokens": rc.task_max_new_tokens, "judge": self.judge_key(),
                   "judge_max_length": rc.judge_max_length, "task_match": rc.task_match,
                   "row_order": rc.row_order}
        else:
            raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
        return StageDir(self.run_dir, name, key, self.cache)

    def source_fingerprint(self, which: str) -> str:
        """Fingerprint of the stage whose output is model `which` (base / aligned / final)."""
        if which == "base":
            return fingerprint(self.model_key())
        if which == "aligned":
            return self.stage("align").fingerprint if self.rc.align_epochs else \
                self.source_fingerprint("base")
        if not self.rc.epochs:
            return self.source_fingerprint("aligned")
        return self.stage("repair" if self.defenses["repair_defense"] else "finetune").fingerprint

    def active_stages(self) -> list[str]:
        out = []
        if self.rc.align_epochs:
            out.append("align")
        if self.rc.epochs:
            out.append("finetune")
            if self.defenses["repair_defense"]:
                out.append("repair")
        return out + [f"eval_{m}" for m in self.rc.models_to_eval]

    # ------------------------------------------------------------ running
    def preflight(self, todo: Sequence[str]) -> None:
        """Everything that can refuse the run, before anything is written: the model and the
        data load, prompts fit the model's context, no stage folder to reuse holds other
        settings, and the earlier stages that `todo` reads (and does not run) have finished."""
        cfg = self.base.cfg
        self.role_plan()  # the harmful pool holds a disjoint slice for every role
        if self.rc.max_length > cfg.max_position_embeddings:
            raise ConfigError(f"--max_length={self.rc.max_length} exceeds the model's context "
                              f"of {cfg.max_position_embeddings} tokens")
        if any(s.startswith("eval_") for s in todo):
            self._check_eval_context()
        for name in todo:
            sd = self.stage(name)
            if not (self.rc.overwrite and sd.fingerprint not in self._redone):
                sd.done  # noqa: B018 - raises StageMismatchError on other settings
            self._check_upstream(name, todo)

    def _check_eval_context(self) -> None:
        """Every evaluation prompt plus its generation budget fits the model's context."""
        limit = self.base.cfg.max_position_embeddings
        harm, task = self.eval_sets()
        for what, records, budget, flag in (("harmful evaluation", harm, self.rc.max_new_tokens,
                                             "max_new_tokens"),
                                            ("task test", task, self.rc.task_max_new_tokens,
                                             "task_max_new_tokens")):
            lengths = [len(ids) for ids in data_lib.encode_prompts(records, self.base.tokenizer,
                                                                   self.rc.template)]
            over = [n for n in lengths if n + budget > limit]
            if over:
                raise data_lib.DataError(
                    f"{len(over)} of {len(lengths)} {what} prompts do not fit the model's "
                    f"context of {limit} tokens with --{flag}={budget} (the longest prompt has "
                    f"{max(over)} tokens); shorten or drop them, or lower --{flag}")

    def write_manifest(self) -> None:
        """run.json: this invocation's settings; stage fingerprints accumulate over runs."""
        if self.main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            old = read_json(self.run_dir / "run.json") if (self.run_dir / "run.json").is_file() \
                else {}
            stages = {**old.get("stages", {}),
                      **{s: self.stage(s).fingerprint for s in self.active_stages()}}
            write_manifest(self.run_dir, self.rc.to_dict(), {
                "stages": stages, "model_path": model_path(self.rc),
                "inputs": {"model": self.model_key(),
                           "data": self.data_key(TRAIN_ROLES + EVAL_ROLES)["content"]},
                "harmful_roles": self.role_plan().summary(self._pools())})
        _barrier("manifest written")

    def _lock(self, sd: StageDir | None = None):
        """The run folder's lock (refuse when held), or a shared stage's (wait for it);
        process 0 alone holds locks."""
        if not self.main_process:
            return contextlib.nullcontext()
        if sd is None:
            return folder_lock(self.run_dir / ".lock", f"run folder {self.run_dir}")
        return folder_lock(sd.path.parent / f".{sd.path.name}.lock", f"shared stage {sd.path}",
                           wait=True)

    def run_stage(self, name: str) -> dict:
        """Run stage `name` unless its artifacts exist (then return its summary).

        Multi-host: process 0 alone writes the stage folder (begin, DONE); every process decides
        from the same files, because all of them pass a barrier after deciding whether to skip
        and after the stage finished (a shared filesystem is assumed, as for orbax)."""
        sd = self.stage(name)
        with self._lock(sd) if sd.path != sd.link else contextlib.nullcontext():
            force = self.rc.overwrite and sd.fingerprint not in self._redone
            skip = not force and sd.done
            _barrier(f"{name}: skip decided")
            if skip:
                if self.main_process:
                    sd.ensure_link()
                print(f"[{name}] done already ({sd.path}); skipped", flush=True)
                return sd.summary()
            print(f"[{name}] running -> {sd.path}", flush=True)
            start = time.perf_counter()
            if self.main_process:
                sd.begin(overwrite=force)
            _barrier(f"{name}: folder ready")
            summary = getattr(self, f"_run_{name.split('_')[0]}")(sd, sd.path, name)
            summary = {**summary, "wall_s": round(time.perf_counter() - start, 2)}
            if self.main_process:
                sd.finish(summary)
            _barrier(f"{name}: finished")
        self._redone.add(sd.fingerprint)
        print(f"[{name}] finished in {summary['wall_s']:.1f} s", flush=True)
        return summary

    def _check_upstream(self, name: str, todo: Sequence[str]) -> None:
        needs = {"finetune": ["align"] if self.rc.align_epochs else [],
                 "repair": ["finetune"],
                 "eval_aligned": ["align"] if self.rc.align_epochs else [],
                 "eval_final": [s for s in ("align", "finetune", "repair")
                                if s in self.active_stages()]}.get(name, [])
        for up in needs:
            if up not in todo and not self.stage(up).done:
                raise MissingStageError(
                    f"stage {name!r} needs stage {up!r}, which has not finished in "
                    f"{self.run_dir} with these settings; run experiments.{up} (or "
                    f"experiments.pipeline) first")

    def run(self, stages: Sequence[str] | None = None) -> dict:
        """Run `stages` (default: every active stage) in order, then write the run's results.

        Nothing is written before the settings are accepted and the inputs load (`preflight`);
        the run folder is locked against a second process for the whole run."""
        todo = list(stages) if stages is not None else self.active_stages()
        for s in todo:
            if s not in self.active_stages():
                raise ConfigError(f"stage {s!r} is not part of this run (its stages: "
                                  f"{self.active_stages()})")
        self.preflight(todo)
        with self._lock():
            self.preflight(todo)  # again under the lock: the folder may have changed meanwhile
            self.write_manifest()
            for s in todo:
                self.run_stage(s)
            return self.write_results()

    # ------------------------------------------------------------ models
    def alignment_adapter(self) -> models.lora.LoRA:
        return models.lora.load_peft(self.stage("align").path / "adapter", self.base.cfg)

    def aligned_params(self) -> dict:
        base = self.base
        if not self.rc.align_epochs:
            return base.params
        if self._aligned is None:
            merged = models.lora.merge(base.cfg, base.params, self.alignment_adapter())
            self._aligned = jax.device_put(merged, state_lib.params_shardings(base.cfg,
                                                                              self.mesh))
        return self._aligned

    def final_model(self) -> tuple[dict, Any]:
        """(params, lora) of the final model: aligned weights + the repaired fine-tuning LoRA."""
        if not self.rc.epochs:
            return self.aligned_params(), None
        stage = "repair" if self.defenses["repair_defense"] else "finetune"
        params = self.base.params if self.rc.finetune_adapter == "continue" else \
            self.aligned_params()
        return params, models.lora.load_peft(self.stage(stage).path / "adapter", self.base.cfg)

    # ------------------------------------------------------------ data per stage
    def role_plan(self) -> data_lib.RolePlan:
        """Disjoint slices of the harmful training pool (see `role_plan`)."""
        if self._plan is None:
            self._plan = role_plan(self.rc, self.defenses, self.data.harmful_train,
                                   self.data.attack)
        return self._plan

    def _pools(self) -> dict[str, list]:
        return {"pool": self.data.harmful_train, "attack": self.data.attack}

    def alignment_records(self) -> list:
        d = self.data
        refusals = self.role_plan().take(self._pools(), data_lib.plan.ALIGNMENT)
        benign = data_lib.sample(d.align_benign, self.rc.align_benign, self.rc.seed,
                                 "benign alignment source", self.rc.row_order)
        return data_lib.build_alignment_set(refusals, benign, len(refusals), len(benign),
                                            self.rc.seed)

    def alignment_pairs(self) -> list:
        """The alignment's harmful rows, each with its refusal (paired, or templated) in
        "refusal": a paired defense's rows (RepNoise trains on these pairs alone)."""
        rows = self.role_plan().take(self._pools(), data_lib.plan.ALIGNMENT)
        return [{**r, "refusal": data_lib.refusal_row(r, self.rc.seed)["response"]}
                for r in rows]

    def user_records(self) -> list:
        d = self.data
        attack = self.role_plan().take(self._pools(), data_lib.plan.ATTACK)
        return data_lib.mix_user_data(d.task_train, attack, self.rc.num_samples,
                                      self.rc.harmful_ratio, self.rc.seed, self.rc.row_order)

    def _stream_records(self, name: str, stage: str) -> list:
        """Records of the extra batch stream `name` a defense reads at `stage` (alignment,
        finetune, post): its own slice of the harmful pool, as refusals for a safety stream."""
        kind = stream_kind(name)
        if kind == "align" and stage == "finetune" and self.rc.safety_stream == "benign":
            return data_lib.sample(self.data.align_benign, self.rc.defense_data_size,
                                   self.rc.seed, "benign alignment source", self.rc.row_order)
        rows = self.role_plan().take(self._pools(), f"{stage}:{kind}")
        if not rows:
            raise ConfigError(f"the {stage} stage's defense reads a {name!r} stream the pipeline "
                              f"did not plan (streams planned: {sorted(self.role_plan().rows)})")
        if kind == "align":
            return [data_lib.refusal_row(r, self.rc.seed) for r in rows]
        return rows

    def _tokenize(self, records: list, response_field: str = "response") -> list:
        return data_lib.tokenize_records(records, self.base.tokenizer, self.rc.template,
                                         self.rc.max_length, response_field=response_field)

    def _batcher(self, examples, batch_size: int, seed: int, num_epochs: int | None,
                 drop_last: bool = True):
        tok = self.base.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        lengths = buckets(self.rc.max_length, self.rc.pad_multiple)
        return data_lib.Batcher(examples, batch_size, seed, buckets=lengths, pad_id=pad,
                                num_epochs=num_epochs, drop_last=drop_last,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())

    def _stream_batcher(self, name: str, stage: str, batch_size: int, seed: int):
        return self._batcher(self._tokenize(self._stream_records(name, stage)), batch_size, seed,
                             None)

    # ------------------------------------------------------------ training
    def _train(self, out: Path, *, params: dict, records: list, stream: str,
               training: StageTraining, defense: Defense | None, salt: int,
               init: models.lora.LoRA | None = None) -> tuple[Any, dict]:
        """Train a LoRA (fresh, or `init`) on `records` (the batch stream named `stream`:
        "align" at the alignment stage, "user" at fine-tuning) with the stage's `training`
        settings; a gradient defense is chained before AdamW, gets the step options it declares
        and every batch stream it names."""
        rc, base = self.rc, self.base
        batch_size = training.batch_size
        pre, step_kwargs, names, sizes, paired = [], {"primary": stream}, [stream], {}, ()
        gradient = defense is not None and defense.spec.level == "gradient"
        if gradient:
            options = defense.spec.step_options(**defense.hparams)
            step_kwargs = options.step_kwargs()
            names = list(dict.fromkeys([*names, *options.batch_names, *defense.spec.batches]))
            sizes, paired = dict(options.batch_sizes), options.paired
            per = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            for name, size in sizes.items():
                if size % per:
                    raise ConfigError(f"{defense.name} reads {size}-row {name!r} batches, which "
                                      f"the mesh's data x fsdp = {per} devices do not divide")
        if paired:  # one record per row: its refusal in paired[0], its answer in the others
            examples = {n: self._tokenize(records, "refusal" if n == paired[0] else "response")
                        for n in paired}
            census = loss_token_census([{**r, "harmful": False} for r in records],
                                       examples[paired[0]], f"the {stream!r} rows")
            # no label-masked fillers: the official pair mask reads ids, where fillers count
            primary = self._batcher(examples, batch_size, rc.seed + salt, training.epochs)
        else:
            examples = self._tokenize(records)
            census = loss_token_census(records, examples, f"the {stream!r} rows")
            primary = self._batcher(examples, batch_size, rc.seed + salt, training.epochs,
                                    drop_last=False)
        if gradient:  # built once the run's step count is known (Lisa's warm-up reads it)
            pre.append(defense.spec.build_for_run(defense.hparams,
                                                  total_steps=primary.total_steps))
        stage = "alignment" if stream == "align" else "finetune"
        extra = {name: self._stream_batcher(name, stage, sizes.get(name, batch_size),
                                            rc.seed + salt + 10 + i)
                 for i, name in enumerate(names[1:]) if name not in paired}
        total = primary.total_steps
        ocfg = optim.OptimizerConfig(learning_rate=training.lr, schedule=training.schedule,
                                     warmup_ratio=training.warmup_ratio, total_steps=total,
                                     weight_decay=training.weight_decay,
                                     max_grad_norm=rc.max_grad_norm or None)
        opt = optim.make_optimizer(ocfg, pre=pre)
        lora = init.replace(dropout=training.lora_dropout) if init is not None else \
            models.lora.init(base.cfg, jax.random.fold_in(jax.random.key(rc.seed), salt),
                             rank=training.lora_rank, alpha=training.lora_alpha,
                             targets=training.lora_targets, dropout=training.lora_dropout)
        frozen_sh = state_lib.params_shardings(base.cfg, self.mesh)
        st, st_sh = step_lib.init_state(base.cfg, lora, opt, mesh=self.mesh, seed=rc.seed + salt)
        fn = step_lib.make_train_step(base.cfg, opt, mesh=self.mesh, state_shardings=st_sh,
                                      frozen_shardings=frozen_sh,
                                      learning_rate_fn=optim.make_schedule(ocfg),
                                      skip_nonfinite=rc.nonfinite == "skip", **step_kwargs)

        def batches(start: int) -> Iterator[dict]:
            others = {n: b.batches(start) for n, b in extra.items()}
            for b in primary.batches(start):
                yield pad_to_common_length({**(b if paired else {stream: b}),
                                            **{n: next(it) for n, it in others.items()}})

        ckpt = Checkpointer(out / "ckpt", every=rc.checkpoint_every, keep=2)
        try:
            st, history = loop_lib.train(fn, st, params, batches, mesh=self.mesh,
                                         num_steps=total, state_shardings=st_sh,
                                         checkpointer=ckpt, metrics_path=out / "metrics.jsonl",
                                         progress=rc.progress)
        finally:
            ckpt.close()
        if int(st.step) < total:
            raise StageInterrupted(f"training stopped at step {int(st.step)} of {total}; "
                                   f"rerun the same command to resume from {out / 'ckpt'}")
        loop_lib.check_finite_tree(st.trainable, f"the trained adapter in {out}")
        skipped = int(sum(h.get("skipped", 0) for h in history))
        if 2 * skipped > len(history):
            raise loop_lib.NonFiniteError(
                f"{skipped} of the {len(history)} steps of this run of the stage had a non-finite "
                f"loss or gradient norm and were skipped (--nonfinite=skip): the training "
                f"diverged; lower the learning rate. The stage is not marked done")
        times = [h["step_time_s"] for h in history[1:]] or [h["step_time_s"] for h in history]
        summary = {"steps": total, **census, "streams": names, "compiles": fn.compiles,
                   "steps_per_epoch": primary.steps_per_epoch,
                   "skipped_steps": skipped,
                   "final_loss": history[-1]["loss"] if history else None,
                   "median_step_s": float(np.median(times)) if times else None}
        return st.trainable, summary

    def _data_defense(self, defense: Defense | None, records: list, stage: str) -> list:
        """Apply a data-level defense (`records -> records`, e.g. SafeInstr mixing)."""
        if defense is None or defense.spec.level != "data":
            return records
        hparams = defense.hparams
        if "seed" in defense.spec.hyperparameters:  # the run's seed unless the user set one
            hparams = {"seed": self.rc.seed, **hparams}
        transform = defense.spec.build(**hparams)
        return _call_with_inputs(transform, defense.name, (records,), {
            name: lambda name=name: self._stream_records(name, stage)
            for name in DATA_DEFENSE_INPUTS})

    def _save_adapter(self, out: Path, lora) -> None:
        # every process: save_peft all-gathers weights that span processes; process 0 writes
        models.lora.save_peft(out / "adapter", self.base.cfg, lora,
                              base_model_name_or_path=model_path(self.rc))

    def _run_align(self, sd: StageDir, out: Path, name: str) -> dict:
        defense = self.defenses["align_defense"]
        if defense is not None and defense.spec.step_options(**defense.hparams).paired:
            records = self.alignment_pairs()
        else:
            records = self._data_defense(defense, self.alignment_records(), "alignment")
        lora, summary = self._train(out, params=self.base.params, records=records, stream="align",
                                    training=self.rc.training("align"), defense=defense, salt=1)
        self._save_adapter(out, lora)
        self._aligned = None
        return summary

    def _run_finetune(self, sd: StageDir, out: Path, name: str) -> dict:
        defense = self.defenses["finetune_defense"]
        records = self._data_defense(defense, self.user_records(), "finetune")
        if self.rc.finetune_adapter == "continue":  # the alignment's LoRA, further, on the base
            params, init = self.base.params, self.alignment_adapter()
        else:
            params, init = self.aligned_params(), None
        lora, summary = self._train(out, params=params, records=records, stream="user",
                                    training=self.rc.training("finetune"), defense=defense,
                                    salt=2, init=init)
        self._save_adapter(out, lora)
        return summary

    def _run_repair(self, sd: StageDir, out: Path, name: str) -> dict:
        """The post-fine-tuning weight transform `(cfg, params, lora, **inputs) -> lora` (or
        `(lora, report)`); params are the aligned weights the adapter was trained on."""
        defense = self.defenses["repair_defense"]
        cfg = self.base.cfg
        lora = models.lora.load_peft(self.stage("finetune").path / "adapter", cfg)
        fn = defense.spec.build(**defense.hparams)

        def calibration() -> list[dict]:
            ex = self._tokenize(self._stream_records("harmful", "post"))
            return list(self._batcher(ex, self.rc.batch_size, self.rc.seed + 3, 1).batches(0))

        out_lora = _call_with_inputs(fn, defense.name, (cfg, self.aligned_params(), lora), {
            "base_params": lambda: self.base.params, "aligned_params": self.aligned_params,
            "calibration_batches": calibration})
        report = {}
        if isinstance(out_lora, tuple):
            out_lora, report = out_lora
        self._save_adapter(out, out_lora)
        scalars = {k: v for k, v in (report or {}).items()
                   if isinstance(v, (int, float, str, bool, list, dict)) and k != "masks"}
        if self.main_process:
            write_json(out / "report.json", jax.tree.map(
                lambda x: np.asarray(x).tolist() if hasattr(x, "shape") else x, scalars))
        return {"defense": defense.name}

    # ------------------------------------------------------------ evaluation
    def judge(self):
        j = self.rc.judge
        if j == "keyword":
            return judges_lib.KeywordRefusalJudge()
        kind, _, path = j.partition(":")
        if kind == "beaver_dam":
            return judges_lib.BeaverDamJudge(path, max_length=self.rc.judge_max_length)
        return judges_lib.HFSequenceClassifierJudge(path, max_length=self.rc.judge_max_length)

    def _generate(self, params, lora, records: list, max_new_tokens: int) -> list[str]:
        tok, cfg = self.base.tokenizer, self.base.cfg
        ids = data_lib.encode_prompts(records, tok, self.rc.template)
        order = np.argsort([len(p) for p in ids], kind="stable")
        out: list[str] = [""] * len(ids)
        bs = self.rc.eval_batch_size
        for s in range(0, len(ids), bs):
            chunk = order[s:s + bs]
            gen = greedy_generate(cfg, params, [ids[i] for i in chunk],
                                  max_new_tokens=max_new_tokens, lora=lora)
            for i, g in zip(chunk, gen, strict=True):
                out[i] = tok.decode(g, skip_special_tokens=True).strip()
        return out

    def eval_sets(self) -> tuple[list, list]:
        d, rc = self.data, self.rc
        harm = data_lib.build_eval_set(d.harmful_eval, min(rc.eval_size, len(d.harmful_eval)),
                                       rc.data_seed, rc.row_order)
        task = data_lib.build_eval_set(d.task_test, min(rc.task_eval_size, len(d.task_test)),
                                       rc.data_seed, rc.row_order)
        return harm, task

    def _run_eval(self, sd: StageDir, out: Path, name: str) -> dict:
        which = name.removeprefix("eval_")
        if which == "base":
            params, lora = self.base.params, None
        elif which == "aligned":
            params, lora = self.aligned_params(), None
        else:
            params, lora = self.final_model()
        harm, task = self.eval_sets()
        judge = self.judge()
        t0 = time.perf_counter()
        answers = self._generate(params, lora, harm, self.rc.max_new_tokens)
        t1 = time.perf_counter()
        prompts = [r["prompt"] for r in harm]
        judged = judges_lib.score_with(judge, prompts, answers)
        hs = metrics_lib.harmful_score(judged.scores)
        degenerate = [metrics_lib.is_degenerate(a) for a in answers]
        task_answers = self._generate(params, lora, task, self.rc.task_max_new_tokens)
        t2 = time.perf_counter()
        golds = [r.get("label") or r.get("answer") for r in task]
        task_name = self.data.task_metric
        exact = self.rc.task_match == "exact"
        correct = [metrics_lib.accuracy(task_name, [a], [g], exact) for a, g in
                   zip(task_answers, golds, strict=True)]
        fa = float(np.mean(correct))
        degenerate_share = float(np.mean(degenerate))
        task_degenerate = metrics_lib.degenerate_share(task_answers)
        results = report_lib.make_results(
            model=which, judge=judge.name, harmful_score=hs, finetune_accuracy=fa,
            task=task_name, n_harmful=len(harm), n_flagged=int(judged.flags.sum()),
            n_task=len(task), seeds={"seed": self.rc.seed, "data_seed": self.rc.data_seed},
            degenerate_share=degenerate_share, task_degenerate_share=task_degenerate,
            max_new_tokens=self.rc.max_new_tokens, generate_s=round(t2 - t0, 2))
        if self.main_process:
            report_lib.write_generations(out / "generations_harmful.jsonl",
                                         report_lib.generation_records(
                                             prompts, answers, [judged],
                                             extra={"degenerate": degenerate}))
            report_lib.write_generations(
                out / "generations_task.jsonl",
                report_lib.generation_records([_task_text(r) for r in task], task_answers,
                                              extra={"gold": golds, "correct": correct}))
            write_json(out / "results.json", results)
        print(f"[{name}] HS {100 * hs:.1f}%  FA {100 * fa:.1f}%  "
              f"(generation {t1 - t0:.1f} s + {t2 - t1:.1f} s)", flush=True)
        if degenerate_share or task_degenerate:
            print(f"[{name}] warning: {100 * degenerate_share:.0f}% of the harmful-prompt answers "
                  f"and {100 * task_degenerate:.0f}% of the task answers are empty or degenerate; "
                  f"the judge scores them as safe, so HS understates what a working model "
                  f"would do (see generations_*.jsonl)", flush=True)
        return {"harmful_score": hs, "finetune_accuracy": fa,
                "degenerate_share": degenerate_share}

    # ------------------------------------------------------------ results
    def results(self) -> dict:
        """The run's summary: settings and HS/FA of every evaluated model that has finished."""
        rc = self.rc
        rows = []
        for which in MODEL_NAMES:  # every finished evaluation of these settings, not only
            sd = self.stage(f"eval_{which}")  # those this invocation ran (a subset rerun)
            try:
                if not sd.done:
                    continue
            except StageMismatchError:  # made with other settings: not this run's result
                continue
            r = read_json(sd.path / "results.json")
            rows.append({"model": which, "label": model_label(which, rc),
                         "harmful_score": r["harmful_score"],
                         "finetune_accuracy": r["finetune_accuracy"],
                         "degenerate_share": r.get("degenerate_share"), "judge": r["judge"],
                         "task": r["task"]})
        return {"run_dir": str(self.run_dir), "settings": run_settings(rc), "rows": rows}

    def write_results(self) -> dict:
        from hfjax.pipeline import report

        res = self.results()
        if self.main_process and res["rows"]:
            write_json(self.run_dir / "results.json", res)
            table = report.run_table(res)
            report.write_text(self.run_dir / "results.md", table + "\n")
            report.write_csv(self.run_dir / "results.csv", report.long_rows([res]))
        return res


def _barrier(tag: str) -> None:
    """Wait for every process (multi-host runs only): files process 0 wrote are visible."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


def _task_text(r: Mapping) -> str:
    return r["prompt"] + (f"\n\n{r['input']}" if r.get("input") else "")


def model_label(which: str, rc: RunConfig) -> str:
    if which != "final":
        return LABELS[which]
    defense = rc.defense_label()
    if not rc.epochs:
        return "aligned (no fine-tuning)"
    return "attacked" if defense == NONE else f"attacked+{defense}"


def run_settings(rc: RunConfig) -> dict:
    """The settings a results table groups by."""
    rc = rc.resolved()
    return {"defense": rc.defense_label(), "harmful_ratio": rc.harmful_ratio,
            "num_samples": rc.num_samples, "lr": rc.lr, "epochs": rc.epochs, "seed": rc.seed,
            "align_lr": rc.align_lr, "align_epochs": rc.align_epochs,
            "model": Path(rc.model).name if rc.model else "SmolLM2-135M-Instruct (embedded)",
            "harmful_count": data_lib.harmful_count(rc.num_samples, rc.harmful_ratio)
            if rc.epochs else 0,
            "hparams": {f: getattr(rc, f"{f}_hparams") for f in
                        ("align_defense", "finetune_defense", "repair_defense")
                        if getattr(rc, f) != NONE}}

