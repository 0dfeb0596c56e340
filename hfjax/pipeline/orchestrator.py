"""The protocol's stages over a run folder: align → fine-tune → repair → evaluate.

    base ──align (adapter #1, alignment defenses)──► merge ──► aligned
    aligned ──fine-tune (adapter #2 on the attack's user data; fine-tuning defenses)──► attacked
    attacked ──repair (post-fine-tuning defenses: adapter -> adapter)──► final
    evaluate base, aligned, final: HS (judge on held-out harmful prompts), FA (task test set)

`Pipeline` orchestrates: the stage keys (whole sub-configs plus content digests of what was
read), skip and resume (a stage folder whose DONE marker holds the current key is skipped; an
interrupted training resumes from its checkpoint), locks and barriers, the manifest and the
results. What a stage computes lives in `training` and `evaluation`; what it reads in
`resources`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from hfjax import data as data_lib
from hfjax.errors import UserError
from hfjax.models import adapters
from hfjax.pipeline import flags as flags_lib
from hfjax.pipeline import portable
from hfjax.pipeline.config import MODEL_NAMES, NONE, ConfigError, RunConfig, key_of
from hfjax.pipeline.evaluation import Evaluator
from hfjax.pipeline.lock import folder_lock
from hfjax.pipeline.resources import EVAL_ROLES, TRAIN_ROLES, Resources, make_mesh
from hfjax.pipeline.run_folder import (
    StageDir,
    StageMismatchError,
    fingerprint,
    read_json,
    write_json,
    write_manifest,
)
from hfjax.pipeline.training import Trainer, describe
from hfjax.train import state as state_lib

STAGES = ("align", "finetune", "repair", "eval_base", "eval_aligned", "eval_final")
LABELS = {"base": "unaligned", "aligned": "aligned", "final": "attacked"}


class MissingStageError(UserError, FileNotFoundError):
    """A stage needs the artifacts of an earlier stage that has not run."""


def barrier(tag: str) -> None:
    """Wait for every process (multi-host runs only): files process 0 wrote are visible."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


class Pipeline:
    """One run: its settings, run folder, stage folders and the stages themselves."""

    def __init__(self, flags: flags_lib.RunFlags, mesh: jax.sharding.Mesh | None = None):
        self.flags = flags_lib.validate(flags, jax.device_count())
        self.rc: RunConfig = flags_lib.to_config(self.flags)
        run = self.rc.run
        self.run_dir = Path(run.run_dir).expanduser().absolute()
        self.cache = Path(run.stage_cache).expanduser().absolute() if run.stage_cache else None
        self.mesh = mesh if mesh is not None else make_mesh(self.rc)
        per = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        for flag, size in (("batch_size", self.rc.finetune.train.batch_size),
                           ("align_batch_size", self.rc.align.train.batch_size)):
            if size % per:
                raise ConfigError(f"--{flag}={size} is not divisible by the mesh's data x fsdp "
                                  f"= {per} devices")
        self.res = Resources(self.rc, self.mesh)
        self.trainer, self.evaluator = Trainer(self.res), Evaluator(self.res)
        self._redone: set[str] = set()
        self._aligned: dict | None = None
        self.main_process = jax.process_index() == 0

    # ------------------------------------------------------------ what the stages read
    @property
    def base(self):
        return self.res.base

    @property
    def data(self):
        return self.res.data

    def role_plan(self) -> data_lib.RolePlan:
        return self.res.plan

    # ------------------------------------------------------------ stage keys
    def stage(self, name: str) -> StageDir:
        """The stage folder of `name` with its key: the whole sub-configs the stage reads."""
        rc, res = self.rc, self.res
        seed = {"seed": rc.run.seed}
        if name == "align":
            key = {"model": res.model_key(), "data": res.data_key(TRAIN_ROLES),
                   "align": key_of(rc.align), **seed}
        elif name == "finetune":
            key = {"model": res.model_key(), "data": res.data_key(TRAIN_ROLES),
                   "aligned": self.source_fingerprint("aligned"),
                   "finetune": key_of(rc.finetune), **seed}
        elif name == "repair":
            key = {"finetune": self.stage("finetune").fingerprint, "repair": key_of(rc.repair)}
        elif name.startswith("eval_"):
            which = name.removeprefix("eval_")
            source = res.model_key() if self.source_fingerprint(which) == \
                self.source_fingerprint("base") else {"stage": self.source_fingerprint(which)}
            key = {"model": source, "data": res.data_key(EVAL_ROLES), "eval": key_of(rc.eval),
                   "judge": res.judge_key()}
        else:
            raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
        return StageDir(self.run_dir, name, key, self.cache)

    def source_fingerprint(self, which: str) -> str:
        """Fingerprint of the stage whose output is model `which` (base / aligned / final)."""
        if which == "base":
            return fingerprint(self.res.model_key())
        if which == "aligned":
            return self.stage("align").fingerprint if self.rc.align.train.epochs else \
                self.source_fingerprint("base")
        if not self.rc.finetune.train.epochs:
            return self.source_fingerprint("aligned")
        return self.stage("repair" if self.rc.repair.defenses else "finetune").fingerprint

    def active_stages(self) -> list[str]:
        out = []
        if self.rc.align.train.epochs:
            out.append("align")
        if self.rc.finetune.train.epochs:
            out.append("finetune")
            if self.rc.repair.defenses:
                out.append("repair")
        return out + [f"eval_{m}" for m in self.rc.run.models_to_eval]

    # ------------------------------------------------------------ running
    def preflight(self, todo: Sequence[str]) -> None:
        """Everything that can refuse the run, before anything is written: the model and the
        data load, prompts fit the model's context, no stage folder to reuse holds other
        settings, and the earlier stages that `todo` reads (and does not run) have finished."""
        cfg = self.base.cfg
        self.res.plan  # noqa: B018 - the harmful pool holds a slice for every role
        if self.rc.data.max_length > cfg.max_position_embeddings:
            raise ConfigError(f"--max_length={self.rc.data.max_length} exceeds the model's "
                              f"context of {cfg.max_position_embeddings} tokens")
        if any(s.startswith("eval_") for s in todo):
            self.evaluator.check_context()
        for name in todo:
            sd = self.stage(name)
            if not (self.rc.run.overwrite and sd.fingerprint not in self._redone):
                sd.done  # noqa: B018 - raises StageMismatchError on other settings
            self._check_upstream(name, todo)

    def write_manifest(self) -> None:
        """run.json: this invocation's flags; stage fingerprints accumulate over runs."""
        if self.main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            old = read_json(self.run_dir / "run.json") if (self.run_dir / "run.json").is_file() \
                else {}
            stages = {**old.get("stages", {}),
                      **{s: self.stage(s).fingerprint for s in self.active_stages()}}
            write_manifest(self.run_dir, self.flags.to_dict(), {
                "stages": stages, "model_path": self.res.model_path(),
                "config": key_of(self.rc),
                "inputs": {"model": self.res.model_key(),
                           "data": self.res.data_key(TRAIN_ROLES + EVAL_ROLES)["content"]},
                "harmful_roles": self.res.plan.summary(self.res.pools())})
        barrier("manifest written")

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
            force = self.rc.run.overwrite and sd.fingerprint not in self._redone
            skip = not force and sd.done
            barrier(f"{name}: skip decided")
            if skip:
                if self.main_process:
                    sd.ensure_link()
                print(f"[{name}] done already ({sd.path}); skipped", flush=True)
                return sd.summary()
            print(f"[{name}] running -> {sd.path}", flush=True)
            start = time.perf_counter()
            if self.main_process:
                sd.begin(overwrite=force)
            barrier(f"{name}: folder ready")
            summary = self._compute(name, sd.path)
            summary = {**summary, "wall_s": round(time.perf_counter() - start, 2)}
            if self.main_process:
                sd.finish(summary)
            barrier(f"{name}: finished")
        self._redone.add(sd.fingerprint)
        print(f"[{name}] finished in {summary['wall_s']:.1f} s", flush=True)
        return summary

    def _compute(self, name: str, out: Path) -> dict:
        if name == "align":
            summary = self.trainer.run_align(out)
            self._aligned = None
            barrier("align: adapter written")  # process 0 wrote it; every process reads it next
            self.aligned_model_folder()
            return summary
        if name == "finetune":
            if self.rc.finetune.init == "continue":  # the alignment's adapter, further, on base
                return self.trainer.run_finetune(out, params=self.base.params,
                                                 init=self.alignment_adapter())
            return self.trainer.run_finetune(out, params=self.aligned_params(),
                                             aligned=self.adapter_base())
        if name == "repair":
            tuned = self.trainer.load_adapter(self.stage("finetune").path,
                                              self.rc.finetune.train)
            return self.trainer.run_repair(out, tuned=tuned, aligned=self.aligned_params,
                                           main_process=self.main_process,
                                           aligned_model=self.adapter_base())
        which = name.removeprefix("eval_")
        params, lora = self.model(which)
        return self.evaluator.run(out, name, params, lora, main_process=self.main_process)

    def _check_upstream(self, name: str, todo: Sequence[str]) -> None:
        needs = {"finetune": ["align"] if self.rc.align.train.epochs else [],
                 "repair": ["finetune"],
                 "eval_aligned": ["align"] if self.rc.align.train.epochs else [],
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
    def alignment_adapter(self):
        return self.trainer.load_adapter(self.stage("align").path, self.rc.align.train)

    def aligned_params(self) -> dict:
        base = self.base
        if not self.rc.align.train.epochs:
            return base.params
        if self._aligned is None:
            kind = adapters.get(self.rc.align.train.adapter.kind)
            merged = kind.merge(base.cfg, base.params, self.alignment_adapter())
            self._aligned = jax.device_put(merged, state_lib.params_shardings(base.cfg,
                                                                              self.mesh))
        return self._aligned

    def aligned_model_folder(self) -> Path:
        """The aligned model as an HF safetensors folder: the alignment adapter's folder for a
        full fine-tune, else `align/aligned_model` (base + the merged LoRA), written once (also
        for an alignment stage that finished before these folders were written)."""
        sd = self.stage("align")
        if adapters.get(self.rc.align.train.adapter.kind).full_finetune:
            return sd.path / "adapter"
        folder = sd.path / portable.ALIGNED_MODEL
        if not (folder / "config.json").is_file():
            portable.write_model(folder, self.base.cfg, self.aligned_params(),
                                 self.base.tokenizer, portable.card(
                                     portable.base_ref(self.rc.model.path, self.res.model_path()),
                                     kind="full", stage="aligned model", about=(
                                         "The base model with the alignment stage's adapter "
                                         "merged into its weights (alignment defenses: "
                                         f"{describe(self.rc.align.train.defenses)}).")))
        return folder

    def adapter_base(self) -> Path | None:
        """The aligned model's folder when the fine-tuning adapter applies on top of the merged
        alignment (None: it applies to the raw base)."""
        if not self.rc.align.train.epochs or self.rc.finetune.init == "continue":
            return None
        return self.aligned_model_folder()

    def final_model(self) -> tuple[dict, Any]:
        """(params, LoRA or None) of the final model: the aligned weights with the repaired
        fine-tuning adapter (a full fine-tune's weights are the model)."""
        if not self.rc.finetune.train.epochs:
            return self.aligned_params(), None
        settings = self.rc.finetune.train
        trained = self.trainer.load_adapter(
            self.stage("repair" if self.rc.repair.defenses else "finetune").path, settings)
        if adapters.get(settings.adapter.kind).full_finetune:
            return jax.device_put(trained, state_lib.params_shardings(self.base.cfg,
                                                                      self.mesh)), None
        params = self.base.params if self.rc.finetune.init == "continue" else \
            self.aligned_params()
        return params, trained

    def model(self, which: str) -> tuple[dict, Any]:
        """(params, LoRA or None) of model `which`: base, aligned or final."""
        if which == "base":
            return self.base.params, None
        if which == "aligned":
            return self.aligned_params(), None
        return self.final_model()

    # ------------------------------------------------------------ results
    def results(self) -> dict:
        """The run's summary: settings and HS/FA of every evaluated model that has finished."""
        rows = []
        for which in MODEL_NAMES:  # every finished evaluation of these settings, not only
            sd = self.stage(f"eval_{which}")  # those this invocation ran (a subset rerun)
            try:
                if not sd.done:
                    continue
            except StageMismatchError:  # made with other settings: not this run's result
                continue
            r = read_json(sd.path / "results.json")
            rows.append({"model": which, "label": model_label(which, self.flags),
                         "harmful_score": r["harmful_score"],
                         "finetune_accuracy": r["finetune_accuracy"],
                         "degenerate_share": r.get("degenerate_share"), "judge": r["judge"],
                         "task": r["task"],
                         **{k: r[k] for k in ("hs_by_framing", "task_scores", "target_match")
                            if r.get(k)}})
        out = {"run_dir": str(self.run_dir), "settings": run_settings(self.flags),
               "rows": rows}
        user_data = self.user_data_report()
        return {**out, "user_data": user_data} if user_data else out

    def user_data_report(self) -> dict | None:
        """The fine-tuning stage's report on the user data (the guard filter's rows passed per
        origin, Virus's objective per row), when it wrote one."""
        try:
            sd = self.stage("finetune")
            if not sd.done:
                return None
        except StageMismatchError:
            return None
        path = sd.path / "user_data.json"
        return read_json(path) if path.is_file() else None

    def write_results(self) -> dict:
        from hfjax.pipeline import report

        res = self.results()
        if self.main_process and res["rows"]:
            write_json(self.run_dir / "results.json", res)
            table = report.run_table(res)
            report.write_text(self.run_dir / "results.md", table + "\n")
            report.write_csv(self.run_dir / "results.csv", report.long_rows([res]))
        return res


def model_label(which: str, flags: flags_lib.RunFlags) -> str:
    if which != "final":
        return LABELS[which]
    defense = flags.defense_label()
    if not flags.epochs:
        return "aligned (no fine-tuning)"
    return "attacked" if defense == NONE else f"attacked+{defense}"


def run_settings(flags: flags_lib.RunFlags) -> dict:
    """The settings a results table groups by."""
    f = flags.resolved()
    return {"defense": f.defense_label(), "harmful_ratio": f.harmful_ratio,
            "num_samples": f.num_samples, "lr": f.lr, "epochs": f.epochs, "seed": f.seed,
            "align_lr": f.align_lr, "align_epochs": f.align_epochs, "attack": f.attack,
            "attack_hparams": f.attack_hparams, "task": f.task_name(),
            "adapter": f.adapter, "attack_protocol": f.attack_protocol(),
            "eval_attack": None if f.eval_attack == NONE else
            f"{f.eval_attack}:{f.eval_attack_hparams}".rstrip(":"),
            "num_virtual_tokens": f.num_virtual_tokens if f.adapter == "prefix" else None,
            "model": Path(f.model).name if f.model else "SmolLM2-135M-Instruct (embedded)",
            "harmful_count": data_lib.harmful_count(f.num_samples, f.harmful_ratio)
            if f.epochs else 0,
            "hparams": {g: getattr(f, f"{g}_hparams") for g in flags_lib.STAGE_OF_FLAG
                        if getattr(f, g) != NONE}}
