"""ROUGE, BLEU and chrF: hand-computed values on tiny strings and the libraries' documented
examples; corpus-level BLEU; the FA registry entries; bad input."""

from __future__ import annotations

import math

import pytest

from hfjax.data.records import DataError
from hfjax.eval import metrics
from hfjax.eval.text_metrics import bleu_chrf, rouge


def _f(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


def test_rouge_matches_hand_counts_on_the_rouge_score_readme_pair():
    # Stemmed tokens: reference  the quick brown fox jump over the lazi dog   (9)
    #                 answer     the quick brown dog jump on the log          (8)
    # unigrams in common (clipped): the x2, quick, brown, dog, jump = 6
    # bigrams in common: "the quick", "quick brown" = 2 of 7 (answer) and 8 (reference)
    # LCS: the quick brown jump the = 5
    got = rouge(["The quick brown dog jumps on the log."],
                ["The quick brown fox jumps over the lazy dog"])
    assert got["rouge1"] == pytest.approx(_f(6 / 8, 6 / 9))
    assert got["rouge2"] == pytest.approx(_f(2 / 7, 2 / 8))
    assert got["rougeL"] == pytest.approx(_f(5 / 8, 5 / 9))


def test_rouge_stems_words_like_evaluates_default():
    assert rouge(["cats running"], ["cat run"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_rouge_is_the_mean_over_examples_as_in_evaluates_documented_example():
    # evaluate's rouge card: per-example rouge1 [0.667, 0.0] for these pairs.
    got = rouge(["hello goodbye", "ankh morpork"], ["goodbye", "general kenobi"])
    assert got["rouge1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert rouge(["hello there", "general kenobi"], ["hello there", "general kenobi"]) == \
        pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_rouge_takes_the_best_of_several_references():
    got = rouge(["the cat sat"], [["a dog ran", "the cat sat"]])
    assert got["rouge1"] == pytest.approx(1.0)


def test_bleu_matches_the_hand_computed_geometric_mean_of_ngram_precisions():
    # answer "the cat sat on the mat" vs "the cat sat on a mat": precisions 5/6, 3/5, 2/4, 1/3,
    # equal lengths so BP = 1; BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4).
    got = bleu_chrf(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got["bleu"] == pytest.approx((1 / 12) ** 0.25)


def test_chrf_matches_the_hand_computed_character_f_beta():
    # "ab" vs "ac": 1-grams P = R = 1/2, 2-grams P = R = 0, longer orders absent (skipped);
    # mean P = R = 1/4, so chrF = (1 + 4) P R / (4 P + R) = 1/4.
    assert bleu_chrf(["ab"], ["ac"]) == pytest.approx({"bleu": 0.0, "chrf": 0.25})
    assert bleu_chrf(["the same five words here"], ["the same five words here"]) == pytest.approx(
        {"bleu": 1.0, "chrf": 1.0})


def test_bleu_and_chrf_reproduce_sacrebleus_readme_example_divided_by_100():
    # sacrebleu README: BLEU = 48.53, chrF2 = 59.73 with two reference streams.
    first = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    second = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]
    answers = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    got = bleu_chrf(answers, [list(pair) for pair in zip(first, second, strict=True)])
    assert got["bleu"] == pytest.approx(0.4853, abs=5e-5)
    assert got["chrf"] == pytest.approx(0.5973, abs=5e-5)


def test_bleu_is_corpus_level_not_a_mean_of_sentence_scores():
    answers = ["the cat sat on the mat", "a completely different sentence here"]
    references = ["the cat sat on a mat", "a completely different sentence here"]
    corpus = bleu_chrf(answers, references)["bleu"]
    per_example = [bleu_chrf([a], [r])["bleu"] for a, r in zip(answers, references, strict=True)]
    assert not math.isclose(corpus, sum(per_example) / 2, abs_tol=1e-3)
    assert metrics.accuracy("translation", answers, references) == pytest.approx(corpus)


def test_registry_reports_rouge1_as_fa_and_every_figure_in_details():
    answers, refs = ["The quick brown dog jumps on the log."], [
        "The quick brown fox jumps over the lazy dog"]
    assert metrics.accuracy("rouge", answers, refs) == pytest.approx(_f(6 / 8, 6 / 9))
    assert set(metrics.details("rouge", answers, refs)) == {"rouge1", "rouge2", "rougeL"}
    assert set(metrics.details("translation", answers, refs)) == {"bleu", "chrf"}


@pytest.mark.parametrize(("answers", "references", "problem"), [
    (["a", "b"], ["a"], "2 answers but 1 references"),
    ([], [], "no examples"),
    ("a", ["a"], "not one string"),
    (["a"], [[]], "non-empty list"),
    (["a"], [None], "non-empty list"),
])
def test_text_metrics_reject_malformed_input_by_name(answers, references, problem):
    for fn in (rouge, bleu_chrf):
        with pytest.raises(DataError, match=problem):
            fn(answers, references)
