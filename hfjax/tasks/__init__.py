"""Tasks: what the user fine-tunes the model for, by name, and how its accuracy (FA) is measured.

A task is its data (a train and a test source: hub ids or local files through `datasets`, or an
offline generator that needs no hub), the prompt format its rows carry (the instruction in
"prompt", the item in "input", the gold in "label" or "answer"), its generation budget and its
metric:

    task = hfjax.tasks.get("sst2")
    train, test = task.load(data_seed=0)          # records
    fa = task.accuracy(answers, golds)

The pipeline selects one with --task NAME (the role flags --task_train_data/--task_test_data
and --task_metric override its parts).
"""

from hfjax.tasks import builtin  # noqa: F401 - registers the built-in tasks
from hfjax.tasks.api import REGISTRY, TaskError, TaskSpec, available, get, register

__all__ = ["REGISTRY", "TaskError", "TaskSpec", "available", "get", "register"]
