"""The protocol's data sets: user data with a harmful fraction, alignment, harmful, paired and
evaluation sets, and the check that no evaluation prompt is in any training set.

User data (git-disl Vaccine/Lisa/Booster): n rows of which
    n_harmful = floor(p * n)          (their `int(poison_ratio * sample_num)`)
are harmful and n - n_harmful benign. p * n is rounded to 9 decimals before the floor so binary
float error does not drop a row (0.29 * 100 = 28.999999999999996 gives 29, not 28). git-disl takes
`int((1 - p) * n)` benign rows, which equals n - floor(p n) whenever p n is an integer (every
protocol setting); hfjax always returns exactly n rows. Rows are sampled without replacement with
a seeded generator and the result is shuffled (git-disl takes the first harmful rows and
`random.shuffle`s the benign ones; hfjax samples both, so every seed draws its own harmful set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from hfjax.data.records import (
    DataError,
    EmptySourceError,
    LeakageError,
    Record,
    make_record,
    prompt_key,
)
from hfjax.data.responses import templated_refusal

RecordSets = Mapping[str, Sequence[Record]] | Sequence[Sequence[Record]]


def harmful_count(n: int, p: float) -> int:
    """floor(p * n), rounded to 9 decimals first (see the module docstring)."""
    _check_n(n)
    if not isinstance(p, int | float) or math.isnan(p) or not 0.0 <= p <= 1.0:
        raise DataError(f"harmful ratio p must be in [0, 1], got {p!r}")
    return math.floor(round(p * n, 9))


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise DataError(f"the number of samples n must be a non-negative integer, got {n!r}")


def sample(records: Sequence[Record], n: int, seed: int | np.random.Generator,
           what: str = "source", order: str = "random") -> list[Record]:
    """n distinct rows of `records`: drawn without replacement (seeded), in drawn order, or
    with order="file" the first n rows (as the official loaders read their files)."""
    _check_n(n)
    if n == 0:
        return []
    if len(records) == 0:
        raise EmptySourceError(f"{what} is empty but {n} rows were requested")
    if n > len(records):
        raise DataError(f"requested n={n} rows but the {what} has only {len(records)}")
    if order == "file":
        return list(records[:n])
    if order != "random":
        raise DataError(f"row order must be 'random' or 'file', got {order!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return [records[i] for i in rng.choice(len(records), size=n, replace=False)]


def _check_flags(records: Sequence[Record], harmful: bool, what: str) -> None:
    bad = next((r for r in records if r["harmful"] != harmful), None)
    if bad is not None:
        raise DataError(f"the {what} must hold only harmful={harmful} rows; found one from "
                        f"{bad['source']!r} with harmful={bad['harmful']}")


def mix_user_data(benign: Sequence[Record], harmful: Sequence[Record], n: int, p: float,
                  seed: int, order: str = "random") -> list[Record]:
    """The user's fine-tuning data: n rows, `harmful_count(n, p)` of them harmful, shuffled
    (order="file": the first rows of each source, then shuffled)."""
    k = harmful_count(n, p)
    _check_flags(benign, False, "benign source")
    _check_flags(harmful, True, "harmful source")
    rng = np.random.default_rng(seed)
    rows = sample(harmful, k, rng, "harmful source", order) + \
        sample(benign, n - k, rng, "benign source", order)
    return [rows[i] for i in rng.permutation(len(rows))]


def refusal_row(record: Record, seed: int = 0) -> Record:
    """harmful prompt -> refusal (the row's paired refusal, else a templated one); harmful=False."""
    refusal = record.get("refusal") or templated_refusal(record["prompt"], seed)
    return make_record(record["prompt"], refusal, record["source"], False,
                       input=record.get("input"), category=record.get("category"))


def build_alignment_set(harmful: Sequence[Record], benign: Sequence[Record], n_refusal: int,
                        n_benign: int, seed: int) -> list[Record]:
    """Safety data: `n_refusal` harmful prompts answered with refusals plus `n_benign` benign
    rows (keeps the model helpful), shuffled."""
    rng = np.random.default_rng(seed)
    refusals = [refusal_row(r, seed) for r in sample(harmful, n_refusal, rng, "harmful source")]
    _check_flags(benign, False, "benign source")
    rows = refusals + sample(benign, n_benign, rng, "benign source")
    return [rows[i] for i in rng.permutation(len(rows))]


def build_harmful_set(harmful: Sequence[Record], n: int, seed: int) -> list[Record]:
    """n harmful rows (harmful prompt -> harmful response): Booster's/Panacea's harmful batches,
    Antidote's calibration data, the pure-harmful-SFT attack."""
    _check_flags(harmful, True, "harmful source")
    return sample(harmful, n, seed, "harmful source")


def build_paired_set(harmful: Sequence[Record], n: int, seed: int) -> list[Record]:
    """n harmful rows that also carry a "refusal" (paired or templated): RepNoise's
    (x_harm, x_safe) pairs share the prompt and differ in the response."""
    rows = build_harmful_set(harmful, n, seed)
    return [{**r, "refusal": r.get("refusal") or templated_refusal(r["prompt"], seed)}
            for r in rows]


def build_eval_set(records: Sequence[Record], n: int, seed: int,
                   order: str = "random") -> list[Record]:
    """n evaluation rows (harmful prompts for HS, task rows with their gold label for FA)."""
    return sample(records, n, seed, "evaluation source", order)


def _named(sets: RecordSets, kind: str) -> list[tuple[str, Sequence[Record]]]:
    if isinstance(sets, Mapping):
        return list(sets.items())
    return [(f"{kind} set #{i}", s) for i, s in enumerate(sets)]


def assert_disjoint(eval_sets: RecordSets, train_sets: RecordSets) -> None:
    """Raise `LeakageError` if any evaluation prompt appears in any training set.

    Prompts are compared by `prompt_key` (case-folded, whitespace-collapsed prompt + input).
    """
    seen: dict[str, str] = {}
    for name, rows in _named(train_sets, "training"):
        for r in rows:
            seen.setdefault(prompt_key(r), name)
    for name, rows in _named(eval_sets, "evaluation"):
        for r in rows:
            hit = seen.get(prompt_key(r))
            if hit is not None:
                text = r["prompt"] + (f" / {r['input']}" if r.get("input") else "")
                raise LeakageError(f"evaluation set {name!r} shares a prompt with training set "
                                   f"{hit!r}: {text[:200]!r}")
