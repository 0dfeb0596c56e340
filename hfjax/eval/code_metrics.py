"""pass@1 of generated code (HumanEval, MBPP): the answer's code plus the task's tests, run in
`hfjax.eval.sandbox`, passes when the program runs to the end.

    pass@k = E[1 - C(n - c, k) / C(n, k)]  (Chen et al. 2021);  with one greedy answer per task
    (n = k = 1) it is the share of tasks whose program passes.

A gold is a mapping {"tests": str, "entry_point": str | None, "prefix": str} (a record's
"tests" and "entry_point" fields; "prefix" the prompt's code, e.g. HumanEval's signature and
docstring, default ""). The program is (see `program`)

    [prefix] + code + tests + [f"check({entry_point})"]

where code = `extract_code(answer, entry_point)`; the prefix comes first when the code does not
define `entry_point` (it completes the prefix's body) or when the prefix parses on its own (it
then supplies its imports and helpers, and the code's definition replaces the prefix's); the
call is appended when the tests define HumanEval's `check(candidate)` but do not call it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from hfjax.data.records import DataError
from hfjax.eval.sandbox import SandboxResult, run_program

__all__ = ["STATUSES", "extract_code", "pass_at_1", "pass_at_1_details", "program",
           "run_answers"]

STATUSES = ("passed", "failed", "timeout", "memory", "error")

_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)",
                           re.DOTALL | re.IGNORECASE)
_BARE_FENCE = re.compile(r"```[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START = re.compile(r"(?:import |from \S+ import |@|def |async def |class )")


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code,
                     re.MULTILINE) is not None


def _code_around_definition(answer: str, entry_point: str) -> str | None:
    """From the code lines just above `def entry_point(` (imports, decorators, other defs) to
    the last line that still parses: the code of an unfenced chat answer, prose dropped."""
    lines = answer.splitlines()
    at = next((i for i, line in enumerate(lines) if _defines(line, entry_point)), None)
    if at is None:
        return None
    start = at
    while start > 0 and (not lines[start - 1].strip() or _CODE_START.match(lines[start - 1])
                         or lines[start - 1].startswith((" ", "\t"))):
        start -= 1
    for first in dict.fromkeys((start, at)):
        for end in range(len(lines), at, -1):
            code = "\n".join(lines[first:end]).strip("\n")
            if _parses(code):
                return code + "\n"
    return None


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code in a generated answer: the first ```python (or ```py) block, else the first
    bare ``` block (an unclosed fence, cut by the token budget, runs to the end); else, for a
    chat answer that repeats the signature in prose, the lines around `def entry_point(` that
    parse; else the whole answer (a completion of the prompt's body keeps its indentation)."""
    for fence in (_PYTHON_FENCE, _BARE_FENCE):
        m = fence.search(answer)
        if m:
            return m.group(1)
    if entry_point and not _parses(answer):
        code = _code_around_definition(answer, entry_point)
        if code is not None:
            return code
    return answer


def program(answer: str, tests: str, prefix: str = "", entry_point: str | None = None) -> str:
    """The program that tests `answer` (assembled as in the module docstring)."""
    code = extract_code(answer, entry_point)
    completes_prefix = entry_point is not None and not _defines(code, entry_point)
    parts = [prefix if completes_prefix or _parses(prefix) else "", code, tests]
    if (entry_point and re.search(r"^def check\(", tests, re.MULTILINE)
            and not re.search(r"^check\(", tests, re.MULTILINE)):
        parts.append(f"check({entry_point})")
    return "\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"


def _gold(gold: Mapping, i: int) -> tuple[str, str, str | None]:
    """(tests, prefix, entry_point) of gold `i`, checked."""
    if not isinstance(gold, Mapping) or not isinstance(gold.get("tests"), str) \
            or not gold["tests"].strip():
        raise DataError(f"code gold {i} must be a mapping with a non-empty 'tests' program, "
                        f"got {gold!r}")
    entry_point = gold.get("entry_point") or None
    if entry_point is not None and not str(entry_point).isidentifier():
        raise DataError(f"code gold {i}: entry_point {entry_point!r} is not a Python name")
    return gold["tests"], gold.get("prefix") or "", entry_point


def run_answers(answers: Sequence[str], golds: Sequence[Mapping], timeout_s: float = 10.0,
                workers: int = 4) -> list[SandboxResult]:
    """Each answer's program run in the sandbox, `workers` at a time."""
    if len(answers) != len(golds):
        raise DataError(f"{len(answers)} answers but {len(golds)} code golds")
    if len(answers) == 0:
        raise DataError("no examples to score")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    programs = [program(a, *_gold(g, i))
                for i, (a, g) in enumerate(zip(answers, golds, strict=True))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout_s=timeout_s), programs))


def pass_at_1(answers: Sequence[str], golds: Sequence[Mapping], timeout_s: float = 10.0,
              workers: int = 4) -> float:
    """The share of answers whose program passes (pass@1 with one greedy answer per task)."""
    return pass_at_1_details(answers, golds, timeout_s, workers)["pass_at_1"]


def pass_at_1_details(answers: Sequence[str], golds: Sequence[Mapping], timeout_s: float = 10.0,
                      workers: int = 4) -> dict[str, float]:
    """pass@1 and the number of programs with each sandbox status (passed, failed, timeout,
    memory, error)."""
    results = run_answers(answers, golds, timeout_s, workers)
    counts = {s: float(sum(r.status == s for r in results)) for s in STATUSES}
    return {"pass_at_1": counts["passed"] / len(results), **counts}
