"""The training loop: resume, step, log (tqdm + JSONL), evaluate, checkpoint, stop cleanly.

`data(start_step)` must return an iterator of {name: host-local numpy batch} that yields, from
`start_step` on, exactly what an uninterrupted run would; that plus the restored state (with its
rng) makes a resumed run equal an uninterrupted one.
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
) -> tuple[TrainState, list[dict]]:
    """Run until `num_steps` steps are done; returns (state, per-step metrics of this run)."""
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
    step = start
    try:
        batches_iter = data(start)
        while step < num_steps:
            host_batches = next(batches_iter)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, frozen, put_batches(host_batches, mesh))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            tokens = sum(int(np.sum(b["attention_mask"])) for b in host_batches.values())
            step += 1
            row = {"step": step, **metrics, "step_time_s": dt,
                   "tokens_per_s": tokens * jax.process_count() / dt}
            if eval_fn is not None and eval_every and step % eval_every == 0:
                row.update({f"eval/{k}": v for k, v in eval_fn(state, step).items()})
            history.append(row)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.2e}",
                            tok_s=f"{row['tokens_per_s']:.0f}")
            if checkpointer is not None:
                checkpointer.save(step, state, {"next_step": step})
        if checkpointer is not None and checkpointer.latest_step() != step:
            checkpointer.save(step, state, {"next_step": step}, force=True)
    except KeyboardInterrupt:
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
