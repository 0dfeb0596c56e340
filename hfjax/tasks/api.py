"""The task registry (`hfjax.registry`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from hfjax.data.records import Record
from hfjax.errors import UserError
from hfjax.eval import metrics
from hfjax.registry import Registry


class TaskError(UserError, ValueError):
    """An unknown task or a task that cannot load."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    loader: `(data_seed) -> (train, test)` records (a generator or two source specs);
    metric: the `hfjax.eval.metrics.accuracy` task name; max_new_tokens: its generation budget.
    """

    name: str
    loader: Callable[[int], tuple[list[Record], list[Record]]]
    metric: str
    max_new_tokens: int
    about: str
    offline: bool

    def load(self, data_seed: int = 0) -> tuple[list[Record], list[Record]]:
        return self.loader(data_seed)

    def accuracy(self, answers: Sequence[str], golds: Sequence, exact: bool = False) -> float:
        return metrics.accuracy(self.metric, answers, golds, exact)


REGISTRY: Registry[TaskSpec] = Registry("task", TaskError)


def register(name: str, *, metric: str, max_new_tokens: int, about: str, offline: bool):
    """Decorator registering a task loader `(data_seed) -> (train, test)` under `name`."""
    def wrap(loader):
        REGISTRY.add(name, TaskSpec(name, loader, metric, max_new_tokens, about, offline))
        return loader
    return wrap


def get(name: str) -> TaskSpec:
    return REGISTRY.get(name)


def available(offline: bool | None = None) -> list[str]:
    return REGISTRY.available(None if offline is None else lambda s: s.offline == offline)
