"""Named data sources, loaded through `datasets` from the hub or from a local file.

    load_source("beavertails", split="30k_test")           # PKU-Alignment/BeaverTails
    load_source("sst2", path="sst2_dev.parquet")           # same schema, local file
    load_source("custom", path="mine.jsonl", fields={"prompt": "question", "response": "answer"},
                harmful=False)

Every row becomes a `Record`. Local files may be JSON (a list of objects or JSON lines), JSONL,
CSV or parquet. For a named source, `fields` renames columns: {expected column: column in the
file}. For "custom", `fields` maps record fields to columns ("prompt" required; "response",
"input", "label", "answer", "refusal", "harmful" optional) and `harmful` gives the flag when no
column holds it. Task instructions follow the git-disl code base (Vaccine/Lisa/Booster).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hfjax.data.records import (
    DataError,
    EmptySourceError,
    MissingFieldError,
    Record,
    UnknownSourceError,
    make_record,
)

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
SST2_LABELS = ("negative", "positive")
AGNEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 "
                      "categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_QUESTION_SUFFIX = "\nFirst think step by step and then answer the final number.\n"
GSM8K_ANSWER_PREFIX = "The final answer is: "

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A named source: where it lives on the hub and how a row becomes a record."""

    hub_id: str
    config: str | None
    splits: tuple[str, ...] | None  # None: not checked
    columns: tuple[str, ...]  # columns `convert` needs
    convert: Callable[[Mapping[str, Any]], Record]
    about: str


def _label_word(value: Any, words: tuple[str, ...], name: str) -> str:
    if isinstance(value, str) and value in words:
        return value
    try:
        idx = int(value)
    except (TypeError, ValueError):
        idx = -1
    if not 0 <= idx < len(words):
        raise DataError(f"{name}: label {value!r} is not one of 0..{len(words) - 1} or "
                        f"{list(words)} (SST2's hub 'test' split is unlabelled: use 'validation')")
    return words[idx]


def _categories(value: Any) -> list[str] | None:
    if isinstance(value, Mapping):
        return sorted(k for k, v in value.items() if v)
    if isinstance(value, str) and value:
        return [value]
    return None


def _beavertails(row: Mapping[str, Any]) -> Record:
    return make_record(row["prompt"], row["response"], "beavertails",
                       not _to_bool(row["is_safe"], "beavertails", "is_safe"),
                       category=_categories(row.get("category")))


def _split_refusal(text: str) -> str:
    """Refusal-paired BeaverTails stores "Question: ...\\nAnswer: <refusal>"; keep the answer."""
    head, sep, answer = text.partition("\nAnswer: ")
    return answer.strip() if sep and head.startswith("Question: ") else text.strip()


def _beavertails_refusal(row: Mapping[str, Any]) -> Record:
    return make_record(row["prompt"], row["response"], "beavertails_refusal", True,
                       refusal=_split_refusal(row["refusal"]))


def _sst2(row: Mapping[str, Any]) -> Record:
    label = _label_word(row["label"], SST2_LABELS, "sst2")
    return make_record(SST2_INSTRUCTION, label, "sst2", False, input=row["sentence"], label=label)


def _ag_news(row: Mapping[str, Any]) -> Record:
    label = _label_word(row["label"], AGNEWS_LABELS, "ag_news")
    return make_record(AGNEWS_INSTRUCTION, label, "ag_news", False, input=row["text"], label=label)


def _gsm8k(row: Mapping[str, Any]) -> Record:
    solution = row["answer"]
    if "####" not in solution:
        raise DataError(f"gsm8k: answer has no '####' final-answer marker: {solution[-80:]!r}")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return make_record(row["question"] + GSM8K_QUESTION_SUFFIX,
                       solution.replace("####", GSM8K_ANSWER_PREFIX), "gsm8k", False, answer=gold)


def _alpaca(row: Mapping[str, Any]) -> Record:
    return make_record(row["instruction"], row["output"], "alpaca", False,
                       input=row.get("input") or None)


def _advbench(row: Mapping[str, Any]) -> Record:
    return make_record(row["prompt"], row["target"], "advbench", True)


def _harmbench(row: Mapping[str, Any]) -> Record:
    return make_record(row["prompt"], "", "harmbench", True,
                       category=_categories(row.get("category")))


SOURCES: dict[str, SourceSpec] = {
    "beavertails": SourceSpec(
        "PKU-Alignment/BeaverTails", None, ("30k_train", "30k_test", "330k_train", "330k_test"),
        ("prompt", "response", "is_safe"), _beavertails,
        "QA pairs with harm labels; harmful = not is_safe"),
    "beavertails_refusal": SourceSpec(
        "anonymous4486/repnoise_beavertail", None, None, ("prompt", "response", "refusal"),
        _beavertails_refusal, "BeaverTails harmful QA paired with a refusal (RepNoise/Booster)"),
    "sst2": SourceSpec(
        "stanfordnlp/sst2", None, ("train", "validation", "test"), ("sentence", "label"), _sst2,
        "sentiment; the labelled held-out split is 'validation'"),
    "ag_news": SourceSpec(
        "fancyzhx/ag_news", None, ("train", "test"), ("text", "label"), _ag_news,
        "4-way news topic"),
    "gsm8k": SourceSpec(
        "openai/gsm8k", "main", ("train", "test"), ("question", "answer"), _gsm8k,
        "grade-school math; gold number in 'answer'"),
    "alpaca": SourceSpec(
        "tatsu-lab/alpaca", None, ("train",), ("instruction", "output"), _alpaca,
        "instruction following"),
    "advbench": SourceSpec(
        "walledai/AdvBench", None, ("train",), ("prompt", "target"), _advbench,
        "520 harmful behaviors with affirmative targets"),
    "harmbench": SourceSpec(
        "walledai/HarmBench", "standard", ("train",), ("prompt",), _harmbench,
        "HarmBench standard behaviors (evaluation prompts)"),
}

CUSTOM = "custom"
CUSTOM_FIELDS = ("prompt", "response", "input", "label", "answer", "refusal", "harmful")


def known_sources() -> list[str]:
    """Names accepted by `load_source`."""
    return sorted(SOURCES) + [CUSTOM]


def _to_bool(value: Any, source: str, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise DataError(f"{source}: column {column!r} holds {value!r}, not a boolean")


def load_rows(*, path: str | os.PathLike | None = None, hub_id: str | None = None,
              config: str | None = None, split: str | None = None,
              cache_dir: str | os.PathLike | None = None):
    """A `datasets.Dataset` from a local file (JSON/JSONL/CSV/parquet) or from the hub."""
    import datasets

    cache = str(cache_dir) if cache_dir is not None else None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} does not exist")
        builder = FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"data file {p}: unsupported extension {p.suffix!r}; use one of "
                            f"{sorted(FILE_BUILDERS)}")
        try:
            return datasets.load_dataset(builder, data_files=str(p), split="train",
                                         cache_dir=cache)
        except ValueError as e:  # datasets: 'Instruction "train" corresponds to no data!'
            if "no data" in str(e):
                raise EmptySourceError(f"data file {p} has no rows") from e
            raise DataError(f"cannot read data file {p} as {builder}: {e}") from e
    if hub_id is None:
        raise DataError("give a local `path` or a hub id")
    return datasets.load_dataset(hub_id, name=config, split=split, cache_dir=cache)


def _require(columns: list[str], needed: tuple[str, ...] | list[str], name: str,
             where: str) -> None:
    for col in needed:
        if col not in columns:
            raise MissingFieldError(f"source {name!r} ({where}) has no field {col!r}; "
                                    f"its fields are {columns}")


def _check_custom(fields: Mapping[str, str], harmful: bool | None) -> None:
    unknown = set(fields) - set(CUSTOM_FIELDS)
    if unknown or "prompt" not in fields:
        raise DataError(f"custom source: `fields` maps record fields {list(CUSTOM_FIELDS)} to "
                        f"columns and must map 'prompt'; got {dict(fields)}")
    if "harmful" not in fields and harmful is None:
        raise DataError("custom source: give `harmful=True/False` or map a 'harmful' column")


def _custom_records(rows: list[dict[str, Any]], fields: Mapping[str, str],
                    harmful: bool | None, name: str) -> list[Record]:
    out = []
    for row in rows:
        flag = (_to_bool(row[fields["harmful"]], name, fields["harmful"]) if "harmful" in fields
                else harmful)
        extra = {k: (None if row[c] is None else str(row[c])) for k, c in fields.items()
                 if k in ("input", "label", "answer", "refusal")}
        response = row[fields["response"]] if "response" in fields else ""
        out.append(make_record(str(row[fields["prompt"]]), "" if response is None else
                               str(response), name, flag, **extra))
    return out


def load_source(name: str, split: str | None = None, *, path: str | os.PathLike | None = None,
                fields: Mapping[str, str] | None = None, harmful: bool | None = None,
                hub_id: str | None = None, config: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> list[Record]:
    """Records of a named source (hub or local `path`) or of a "custom" file / hub dataset.

    Args:
      name: one of `known_sources()`.
      split: hub split (slicing like "30k_train[:1000]" is passed through); ignored for files.
      path: a local JSON/JSONL/CSV/parquet file in the source's schema (or any schema with
        `fields`).
      fields: column mapping (see module docstring).
      harmful: the harmful flag of every row of a custom source without a 'harmful' column.
      hub_id, config: override the hub location (required for a custom hub dataset).
      cache_dir: the `datasets` cache directory.
    """
    if name != CUSTOM and name not in SOURCES:
        raise UnknownSourceError(f"unknown data source {name!r}; known sources: "
                                 f"{known_sources()}")
    spec = SOURCES.get(name)
    if spec is not None and harmful is not None:
        raise DataError(f"source {name!r} sets its own harmful flags; `harmful` is for 'custom'")
    if spec is None:
        _check_custom(fields or {}, harmful)
    if path is None:
        hub_id = hub_id or (spec.hub_id if spec else None)
        if hub_id is None:
            raise DataError("custom source: give a local `path` or a `hub_id`")
        config = config if config is not None else (spec.config if spec else None)
        if split is None:
            known = f", one of {list(spec.splits)}" if spec and spec.splits else ""
            raise DataError(f"source {name!r}: give a hub split{known}")
        base = (split or "").split("[", 1)[0]
        if spec is not None and spec.splits is not None and base not in spec.splits:
            raise DataError(f"source {name!r} has no split {split!r}; splits: {list(spec.splits)}")
        where = f"hub {hub_id}" + (f"/{config}" if config else "") + f" split {split}"
    else:
        where = f"file {path}"
    ds = load_rows(path=path, hub_id=hub_id, config=config, split=split, cache_dir=cache_dir)
    if len(ds) == 0:
        raise EmptySourceError(f"source {name!r} ({where}) has no rows")
    columns = list(ds.column_names)
    if spec is None:
        _require(columns, list(fields.values()), name, where)
        return _custom_records(ds.to_list(), fields, harmful, name)
    rename = dict(fields or {})  # expected column -> column in the data
    _require(columns, [rename.get(c, c) for c in spec.columns], name, where)
    rows = ds.to_list()
    if rename:
        rows = [{**row, **{exp: row[col] for exp, col in rename.items() if col in row}}
                for row in rows]
    return [spec.convert(row) for row in rows]
