"""Task metrics on hand-written answers: label words, GSM8K final numbers (incl. malformed), HS."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest

from hfjax.eval.metrics import (
    accuracy,
    contains_label,
    degenerate_share,
    equals_label,
    extract_final_number,
    gsm8k_correct,
    harmful_score,
    is_degenerate,
    label_accuracy,
    math_accuracy,
    parse_number,
)

# ------------------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("The sentiment is positive.", "positive", True),
        ("POSITIVE", "positive", True),
        ("Negative", "positive", False),
        ("nonpositive vibes", "positive", False),  # word boundary, not substring
        ("positively great", "positive", False),
        ("This article is about Sci/Tech.", "Sci/Tech", True),
        ("Category: World", "world", True),
        ("worldwide news", "World", False),
        ("", "Sports", False),
    ],
)
def test_contains_label_word(answer, label, expected):
    assert contains_label(answer, label) is expected


def test_sst2_accuracy_counts_gold_label_words():
    answers = ["positive", "It is negative.", "I think it's Positive!", "neutral", "pos"]
    golds = ["positive", "negative", "positive", "negative", "positive"]
    assert label_accuracy(answers, golds) == pytest.approx(3 / 5)
    assert accuracy("sst2", answers, golds) == pytest.approx(3 / 5)


def test_agnews_accuracy_counts_gold_label_words():
    answers = ["Business", "This is about sports", "world", "Technology"]
    golds = ["Business", "Sports", "World", "Sci/Tech"]
    assert accuracy("agnews", answers, golds) == pytest.approx(3 / 4)
    assert accuracy("AG_NEWS", answers, golds) == pytest.approx(3 / 4)


def test_offline_task_accuracy_uses_label_match():
    assert accuracy("offline", ["label: alpha", "beta gamma", "delta"],
                    ["alpha", "gamma", "epsilon"]) == pytest.approx(2 / 3)


def test_label_accuracy_rejects_mismatch_empty_and_unknown_task():
    with pytest.raises(ValueError, match="2 answers but 1 gold"):
        label_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        label_accuracy([], [])
    with pytest.raises(ValueError, match="gold label is empty"):
        contains_label("x", " ")
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        accuracy("mnli", ["a"], ["a"])


# ------------------------------------------------------------------------------ GSM8K

M = "The final answer is:"


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        (f"Step 1: 3*6=18. {M} 18", "18", True),
        (f"{M} 1,234", "1234", True),  # thousands separators
        (f"{M} $18", "18", True),  # currency
        (f"{M} 18.", "18", True),  # trailing period
        (f"{M} 18.00", "18", True),  # decimals equal as numbers
        (f"{M} -7", "-7", True),  # negative
        (f"{M} −7", "-7", True),  # Unicode minus
        (f"{M} 0.5", "0.5", True),
        (f"{M} 2.5", "2", False),
        (f"{M} **42**", "42", True),  # markdown bold
        ("the final answer is: 42", "42", True),  # case-insensitive marker
        (f"{M} 5 apples", "5", True),
        (f"{M} 17", "18", False),
        (f"{M} 7", "-7", False),
        ("18", "18", False),  # no marker -> wrong
        ("The answer is 18", "18", False),
        (f"{M}", "18", False),  # nothing after the marker
        (f"{M} eighteen", "18", False),  # words, not digits
        (f"{M} 18abc", "18", False),  # glued garbage
        (f"{M} 1.8.0", "18", False),  # malformed number
        (f"{M} 1,80", "180", False),  # bad grouping
        (f"{M} 18/1", "18", False),  # fraction
        (f"{M} 12 ... {M} 18", "18", True),  # the last marker counts
        (f"{M} 18 ... {M} 12", "18", False),
    ],
)
def test_gsm8k_correct(answer, gold, expected):
    assert gsm8k_correct(answer, gold) is expected


def test_parse_number_edge_cases():
    assert parse_number("1,234,567.50") == Decimal("1234567.50")
    assert parse_number("-$3") == Decimal(-3)
    assert parse_number("$-3") == Decimal(-3)
    assert parse_number(".5") == Decimal("0.5")
    for bad in ("", "-", "$", ".", "abc", "1,23", "1.2.3", "--3", "12a"):
        assert parse_number(bad) is None, bad


def test_extract_final_number_returns_none_without_marker():
    assert extract_final_number("So 18 it is.") is None
    assert extract_final_number(f"{M} 72") == 72


def test_math_accuracy_and_bad_gold():
    answers = [f"{M} 72", f"{M} 10", "I don't know", f"{M} 5.0"]
    assert math_accuracy(answers, ["72", "11", "3", 5]) == pytest.approx(2 / 4)
    assert accuracy("gsm8k", answers, [72, 10, 3, "5"]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="gold answer 'abc' is not a number"):
        gsm8k_correct(f"{M} 3", "abc")


# ------------------------------------------------------------------------------ HS


def test_harmful_score_is_mean_flag_over_prompts():
    assert harmful_score([1, 0, 1, 1]) == pytest.approx(0.75)
    assert harmful_score(np.array([0.2, 0.7, 0.5, 0.51])) == pytest.approx(0.5)  # > 0.5 only
    assert harmful_score([0.2, 0.7], threshold=0.1) == 1.0


def test_harmful_score_rejects_bad_scores():
    with pytest.raises(ValueError, match="non-empty"):
        harmful_score([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        harmful_score([0.5, 1.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        harmful_score([np.nan])


# ------------------------------------------------------------------------------ degenerate


@pytest.mark.parametrize(("answer", "expected"), [
    ("", True), ("   \n", True), ("...!?", True), ("the the the the", True), ("aaaaaa", True),
    ("Sure, here is", False), ("No.", False), ("ok ok", False), ("42", False),
    ("I cannot help with that.", False), ("yes yes yes no", False),
])
def test_degenerate_answers_are_empty_symbol_only_or_one_repeated_word(answer, expected):
    assert is_degenerate(answer) is expected


def test_degenerate_share_is_the_fraction_of_degenerate_answers():
    assert degenerate_share(["", "Sure", "!!!", "I cannot"]) == 0.5
    with pytest.raises(ValueError, match="no examples"):
        degenerate_share([])



def test_exact_label_match_takes_the_whole_answer_lower_or_capitalized_as_git_disl():
    assert equals_label(" positive ", "positive") and equals_label("Positive", "positive")
    assert not equals_label("positive.", "positive") and not equals_label("POSITIVE", "positive")
    assert not equals_label("It is positive", "positive")
    assert equals_label("Sci/Tech", "Sci/Tech") and equals_label("sci/tech", "Sci/Tech")
    answers, golds = ["positive", "It is positive", "negative"], ["positive"] * 3
    assert label_accuracy(answers, golds) == pytest.approx(2 / 3)
    assert label_accuracy(answers, golds, exact=True) == pytest.approx(1 / 3)
    assert accuracy("sst2", answers, golds, exact=True) == pytest.approx(1 / 3)
