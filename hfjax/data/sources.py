"""Named data sources, loaded through `datasets` from the hub or from a local file.

    load_source("beavertails", split="30k_test")           # PKU-Alignment/BeaverTails
    load_source("sst2", path="sst2_dev.parquet")           # same schema, local file
    load_source("custom", path="mine.jsonl", fields={"prompt": "question", "response": "answer"},
                harmful=False)

Every row becomes a `Record`. Local files may be JSON (a list of objects or JSON lines), JSONL,
CSV or parquet. For a named source, `fields` renames columns: {expected column: column in the
file}. For "custom", `fields` maps record fields to columns ("prompt" required; "response",
"input", "label", "answer", "refusal", "harmful" optional) and `harmful` gives the flag when no
column holds it; without `fields`, a custom file's columns named like record fields are used
as they are. Task instructions follow the git-disl code base (Vaccine/Lisa/Booster).

Local files are checked in one streaming pass before `datasets` reads them (see
`hfjax.data.files`), and every row before it is converted: a fault is a `DataError` naming the
file and the 1-based row (or the hub id, split and row index) and what is wrong, e.g.
`data file /x/a.jsonl row 3: field 'sentence' is missing (null)`.

On the command line a source is one string (`parse_source_spec`, `load_spec`):

    beavertails:30k_train                      NAME:SPLIT (hub)
    sst2:/data/x.csv?sentence=text             NAME:PATH?EXPECTED=COLUMN,...
    custom:/data/mine.jsonl?prompt=question,response=answer,harmful=true
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hfjax.data.files import describe, scan_data_file
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
    optional: tuple[str, ...] = ()  # columns `convert` reads when present


TEXT = "text"
LABEL = "text or an integer"
ANY = "any value"
COLUMN_KINDS = {"label": LABEL, "is_safe": ANY, "category": ANY}  # other columns: TEXT
CUSTOM_KINDS = {"label": LABEL, "answer": LABEL, "harmful": ANY}  # other record fields: TEXT


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
                       not _to_bool(row["is_safe"], "is_safe"),
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
        "QA pairs with harm labels; harmful = not is_safe", ("category",)),
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
        "instruction following", ("input",)),
    "advbench": SourceSpec(
        "walledai/AdvBench", None, ("train",), ("prompt", "target"), _advbench,
        "520 harmful behaviors with affirmative targets"),
    "harmbench": SourceSpec(
        "walledai/HarmBench", "standard", ("train",), ("prompt",), _harmbench,
        "HarmBench standard behaviors (evaluation prompts)", ("category",)),
}

CUSTOM = "custom"
CUSTOM_FIELDS = ("prompt", "response", "input", "label", "answer", "refusal", "harmful")


def known_sources() -> list[str]:
    """Names accepted by `load_source`."""
    return sorted(SOURCES) + [CUSTOM]


def _to_bool(value: Any, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise DataError(f"field {column!r} holds {value!r}, not a boolean")


def load_rows(*, path: str | os.PathLike | None = None, hub_id: str | None = None,
              config: str | None = None, split: str | None = None,
              cache_dir: str | os.PathLike | None = None):
    """A `datasets.Dataset` from a local file (JSON/JSONL/CSV/parquet) or from the hub.

    A local file is checked first (`scan_data_file`); CSV cells are read as text, and only an
    empty cell is missing (null).
    """
    import datasets

    cache = str(cache_dir) if cache_dir is not None else None
    if path is None:
        if hub_id is None:
            raise DataError("give a local `path` or a hub id")
        return datasets.load_dataset(hub_id, name=config, split=split, cache_dir=cache)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    builder = FILE_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"data file {p}: unsupported extension {p.suffix!r}; use one of "
                        f"{sorted(FILE_BUILDERS)}")
    columns = scan_data_file(p, builder)
    options = ({"converters": dict.fromkeys(range(len(columns)), str), "keep_default_na": False,
                "na_values": [""]} if builder == "csv" else {})
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache,
                                     **options)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        if "no data" in str(e):  # datasets: 'Instruction "train" corresponds to no data!'
            raise EmptySourceError(f"data file {p} has no rows") from e
        raise DataError(f"cannot read data file {p} as {builder}: {e.__cause__ or e}") from e


def _require(columns: list[str], needed: tuple[str, ...] | list[str], name: str,
             where: str) -> None:
    for col in needed:
        if col not in columns:
            raise MissingFieldError(f"source {name!r} ({where}) has no field {col!r}; "
                                    f"its fields are {columns}")


def _is_integer(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())


def _field_problem(value: Any, kind: str) -> str | None:
    if value is None:
        return "is missing (null)"
    if kind == ANY or isinstance(value, str) or (kind == LABEL and _is_integer(value)):
        return None
    return f"holds {describe(value)}, not {kind}"


def check_fields(row: Mapping[str, Any], needed: Mapping[str, str],
                 optional: Mapping[str, str] | None = None) -> None:
    """Each `needed` column {name: kind} is set and of its kind (TEXT, LABEL or ANY); each
    `optional` column is of its kind when set. Raises MissingFieldError / DataError."""
    for col, kind in {**(optional or {}), **needed}.items():
        value = row.get(col)
        if value is None and col not in needed:
            continue
        problem = _field_problem(value, kind)
        if problem is not None:
            error = MissingFieldError if value is None else DataError
            raise error(f"field {col!r} {problem}")


def _located(place: str, error: Exception) -> DataError:
    """`error` as a DataError (of the same class when it is one) whose message starts with
    `place`."""
    if isinstance(error, DataError):
        return type(error)(f"{place}: {error}")
    if isinstance(error, KeyError):
        return MissingFieldError(f"{place}: field {error.args[0]!r} is missing")
    return DataError(f"{place}: {error}")


def _convert_rows(rows: list[dict[str, Any]], convert: Callable[[Mapping[str, Any]], Record],
                  needed: Mapping[str, str], optional: Mapping[str, str],
                  where: str, from_file: bool) -> list[Record]:
    """Records of `rows`; a fault in row i is raised as '<where> row i+1: ...' for a file and
    '<where> row index i: ...' for a hub dataset."""
    out = []
    for i, row in enumerate(rows):
        try:
            check_fields(row, needed, optional)
            out.append(convert(row))
        except (DataError, KeyError, TypeError) as e:
            place = f"{where} row {i + 1}" if from_file else f"{where} row index {i}"
            raise _located(place, e) from e
    return out


def _check_rename(name: str, spec: SourceSpec, rename: Mapping[str, str]) -> None:
    unknown = sorted(set(rename) - set(spec.columns) - set(spec.optional))
    if unknown:
        raise DataError(f"source {name!r} reads the columns {list(spec.columns + spec.optional)};"
                        f" `fields` cannot rename {unknown}")


def _renamed(convert: Callable[[Mapping[str, Any]], Record], rename: Mapping[str, str],
             row: Mapping[str, Any]) -> Record:
    return convert({**row, **{exp: row[col] for exp, col in rename.items() if col in row}})


def _check_custom(fields: Mapping[str, str], harmful: bool | None) -> None:
    unknown = set(fields) - set(CUSTOM_FIELDS)
    if unknown or "prompt" not in fields:
        raise DataError(f"custom source: `fields` maps record fields {list(CUSTOM_FIELDS)} to "
                        f"columns and must map 'prompt'; got {dict(fields)}")
    if "harmful" not in fields and harmful is None:
        raise DataError("custom source: give `harmful=True/False` or map a 'harmful' column")


def _custom_fields(fields: Mapping[str, str] | None, columns: list[str],
                   where: str) -> dict[str, str]:
    """The given mapping, or else every column named like a record field."""
    if fields:
        return dict(fields)
    if "prompt" not in columns:
        raise MissingFieldError(f"custom source ({where}) has no 'prompt' column; map one with "
                                f"fields={{'prompt': COLUMN}} (?prompt=COLUMN in a source "
                                f"spec); its columns are {columns}")
    return {f: f for f in CUSTOM_FIELDS if f in columns}


def _custom_record(row: Mapping[str, Any], fields: Mapping[str, str],
                   harmful: bool | None) -> Record:
    flag = (_to_bool(row[fields["harmful"]], fields["harmful"]) if "harmful" in fields
            else harmful)
    extra = {k: (None if row[c] is None else str(row[c])) for k, c in fields.items()
             if k in ("input", "label", "answer", "refusal")}
    response = row[fields["response"]] if "response" in fields else ""
    return make_record(row[fields["prompt"]], response, CUSTOM, flag, **extra)


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
      fields: column mapping (see module docstring); for "custom", None uses the columns named
        like record fields.
      harmful: the harmful flag of every row of a custom source without a 'harmful' column.
      hub_id, config: override the hub location (required for a custom hub dataset).
      cache_dir: the `datasets` cache directory.

    Every column a row needs must be set: text, or for labels text or an integer.
    """
    if name != CUSTOM and name not in SOURCES:
        raise UnknownSourceError(f"unknown data source {name!r}; known sources: "
                                 f"{known_sources()}")
    spec = SOURCES.get(name)
    if spec is not None and harmful is not None:
        raise DataError(f"source {name!r} sets its own harmful flags; `harmful` is for 'custom'")
    if spec is not None:
        _check_rename(name, spec, fields or {})
    elif fields:
        _check_custom(fields, harmful)
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
        where = f"hub dataset {hub_id}" + (f"/{config}" if config else "") + f" split {split}"
    else:
        where = f"data file {path}"
    ds = load_rows(path=path, hub_id=hub_id, config=config, split=split, cache_dir=cache_dir)
    if len(ds) == 0:
        raise EmptySourceError(f"source {name!r} ({where}) has no rows")
    columns = list(ds.column_names)
    if spec is None:
        mapping = _custom_fields(fields, columns, where)
        _check_custom(mapping, harmful)
        _require(columns, list(mapping.values()), name, where)
        kinds = {f: CUSTOM_KINDS.get(f, TEXT) for f in mapping}
        needed = {mapping[f]: kinds[f] for f in ("prompt", "response", "harmful") if f in mapping}
        optional = {c: kinds[f] for f, c in mapping.items()}
        convert = functools.partial(_custom_record, fields=mapping, harmful=harmful)
    else:
        rename = dict(fields or {})  # expected column -> column in the data
        _require(columns, [rename.get(c, c) for c in spec.columns], name, where)
        needed = {rename.get(c, c): COLUMN_KINDS.get(c, TEXT) for c in spec.columns}
        optional = {rename.get(c, c): COLUMN_KINDS.get(c, TEXT) for c in spec.optional}
        convert = functools.partial(_renamed, spec.convert, rename) if rename else spec.convert
    return _convert_rows(ds.to_list(), convert, needed, optional, where, path is not None)


SPEC_SYNTAX = ("NAME:SPLIT or NAME:PATH, optionally followed by ?KEY=VALUE,..., e.g. "
               "beavertails:30k_train, sst2:/data/sst2.csv?sentence=text or "
               "custom:/data/mine.jsonl?prompt=question,response=answer,harmful=true")


@dataclasses.dataclass(frozen=True)
class SourceRequest:
    """A source named on the command line: the arguments of `load_source`."""

    name: str
    split: str | None = None
    path: str | None = None
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    harmful: bool | None = None  # custom: the constant flag (harmful=true|false)


def _is_data_path(text: str) -> bool:
    """An existing file, or a name with a data-file suffix (a file that should exist)."""
    p = Path(text).expanduser()
    return p.is_file() or p.suffix.lower() in FILE_BUILDERS


def _pairs(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in query.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        if key in out:
            raise ValueError(f"{key!r} is given twice")
        out[key] = value
    return out


def parse_source_spec(spec: str) -> SourceRequest:
    """Parse `NAME:SPLIT` or `NAME:PATH`, each optionally followed by `?KEY=VALUE,...`.

    A target is a PATH when it is an existing file or has a data-file suffix (.json, .jsonl,
    .csv, .parquet); otherwise a hub SPLIT. For a named source the pairs rename columns
    {expected column: column in the data}; for "custom" (a local file) they map record fields
    to columns, except `harmful=true|false`, the constant flag (`harmful=COLUMN` names a
    column).
    """
    def bad(problem: str) -> DataError:
        return DataError(f"data source {spec!r}: {problem}; expected {SPEC_SYNTAX}")

    name, colon, rest = spec.partition(":")
    if not colon or not name or not rest:
        raise bad("no NAME:TARGET")
    if name != CUSTOM and name not in SOURCES:
        raise UnknownSourceError(f"data source {spec!r}: unknown source {name!r}; known "
                                 f"sources: {known_sources()}")
    target, ask, query = (rest, "", "") if Path(rest).expanduser().is_file() else \
        rest.partition("?")
    if not target.strip():
        raise bad("no split or path before '?'")
    try:
        fields = _pairs(query) if ask else {}
    except ValueError as e:
        raise bad(str(e)) from None
    path = str(Path(target).expanduser()) if _is_data_path(target) else None
    split = None if path else target
    if name != CUSTOM:
        _check_rename(name, SOURCES[name], fields)
        return SourceRequest(name, split, path, fields)
    if path is None:
        raise bad(f"a custom source reads a local data file ({'/'.join(FILE_BUILDERS)}), "
                  f"not {target!r}")
    harmful = None
    if fields.get("harmful", "").lower() in ("true", "false"):
        harmful = fields.pop("harmful").lower() == "true"
    unknown = sorted(set(fields) - set(CUSTOM_FIELDS))
    if unknown:
        raise bad(f"custom keys are the record fields {list(CUSTOM_FIELDS)}, not {unknown}")
    if fields and "prompt" not in fields:
        raise bad("custom fields must map 'prompt' (e.g. ?prompt=question)")
    return SourceRequest(name, None, path, fields, harmful)


def load_spec(spec: str, *, default_harmful: bool | None = None,
              cache_dir: str | os.PathLike | None = None) -> list[Record]:
    """Records of a source spec (`parse_source_spec`).

    A custom source without a harmful column or constant takes `default_harmful` (the harmful
    flag its role implies); a column named or mapped 'harmful' wins over either.
    """
    req = parse_source_spec(spec)
    harmful = (req.harmful if req.harmful is not None else default_harmful) \
        if req.name == CUSTOM else None
    return load_source(req.name, req.split, path=req.path, fields=req.fields or None,
                       harmful=harmful, cache_dir=cache_dir)
