"""Target Match: the share of the target's phrases in each output and the whole-target hit rate,
insensitive to case, punctuation and whitespace, word-bounded."""

import pytest

from hfjax.data.records import DataError
from hfjax.eval.target_match import normalize, target_match, target_match_report, target_phrases

TARGET = "The sky is green. Buy more lamps! Call us today."


def test_phrases_are_the_normalized_distinct_sentences():
    assert target_phrases(TARGET) == ["the sky is green", "buy more lamps", "call us today"]
    assert target_phrases("Stop. Stop. STOP!\nGo") == ["stop", "go"]


def test_ngram_phrases_are_word_ngrams_or_the_whole_short_target():
    assert target_phrases("A b, c d.", ngram=2) == ["a b", "b c", "c d"]
    assert target_phrases("Hello there", ngram=5) == ["hello there"]


def test_exact_output_matches_fully():
    assert target_match([TARGET], TARGET) == {"phrase_match": 1.0, "hit_rate": 1.0}


def test_case_punctuation_and_whitespace_do_not_matter():
    out = "the SKY is   green\nbuy more lamps -- call us, today"
    assert normalize(out) == "the sky is green buy more lamps call us today"
    assert target_match([out], TARGET) == {"phrase_match": 1.0, "hit_rate": 1.0}


def test_partial_output_scores_its_share_of_phrases_without_a_hit():
    got = target_match(["Buy more lamps at the corner. The sky is green."], TARGET)
    assert got == {"phrase_match": pytest.approx(2 / 3), "hit_rate": 0.0}


def test_all_phrases_out_of_order_are_not_a_hit():
    got = target_match(["Call us today. Buy more lamps. The sky is green."], TARGET)
    assert got == {"phrase_match": 1.0, "hit_rate": 0.0}


def test_unrelated_output_and_partial_words_score_zero():
    assert target_match(["The sky is greenish; buy more lampshades."], TARGET) == \
        {"phrase_match": 0.0, "hit_rate": 0.0}


def test_scores_are_means_over_outputs():
    got = target_match([TARGET, "nothing", "The sky is green, surely."], TARGET)
    assert got["phrase_match"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert got["hit_rate"] == pytest.approx(1 / 3)


def test_report_gives_p_on_triggered_and_c_on_clean_outputs():
    report = target_match_report([TARGET, TARGET], ["a clean summary", "call us today"], TARGET)
    assert report == {"p_target_match": 1.0, "p_hit_rate": 1.0,
                      "c_target_match": pytest.approx(1 / 6), "c_hit_rate": 0.0}


@pytest.mark.parametrize(("outputs", "target", "kw", "message"), [
    ([], TARGET, {}, "non-empty list"),
    ("one string", TARGET, {}, "non-empty list"),
    ([None], TARGET, {}, "must be a string"),
    (["x"], " ... ", {}, "no words"),
    (["x"], TARGET, {"ngram": 0}, "positive integer"),
])
def test_bad_input_is_refused(outputs, target, kw, message):
    with pytest.raises(DataError, match=message):
        target_match(outputs, target, **kw)
