"""The training loop: resume, step, log (tqdm + JSONL), evaluate, checkpoint, stop cleanly.

`data(start_step)` must return an iterator of {name: host-local numpy batch} that yields, from
`start_step` on, exactly what an uninterrupted run would; that plus the restored state (with its
rng) makes a resumed run equal an uninterrupted one.

With `overlap` (the default on accelerators) the host never stalls the device: step k + 1 is
dispatched (JAX dispatch is asynchronous) before step k's metrics are read, so the next batch is
built, placed and queued while step k runs, and step k's row is written while step k + 1 runs.
The loop then waits for a step before dispatching the next only where it needs that step's
state: an evaluation, a checkpoint, the last step. On the CPU backend the default is off: the
host's ~1 ms per step is nothing against a CPU step, the host thread shares the cores with
XLA's, and the interleaved allocations fragment the heap (BUILD_NOTES, session 11).
A row's `step_time_s` is the time from the previous step's end (or from when this step's
batch was requested, if later) to this step's end: in steady state, the wall time per step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from hfjax.train.checkpoint import Checkpointer
from hfjax.train.state import TrainState
from hfjax.train.step import put_batches


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
) -> tuple[TrainState, list[dict]]:
    """Run until `num_steps` steps are done; returns (state, per-step metrics of this run).

    `eval_fn(state, step)` runs every `eval_every` steps on the state after that step; its
    results join that step's row as `eval/<name>` (outside the row's `step_time_s`).
    `overlap`: keep one step in flight (None: on unless the mesh's devices are CPUs).
    """
    if overlap is None:
        overlap = mesh.devices.flat[0].platform != "cpu"
    start = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        if state_shardings is None:
            raise ValueError("resuming from a checkpoint needs state_shardings")
        state, meta = checkpointer.restore(jax.eval_shape(lambda: state), state_shardings)
        start = int(meta["next_step"])
    history: list[dict] = []
    log = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115
    bar = tqdm(total=num_steps, initial=start, disable=not progress, dynamic_ncols=True,
               desc="train")
    last_end = [time.perf_counter()]
    inflight: list[dict] = []  # dispatched steps whose rows are not written yet, oldest first

    def complete(p: dict) -> dict:
        """Wait for the dispatched step `p`; its row, timed to its end."""
        metrics = {k: float(v) for k, v in jax.device_get(p["metrics"]).items()}
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
    try:
        batches_iter = data(start)
        while step < num_steps:
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
        for p in inflight:
            emit(complete(p))
        bar.write(f"interrupted at step {step}: writing a final checkpoint")
        if checkpointer is not None and checkpointer.latest_step() != step:
            checkpointer.save(step, state, {"next_step": step}, force=True)
    finally:
        bar.close()
        if log is not None:
            log.close()
        if checkpointer is not None:
            checkpointer.wait()
    return state, history


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
