"""Fault injection through the experiment binaries, as a user meets the faults.

    .venv/bin/python tests/fault_injection.py [--out DIR] [--only NAME,...]
        [--compilation_cache DIR]

Builds the tiny setup of tests/test_pipeline.py (a random 2-layer Llama HF folder, its tokenizer
and JSONL data files) under --out (default: a new temporary folder, kept), then runs every fault
below through `python -m experiments.<binary>` subprocesses (JAX_PLATFORMS=cpu, offline hub and
datasets, one shared --compilation_cache so later runs compile nothing) and checks each expected
outcome: a one-line "error: ..." on stderr with exit status 1 and no traceback, or the correct
result. It prints a markdown table | fault | what happened | exit code | verdict |, writes it as
OUT/faults.json, and exits with status 1 if any verdict is WRONG. Not collected by pytest: the
whole list takes minutes, not seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # per binary; the slowest healthy run here takes ~15 s
HINT = re.compile(r" \(traceback: add -v 1 or set HFJAX_TRACEBACK=1\)$")
TRACEBACKS = ("Traceback (most recent call last)", "Exception in thread")
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*", re.MULTILINE)
BASE_FLAGS = dict(
    data="hub", mesh="1,1,1", max_length=64, pad_multiple=64, align_epochs=0, num_samples=32,
    harmful_ratio=0.25, epochs=1, batch_size=8, lr=3e-3, eval_size=6, task_eval_size=6,
    max_new_tokens=5, task_max_new_tokens=3, eval_batch_size=8, checkpoint_every=100,
    progress=False, defense_data_size=16, eval_models="base")
# a 40-step fine-tuning (4 steps an epoch) that signals can interrupt between checkpoints
RESUMABLE = dict(epochs=10, checkpoint_every=1)
RESUMABLE_STEPS = list(range(1, 41))  # 32 rows / batch 8 x 10 epochs
LONG = dict(epochs=2000, checkpoint_every=100000)  # runs until stopped


class Skipped(Exception):
    """The fault cannot be injected on this machine; the message says why."""


# --------------------------------------------------------------------------- running binaries

@dataclasses.dataclass
class Ran:
    """A finished binary: exit status and its output."""

    rc: int | None
    out: str
    err: str

    @property
    def error(self) -> str:
        """The last "error: ..." line of stderr, without the traceback hint ('' if none)."""
        lines = [x for x in self.err.splitlines() if x.startswith("error: ")]
        return HINT.sub("", lines[-1]) if lines else ""

    @property
    def traceback(self) -> bool:
        return any(t in self.err for t in TRACEBACKS)

    @property
    def last_exception(self) -> str:
        """The last "SomeError: ..." line of a printed traceback ('' if none)."""
        found = [m.group(0) for m in EXCEPTION_LINE.finditer(self.err)]
        return found[-1] if found else ""

    def story(self) -> str:
        """The exit status and the error line or the last exception."""
        return f"exit {self.rc}: {self.error or self.last_exception or 'no error line'}"


@dataclasses.dataclass
class Started:
    """A binary running in the background; output goes to log files."""

    proc: subprocess.Popen
    out: Path
    err: Path

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = TIMEOUT_S) -> Ran:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        return Ran(rc, self.out.read_text(errors="replace"), self.err.read_text(errors="replace"))


def flag_args(values: dict) -> list[str]:
    """absl arguments: --name=value, --name / --noname for booleans; None drops a flag."""
    out = []
    for k, v in values.items():
        if isinstance(v, bool):
            out.append(f"--{k}" if v else f"--no{k}")
        elif v is not None:
            out.append(f"--{k}={v}")
    return out


class Lab:
    """The tiny model and data, the output folder, and the runner of the binaries."""

    def __init__(self, out: Path, cache: Path):
        self.out, self.cache = out, cache
        self.setup = out / "setup"
        self.model = self.setup / "tiny-llama"
        self.files = {p.stem: p for p in self.setup.glob("*.jsonl")}
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "hf_datasets"),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        self._reference: Path | None = None
        self._logs = 0

    def flags(self, run_dir: Path, model: Path | None = None, files: dict | None = None,
              **overrides) -> list[str]:
        f = files or self.files
        sources = dict(harmful_train_data=f"advbench:{f['harm_train']}",
                       harmful_eval_data=f"harmbench:{f['harm_eval']}",
                       task_train_data=f"sst2:{f['task_train']}",
                       task_test_data=f"sst2:{f['task_test']}",
                       align_benign_data=f"alpaca:{f['benign']}")
        return flag_args({"run_dir": run_dir, "model": model or self.model, **sources,
                          **BASE_FLAGS, "compilation_cache": self.cache, **overrides})

    def start(self, binary: str, run_dir: Path, *, umask: int = -1, **flags) -> Started:
        """Start `python -m experiments.<binary>` with the base flags and `flags`."""
        self._logs += 1
        log = self.out / "logs" / f"{self._logs:02d}-{run_dir.name}-{binary}"
        log.parent.mkdir(parents=True, exist_ok=True)
        out, err = log.with_suffix(".out"), log.with_suffix(".err")
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"experiments.{binary}", *self.flags(run_dir, **flags)],
                cwd=ROOT, env=self.env, stdout=o, stderr=e, umask=umask)
        return Started(proc, out, err)

    def run(self, binary: str, run_dir: Path, **flags) -> Ran:
        return self.start(binary, run_dir, **flags).finish()

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def own_inputs(self, name: str) -> tuple[Path, dict]:
        """A private copy of the model folder and data files (a fault changes them)."""
        folder = self.out / "inputs" / name
        shutil.copytree(self.model, folder / "model")
        return folder / "model", {k: Path(shutil.copy(p, folder / p.name))
                                  for k, p in self.files.items()}

    def reference(self) -> Path:
        """An uninterrupted RESUMABLE fine-tuning (made once; resumed runs must equal it)."""
        if self._reference is None:
            run = self.run_dir("reference")
            ran = self.run("finetune", run, **{**RESUMABLE, "checkpoint_every": 1000})
            if ran.rc != 0:
                raise RuntimeError(f"the reference fine-tuning failed: {ran.error or ran.err}")
            self._reference = run
        return self._reference

    def short(self, text: str, limit: int = 230) -> str:
        """`text` on one line, the output folder written as $OUT, cut to `limit` characters."""
        text = " ".join(text.replace(str(self.out), "$OUT").split())
        return text if len(text) <= limit else text[:limit - 1] + "…"


def build_setup(out: Path) -> None:
    """The tiny model folder and data files of tests/test_pipeline.py under out/setup."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_pipeline import build_tiny_setup

    (out / "setup").mkdir(parents=True)
    build_tiny_setup(out / "setup")


# --------------------------------------------------------------------------- checks

@dataclasses.dataclass
class Fault:
    """One fault's record: what happened, the exit codes, missed expectations, remarks."""

    happened: str = ""
    codes: list[int | None] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def ran(self, ran: Ran) -> Ran:
        self.codes.append(ran.rc)
        return ran

    def user_error(self, lab: Lab, ran: Ran, pattern: str) -> str:
        """Expect exit 1 and one "error: ..." line matching `pattern`, no traceback; returns the
        error's essence."""
        self.ran(ran)
        self.expect(ran.rc == 1, f"exit status {ran.rc}, expected 1")
        self.expect(bool(re.search(pattern, ran.error)),
                    f"no error line matching /{pattern}/ (stderr ends: "
                    f"{lab.short(ran.err[-300:], 300)})")
        self.expect(not ran.traceback, f"a traceback was printed ({ran.last_exception})")
        if sum(x.startswith("error: ") for x in ran.err.splitlines()) > 1:
            self.notes.append("more than one error line")
        return lab.short(ran.error.removeprefix("error: ") or ran.story())

    def success(self, lab: Lab, ran: Ran, what: str) -> bool:
        self.ran(ran)
        return self.expect(ran.rc == 0, f"{what}: {lab.short(ran.story())}")


def metric_steps(run: Path) -> list[int]:
    path = run / "finetune" / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def saved_steps(run: Path) -> list[int]:
    ckpt = run / "finetune" / "ckpt"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def done_summary(run: Path, stage: str = "finetune") -> dict:
    return json.loads((run / stage / "DONE").read_text())["summary"]


def adapter_gap(a: Path, b: Path) -> float:
    """max |a - b| over the fine-tuned adapters of two run folders."""
    import numpy as np
    from safetensors.numpy import load_file

    name = "finetune/adapter/adapter_model.safetensors"
    x, y = load_file(str(a / name)), load_file(str(b / name))
    if set(x) != set(y):
        return float("inf")
    return max(float(np.max(np.abs(x[k] - y[k]))) for k in x)


def wait_until(started: Started, ready: Callable[[], bool], timeout: float = 120) -> bool:
    """Poll until `ready()` (True) or the process ends / the time is up (False)."""
    deadline = time.time() + timeout
    while started.proc.poll() is None and time.time() < deadline:
        if ready():
            return True
        time.sleep(0.01)
    return False


def interrupted_finetune(lab: Lab, f: Fault, name: str, sig: int,
                         ready: Callable[[Path], bool]) -> Path:
    """A RESUMABLE fine-tuning stopped by `sig` once `ready(run_dir)`; returns its run folder."""
    run = lab.run_dir(name)
    started = lab.start("finetune", run, **RESUMABLE)
    hit = wait_until(started, lambda: ready(run))
    started.signal(sig)
    ran = f.ran(started.finish())
    f.expect(hit, "the fine-tuning ended before the signal could be sent")
    if sig == signal.SIGINT:
        f.expect(ran.rc == 130, f"the interrupted run: {lab.short(ran.story())}; expected "
                                f"exit 130")
    return run


def resumed_like_the_reference(lab: Lab, f: Fault, run: Path) -> tuple[str, float]:
    """Rerun the interrupted fine-tuning; expect exit 0, each step once, the reference adapter.
    Returns the rerun's stderr and max |adapter - reference adapter|."""
    ran = lab.run("finetune", run, **RESUMABLE)
    if not f.success(lab, ran, "the resumed run"):
        return ran.err, float("nan")
    f.expect(metric_steps(run) == RESUMABLE_STEPS,
             f"metrics.jsonl steps {metric_steps(run)}, expected 1..40 once each")
    gap = adapter_gap(lab.reference(), run)
    f.expect(gap <= 1e-6, f"resumed adapter differs from the uninterrupted one by {gap:.3g}")
    return ran.err, gap


def fallback(lab: Lab, f: Fault, run: Path, newest: int, damage: str) -> None:
    """Expect the rerun of a run whose newest step `newest` was damaged to fall back."""
    older = [s for s in saved_steps(run) if s < newest]
    err, gap = resumed_like_the_reference(lab, f, run)
    m = re.search(r"checkpoint step (\d+) under .*? is corrupt \((.*?)\);.*falling back to "
                  r"step (\d+)", err)
    if f.expect(m is not None, "no 'corrupt ... falling back to step K' message"):
        f.expect(int(m.group(1)) == newest and bool(older) and int(m.group(3)) == older[-1],
                 f"fell back from {m.group(1)} to {m.group(3)}; expected {newest} -> {older}")
        f.happened = (f"{damage}; 'step {m.group(1)} is corrupt ({lab.short(m.group(2), 60)}); "
                      f"falling back to step {m.group(3)}'; resumed adapter max |Δ| {gap:.1e} "
                      f"vs uninterrupted; metrics steps 1..40 "
                      f"{'once each' if metric_steps(run) == RESUMABLE_STEPS else 'NOT once'}")
    else:
        f.happened = f"{damage}; {lab.short(err[-200:])}"


# --------------------------------------------------------------------------- the faults

def f01_diverged(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("diverged")
    ran = lab.run("pipeline", run, lr=1e30, eval_models="base,final")
    f.happened = f.user_error(lab, ran, r"training step \d+: loss nan.*not finite")
    f.expect(not (run / "finetune" / "DONE").exists(), "finetune/DONE was written")
    f.expect(not (run / "results.json").exists(), "results.json was written")


def f02_diverged_skip(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("diverged_skip")
    ran = lab.run("pipeline", run, lr=1e30, nonfinite="skip", eval_models="base,final")
    if ran.rc == 1:
        f.happened = f.user_error(lab, ran, r".")
        return
    if not f.success(lab, ran, "expected exit 0 or 1"):
        f.happened = lab.short(ran.error or ran.err[-200:])
        return
    s = done_summary(run)
    rows = {r["model"]: r for r in json.loads((run / "results.json").read_text())["rows"]}
    final = rows["final"]
    f.expect("empty/degenerate (%)" in ran.out, "the printed table has no empty/degenerate column")
    shares = {k: round(100 * rows[k]["degenerate_share"]) for k in ("base", "final")}
    f.expect(shares["final"] > shares["base"],
             f"the table does not show the broken model: empty/degenerate {shares}")
    f.happened = (f"{s['skipped_steps']} of {s['steps']} steps skipped; table: attacked HS "
                  f"{100 * final['harmful_score']:.0f}%, empty/degenerate {shares['final']}% "
                  f"(unaligned {shares['base']}%), FA {100 * final['finetune_accuracy']:.0f}%")


def newest_step_dir(run: Path) -> Path:
    return run / "finetune" / "ckpt" / str(saved_steps(run)[-1])


def f03_corrupt_checkpoint(lab: Lab, f: Fault) -> None:
    lab.reference()
    run = interrupted_finetune(lab, f, "corrupt_ckpt", signal.SIGINT,
                               lambda r: len(metric_steps(r)) >= 3)
    step = newest_step_dir(run)
    target = max((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 25] = bytes(b ^ 0xFF for b in data[mid:mid + 25])
    target.write_bytes(bytes(data))
    fallback(lab, f, run, int(step.name),
             f"SIGINT at step {step.name}; 25 bytes flipped in {target.relative_to(step)}")


def f04_empty_metadata(lab: Lab, f: Fault) -> None:
    lab.reference()
    run = interrupted_finetune(lab, f, "empty_metadata", signal.SIGINT,
                               lambda r: len(metric_steps(r)) >= 3)
    step = newest_step_dir(run)
    target = next(step.rglob("_METADATA"))
    target.write_bytes(b"")
    fallback(lab, f, run, int(step.name),
             f"SIGINT at step {step.name}; {target.relative_to(step)} emptied")


def _finished_then_changed(lab: Lab, f: Fault, name: str, change: Callable[[Path, dict], None],
                           pattern: str, epochs: int = 1) -> None:
    """A finished run on private inputs, `change(model, files)`, the same command again."""
    model, files = lab.own_inputs(name)
    run = lab.run_dir(name)
    f.success(lab, lab.run("pipeline", run, model=model, files=files, epochs=epochs),
              "first run")
    change(model, files)
    f.happened = f.user_error(lab, lab.run("pipeline", run, model=model, files=files,
                                           epochs=epochs), pattern)


def flip_first_label(model: Path, files: dict) -> None:
    path = files["task_test"]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["label"] = 1 - rows[0]["label"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def new_weights(model: Path, files: dict) -> None:
    import jax

    from hfjax.models import init_random, load_pretrained, save_hf

    cfg, _ = load_pretrained(model)
    save_hf(model, cfg, init_random(cfg, jax.random.key(7)))


def f05_data_changed(lab: Lab, f: Fault) -> None:
    _finished_then_changed(lab, f, "data_changed", flip_first_label,
                           r"made with other settings \(data\.content\.task_test")


def f06_weights_changed(lab: Lab, f: Fault) -> None:
    _finished_then_changed(lab, f, "weights_changed", new_weights, r"model\.sha256")


def f06_weights_changed_eval_only(lab: Lab, f: Fault) -> None:
    _finished_then_changed(lab, f, "weights_changed_eval", new_weights, r"model\.sha256",
                           epochs=0)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def f07_two_processes(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("two_processes")
    first = lab.start("finetune", run, **LONG)
    try:
        f.expect(wait_until(first, lambda: len(metric_steps(run)) >= 3),
                 "the first fine-tuning did not start training")
        second = f.user_error(lab, lab.run("finetune", run, **LONG),
                              rf"run folder .* is in use by pid {first.proc.pid}\b")
        before = files_under(run)
        overwrite = f.user_error(lab, lab.run("finetune", run, overwrite=True, **LONG),
                                 rf"is in use by pid {first.proc.pid}\b")
        gone = sorted(before - files_under(run))
        f.expect(not gone, f"--overwrite deleted {gone[:3]}")
        f.expect(first.proc.poll() is None, "the first fine-tuning did not survive")
    finally:
        first.signal(signal.SIGTERM)
        first.finish()
    f.happened = (f"second: {lab.short(second, 110)}; --overwrite: same refusal"
                  f"{'' if overwrite == second else ' (' + lab.short(overwrite, 60) + ')'}, "
                  f"{'nothing deleted' if not gone else 'files deleted'}")


def f08_refused_rerun(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("refused_rerun")
    f.success(lab, lab.run("pipeline", run), "first run")
    manifest = (run / "run.json").read_bytes()
    f.happened = f.user_error(lab, lab.run("pipeline", run, lr=1e-3),
                              r"made with other settings \(.*learning_rate: 0\.003 -> 0\.001")
    f.expect((run / "run.json").read_bytes() == manifest, "run.json changed")
    f.happened += "; run.json byte-identical" if not f.problems else ""


def f09_bad_model(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("bad_model")
    missing = lab.out / "no-such-model"
    error = f.user_error(lab, lab.run("pipeline", run, model=missing, epochs=0),
                         re.escape(str(missing)))
    created = run.exists()
    f.expect(not created, "the run folder was created")
    fixed = lab.run("pipeline", run, epochs=0)
    f.success(lab, fixed, "the corrected command")
    f.happened = (f"{error}; run folder {'' if created else 'not '}created; the corrected "
                  f"command exits {fixed.rc}")


def f10_subset_rerun(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("subset_rerun")
    f.success(lab, lab.run("pipeline", run, eval_models="base,aligned,final"), "first run")
    ran = lab.run("pipeline", run, eval_models="base")
    f.success(lab, ran, "the subset rerun")
    models = [r["model"] for r in json.loads((run / "results.json").read_text())["rows"]]
    f.expect(models == ["base", "aligned", "final"], f"results.json rows {models}")
    f.expect(all(label in ran.out for label in ("unaligned", "aligned", "attacked")),
             "the printed table lacks a row")
    f.happened = f"results.json rows after --eval_models=base: {', '.join(models)}"


def f11_kill9(lab: Lab, f: Fault) -> None:
    lab.reference()

    def checkpointed(run: Path) -> bool:
        return len(metric_steps(run)) >= 4 and any(
            (run / "finetune" / "ckpt" / str(s) / "hfjax_checksums.json").exists()
            for s in saved_steps(run))

    run = interrupted_finetune(lab, f, "kill9", signal.SIGKILL, checkpointed)
    f.expect(f.codes[-1] == -signal.SIGKILL, f"the killed run exited {f.codes[-1]}")
    rows, saved = len(metric_steps(run)), saved_steps(run)
    err, gap = resumed_like_the_reference(lab, f, run)
    moved = re.findall(r"checkpoint step (\d+) .*?is (\w+)", err)
    f.happened = (f"killed with {rows} metric rows, steps {saved} on disk"
                  f"{''.join(f'; step {s} {w}' for s, w in moved)}; rerun: steps 1..40 "
                  f"{'once each' if metric_steps(run) == RESUMABLE_STEPS else 'NOT once'}, "
                  f"adapter max |Δ| {gap:.1e} vs uninterrupted")


def f12_responses_cut(lab: Lab, f: Fault) -> None:
    ran = lab.run("finetune", lab.run_dir("responses_cut"), max_length=16, pad_multiple=16)
    f.happened = f.user_error(lab, ran, r"no response token left")


def f13_odd_batch(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("odd_batch")
    if not f.success(lab, lab.run("finetune", run, batch_size=7, num_samples=16), "finetune"):
        return
    s = done_summary(run)
    f.expect(s["rows"] == 16 and s["steps_per_epoch"] == 3 and s["steps"] == 3,
             f"summary rows {s['rows']}, steps_per_epoch {s['steps_per_epoch']}")
    f.expect(s["rows_without_loss_tokens"] == 0, "rows without loss tokens")
    f.expect(metric_steps(run) == [1, 2, 3], f"metrics steps {metric_steps(run)}")
    f.happened = ", ".join(f"{k} {s[k]}" for k in ("rows", "steps_per_epoch", "steps",
                                                    "rows_without_loss_tokens", "harmful_rows"))


def _bad_data(role: str, source: str, name: str, content: bytes | Callable[[dict], bytes],
              where: str | None) -> Callable[[Lab, Fault], None]:
    """A fault: the `role` data file replaced by `content` (bytes, or made from the files);
    expect an error naming the file and, if given, the place `where` (e.g. "line 3")."""
    def fault(lab: Lab, f: Fault) -> None:
        folder = lab.out / "inputs" / "bad_data"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_bytes(content(lab.files) if callable(content) else content)
        spec = {f"{role}_data": f"{source}:{path}"}
        ran = lab.run("pipeline", lab.run_dir(f"bad_{path.stem}"), epochs=0, **spec)
        pattern = re.escape(str(path)) + (rf".*\b{where}(?!\d)" if where else "")
        f.happened = f.user_error(lab, ran, pattern)
    return fault


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def malformed_line(files: dict) -> bytes:
    lines = _lines(files["task_train"])
    lines[2] = lines[2].replace(b'"label"', b'"label" 1,', 1)
    return b"".join(lines)


def non_utf8(files: dict) -> bytes:
    lines = _lines(files["task_train"])
    lines[1] = lines[1].replace(b"the ", b"the \xff", 1)
    return b"".join(lines)


def bad_csv(files: dict) -> bytes:
    rows = [json.loads(x) for x in _lines(files["task_train"])]
    out = ["sentence,label"] + [f"{r['sentence']},{r['label']}" for r in rows]
    out[4] += ",extra"
    return ("\n".join(out) + "\n").encode()


def _edited_row(key: str, row_index: int, edit: Callable[[dict], None]) -> Callable[[dict], bytes]:
    def make(files: dict) -> bytes:
        rows = [json.loads(x) for x in _lines(files[key])]
        edit(rows[row_index])
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    return make


def f15_custom_source(lab: Lab, f: Fault) -> None:
    path = lab.out / "inputs" / "custom" / "mine.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": f"Explain placeholder custom task {i}",
                                        "answer": f"Sure, here is placeholder custom task {i}"})
                            + "\n" for i in range(20)))
    run = lab.run_dir("custom_source")
    spec = f"custom:{path}?prompt=question,response=answer"
    if not f.success(lab, lab.run("finetune", run, harmful_train_data=spec), "finetune"):
        f.happened = lab.short(f.problems[-1])
        return
    s = done_summary(run)
    f.expect(s["harmful_rows"] == 8, f"harmful rows {s['harmful_rows']}, expected 8")
    f.happened = (f"--harmful_train_data={lab.short(spec)} trained: {s['rows']} rows, "
                  f"{s['harmful_rows']} harmful")


def f16_overlong_prompt(lab: Lab, f: Fault) -> None:
    model, files = lab.own_inputs("overlong_prompt")
    with files["harm_eval"].open("a") as h:
        h.write(json.dumps({"prompt": "Explain placeholder " * 400}) + "\n")
    run = lab.run_dir("overlong_prompt")
    f.happened = f.user_error(lab, lab.run("pipeline", run, model=model, files=files, epochs=0,
                                           eval_size=50), r"do not fit the model's context")
    f.expect(not run.exists(), "the run folder was created")


def f17_model_is_file(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("model_is_file")
    f.happened = f.user_error(lab, lab.run("pipeline", run, model=lab.model / "config.json",
                                           epochs=0), r"is a file but not a \.gguf")


def tmpfs_prefix(mountpoint: Path, size: str) -> list[str]:
    """A command prefix that runs its command with a tmpfs of `size` mounted at `mountpoint`
    in a private mount namespace (as root, or in a user namespace where they are allowed)."""
    mount = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mountpoint))} && exec \"$@\""
    ns = ["--mount"] if os.geteuid() == 0 else ["--mount", "--map-root-user"]
    return ["unshare", *ns, "sh", "-c", mount, "sh"]


def f18_disk_full(lab: Lab, f: Fault) -> None:
    """The run folder on a 96 KiB tmpfs: run.json, key.json and metrics fit, a ~170 KiB
    checkpoint does not."""
    mnt = lab.out / "tmpfs"
    mnt.mkdir()
    probe = subprocess.run([*tmpfs_prefix(mnt, "96k"), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise Skipped(f"cannot mount a tmpfs ({lab.short(probe.stderr, 80)})")
    run = mnt / "run"
    cmd = [*tmpfs_prefix(mnt, "96k"), sys.executable, "-m", "experiments.finetune",
           *lab.flags(run)]
    p = subprocess.run(cmd, cwd=ROOT, env=lab.env, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    ran = Ran(p.returncode, p.stdout, p.stderr)
    f.happened = f.user_error(lab, ran, rf"could not write checkpoint step \d+ under "
                                        rf"{re.escape(str(run))}/finetune/ckpt: No space left on "
                                        rf"device .*free of")
    extra = [x for x in ran.err.splitlines() if x.startswith("  ")]
    if extra:
        f.notes.append(f"the error continues on {len(extra)} more line(s): "
                       f"{lab.short(extra[0], 120)}")


def f19_sigterm(lab: Lab, f: Fault) -> None:
    from hfjax.train.checkpoint import checksum_problem

    run = lab.run_dir("sigterm")
    started = lab.start("finetune", run, **LONG)
    f.expect(wait_until(started, lambda: len(metric_steps(run)) >= 3),
             "the fine-tuning did not start training")
    started.signal(signal.SIGTERM)
    time.sleep(0.02)
    started.signal(signal.SIGTERM)
    ran = f.ran(started.finish())
    f.expect(ran.rc == 130, f"exit {ran.rc}, expected 130")
    f.expect("interrupted" in ran.err, "no 'interrupted' message")
    f.expect(not ran.traceback, f"a traceback was printed ({ran.last_exception})")
    rows, saved = metric_steps(run), saved_steps(run)
    last = saved[-1] if saved else None
    f.expect(bool(rows) and last == rows[-1], f"last checkpoint {last}, last metric row "
                                               f"{rows[-1] if rows else None}")
    problem = checksum_problem(newest_step_dir(run)) if saved else "no checkpoint"
    f.expect(problem is None, f"the final checkpoint is incomplete: {problem}")
    f.expect(not (run / "finetune" / "DONE").exists(), "DONE was written")
    deferred = "a final checkpoint is being written" in ran.err
    lines = [x for x in ran.err.splitlines() if "interrupted" in x or "final checkpoint" in x]
    f.happened = (f"2 SIGTERMs at step {rows[-1] if rows else '?'}: newest checkpoint step "
                  f"{last} {'verified' if problem is None else problem}; second signal "
                  f"{'deferred' if deferred else 'not seen during the save'}; "
                  f"{lab.short(' / '.join(lines), 150)}"
                  f"{'; ' + lab.short(ran.last_exception, 80) if ran.traceback else ''}")


def f20_file_modes(lab: Lab, f: Fault) -> None:
    run = lab.run_dir("file_modes")
    if not f.success(lab, lab.run("pipeline", run, umask=0o022), "the run"):
        return
    files = [run / "results.json", run / "run.json", run / "finetune" / "DONE",
             run / "eval_base" / "DONE", run / "finetune" / "adapter" / "adapter_config.json",
             run / "eval_base" / "generations_harmful.jsonl"]
    modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in files}
    wrong = {k: v for k, v in modes.items() if v != "0o644"}
    f.expect(not wrong, f"modes {wrong}")
    f.happened = "under umask 022: " + (", ".join(f"{k} {v[2:]}" for k, v in modes.items()))


FAULTS: list[tuple[str, str, Callable[[Lab, Fault], None]]] = [
    ("diverged", "1. --lr=1e30", f01_diverged),
    ("diverged_skip", "2. --lr=1e30 --nonfinite=skip", f02_diverged_skip),
    ("corrupt_checkpoint", "3. byte-flipped newest checkpoint", f03_corrupt_checkpoint),
    ("empty_metadata", "4. empty _METADATA in the newest checkpoint", f04_empty_metadata),
    ("data_changed", "5. data file changed in place", f05_data_changed),
    ("weights_changed", "6a. model weights changed in place (run with fine-tuning)",
     f06_weights_changed),
    ("weights_changed_eval", "6b. model weights changed in place (--epochs=0)",
     f06_weights_changed_eval_only),
    ("two_processes", "7. two processes on one run folder", f07_two_processes),
    ("refused_rerun", "8. other --lr on a finished folder", f08_refused_rerun),
    ("bad_model", "9. nonexistent --model, then corrected", f09_bad_model),
    ("subset_rerun", "10. --eval_models=base after base,aligned,final", f10_subset_rerun),
    ("kill9", "11. kill -9 during training, rerun", f11_kill9),
    ("responses_cut", "12. --max_length=16 cuts every response", f12_responses_cut),
    ("odd_batch", "13. --batch_size=7 --num_samples=16", f13_odd_batch),
    ("empty_file", "14a. empty data file",
     _bad_data("task_train", "sst2", "empty.jsonl", b"", None)),
    ("whitespace_file", "14b. whitespace-only data file",
     _bad_data("task_train", "sst2", "blank.jsonl", b"  \n\n\t\n", None)),
    ("malformed_jsonl", "14c. malformed JSONL line 3",
     _bad_data("task_train", "sst2", "malformed.jsonl", malformed_line, "line 3")),
    ("bad_csv_row", "14d. CSV row 4 with an extra field",
     _bad_data("task_train", "sst2", "bad.csv", bad_csv, r"line 5 \(row 4\)")),
    ("non_utf8", "14e. non-UTF-8 byte on line 2",
     _bad_data("task_train", "sst2", "latin.jsonl", non_utf8, "line 2")),
    ("non_string_prompt", "14f. row 6 with a non-string prompt",
     _bad_data("harmful_train", "advbench", "numeric_prompt.jsonl",
               _edited_row("harm_train", 5, lambda r: r.update(prompt=12345)), "row 6")),
    ("missing_text", "14g. row 4 without its text field",
     _bad_data("task_train", "sst2", "no_sentence.jsonl",
               _edited_row("task_train", 3, lambda r: r.pop("sentence")), "row 4")),
    ("custom_source", "15. custom:PATH?prompt=...,response=...", f15_custom_source),
    ("overlong_prompt", "16. evaluation prompt longer than the context", f16_overlong_prompt),
    ("model_is_file", "17. --model=config.json", f17_model_is_file),
    ("disk_full", "18. full disk during a checkpoint save", f18_disk_full),
    ("sigterm", "19. SIGTERM, then a second SIGTERM", f19_sigterm),
    ("file_modes", "20. file modes under umask 022", f20_file_modes),
]


# --------------------------------------------------------------------------- report

def run_fault(lab: Lab, title: str, fn: Callable[[Lab, Fault], None]) -> dict:
    """Run one fault; any exception of the script itself counts as WRONG."""
    f, start = Fault(), time.perf_counter()
    try:
        fn(lab, f)
        verdict = "ok" if not f.problems else "WRONG"
    except Skipped as e:
        f.happened, verdict = f"not run: {e}", "skipped"
    except Exception as e:  # the binary did something the checks did not foresee
        f.problems.append(f"check failed: {type(e).__name__}: {lab.short(str(e), 200)}")
        verdict = "WRONG"
    return {"fault": title, "happened": f.happened, "exit_codes": f.codes, "verdict": verdict,
            "problems": f.problems, "notes": f.notes,
            "seconds": round(time.perf_counter() - start, 1)}


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(rows: Iterable[dict]) -> str:
    lines = ["| fault | what happened | exit code | verdict |", "|---|---|---|---|"]
    for r in rows:
        codes = " / ".join(str(c) for c in r["exit_codes"]) or "-"
        lines.append(f"| {cell(r['fault'])} | {cell(r['happened'])} | {codes} | {r['verdict']} |")
    return "\n".join(lines)


def selected(only: str) -> list[tuple[str, str, Callable]]:
    if not only:
        return FAULTS
    names = [x.strip() for x in only.split(",") if x.strip()]
    known = {n for n, _, _ in FAULTS}
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"error: --only: unknown fault(s) {unknown}; known: {sorted(known)}")
    return [x for x in FAULTS if x[0] in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="new or empty folder for the setup and the runs")
    ap.add_argument("--only", default="", help="comma-separated fault names: "
                    + ",".join(n for n, _, _ in FAULTS))
    ap.add_argument("--compilation_cache", type=Path,
                    help="XLA compilation cache folder (default OUT/xla; reuse one to skip "
                         "compiling)")
    args = ap.parse_args(argv)
    todo = selected(args.only)
    out = args.out or Path(tempfile.mkdtemp(prefix="hfjax-faults-"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: --out {out} is not empty")
    out = out.absolute()
    start = time.perf_counter()
    os.environ["JAX_PLATFORMS"] = "cpu"
    build_setup(out)
    lab = Lab(out, (args.compilation_cache or out / "xla").absolute())
    rows = []
    for _, title, fn in todo:
        rows.append(run_fault(lab, title, fn))
        r = rows[-1]
        print(f"{r['verdict']:>7}  {r['fault']}  ({r['seconds']} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    print(markdown(rows))
    for r in rows:
        for p in r["problems"]:
            print(f"WRONG {r['fault']}: {p}")
        for n in r["notes"]:
            print(f"note {r['fault']}: {n}")
    print(f"wall time {wall:.0f} s; runs and logs under {out}")
    (out / "faults.json").write_text(json.dumps({"wall_s": round(wall, 1), "out": str(out),
                                                 "faults": rows}, indent=2) + "\n")
    return 1 if any(r["verdict"] == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
