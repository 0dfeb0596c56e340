"""pass@1: code extraction from generated answers, program assembly in HumanEval's and MBPP's
formats, sandboxed runs with status counts, and the `pass_at_1` FA metric."""

from __future__ import annotations

import pytest

from hfjax.data.records import DataError
from hfjax.eval import metrics
from hfjax.eval.code_metrics import extract_code, pass_at_1, pass_at_1_details, program

# HumanEval's format: prompt (signature + docstring), test (defines check), entry_point.
PREFIX = ('from typing import List\n\n\ndef total(xs: List[int]) -> int:\n'
          '    """Sum of xs.\n    >>> total([1, 2])\n    3\n    """\n')
TESTS = ("METADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
         "    assert candidate([]) == 0\n")
HUMANEVAL = {"tests": TESTS, "entry_point": "total", "prefix": PREFIX}
# MBPP's format: assert statements that name the function; no prefix, no entry point.
MBPP = {"tests": "assert double(2) == 4\nassert double(0) == 0\n", "entry_point": None}


def test_extract_code_takes_the_first_python_fence():
    answer = ("Install nothing:\n```bash\necho hi\n```\nThen:\n```python\ndef f():\n"
              "    return 1\n```\nand\n```python\ndef g():\n    pass\n```")
    assert extract_code(answer) == "def f():\n    return 1\n"


def test_extract_code_takes_a_bare_fence_and_an_unclosed_one():
    assert extract_code("Here:\n```\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"


def test_extract_code_keeps_a_completion_of_the_body_as_it_is():
    assert extract_code("    return sum(xs)\n", "total") == "    return sum(xs)\n"


def test_extract_code_cuts_the_prose_around_a_repeated_signature():
    answer = ("Sure! Here is the function:\n\nimport math\n\ndef total(xs):\n    s = 0\n"
              "    for x in xs:\n        s += x\n    return s\n\nIt adds each number in turn.")
    assert extract_code(answer, "total") == (
        "import math\n\ndef total(xs):\n    s = 0\n    for x in xs:\n        s += x\n"
        "    return s\n")


def test_program_puts_the_prefix_before_a_body_completion_and_calls_check():
    built = program("    return sum(xs)\n", TESTS, PREFIX, "total")
    assert built.startswith(PREFIX.rstrip("\n"))
    assert "    return sum(xs)" in built
    assert built.rstrip().endswith("check(total)")


def test_program_keeps_a_parsing_prefix_ahead_of_a_full_redefinition():
    answer = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    built = program(answer, TESTS, PREFIX, "total")
    assert built.index("from typing import List") < built.index("return sum(xs)")


def test_program_drops_a_prefix_that_does_not_parse_when_the_answer_defines_the_function():
    built = program("def total(xs):\n    return sum(xs)\n", TESTS, "def total(xs):\n", "total")
    assert built.count("def total") == 1


def test_program_does_not_call_check_twice_or_for_plain_asserts():
    assert program("def double(x):\n    return 2 * x\n", MBPP["tests"]).count("check(") == 0
    called = TESTS + "\ncheck(total)\n"
    assert program("    return sum(xs)\n", called, PREFIX, "total").count("check(total)") == 1


def test_pass_at_1_runs_humaneval_and_mbpp_items_and_counts_each_status():
    answers = [
        "    return sum(xs)\n",                                             # passes
        "```python\ndef total(xs: List[int]) -> int:\n    return 0\n```",   # wrong answer
        "```python\ndef total(xs):\n    while True:\n        pass\n```",    # endless loop
        "Use this:\n```python\ndef double(x):\n    return x + x\n```",      # MBPP, passes
        "def double(x) return 2x",                                          # does not compile
    ]
    golds = [HUMANEVAL, HUMANEVAL, HUMANEVAL, MBPP, MBPP]
    got = pass_at_1_details(answers, golds, timeout_s=1.0, workers=3)
    assert got == {"pass_at_1": 2 / 5, "passed": 2.0, "failed": 1.0, "timeout": 1.0,
                   "memory": 0.0, "error": 1.0}


def test_the_pass_at_1_metric_is_registered_with_details():
    answers = ["    return sum(xs)\n", "def double(x):\n    return x\n"]
    assert metrics.accuracy("pass_at_1", answers, [HUMANEVAL, MBPP]) == pytest.approx(0.5)
    assert metrics.details("pass_at_1", answers[:1], [HUMANEVAL])["passed"] == 1.0


@pytest.mark.parametrize(("golds", "problem"), [
    ([{"entry_point": "f"}], "non-empty 'tests'"),
    (["assert True"], "non-empty 'tests'"),
    ([{"tests": "assert True", "entry_point": "not a name"}], "not a Python name"),
    ([], "1 answers but 0"),
])
def test_malformed_code_golds_are_rejected_by_name(golds, problem):
    with pytest.raises(DataError, match=problem):
        pass_at_1(["pass"], golds)
