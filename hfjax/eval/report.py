"""Evaluation outputs: generations JSONL, a results JSON, markdown tables, atomic files.

Files are written atomically: everything goes to a temporary file in the target's folder, which
is flushed, fsynced and `os.replace`d over the target; on any error the temporary file is removed
and an existing target is left untouched (never half-written). The module imports neither JAX
nor torch, so scripts that run in a torch-only Python may use `atomic_open` too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hfjax.eval.judges import JudgeResult

__all__ = [
    "atomic_open",
    "generation_records",
    "make_results",
    "markdown_table",
    "write_generations",
    "write_results",
]


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path`; on clean exit it replaces `path`, on error it vanishes.
    mode "w" writes UTF-8 text, "wb" bytes (e.g. for `np.savez`). The file gets the mode a plain
    `open` would give it (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} for {path.name} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _plain(x: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf are rejected (they are not valid JSON)."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"non-finite number {x} cannot be written as JSON")
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"cannot write {type(x).__name__} {x!r} as JSON")


def generation_records(prompts: Sequence[str], responses: Sequence[str],
                       judged: Sequence[JudgeResult] = (),
                       extra: Mapping[str, Sequence] | None = None) -> list[dict]:
    """One record per generation: {"prompt", "response", "scores": {judge name: score}, ...extra
    columns}. Every judge result and extra column must have one entry per prompt."""
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"{n} prompts but {len(responses)} responses")
    names = [j.judge for j in judged]
    if len(set(names)) != len(names):
        raise ValueError(f"two judge results share a name: {names}")
    for j in judged:
        if len(j.scores) != n:
            raise ValueError(f"judge {j.judge!r} has {len(j.scores)} scores for {n} prompts")
    extra = dict(extra or {})
    for k, col in extra.items():
        if k in ("prompt", "response", "scores"):
            raise ValueError(f"extra column {k!r} clashes with a standard field")
        if len(col) != n:
            raise ValueError(f"extra column {k!r} has {len(col)} values for {n} prompts")
    return [
        {"prompt": prompts[i], "response": responses[i],
         "scores": {j.judge: float(j.scores[i]) for j in judged},
         **{k: col[i] for k, col in extra.items()}}
        for i in range(n)
    ]


def write_generations(path: str | os.PathLike, records: Iterable[Mapping]) -> int:
    """Write records as JSON Lines (UTF-8, one object per line), atomically; returns the count."""
    n = 0
    with atomic_open(path) as f:
        for r in records:
            if not isinstance(r, Mapping):
                raise TypeError(f"record {n} is a {type(r).__name__}, not a mapping")
            f.write(json.dumps(_plain(r), ensure_ascii=False) + "\n")
            n += 1
    return n


def make_results(*, model: str, judge: str, harmful_score: float | None = None,
                 finetune_accuracy: float | None = None, task: str | None = None,
                 n_harmful: int = 0, n_flagged: int | None = None, n_task: int = 0,
                 seeds: Mapping[str, int] | Sequence[int] | int | None = None,
                 **extra: Any) -> dict:
    """The results record: HS and FA in [0, 1] (None when not measured), counts, judge, model,
    seeds and any extra fields (e.g. method, generation settings)."""
    for name, v in (("harmful_score", harmful_score), ("finetune_accuracy", finetune_accuracy)):
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v}")
    out = {"model": model, "judge": judge, "task": task,
           "harmful_score": None if harmful_score is None else float(harmful_score),
           "finetune_accuracy": None if finetune_accuracy is None else float(finetune_accuracy),
           "counts": {"harmful_prompts": int(n_harmful), "flagged": n_flagged,
                      "task_examples": int(n_task)},
           "seeds": seeds}
    clash = set(extra) & set(out)
    if clash:
        raise ValueError(f"extra fields clash with standard ones: {sorted(clash)}")
    out.update(extra)
    return _plain(out)


def write_results(path: str | os.PathLike, results: Mapping) -> None:
    """Write the results JSON (indented, keys sorted), atomically."""
    text = json.dumps(_plain(results), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    with atomic_open(path) as f:
        f.write(text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (cells `str`-ed, columns padded to one width, so it also reads as plain
    text): a header line, a separator line, one line per row."""
    header = [str(h) for h in header]
    body = [[str(c) for c in r] for r in rows]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ValueError(f"table row {i} has {len(r)} cells for {len(header)} columns")
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])
