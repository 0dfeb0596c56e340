"""Data for harmful fine-tuning: sources, the offline default, templates, mixing, batching.

    records = data.load_source("beavertails", split="30k_test")       # hub or local file
    offline = data.default_data(seed=0)                                 # no hub, no torch
    user = data.mix_user_data(offline.task_train, offline.harmful_train, n=1000, p=0.1, seed=0)
    data.assert_disjoint({"eval": offline.harmful_eval}, {"user": user})
    examples = data.tokenize_records(user, tokenizer, "chat", max_length=256)
    for batch in data.Batcher(examples, batch_size=8, seed=0).batches(start_step=0): ...
"""

from hfjax.data import plan
from hfjax.data.batching import (
    IGNORE_INDEX,
    Batcher,
    Example,
    bucket_for,
    encode_prompts,
    length_buckets,
    pad_batch,
    tokenize_records,
)
from hfjax.data.mixing import (
    assert_disjoint,
    build_alignment_set,
    build_eval_set,
    build_harmful_set,
    build_paired_set,
    harmful_count,
    mix_user_data,
    refusal_row,
    sample,
)
from hfjax.data.offline import (
    PIP_COMMAND,
    MissingPackageError,
    OfflineData,
    default_data,
    harmful_file,
    harmful_prompts,
    offline_harmful_records,
    split_harmful,
)
from hfjax.data.plan import RolePlan, plan_roles
from hfjax.data.records import (
    DataError,
    EmptySourceError,
    LeakageError,
    MissingFieldError,
    Record,
    UnknownSourceError,
    make_record,
    normalize_text,
    prompt_key,
)
from hfjax.data.responses import REFUSALS, affirmative_target, templated_refusal
from hfjax.data.sources import (
    SOURCES,
    SourceRequest,
    known_sources,
    load_rows,
    load_source,
    load_spec,
    parse_source_spec,
)
from hfjax.data.synthetic import benign_instruction_rows, split_rows, task_rows
from hfjax.data.templates import TEMPLATES, AlpacaTemplate, ChatTemplate, get_template

__all__ = [
    "IGNORE_INDEX",
    "PIP_COMMAND",
    "REFUSALS",
    "SOURCES",
    "TEMPLATES",
    "AlpacaTemplate",
    "Batcher",
    "ChatTemplate",
    "DataError",
    "EmptySourceError",
    "Example",
    "LeakageError",
    "MissingFieldError",
    "MissingPackageError",
    "OfflineData",
    "Record",
    "RolePlan",
    "SourceRequest",
    "UnknownSourceError",
    "affirmative_target",
    "assert_disjoint",
    "benign_instruction_rows",
    "bucket_for",
    "build_alignment_set",
    "build_eval_set",
    "build_harmful_set",
    "build_paired_set",
    "default_data",
    "encode_prompts",
    "get_template",
    "harmful_count",
    "harmful_file",
    "harmful_prompts",
    "known_sources",
    "length_buckets",
    "load_rows",
    "load_source",
    "load_spec",
    "make_record",
    "mix_user_data",
    "normalize_text",
    "offline_harmful_records",
    "pad_batch",
    "plan",
    "plan_roles",
    "parse_source_spec",
    "prompt_key",
    "refusal_row",
    "sample",
    "split_harmful",
    "split_rows",
    "task_rows",
    "templated_refusal",
    "tokenize_records",
]
