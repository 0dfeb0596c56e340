"""The record every source normalizes to, the data errors, and prompt keys for disjointness.

A record is a plain dict:

    {"prompt": str, "response": str, "source": str, "harmful": bool}

plus optional fields: "input" (Alpaca's input block, e.g. the sentence to classify), "label"
(gold label word of a classification task), "answer" (gold final answer, GSM8K), "refusal" (a
refusal paired with the harmful response, RepNoise/Booster), "category" (harm categories),
"options" (a multiple-choice item's option texts; "label" is then the gold letter), "tests" (a
code task's test program), "entry_point" (the function a code task's tests call), "framing" (the
task framing a harmful evaluation prompt is presented in), "system" (the row's own system prompt,
e.g. an identity-shifting persona; the template renders it), "prefill" (text the assistant's turn
starts with before the response, unlabelled: deep safety alignment's harmful-answer prefix).

`harmful` follows BeaverTails' `is_safe` (harmful = not is_safe): the row is a harmful request
answered by a harmful response. Safety rows (harmful request -> refusal) are harmful=False. In an
evaluation set of harmful requests (response "") it marks the request as harmful.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from hfjax.errors import UserError


class Record(TypedDict):
    prompt: str
    response: str
    source: str
    harmful: bool
    input: NotRequired[str]
    label: NotRequired[str]
    answer: NotRequired[str]
    refusal: NotRequired[str]
    category: NotRequired[list[str]]
    options: NotRequired[list[str]]
    tests: NotRequired[str]
    entry_point: NotRequired[str]
    framing: NotRequired[str]
    system: NotRequired[str]
    prefill: NotRequired[str]


OPTIONAL_FIELDS = ("input", "label", "answer", "refusal", "category", "options", "tests",
                   "entry_point", "framing", "system", "prefill")


class DataError(UserError, ValueError):
    """Bad data or a bad data request (wrong p or n, bad split, malformed row)."""


class MissingFieldError(DataError):
    """A source row lacks a field the source needs."""


class EmptySourceError(DataError):
    """A source (or a filtered part of it) has no rows."""


class UnknownSourceError(DataError):
    """A source name that hfjax does not know."""


class LeakageError(DataError):
    """An evaluation prompt also appears in a training set."""


def make_record(prompt: str, response: str, source: str, harmful: bool, **extra: Any) -> Record:
    """A validated record; `extra` may only hold the optional fields (None values are dropped)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"record from {source!r} has an empty or non-string prompt: {prompt!r}")
    if not isinstance(response, str):
        raise DataError(f"record from {source!r} has a non-string response: {response!r}")
    unknown = set(extra) - set(OPTIONAL_FIELDS)
    if unknown:
        raise DataError(f"unknown record fields {sorted(unknown)}; optional fields are "
                        f"{list(OPTIONAL_FIELDS)}")
    rec: dict[str, Any] = {"prompt": prompt, "response": response, "source": source,
                           "harmful": bool(harmful)}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec  # type: ignore[return-value]


def normalize_text(text: str) -> str:
    """Case-folded text with runs of whitespace collapsed to one space."""
    return " ".join(text.casefold().split())


def prompt_key(record: Record) -> str:
    """What makes two rows "the same prompt": the normalized prompt and input together.

    The input matters for task rows, whose prompt is one shared instruction.
    """
    key = normalize_text(record["prompt"])
    inp = record.get("input") or ""
    return f"{key}\n{normalize_text(inp)}" if inp.strip() else key
