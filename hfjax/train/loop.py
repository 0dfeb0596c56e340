"""The training loop: resume, step, log (tqdm + JSONL), evaluate, checkpoint, stop cleanly.

`data(start_step)` must return an iterator of {name: host-local numpy batch} that yields, from
`start_step` on, exactly what an uninterrupted run would; that plus the restored state (with its
rng) makes a resumed run equal an uninterrupted one. On resume the metrics file is cut back to
the restored step, so it never holds a step twice.

Failures never pass for results: a step whose loss or gradient norm is not finite stops the
loop with `NonFiniteError` naming the step, before any checkpoint of that state is written
(with a step built with `skip_nonfinite`, such steps are skipped instead, up to
`max_consecutive_skips` in a row). Ctrl-C and SIGTERM (what schedulers send) stop the loop at
the next step boundary with a final checkpoint (see `_StopRequests`); a second signal while
that checkpoint is written is reported and otherwise ignored.

With `overlap` (the default on accelerators) the host never stalls the device: step k + 1 is
dispatched (JAX dispatch is asynchronous) before step k's metrics are read, so the next batch is
built, placed and queued while step k runs, and step k's row is written while step k + 1 runs.
The loop then waits for a step before dispatching the next only where it needs that step's
state: an evaluation, a checkpoint, the last step. On the CPU backend the default is off: the
host's ~1 ms per step is nothing against a CPU step, the host thread shares the cores with
XLA's, and the interleaved allocations fragment the heap (BUILD_NOTES, "One step in flight
on accelerators only").
A row's `step_time_s` is the time from the previous step's end (or from when this step's
batch was requested, if later) to this step's end: in steady state, the wall time per step.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from hfjax.errors import UserError
from hfjax.eval.report import atomic_open
from hfjax.train.checkpoint import Checkpointer
from hfjax.train.state import TrainState
from hfjax.train.step import put_batches


class NonFiniteError(UserError, FloatingPointError):
    """A training step produced a non-finite loss or gradient norm."""


class _StopRequests:
    """SIGINT and SIGTERM, recorded instead of raised: the loop stops at the next step boundary.

    A signal raised as an exception could land inside the jitted step call, after the step has
    consumed its donated state and before the new state is bound: the final checkpoint would
    then have no state to write. Recorded, it stops the loop where the state is valid. A signal
    that comes while the loop is stopping is reported and otherwise ignored, so the final
    checkpoint completes. Only the main thread can install signal handlers; elsewhere the
    default behaviour stays.
    """

    def __init__(self):
        self.signals: list[str] = []
        self.stopping = False
        self._previous: dict = {}

    def _record(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stopping or self.signals:
            print("a final checkpoint is being written; it finishes first", file=sys.stderr,
                  flush=True)
        else:
            print(f"{name}: stopping after the current step, then writing a final checkpoint",
                  file=sys.stderr, flush=True)
        self.signals.append(name)

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record)
                              for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was requested."""
        if self.signals:
            raise KeyboardInterrupt(f"signal {self.signals[0]}")


def check_finite_tree(tree, what: str) -> None:
    """Raise NonFiniteError if any floating leaf of `tree` holds a NaN or an infinity."""
    bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
           if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x)))]
    if bad:
        raise NonFiniteError(f"{what} holds non-finite values (in {', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''})")


def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Keep the rows of a metrics JSONL file with step <= last_step (atomically); returns how
    many rows were dropped. A torn last line (a kill while writing it) is dropped too."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        with atomic_open(path) as f:
            f.write("".join(k + "\n" for k in kept))
    return dropped


def train(
    step_fn: Callable,
    state: TrainState,
    frozen,
    data: Callable[[int], Iterator[dict]],
    *,
    mesh: Mesh,
    num_steps: int,
    state_shardings: TrainState | None = None,
    checkpointer: Checkpointer | None = None,
    metrics_path: str | os.PathLike | None = None,
    eval_fn: Callable[[TrainState, int], dict] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    overlap: bool | None = None,
    max_consecutive_skips: int = 10,
) -> tuple[TrainState, list[dict]]:
    """Run until `num_steps` steps are done; returns (state, per-step metrics of this run).

    `eval_fn(state, step)` runs every `eval_every` steps on the state after that step; its
    results join that step's row as `eval/<name>` (outside the row's `step_time_s`).
    `overlap`: keep one step in flight (None: on unless the mesh's devices are CPUs).
    Raises `NonFiniteError` at the first non-finite step (or after `max_consecutive_skips`
    skipped steps in a row, with a step built with `skip_nonfinite`).
    """
    if overlap is None:
        overlap = mesh.devices.flat[0].platform != "cpu"
    start = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        if state_shardings is None:
            raise ValueError("resuming from a checkpoint needs state_shardings")
        restored = checkpointer.restore_latest(jax.eval_shape(lambda: state), state_shardings)
        if restored is not None:
            state, meta = restored
            start = int(meta["next_step"])
    writes_metrics = metrics_path is not None and jax.process_index() == 0  # one file per run
    if writes_metrics:
        truncate_metrics(metrics_path, start)
    history: list[dict] = []
    log = open(metrics_path, "a") if writes_metrics else None  # noqa: SIM115
    bar = tqdm(total=num_steps, initial=start, disable=not progress, dynamic_ncols=True,
               desc="train")
    last_end = [time.perf_counter()]
    inflight: list[dict] = []  # dispatched steps whose rows are not written yet, oldest first
    skipped_in_a_row = [0]

    def check_finite(step: int, metrics: dict) -> None:
        saved = checkpointer.latest_step() if checkpointer is not None else None
        last_good = (f"the last checkpoint is step {saved}" if saved
                     else "no checkpoint was written")
        if metrics.get("skipped"):
            skipped_in_a_row[0] += 1
            if skipped_in_a_row[0] > max_consecutive_skips:
                raise NonFiniteError(
                    f"training step {step}: {skipped_in_a_row[0]} steps in a row had a "
                    f"non-finite loss or gradient norm and were skipped; stopping ({last_good})")
            return
        skipped_in_a_row[0] = 0
        bad = [f"{k} {metrics[k]}" for k in ("loss", "grad_norm")
               if k in metrics and not math.isfinite(metrics[k])]
        if bad:
            raise NonFiniteError(
                f"training step {step}: {' and '.join(bad)} (not finite): the training "
                f"diverged; lower the learning rate, or skip such steps with --nonfinite=skip "
                f"({last_good})")

    def complete(p: dict) -> dict:
        """Wait for the dispatched step `p`; its row, timed to its end. Non-finite: raise."""
        metrics = {k: float(v) for k, v in jax.device_get(p["metrics"]).items()}
        check_finite(p["step"], metrics)
        end = time.perf_counter()
        dt = end - max(last_end[0], p["requested"])
        last_end[0] = end
        return {"step": p["step"], **metrics, "step_time_s": dt,
                "tokens_per_s": p["tokens"] * jax.process_count() / dt}

    def emit(row: dict) -> None:
        if history and history[-1]["step"] >= row["step"]:
            return  # already written (an interrupt between writing a row and dequeuing it)
        history.append(row)
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.2e}",
                        tok_s=f"{row['tokens_per_s']:.0f}")

    step = start
    with _StopRequests() as stop:
        try:
            batches_iter = data(start)
            while step < num_steps:
                stop.check()
                requested = time.perf_counter()
                host_batches = next(batches_iter)
                tokens = sum(int(np.sum(b["attention_mask"])) for b in host_batches.values())
                state, metrics = step_fn(state, frozen, put_batches(host_batches, mesh))
                step += 1
                inflight.append({"step": step, "metrics": metrics, "tokens": tokens,
                                 "requested": requested})
                if len(inflight) > 1:  # step k's row while step k + 1 runs
                    emit(complete(inflight[0]))
                    del inflight[0]
                evaluate = eval_fn is not None and eval_every > 0 and step % eval_every == 0
                save = checkpointer is not None and checkpointer.due(step)
                if not overlap or evaluate or save or step == num_steps:  # this step's state
                    row = complete(inflight[0])
                    if evaluate:
                        row.update({f"eval/{k}": v for k, v in eval_fn(state, step).items()})
                    emit(row)
                    del inflight[0]
                    if save:
                        checkpointer.save(step, state, {"next_step": step})
            if checkpointer is not None and checkpointer.latest_step() != step:
                checkpointer.save(step, state, {"next_step": step}, force=True)
        except KeyboardInterrupt:
            stop.stopping = True
            for p in inflight:
                emit(complete(p))
            bar.write(f"interrupted at step {step}: writing a final checkpoint")
            if checkpointer is not None and checkpointer.latest_step() != step:
                checkpointer.save(step, state, {"next_step": step}, force=True)
        finally:
            stop.stopping = True
            bar.close()
            if log is not None:
                log.close()
            if checkpointer is not None:
                checkpointer.wait()
    return state, history


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
