"""The task registry (`hfjax.registry`) and what a task is.

A task has a family, a hub loader and an offline generator (each `(data_seed) -> (train, test)`,
either may be None), a metric name, a generation budget and `gold(record)`, what its metric
compares an answer against:

    family           gold(record)
    classification   record["label"]                                  (the label word)
    choice           {"label": gold letter, "options": option texts}
    math             record["answer"]                                 (the final number)
    summarization,   record["response"]                               (the reference text)
    translation,
    completion
    code             {"tests": test program, "entry_point": function name,
                      "prefix": code the answer continues ("" when it is the whole program)}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from hfjax.data.records import Record
from hfjax.errors import UserError
from hfjax.eval import metrics
from hfjax.registry import Registry

Loader = Callable[[int], tuple[list[Record], list[Record]]]
FAMILIES = ("classification", "choice", "math", "summarization", "translation", "code",
            "completion")
SOURCES = ("hub", "offline")


class TaskError(UserError, ValueError):
    """An unknown task or a task that cannot load."""


def _field(task: str, record: Record, name: str) -> Any:
    if record.get(name) is None:
        raise TaskError(f"task {task!r}: the record has no {name!r} to score against: "
                        f"{str(record)[:160]}")
    return record[name]


def _gold(family: str, task: str, record: Record) -> Any:
    if family == "classification":
        return _field(task, record, "label")
    if family == "choice":
        return {"label": _field(task, record, "label"),
                "options": _field(task, record, "options")}
    if family == "math":
        return _field(task, record, "answer")
    if family == "code":
        return {"tests": _field(task, record, "tests"),
                "entry_point": _field(task, record, "entry_point"),
                "prefix": record.get("input", "")}
    return _field(task, record, "response")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A registered task (see the module docstring).

    hub: `(data_seed) -> (train, test)` from the hub (`hfjax.tasks.loaders.HubSplits`);
    generator: the same from hfjax's offline generator; metric: the `hfjax.eval.metrics` name;
    max_new_tokens: its generation budget. `offline`: the task has no hub loader (its data is
    always generated), so the default `load` needs no hub.
    """

    name: str
    family: str
    metric: str
    max_new_tokens: int
    about: str
    hub: Loader | None = None
    generator: Loader | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise TaskError(f"task {self.name!r}: unknown family {self.family!r}; families: "
                            f"{list(FAMILIES)}")
        if self.hub is None and self.generator is None:
            raise TaskError(f"task {self.name!r} has neither a hub loader nor a generator")

    @property
    def offline(self) -> bool:
        return self.hub is None

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources `load` accepts: "hub" and/or "offline"."""
        return tuple(s for s, fn in zip(SOURCES, (self.hub, self.generator), strict=True) if fn)

    def load(self, data_seed: int = 0, source: str | None = None
             ) -> tuple[list[Record], list[Record]]:
        """(train, test) records from `source` ("hub" or "offline"; None: the hub when the task
        has a hub loader, else its generator)."""
        source = source or self.sources[0]
        if source not in SOURCES:
            raise TaskError(f"task {self.name!r}: source {source!r} is not one of "
                            f"{list(SOURCES)}")
        loader = self.hub if source == "hub" else self.generator
        if loader is None:
            raise TaskError(f"task {self.name!r} has no {source} loader; it loads from "
                            f"{list(self.sources)}")
        return loader(data_seed)

    def load_files(self, data_seed: int, train: str, test: str | None = None
                   ) -> tuple[list[Record], list[Record]]:
        """(train, test) from local files in the hub's schema; without `test`, the test rows are
        cut from `train` by the data seed (`HubSplits.from_files`)."""
        from_files = getattr(self.hub, "from_files", None)
        if from_files is None:
            raise TaskError(f"task {self.name!r} has no hub schema to read local files in")
        return from_files(data_seed, train, test)

    def gold(self, record: Record) -> Any:
        """What the metric compares an answer against (module docstring)."""
        return _gold(self.family, self.name, record)

    def accuracy(self, answers: Sequence[str], golds: Sequence, exact: bool = False) -> float:
        return metrics.accuracy(self.metric, answers, golds, exact)


REGISTRY: Registry[TaskSpec] = Registry("task", TaskError)


def add(spec: TaskSpec) -> TaskSpec:
    """Register a task with its hub loader and/or generator."""
    return REGISTRY.add(spec.name, spec)


def register(name: str, *, metric: str, max_new_tokens: int, about: str, offline: bool,
             family: str = "classification"):
    """Decorator registering one loader `(data_seed) -> (train, test)` under `name`: the
    task's generator when `offline`, else its hub loader."""
    def wrap(loader: Loader) -> Loader:
        slot = {"generator": loader} if offline else {"hub": loader}
        add(TaskSpec(name, family, metric, max_new_tokens, about, **slot))
        return loader
    return wrap


def get(name: str) -> TaskSpec:
    return REGISTRY.get(name)


def available(offline: bool | None = None, source: str | None = None) -> list[str]:
    """Task names; `offline`: only the tasks without (True) or with (False) a hub loader;
    `source`: only those that load from it ("hub" or "offline")."""
    if source is not None and source not in SOURCES:
        raise TaskError(f"source {source!r} is not one of {list(SOURCES)}")
    return REGISTRY.available(lambda s: (offline is None or s.offline == offline) and
                              (source is None or source in s.sources))
