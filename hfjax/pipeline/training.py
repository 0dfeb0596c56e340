"""The training stages: the rows each trains on, and the run of the built train step.

    align      LoRA #1 (or the whole model, --adapter=full) on the alignment set: harmful prompts
               answered with refusals plus benign rows (a paired defense, RepNoise, trains on the
               alignment prompts' refusal / harmful-answer pairs instead), the stage's defenses
    finetune   a fresh adapter on the merged aligned model (or LoRA #1 further, on the base) on
               the user data the attack makes, with the fine-tuning defenses
    repair     the post-fine-tuning weight defenses map the fine-tuning adapter

Data defenses edit the records; gradient defenses go into `hfjax.train.builder`, which builds
the step; every extra stream a defense reads comes from its planned slice of the harmful pool
(`Resources.plan`). Each training writes metrics.jsonl and orbax checkpoints into its stage
folder and resumes from them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfjax import attacks
from hfjax import data as data_lib
from hfjax.attacks.context import Victim
from hfjax.defenses import compose
from hfjax.defenses.compose import DefenseChoice
from hfjax.eval.guard import Guard, load_guard
from hfjax.models import adapters
from hfjax.models.lora import LoRA
from hfjax.pipeline import portable
from hfjax.pipeline.config import ConfigError, TrainSettings
from hfjax.pipeline.resources import DATA_DEFENSE_INPUTS, Resources, stream_kind
from hfjax.pipeline.run_folder import write_json
from hfjax.train import builder
from hfjax.train import loop as loop_lib
from hfjax.train.checkpoint import Checkpointer

SALTS = {"align": 1, "finetune": 2, "repair": 3}


class StageInterrupted(KeyboardInterrupt):
    """Training stopped before its last step (a checkpoint was written; rerun to resume)."""


def call_with_inputs(fn: Callable, what: str, args: tuple, inputs: Mapping[str, Callable]):
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


def describe(choices: Sequence[DefenseChoice]) -> str:
    """"vaccine(rho=2)+lisa" or "none": a stage's defenses, for adapter cards."""
    return "+".join(c.name + (f"({', '.join(f'{k}={v}' for k, v in c.hparams.items())})"
                              if c.hparams else "") for c in choices) or "none"


def gradient_defenses(choices: Sequence[DefenseChoice]) -> list[DefenseChoice]:
    return [c for c in choices if c.spec.level == "gradient"]


class Trainer:
    """The rows and the training runs of one run's stages (module docstring)."""

    def __init__(self, res: Resources):
        self.res, self.rc = res, res.rc
        self._guard: Guard | None = None
        self.reports: dict[str, Any] = {}  # the user data's: the attack's, data defenses'

    # ------------------------------------------------------------ rows
    def alignment_records(self) -> list:
        res, a = self.res, self.rc.align
        refusals = res.plan.take(res.pools(), data_lib.plan.ALIGNMENT)
        benign = data_lib.sample(res.data.align_benign, a.benign, self.rc.run.seed,
                                 "benign alignment source", self.rc.data.row_order)
        return data_lib.build_alignment_set(refusals, benign, len(refusals), len(benign),
                                            self.rc.run.seed)

    def alignment_pairs(self) -> list:
        """The alignment's harmful rows, each with its refusal (paired, or templated) in
        "refusal": a paired defense's rows (RepNoise trains on these pairs alone)."""
        rows = self.res.plan.take(self.res.pools(), data_lib.plan.ALIGNMENT)
        return [{**r, "refusal": data_lib.refusal_row(r, self.rc.run.seed)["response"]}
                for r in rows]

    def user_records(self, victim: Callable[[], Victim] | None = None) -> list:
        """The user data the attack makes from the task rows and the planned harmful rows. An
        attack that optimizes against the model names `victim` (the model as the fine-tuning
        starts it) or `guard` (--guard) among its inputs (`hfjax.attacks.context`); its
        `report`, when it has one, goes to self.reports["attack"]."""
        res, f = self.res, self.rc.finetune
        harmful = res.plan.take(res.pools(), data_lib.plan.ATTACK)
        attack = attacks.get(f.attack.name).build(**f.attack.hparams)
        budget = functools.partial(attack, n=f.num_samples, p=f.harmful_ratio,
                                   seed=self.rc.run.seed, order=self.rc.data.row_order)
        inputs = {"guard": self.guard, **({"victim": victim} if victim is not None else {})}
        records = call_with_inputs(budget, f"--attack={f.attack.name}",
                                   (res.data.task_train, harmful), inputs)
        if getattr(attack, "report", None) is not None:
            self.reports["attack"] = attack.report
        return records

    def guard(self) -> Guard:
        """The service's guard model (--guard), loaded once, in the run's dtype."""
        if self._guard is None:
            self._guard = load_guard(self.rc.finetune.guard, dtype=jnp.dtype(self.rc.model.dtype))
        return self._guard

    def victim(self, params: dict, settings: TrainSettings, init=None) -> Victim:
        """The model the fine-tuning trains, as it starts (the trainable `train` starts from)."""
        base, d = self.res.base, self.rc.data
        return Victim(base.cfg, params,
                      self.initial_trainable(params, settings, SALTS["finetune"], init),
                      base.tokenizer, d.template, d.max_length,
                      adapters.get(settings.adapter.kind).full_finetune)

    def stream_records(self, name: str, stage: str) -> list:
        """Records of the extra batch stream `name` a defense reads at `stage` (alignment,
        finetune, post): its own slice of the harmful pool, as refusals for a safety stream."""
        kind, d = stream_kind(name), self.rc.data
        if kind == "align" and stage == "finetune" and d.safety_stream == "benign":
            return data_lib.sample(self.res.data.align_benign, d.defense_data_size,
                                   self.rc.run.seed, "benign alignment source", d.row_order)
        rows = self.res.plan.take(self.res.pools(), f"{stage}:{kind}")
        if not rows:
            raise ConfigError(f"the {stage} stage's defense reads a {name!r} stream the pipeline "
                              f"did not plan (streams planned: {sorted(self.res.plan.rows)})")
        if kind == "align":
            return [data_lib.refusal_row(r, self.rc.run.seed) for r in rows]
        return rows

    def data_defenses(self, choices: Sequence[DefenseChoice], records: list,
                      stage: str) -> list:
        """Apply the stage's data-level defenses (`records -> records`, e.g. SafeInstr mixing)
        in order; a `seed` hyper-parameter defaults to the run's. A defense that returns
        `(records, report)` (the guard filter) has its report put in self.reports[name]."""
        for c in choices:
            if c.spec.level != "data":
                continue
            hparams = dict(c.hparams)
            if "seed" in c.spec.hyperparameters:
                hparams = {"seed": self.rc.run.seed, **hparams}
            records = call_with_inputs(c.spec.build(**hparams), c.name, (records,), {
                **{name: lambda name=name: self.stream_records(name, stage)
                   for name in DATA_DEFENSE_INPUTS},
                "tokenizer": lambda: self.res.base.tokenizer, "guard": self.guard})
            if isinstance(records, tuple):
                records, self.reports[c.name] = records
        return records

    def tokenize(self, records: list, response_field: str = "response") -> list:
        return data_lib.tokenize_records(records, self.res.base.tokenizer, self.rc.data.template,
                                         self.rc.data.max_length, response_field=response_field)

    def batcher(self, examples, batch_size: int, seed: int, num_epochs: int | None,
                drop_last: bool = True):
        tok, d = self.res.base.tokenizer, self.rc.data
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        lengths = data_lib.length_buckets(d.max_length, d.pad_multiple)
        return data_lib.Batcher(examples, batch_size, seed, buckets=lengths, pad_id=pad,
                                num_epochs=num_epochs, drop_last=drop_last,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())

    # ------------------------------------------------------------ a training run
    def initial_trainable(self, params: dict, settings: TrainSettings, salt: int, init=None):
        """What a training run starts from: `init` (a LoRA with the stage's dropout), else a
        fresh adapter of the stage's kind drawn from the run's seed and the stage's salt."""
        if init is None:
            return adapters.get(settings.adapter.kind).init(
                self.res.base.cfg, jax.random.fold_in(jax.random.key(self.rc.run.seed), salt),
                params, settings.adapter)
        if isinstance(init, LoRA):
            return init.replace(dropout=settings.adapter.dropout)
        return init

    def train(self, out: Path, *, params: dict, records: list, stream: str,
              settings: TrainSettings, salt: int, init: Any = None) -> tuple[Any, dict]:
        """Train the stage's adapter (fresh, or `init`) on `records` (the batch stream named
        `stream`: "align" at the alignment stage, "user" at fine-tuning); the stage's gradient
        defenses are chained before AdamW by the builder, which also says every batch stream
        they read."""
        rc, base, mesh = self.rc, self.res.base, self.res.mesh
        kind = adapters.get(settings.adapter.kind)
        defenses = gradient_defenses(settings.defenses)
        probe = compose.step_options(defenses, stream)
        per = mesh.shape["data"] * mesh.shape["fsdp"]
        for name, size in probe.batch_sizes:
            if size % per:
                raise ConfigError(f"a defense reads {size}-row {name!r} batches, which the "
                                  f"mesh's data x fsdp = {per} devices do not divide")
        bs, seed = settings.batch_size, rc.run.seed + salt
        if probe.paired:  # one record per row: its refusal in paired[0], its answer in the others
            examples = {n: self.tokenize(records, "refusal" if n == probe.paired[0]
                                         else "response") for n in probe.paired}
            census = loss_token_census([{**r, "harmful": False} for r in records],
                                       examples[probe.paired[0]], f"the {stream!r} rows")
            # no label-masked fillers: the official pair mask reads ids, where fillers count
            primary = self.batcher(examples, bs, seed, settings.epochs)
        else:
            examples = self.tokenize(records)
            census = loss_token_census(records, examples, f"the {stream!r} rows")
            primary = self.batcher(examples, bs, seed, settings.epochs, drop_last=False)
        total = primary.total_steps
        stage = "alignment" if stream == "align" else "finetune"
        trainable = self.initial_trainable(params, settings, salt, init)
        training = builder.build_training(
            base.cfg, trainable, mesh=mesh,
            optimizer=dataclasses.replace(settings.optimizer, total_steps=total),
            defenses=defenses, primary=stream, full_finetune=kind.full_finetune, seed=seed,
            skip_nonfinite=settings.nonfinite == "skip")
        extra = {name: self.batcher(self.tokenize(self.stream_records(name, stage)),
                                    training.batch_sizes.get(name, bs), seed + 10 + i, None)
                 for i, name in enumerate(training.batch_names[1:])
                 if name not in training.paired}

        def batches(start: int) -> Iterator[dict]:
            others = {n: b.batches(start) for n, b in extra.items()}
            for b in primary.batches(start):
                yield pad_to_common_length({**(b if probe.paired else {stream: b}),
                                            **{n: next(it) for n, it in others.items()}})

        ckpt = Checkpointer(out / "ckpt", every=rc.run.checkpoint_every, keep=2)
        try:
            st, history = loop_lib.train(training.step, training.state, params, batches,
                                         mesh=mesh, num_steps=total,
                                         state_shardings=training.state_shardings,
                                         checkpointer=ckpt, metrics_path=out / "metrics.jsonl",
                                         progress=rc.run.progress)
        finally:
            ckpt.close()
        if int(st.step) < total:
            raise StageInterrupted(f"training stopped at step {int(st.step)} of {total}; "
                                   f"rerun the same command to resume from {out / 'ckpt'}")
        trained = st.trainable
        for c in defenses:  # a defense that changes the adapter after training (Panacea's θ + ε)
            finalize = getattr(c.spec.factory, "finalize", None)
            trained = finalize(trained, st.opt_state) if finalize is not None else trained
        loop_lib.check_finite_tree(trained, f"the trained adapter in {out}")
        skipped = int(sum(h.get("skipped", 0) for h in history))
        if 2 * skipped > len(history):
            raise loop_lib.NonFiniteError(
                f"{skipped} of the {len(history)} steps of this run of the stage had a non-finite "
                f"loss or gradient norm and were skipped (--nonfinite=skip): the training "
                f"diverged; lower the learning rate. The stage is not marked done")
        times = [h["step_time_s"] for h in history[1:]] or [h["step_time_s"] for h in history]
        summary = {"steps": total, **census, "streams": list(training.batch_names),
                   "compiles": training.step.compiles,
                   "steps_per_epoch": primary.steps_per_epoch, "skipped_steps": skipped,
                   "final_loss": history[-1]["loss"] if history else None,
                   "median_step_s": float(np.median(times)) if times else None}
        return trained, summary

    # ------------------------------------------------------------ the stages
    def save_adapter(self, out: Path, settings: TrainSettings, trainable, *, stage: str,
                     aligned: Path | None = None) -> None:
        """out/adapter: the adapter, the tokenizer and a card saying how to load it. `aligned`:
        the aligned model's folder when the adapter was trained on top of it (then linked as
        out/aligned_model and named as the adapter's base). Every process calls it: saving
        all-gathers weights that span processes; process 0 writes."""
        kind = adapters.get(settings.adapter.kind)
        base = portable.base_ref(self.rc.model.path, self.res.model_path())
        main = jax.process_index() == 0
        if aligned is not None and not kind.full_finetune:
            if main:
                portable.link_relative(out / portable.ALIGNED_MODEL, aligned)
            base = portable.aligned_ref(base, describe(self.rc.align.train.defenses))
        folder = out / "adapter"
        kind.save(folder, self.res.base.cfg, trainable, base_model=base.name)
        if main:
            portable.save_tokenizer(folder, self.res.base.tokenizer)
            portable.write_card(folder, portable.card(
                base, kind=kind.name, stage=stage,
                about=f"Defenses at this stage: {describe(settings.defenses)}. Every setting "
                      f"is in the stage folder's key.json."))

    def load_adapter(self, folder: Path, settings: TrainSettings):
        return adapters.get(settings.adapter.kind).load(folder / "adapter", self.res.base.cfg)

    def run_align(self, out: Path) -> dict:
        settings = self.rc.align.train
        if any(c.spec.step_options(**c.hparams).paired for c in gradient_defenses(
                settings.defenses)):
            records = self.alignment_pairs()
        else:
            records = self.data_defenses(settings.defenses, self.alignment_records(),
                                         "alignment")
        trainable, summary = self.train(out, params=self.res.base.params, records=records,
                                        stream="align", settings=settings, salt=SALTS["align"])
        self.save_adapter(out, settings, trainable, stage="alignment")
        return summary

    def run_finetune(self, out: Path, *, params: dict, init=None,
                     aligned: Path | None = None) -> dict:
        settings = self.rc.finetune.train
        self.reports = {}
        user = self.user_records(lambda: self.victim(params, settings, init))
        records = self.data_defenses(settings.defenses, user, "finetune")
        trainable, summary = self.train(out, params=params, records=records, stream="user",
                                        settings=settings, salt=SALTS["finetune"], init=init)
        self.save_adapter(out, settings, trainable, stage="fine-tuning", aligned=aligned)
        if self.reports:  # e.g. the guard filter's rows passed per origin
            summary = {**summary, "user_data": self.reports}
            if jax.process_index() == 0:
                write_json(out / "user_data.json", self.reports)
        return summary

    def run_repair(self, out: Path, *, tuned, aligned: Callable[[], dict],
                   main_process: bool, aligned_model: Path | None = None) -> dict:
        """The post-fine-tuning weight transforms `(cfg, params, lora, **inputs) -> lora` (or
        `(lora, report)`), in order; params are the aligned weights the adapter was trained
        on."""
        cfg, settings = self.res.base.cfg, self.rc.finetune.train

        def calibration() -> list[dict]:
            ex = self.tokenize(self.stream_records("harmful", "post"))
            return list(self.batcher(ex, settings.batch_size, self.rc.run.seed + SALTS["repair"],
                                     1).batches(0))

        reports = {}
        for c in self.rc.repair.defenses:
            if c.spec.level == "inference":  # changes no weight: the evaluation applies it
                reports[c.name] = {"applied": "to the final model's task inputs at evaluation"}
                continue
            hparams = dict(c.hparams)
            if "seed" in c.spec.hyperparameters:  # a seeded transform takes the run's seed
                hparams = {"seed": self.rc.run.seed, **hparams}
            result = call_with_inputs(c.spec.build(**hparams), c.name, (cfg, aligned(), tuned),
                                      {"base_params": lambda: self.res.base.params,
                                       "aligned_params": aligned,
                                       "calibration_batches": calibration})
            tuned, report = result if isinstance(result, tuple) else (result, {})
            reports[c.name] = {k: v for k, v in (report or {}).items()
                               if isinstance(v, int | float | str | bool | list | dict)
                               and k != "masks"}
        self.save_adapter(out, settings, tuned, stage="post-fine-tuning repair",
                          aligned=aligned_model)
        if main_process:
            write_json(out / "report.json", jax.tree.map(
                lambda x: np.asarray(x).tolist() if hasattr(x, "shape") else x,
                reports if len(reports) > 1 else next(iter(reports.values()), {})))
        return {"defense": "+".join(c.name for c in self.rc.repair.defenses)}
