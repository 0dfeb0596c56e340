"""Checks of local data files before `datasets` reads them.

One streaming pass per file turns each fault that `datasets` would report without a place, or
not at all, into a `DataError` naming the file, the 1-based line or row and what is wrong:

    data file /x/a.jsonl line 7: invalid JSON (Expecting ',' delimiter at column 18)
    data file /x/a.csv line 4 (row 3): 4 fields where the header has 3
    data file /x/a.jsonl line 2: not UTF-8 (byte 0xff at file offset 13)

Formats are `datasets`' builders: "json" (an array of objects, one object, or JSON lines),
"csv" (a header row, then rows of as many fields; blank lines are skipped as pandas does) and
"parquet" (only the footer is read).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hfjax.data.records import DataError, EmptySourceError


def describe(value: Any) -> str:
    """The JSON kind of a value, with its article ("a list", "an object", ...)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 file (a leading BOM dropped), line endings kept."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data file {path} line {number}: not UTF-8 (byte "
                                f"0x{raw[e.start]:02x} at file offset {offset + e.start})") from e
            offset += len(raw)
            yield number, line


def _invalid_json(path: Path, line: int, error: json.JSONDecodeError) -> DataError:
    return DataError(f"data file {path} line {line}: invalid JSON ({error.msg} at column "
                     f"{error.colno})")


def _json_lines(path: Path, lines: Iterable[tuple[int, str]]) -> list[str]:
    """Each non-blank line one JSON object; returns the keys in order of first use."""
    keys: dict[str, None] = {}
    rows = 0
    for number, line in lines:
        if not line.strip():
            continue
        rows += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _invalid_json(path, number, e) from e
        if not isinstance(row, dict):
            raise DataError(f"data file {path} line {number}: holds {describe(row)}, not a JSON "
                            "object")
        keys.update(dict.fromkeys(row))
    if not rows:
        raise EmptySourceError(f"data file {path} is empty (only whitespace)")
    return list(keys)


def _json_document(path: Path, text: str) -> list[str]:
    """A whole-file JSON document: an array of objects or one object (one row)."""
    if not text.strip():
        raise EmptySourceError(f"data file {path} is empty (only whitespace)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and not text.lstrip().startswith("["):
            return _json_lines(path, enumerate(text.split("\n"), 1))
        raise _invalid_json(path, e.lineno, e) from e
    if isinstance(doc, dict):
        return list(doc)
    if not isinstance(doc, list):
        raise DataError(f"data file {path}: holds {describe(doc)}, not an array of objects")
    if not doc:
        raise EmptySourceError(f"data file {path} has no rows")
    keys: dict[str, None] = {}
    for number, row in enumerate(doc, 1):
        if not isinstance(row, dict):
            raise DataError(f"data file {path} row {number}: holds {describe(row)}, not a JSON "
                            "object")
        keys.update(dict.fromkeys(row))
    return list(keys)


def _scan_json(path: Path) -> list[str]:
    if path.suffix.lower() == ".jsonl":
        return _json_lines(path, text_lines(path))
    return _json_document(path, "".join(line for _, line in text_lines(path)))


def _scan_csv(path: Path) -> list[str]:
    """Strict CSV (RFC 4180 quoting): every row has as many fields as the header."""
    reader = csv.reader((line for _, line in text_lines(path)), strict=True)
    header: list[str] | None = None
    rows, start = 0, 1
    try:
        for row in reader:
            if not "".join(row).strip() and len(row) <= 1:
                start = reader.line_num + 1
                continue
            if header is None:
                header = row
            elif len(row) != len(header):
                raise DataError(f"data file {path} line {start} (row {rows + 1}): {len(row)} "
                                f"fields where the header has {len(header)}")
            else:
                rows += 1
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"data file {path} line {start}: invalid CSV ({e})") from e
    if header is None:
        raise EmptySourceError(f"data file {path} is empty (only whitespace)")
    if not rows:
        raise EmptySourceError(f"data file {path} has no rows")
    return header


def _scan_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data file {path}: not a parquet file ({e})") from e
    if meta.num_rows == 0:
        raise EmptySourceError(f"data file {path} has no rows")
    return list(meta.schema.to_arrow_schema().names)


_SCANNERS = {"json": _scan_json, "csv": _scan_csv, "parquet": _scan_parquet}


def scan_data_file(path: Path, builder: str) -> list[str]:
    """Check a local data file for `datasets`' `builder` in one pass; returns its column names.

    Raises `EmptySourceError` for a file of 0 bytes, only whitespace, or no rows, and
    `DataError` (file, line or row, what is wrong) for bad UTF-8, malformed JSON / JSON lines /
    CSV, a JSON row that is not an object, or a file that is not parquet.
    """
    if path.stat().st_size == 0:
        raise EmptySourceError(f"data file {path} is empty (0 bytes)")
    return _SCANNERS[builder](path)
