"""Tasks: what the user fine-tunes the model for, by name, and how its accuracy (FA) is measured.

A task is its family, its data (a hub loader through `datasets`, from hub ids or local files in
the hub's schema, and an offline generator that needs no hub), the prompt format its rows carry
(`hfjax.data.sources`: the instruction in "prompt", the item in "input", the training target in
"response"), its generation budget, its metric and its gold:

    task = hfjax.tasks.get("boolq")
    train, test = task.load(data_seed=0)                     # the hub ("offline": generated)
    train, test = task.load_files(0, "train.parquet", "validation.parquet")
    fa = task.accuracy(answers, [task.gold(r) for r in test])

One module per family: classification (sentiment, topic, sst2, ag_news, financial_sentiment),
choice (boolq, hellaswag, winogrande, arc), math_problems (gsm8k), summarization (xsum,
billsum, cnn_dailymail), translation (wmt14_en_fr), code_generation (mbpp, humaneval),
completion (wikitext, aeslc). The pipeline selects one with --task NAME (the role flags
--task_train_data/--task_test_data and --task_metric override its parts).
"""

from hfjax.tasks import (  # noqa: F401 - each registers its family's tasks
    choice,
    classification,
    code_generation,
    completion,
    math_problems,
    summarization,
    translation,
)
from hfjax.tasks.api import (
    FAMILIES,
    REGISTRY,
    SOURCES,
    TaskError,
    TaskSpec,
    add,
    available,
    get,
    register,
)
from hfjax.tasks.loaders import Generated, HubSplits

__all__ = ["FAMILIES", "REGISTRY", "SOURCES", "Generated", "HubSplits", "TaskError", "TaskSpec",
           "add", "available", "get", "register"]
