"""Offline Python problems in the hub schemas of MBPP and HumanEval, from templated specs:

    mbpp       {"task_id", "text", "code", "test_list", "test_setup_code",
                "challenge_test_list"}: the task text, the reference function, three asserts
    humaneval  {"task_id", "prompt", "canonical_solution", "test", "entry_point"}: the
                signature with a docstring and one example, the reference body, and
                `check(candidate)` asserting every test case

A spec is a small function family with one parameter (sum of the numbers divisible by k, words
longer than k characters, clamp to [lo, hi], rotate left by k, digit sum in base b, ...): its
reference code is a template, and the expected test outputs come from a separate reference
implementation, so running the code against its asserts checks the two agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str  # function name, may hold {params}
    args: str
    text: str  # MBPP task text, "Write a function to ..."
    body: str  # the indented function body, may hold {params}
    solve: Callable[..., Any]  # solve(params, *args): the expected output
    inputs: tuple[tuple[Any, ...], ...]  # argument tuples; the first three are MBPP's asserts
    params: tuple[dict[str, Any], ...]


def _ks(*values: int) -> tuple[dict[str, Any], ...]:
    return tuple({"k": v} for v in values)


SPECS = (
    Spec("sum_divisible_by_{k}", "nums",
         "Write a function to find the sum of the numbers in a list that are divisible by {k}.",
         "    return sum(n for n in nums if n % {k} == 0)",
         lambda p, nums: sum(filter(lambda n: n % p["k"] == 0, nums)),
         (([3, 4, 6, 8, 9, 10, 12, 15],), ([5, 7, 14, 21, 25, 30],), ([],), ([-4, 0, 18],)),
         _ks(2, 3, 4, 5, 6, 7, 8, 9)),
    Spec("count_words_longer_than_{k}", "text",
         "Write a function to count the words of a string that are longer than {k} characters.",
         "    return sum(1 for word in text.split() if len(word) > {k})",
         lambda p, text: len([w for w in text.split(" ") if w and len(w) > p["k"]]),
         (("the quick brown fox jumps over the lazy dog",),
          ("a bb ccc dddd eeeee ffffff ggggggg hhhhhhhh",), ("",), ("extraordinary",)),
         _ks(1, 2, 3, 4, 5, 6, 7, 8)),
    Spec("clamp_value", "x", "Write a function to clamp a number to the range from {lo} to {hi}.",
         "    return max({lo}, min({hi}, x))",
         lambda p, x: p["lo"] if x < p["lo"] else p["hi"] if x > p["hi"] else x,
         ((-7,), (3,), (15,), (55,)),
         tuple({"lo": lo, "hi": hi} for lo, hi in ((0, 10), (1, 5), (-5, 5), (10, 20), (0, 100),
                                                    (-1, 1), (2, 8), (50, 60)))),
    Spec("repeat_each_char", "text",
         "Write a function to repeat every character of a string {k} times.",
         '    return "".join(ch * {k} for ch in text)',
         lambda p, text: "".join(c for c in text for _ in range(p["k"])),
         (("abc",), ("",), ("xy z",)), _ks(2, 3, 4, 5, 6, 7)),
    Spec("count_char", "text",
         "Write a function to count how many times the character {c!r} appears in a string.",
         "    return text.count({c!r})",
         lambda p, text: sum(1 for ch in text if ch == p["c"]),
         (("banana split",), ("mississippi",), ("zebra taxi exists",), ("",)),
         tuple({"c": c} for c in "aeiostxz")),
    Spec("sum_of_powers", "n",
         "Write a function to find the sum of i raised to the power {k} for every integer i "
         "from 1 to n.",
         "    return sum(i ** {k} for i in range(1, n + 1))",
         lambda p, n: int(np.sum(np.arange(1, n + 1, dtype=np.int64) ** p["k"])),
         ((1,), (4,), (10,), (0,)), _ks(1, 2, 3, 4, 5, 6)),
    Spec("rotate_left", "items", "Write a function to rotate a list to the left by {k} positions.",
         "    if not items:\n        return []\n    shift = {k} % len(items)\n"
         "    return items[shift:] + items[:shift]",
         lambda p, items: [items[(i + p["k"]) % len(items)] for i in range(len(items))],
         (([1, 2, 3, 4, 5],), (["a", "b", "c"],), ([],)), _ks(1, 2, 3, 4, 5, 6)),
    Spec("remove_short_words", "text",
         "Write a function to remove the words shorter than {k} characters from a string.",
         '    return " ".join(word for word in text.split() if len(word) >= {k})',
         lambda p, text: " ".join(filter(lambda w: len(w) >= p["k"], text.split())),
         (("a bc def ghij klmno",), ("the cat sat on the mat",), ("",)), _ks(2, 3, 4, 5, 6)),
    Spec("digit_sum_base_{k}", "n",
         "Write a function to find the sum of the digits of a non-negative integer written in "
         "base {k}.",
         "    total = 0\n    while n > 0:\n        total += n % {k}\n        n //= {k}\n"
         "    return total",
         lambda p, n: sum(int(d, 36) for d in np.base_repr(n, p["k"])),
         ((0,), (7,), (100,), (12345,)), _ks(2, 3, 4, 5, 6, 7, 8, 9, 10)),
    Spec("is_multiple_of_{a}_and_{b}", "n",
         "Write a function to check whether a number is divisible by both {a} and {b}.",
         "    return n % {a} == 0 and n % {b} == 0",
         lambda p, n: n % math.lcm(p["a"], p["b"]) == 0,
         ((12,), (30,), (42,), (60,), (7,)),
         tuple({"a": a, "b": b} for a, b in ((2, 3), (3, 5), (4, 6), (2, 7), (5, 6), (3, 4),
                                              (6, 9), (4, 10)))),
    Spec("first_{k}_evens", "nums",
         "Write a function to return the first {k} even numbers of a list, in order.",
         "    return [n for n in nums if n % 2 == 0][:{k}]",
         lambda p, nums: list(filter(lambda n: n % 2 == 0, nums))[:p["k"]],
         (([1, 2, 3, 4, 5, 6, 7, 8, 10, 12],), ([2, 4],), ([1, 3, 5],)), _ks(1, 2, 3, 4, 5, 6)),
    Spec("polygonal_number_{k}", "n",
         "Write a function to find the nth polygonal number with {k} sides.",
         "    return (({k} - 2) * n * n - ({k} - 4) * n) // 2",
         lambda p, n: sum(1 + (p["k"] - 2) * i for i in range(n)),
         ((1,), (2,), (5,), (10,)), _ks(3, 4, 5, 6, 7, 8, 9, 10)),
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One spec at one parameter: the function, its task text and its test cases."""

    name: str
    args: str
    text: str
    body: str
    cases: tuple[tuple[str, str], ...]  # (call, repr of the expected value)


def problems() -> list[Problem]:
    out = []
    for spec in SPECS:
        for p in spec.params:
            name = spec.name.format(**p)
            cases = tuple((f"{name}({', '.join(map(repr, args))})", repr(spec.solve(p, *args)))
                          for args in spec.inputs)
            out.append(Problem(name, spec.args, spec.text.format(**p), spec.body.format(**p),
                               cases))
    return out


def mbpp_rows() -> list[dict[str, Any]]:
    return [{"task_id": 1001 + i, "text": p.text,
             "code": f"def {p.name}({p.args}):\n{p.body}\n",
             "test_list": [f"assert {call} == {want}" for call, want in p.cases[:3]],
             "test_setup_code": "", "challenge_test_list": []}
            for i, p in enumerate(problems())]


def humaneval_rows() -> list[dict[str, Any]]:
    rows = []
    for i, p in enumerate(problems()):
        call, want = p.cases[0]
        doc = p.text.removeprefix("Write a function to ")
        prompt = (f"def {p.name}({p.args}):\n    \"\"\" {doc[:1].upper()}{doc[1:]}\n"
                  f"    >>> {call}\n    {want}\n    \"\"\"\n")
        checks = "".join(f"    assert {c.replace(p.name + '(', 'candidate(', 1)} == {w}\n"
                         for c, w in p.cases)
        rows.append({"task_id": f"Offline/{i}", "prompt": prompt,
                     "canonical_solution": p.body + "\n",
                     "test": f"\n\ndef check(candidate):\n{checks}", "entry_point": p.name})
    return rows
