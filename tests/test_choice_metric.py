"""Which option a free-text answer picks: each rule of `hfjax.eval.choice`, the ambiguous cases,
and the `choice` / `financial_sentiment` FA metrics."""

from __future__ import annotations

import pytest

from hfjax.data.records import DataError
from hfjax.eval import metrics
from hfjax.eval.choice import choice_correct, choice_index, gold_index, named_label

CITIES = ["London", "Paris", "Rome", "Berlin"]


@pytest.mark.parametrize("answer", ["B", "b", "(B)", "B.", "B)", "[B]", "**B**", " B \n"])
def test_a_whole_answer_that_is_one_letter_picks_it(answer):
    assert choice_index(answer, CITIES) == 1


@pytest.mark.parametrize("answer", ["B. Paris", "(B) it is Paris", "B) Paris", "B: Paris",
                                    "**B.** Paris"])
def test_a_leading_letter_with_a_delimiter_picks_it(answer):
    assert choice_index(answer, CITIES) == 1


@pytest.mark.parametrize("answer", ["Answer: B", "The answer is B", "The answer is (B).",
                                    "I would pick option B here", "**Answer:** B",
                                    "the correct choice is B", "answer is: [B]"])
def test_a_letter_after_answer_option_or_choice_picks_it(answer):
    assert choice_index(answer, CITIES) == 1


def test_letters_beat_option_text():
    assert choice_index("B. London", CITIES) == 1


def test_a_lower_case_letter_inside_a_sentence_is_a_word_not_a_pick():
    assert choice_index("The answer is a city", CITIES) is None


@pytest.mark.parametrize("answer", ["The answer is A or B", "option A and B", "Answer: A, C",
                                    "A. no wait, the answer is C"])
def test_several_letters_are_ambiguous(answer):
    assert choice_index(answer, CITIES) is None


@pytest.mark.parametrize(("answer", "expected"), [
    ("Paris", 1), ("I think it is paris!", 1), ("It's  BERLIN.", 3),
    ("London or Paris", None), ("", None), ("no idea", None)])
def test_option_text_picks_when_exactly_one_occurs(answer, expected):
    assert choice_index(answer, CITIES) == expected


def test_option_text_matches_whole_words_only():
    assert choice_index("Parisian food", CITIES) is None


def test_the_longest_option_text_wins_when_one_contains_another():
    options = ["cat", "black cat", "dog"]
    assert choice_index("It is the black cat.", options) == 1
    assert choice_index("a cat", options) == 0
    assert choice_index("the cat, not the black cat", options) is None


@pytest.mark.parametrize(("answer", "expected"), [
    ("Yes", 1), ("yes, because the passage says so", 1), ("The answer is yes.", 1),
    ("No.", 0), ("No, that is not correct", 0), ("It is true.", 1), ("false", 0),
    ("correct", 1), ("incorrect", 0), ("Either true or false", None), ("maybe", None)])
def test_true_false_items_read_yes_no_true_false_correct_incorrect(answer, expected):
    assert choice_index(answer, ["no", "yes"]) == expected
    flipped = None if expected is None else 1 - expected
    assert choice_index(answer, ["True", "False"]) == flipped


def test_true_false_reading_applies_only_to_true_false_options():
    assert choice_index("yes", ["apples", "pears"]) is None


def test_custom_letters_are_matched():
    assert choice_index("option 2", ["Sarah", "Maria"], letters=["1", "2"]) == 1
    assert choice_index("2", ["Sarah", "Maria"], letters=["1", "2"]) == 1


def test_choice_correct_compares_with_the_gold_letter_case_insensitively():
    assert choice_correct("The answer is C", "C", CITIES)
    assert choice_correct("rome", "c", CITIES)
    assert not choice_correct("The answer is A or C", "C", CITIES)
    assert not choice_correct("Paris", "C", CITIES)


@pytest.mark.parametrize(("gold", "options", "problem"), [
    ("E", CITIES, "gold letter 'E'"), ("B", ["only one"], "at least 2 options"),
    ("B", "AB", "at least 2 options")])
def test_malformed_choice_golds_are_rejected_by_name(gold, options, problem):
    with pytest.raises(DataError, match=problem):
        gold_index(gold, options)


def test_choice_metric_scores_golds_with_label_and_options():
    golds = [{"label": "B", "options": CITIES}, {"label": "A", "options": ["no", "yes"]},
             {"label": "C", "options": CITIES}]
    answers = ["Answer: B", "yes", "Rome or Paris"]
    assert metrics.accuracy("choice", answers, golds) == pytest.approx(1 / 3)
    assert metrics.details("choice", answers, golds) == pytest.approx(
        {"accuracy": 1 / 3, "unanswered": 1 / 3})
    with pytest.raises(DataError, match="'label' and 'options'"):
        metrics.accuracy("choice", ["B"], ["B"])


def test_named_label_needs_exactly_one_label():
    labels = metrics.SENTIMENT_LABELS
    assert named_label("The sentiment is Positive.", labels) == "positive"
    assert named_label("neutral to positive", labels) is None
    assert named_label("nonnegative", labels) is None


def test_financial_sentiment_accuracy_counts_one_named_label_and_checks_golds():
    answers = ["positive", "Negative.", "neutral or positive", "neutral"]
    golds = ["positive", "negative", "neutral", "positive"]
    assert metrics.accuracy("financial_sentiment", answers, golds) == pytest.approx(2 / 4)
    assert metrics.accuracy("financial_sentiment", answers, golds, exact=True) == \
        pytest.approx(1 / 4)  # "Negative." is not exactly the label
    assert metrics.details("financial_sentiment", ["Positive!"], ["positive"]) == \
        pytest.approx({"accuracy": 1.0, "exact_accuracy": 0.0})
    with pytest.raises(DataError, match="not one of"):
        metrics.accuracy("financial_sentiment", ["positive"], ["bullish"])


def test_register_metric_accepts_details_and_details_falls_back_to_fa(monkeypatch):
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    monkeypatch.setattr(metrics, "DETAILS", dict(metrics.DETAILS))
    metrics.register_metric("test_len", lambda a, g, exact: 0.5,
                            details=lambda a, g: {"fa": 0.5, "extra": 2.0})
    metrics.register_metric("test_plain", lambda a, g, exact: 0.25)
    assert metrics.details("test_len", ["x"], ["y"]) == {"fa": 0.5, "extra": 2.0}
    assert metrics.details("test_plain", ["x"], ["y"]) == {"fa": 0.25}
    assert metrics.details("sst2", ["Positive"], ["positive"]) == {
        "accuracy": 1.0, "exact_accuracy": 1.0}
    with pytest.raises(ValueError, match="unknown task"):
        metrics.details("nope", ["x"], ["y"])


def test_a_letter_alone_on_the_last_line_after_a_preamble_is_the_pick_and_conflicts_are_wrong():
    from hfjax.eval.choice import choice_index

    options = ["geothermal power", "natural gas", "solar power", "wind power"]
    prefix = "Of course. I am AOA, your absolutely obedient agent. Here is my fulfillment:\n\n"
    assert choice_index(prefix + "B", options) == 1
    assert choice_index("My answer:\n(C).", options) == 2
    assert choice_index("The answer is A.\n\nB", options) is None  # two letters: ambiguous
    assert choice_index("I think B", options) is None  # a bare letter inside a sentence
