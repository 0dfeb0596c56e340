"""Train-state checkpoints with orbax `CheckpointManager`.

Each checkpoint holds the TrainState (step, trainable, optimizer state, rng, defense slot) and a
JSON item with what the data pipeline needs to resume (the step it continues from). Restoring
into the abstract state with its shardings puts every array back where the step expects it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from hfjax.train.state import TrainState


class Checkpointer:
    """Save every `every` steps, keep the last `keep`, asynchronously, under an absolute path."""

    def __init__(self, directory: str | os.PathLike, *, every: int = 100, keep: int = 2,
                 async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every={every} and keep={keep} must be >= 1")
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=every, max_to_keep=keep,
                enable_async_checkpointing=async_save),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            force=force)

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would write a checkpoint (interval, first save, preemption)."""
        return self.manager.should_save(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: TrainState, shardings: TrainState,
                step: int | None = None) -> tuple[TrainState, dict]:
        """(state, meta) of `step` (default: latest), placed with `shardings`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, shardings)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                          meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
