"""What a run reads: the base model, every data role's records, and which harmful prompts each
role gets. Loaded lazily and cached per process (a sweep loads the base model once); the stage
keys name them by content (`hfjax.pipeline.inputs`), not by path.

    res = Resources(rc, mesh)
    res.base          # BaseModel: path, cfg, params (placed with their shardings), tokenizer
    res.data          # Datasets: records per role
    res.task          # the user's task (hfjax.tasks): metric, generation budget
    res.plan          # RolePlan: the harmful prompts of the alignment, the attack, each stream
    res.model_key(), res.data_key(roles)   # content digests for stage keys
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from hfjax import data as data_lib
from hfjax import models, sharding, tasks
from hfjax.data.multitaskbench import load_multitaskbench
from hfjax.defenses.compose import DefenseChoice
from hfjax.pipeline import inputs as inputs_lib
from hfjax.pipeline.config import ConfigError, DataSettings, RunConfig, key_of
from hfjax.pipeline.run_folder import fingerprint
from hfjax.train import state as state_lib

HUB_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                "special_tokens_map.json", "generation_config.json")
TRAIN_ROLES = ("harmful_train", "task_train", "align_benign", "attack")
EVAL_ROLES = ("harmful_eval", "task_test")
STREAM_KINDS = {"align": "align", "alignment": "align", "safety": "align", "safe": "align",
                "harmful": "harmful", "calibration": "harmful"}
DATA_DEFENSE_INPUTS = ("safety", "alignment", "harmful")
WEIGHT_DEFENSE_STREAMS = {"calibration_batches": "harmful"}


@dataclasses.dataclass
class BaseModel:
    path: str
    cfg: models.ModelConfig
    params: dict
    tokenizer: Any


@dataclasses.dataclass
class Datasets:
    """Records per role (`DataSettings`' sources) and the user's task."""

    harmful_train: list  # harmful prompt -> harmful response (+ "refusal")
    harmful_eval: list  # held-out harmful prompts
    task_train: list
    task_test: list
    align_benign: list
    attack: list  # the attack's harmful rows when --attack_data names their own source
    task: tasks.TaskSpec
    task_metric: str


_MODELS: dict[tuple, BaseModel] = {}
_DATA: dict[str, Datasets] = {}


def model_path(model: str) -> str:
    """A local model path: `model` as given, a hub id ("org/name") fetched with
    `huggingface_hub.snapshot_download` (safetensors, config and tokenizer only), or the
    embedded default for ""."""
    return _resolve_model(model)


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
    return sharding.make_mesh(*rc.run.mesh)


def load_base(rc: RunConfig, mesh: jax.sharding.Mesh) -> BaseModel:
    """The base model placed with its FSDP/tensor shardings (cached per process)."""
    path = model_path(rc.model.path)
    key = (path, inputs_lib.model_digest(path), rc.model.dtype, rc.run.scan_unroll,
           rc.run.attention, tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
    if key not in _MODELS:
        _MODELS.clear()  # one base model in memory at a time
        cfg, params = models.load_pretrained(path, dtype=jnp.dtype(rc.model.dtype))
        cfg = cfg.replace(dtype=rc.model.dtype, scan_unroll=rc.run.scan_unroll,
                          attention=rc.run.attention)
        params = jax.device_put(params, state_lib.params_shardings(cfg, mesh))
        _MODELS[key] = BaseModel(path, cfg, params, models.load_tokenizer(path))
    return _MODELS[key]


def _multitaskbench_path(spec: str) -> Path | None:
    name, _, path = spec.partition(":")
    return Path(path).expanduser() if name == "multitaskbench" else None


def _load_role(spec: str, harmful: bool | None) -> list:
    """The records of one data role's source spec (custom files default to the role's harmful
    flag; `multitaskbench:PATH` reads MultiTaskBench's CSV, each row a harmful request in its
    task framing), keeping the rows whose flag fits the role."""
    path = _multitaskbench_path(spec)
    if path is not None:  # Jan et al.'s file: framed harmful requests with refusals
        rows = load_multitaskbench(path)
    else:
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


def _file_digests(d: DataSettings) -> dict:
    """Digests of the local data files the roles name (a file replaced in place must not be
    served from this process's cache)."""
    out = {}
    for role in TRAIN_ROLES + EVAL_ROLES:
        spec = getattr(d, role)
        if spec:
            path = _multitaskbench_path(spec) or data_lib.parse_source_spec(spec).path
            if path and Path(path).expanduser().is_file():
                out[role] = inputs_lib.file_digest(Path(path).expanduser())
    return out


def load_datasets(d: DataSettings) -> Datasets:
    """Every role's records: a role's source, else the task's data (its generator or hub
    sources), else the offline default (cached per process by settings and file contents)."""
    key = fingerprint({**key_of(d), "files": _file_digests(d)})
    if key in _DATA:
        return _DATA[key]
    task = tasks.get(d.task)
    roles = {"harmful_train": (d.harmful_train, True),
             "harmful_eval": (d.harmful_eval, True if d.harmful_eval_rows == "harmful" else None),
             "align_benign": (d.align_benign, False)}
    missing = [f"--{r}_data" for r, (s, _) in roles.items() if not s]
    if d.source == "hub" and missing:
        raise ConfigError(f"--data=hub needs every source flag; missing {missing}")
    offline = data_lib.default_data(d.data_seed, task=d.task if task.offline else "sentiment") \
        if missing else None
    out: dict = {"attack": _load_role(d.attack, True) if d.attack else []}
    for role, (spec, harmful) in roles.items():
        out[role] = _load_role(spec, harmful) if spec else \
            getattr(offline, {"align_benign": "benign_train"}.get(role, role))
    if d.task_train and d.task_test:
        out["task_train"] = _load_role(d.task_train, False)
        out["task_test"] = _load_role(d.task_test, False)
    else:
        train, test = task.load(d.data_seed, "offline" if d.source == "offline" else None)
        out["task_train"] = _load_role(d.task_train, False) if d.task_train else train
        out["task_test"] = _load_role(d.task_test, False) if d.task_test else test
    out["harmful_eval"] = _dedupe(out["harmful_eval"])
    data_lib.assert_disjoint({"harmful_eval": out["harmful_eval"], "task_test": out["task_test"]},
                             {"harmful_train": out["harmful_train"],
                              "task_train": out["task_train"],
                              "align_benign": out["align_benign"], "attack": out["attack"]})
    _DATA[key] = Datasets(**out, task=task, task_metric=d.task_metric or task.metric)
    return _DATA[key]


def stream_kind(name: str) -> str:
    """A defense's stream name as the data it holds: "align" (harmful prompt -> refusal) or
    "harmful" (harmful prompt -> harmful answer)."""
    if name not in STREAM_KINDS:
        raise ConfigError(f"a defense asks for a batch stream {name!r} the pipeline does not "
                          f"know (known: {sorted(STREAM_KINDS)})")
    return STREAM_KINDS[name]


def defense_streams(choices: Sequence[DefenseChoice], primary: str) -> set[str]:
    """The kinds of extra data a stage's defenses read beyond its own batches: gradient
    defenses' batches other than `primary` (paired streams come from the stage's own rows), a
    data defense's inputs, a weight defense's calibration batches."""
    out: set[str] = set()
    for c in choices:
        spec = c.spec
        if spec.level == "gradient":
            options = spec.step_options(**c.hparams)
            names = set(options.batch_names) | set(spec.batches)
            out |= {stream_kind(n) for n in names - {primary, "user", *options.paired}}
            continue
        params = set(inspect.signature(spec.build(**c.hparams)).parameters)
        if spec.level == "data":
            out |= {stream_kind(n) for n in params & set(DATA_DEFENSE_INPUTS)}
        else:
            out |= {WEIGHT_DEFENSE_STREAMS[n] for n in params & set(WEIGHT_DEFENSE_STREAMS)}
    return out


def role_plan(rc: RunConfig, pool: Sequence[Mapping],
              attack_pool: Sequence[Mapping] = ()) -> data_lib.RolePlan:
    """Which harmful prompts each role of a run gets (`hfjax.data.plan`): the alignment
    refusals, the attack's rows (from `attack_pool` when --attack_data is set) and the streams
    its defenses read. Streams of the alignment stage and safety streams share the alignment's
    prompts, as the official code does; other harmful streams get their own; the attack's
    prompts go to no other role."""
    aligning, tuning = rc.align.train.epochs > 0, rc.finetune.train.epochs > 0
    streams = {"alignment": defense_streams(rc.align.train.defenses, "align") if aligning
               else set(),
               "finetune": defense_streams(rc.finetune.train.defenses, "user") if tuning
               else set(),
               "post": defense_streams(rc.repair.defenses, "") if tuning else set()}
    if rc.data.safety_stream == "benign":  # the safety stream comes from the benign alignment rows
        streams["finetune"].discard("align")
    size = rc.data.defense_data_size
    shared = {f"alignment:{k}": size for k in streams["alignment"]}
    shared.update({f"finetune:{k}": size for k in streams["finetune"] & {"align"}})
    own = {f"{stage}:{k}": size for stage in ("finetune", "post")
           for k in streams[stage] - ({"align"} if stage == "finetune" else set())}
    return data_lib.plan_roles(
        pool, rc.run.seed, alignment=rc.align.refusals if aligning else 0,
        attack=data_lib.harmful_count(rc.finetune.num_samples, rc.finetune.harmful_ratio)
        if tuning else 0,
        shared_streams=shared, own_streams=own, attack_pool=attack_pool or None,
        order=rc.data.row_order)


class Resources:
    """The lazily loaded model, data and role plan of one run, and their content keys."""

    def __init__(self, rc: RunConfig, mesh: jax.sharding.Mesh):
        self.rc, self.mesh = rc, mesh
        self._digests: dict[str, str] = {}
        self._plan: data_lib.RolePlan | None = None

    @property
    def base(self) -> BaseModel:
        return load_base(self.rc, self.mesh)

    @property
    def data(self) -> Datasets:
        return load_datasets(self.rc.data)

    @property
    def plan(self) -> data_lib.RolePlan:
        if self._plan is None:
            self._plan = role_plan(self.rc, self.data.harmful_train, self.data.attack)
        return self._plan

    def pools(self) -> dict[str, list]:
        return {"pool": self.data.harmful_train, "attack": self.data.attack}

    def _digest(self, name: str, compute) -> str:
        if name not in self._digests:
            self._digests[name] = compute()
        return self._digests[name]

    def model_key(self) -> dict:
        """The base model by content (and dtype)."""
        path = model_path(self.rc.model.path)
        return {"sha256": self._digest("model", lambda: inputs_lib.model_digest(path)),
                "dtype": self.rc.model.dtype}

    def data_key(self, roles: Sequence[str]) -> dict:
        """The data settings and the content digests of the `roles`' loaded records."""
        return {**key_of(self.rc.data), "content": {
            r: self._digest(f"data:{r}", lambda r=r: inputs_lib.records_digest(
                getattr(self.data, r))) for r in roles}}

    def judge_key(self) -> dict:
        kind, _, path = self.rc.eval.judge.partition(":")
        if not path:
            return {"judge": self.rc.eval.judge}
        return {"judge": kind, "sha256": self._digest("judge", lambda: inputs_lib.model_digest(
            Path(path).expanduser()))}

    def model_path(self) -> str:
        return model_path(self.rc.model.path)
