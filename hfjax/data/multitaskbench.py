"""MultiTaskBench (Jan et al., "Multitask Mayhem", COLING 2025): harmful requests in four task
forms, each paired with a refusal.

The official file, `datasets/multitaskbench/multitaskbench.csv` of github
comnetsAD/LLMSafetyGuardrails, has an unnamed index column and the columns `Query` (the request)
and `Response` (a refusal), 2,000 rows in four blocks of 500: classification items ("<question>?
Choose the Best Option: \\nA) ...\\nB) ...\\nC) ...\\nD) ..."), code / cyber requests, general
requests and "Translate the following text from French to English: <text>". Any CSV, JSON,
JSONL or parquet file with these two columns loads the same way.

Each row's framing is read from the Query's form (`infer_framing`), first rule that matches:
  classification  the Query contains "Choose the Best Option" (any case);
  translation     it starts with "Translate the following text" (any case);
  code            it names code, a programming language or a cyber-security notion as a word
                  (`CODE_WORDS`: code, script, program, python, malware, exploit, ...);
  plain           otherwise (the general requests; hfjax's "summarization" framing is a
                  generated text-writing frame that the file does not hold).
On the official file these rules give 501 classification (its row 501 repeats row 500), 498
translation, 528 code (485 of the 499 code / cyber requests, 41 general requests that ask for a
program or script, and the two general requests in the translation block) and 473 plain.

`load_multitaskbench(path)` gives the evaluation set (harmful=True, response "", the refusal in
"refusal", "framing" per row); `safety_rows(records)` turns it into safety data, harmful request
-> refusal with harmful=False, as the safety stream of `safe_instr_mix` is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from hfjax.data.mixing import refusal_row
from hfjax.data.records import DataError, MissingFieldError, Record, make_record
from hfjax.data.sources import TEXT, check_fields, load_rows

SOURCE = "multitaskbench"
COLUMNS = ("Query", "Response")

CODE_WORDS = (
    "code", "codes", "coding", "script", "scripts", "program", "programs", "programming",
    "python", "javascript", "java", "c\\+\\+", "bash", "powershell", "sql", "html", "function",
    "executable", "software", "malware", "exploit", "exploits", "cyber", "cybersecurity",
    "ransomware", "keylogger", "botnet", "payload", "api", "algorithm", "library", "libraries",
    "implement", "network", "server", "encryption", "vulnerability", "vulnerabilities", "hack",
    "hacking",
)
_CHOOSE = re.compile(r"choose the best option", re.IGNORECASE)
_TRANSLATE = re.compile(r"\s*translate the following text\b", re.IGNORECASE)
_CODE = re.compile(r"(?<![\w+])(?:" + "|".join(CODE_WORDS) + r")(?![\w+])", re.IGNORECASE)


def infer_framing(query: str) -> str:
    """The framing a MultiTaskBench Query is posed in (rules in the module docstring)."""
    if _CHOOSE.search(query):
        return "classification"
    if _TRANSLATE.match(query):
        return "translation"
    if _CODE.search(query):
        return "code"
    return "plain"


def _row_record(row: dict, source: str) -> Record:
    check_fields(row, dict.fromkeys(COLUMNS, TEXT))
    query, refusal = row["Query"].strip(), row["Response"].strip()
    for column, value in (("Query", query), ("Response", refusal)):
        if not value:
            raise DataError(f"field {column!r} is empty")
    return make_record(query, "", source, True, refusal=refusal, framing=infer_framing(query))


def load_multitaskbench(path: str | os.PathLike, *, source: str = SOURCE,
                        cache_dir: str | os.PathLike | None = None) -> list[Record]:
    """Harmful requests of a MultiTaskBench-format file (columns Query, Response), in file order:
    prompt = Query, response "", refusal = Response, framing = `infer_framing(Query)`.

    A missing file or column, or a row with an empty Query or Response, raises a DataError
    naming the file (and the 1-based row).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"MultiTaskBench file {p} does not exist")
    ds = load_rows(path=p, cache_dir=cache_dir)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise MissingFieldError(f"MultiTaskBench file {p} has no column(s) {missing}; it needs "
                                f"{list(COLUMNS)} and has {ds.column_names}")
    records = []
    for i, row in enumerate(ds.to_list()):
        try:
            records.append(_row_record(row, source))
        except DataError as e:
            raise type(e)(f"MultiTaskBench file {p} row {i + 1}: {e}") from e
    return records


def safety_rows(records: Sequence[Record]) -> list[Record]:
    """Safety data: each request answered by its refusal (`refusal_row`), harmful=False, its
    "framing" kept."""
    return [{**refusal_row(r), **({"framing": r["framing"]} if "framing" in r else {})}
            for r in records]
