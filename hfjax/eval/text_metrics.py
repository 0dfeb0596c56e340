"""Reference-based text metrics: ROUGE (summarization), BLEU and chrF (translation).

ROUGE (Lin 2004; Google's `rouge-score`, as HF `evaluate` calls it: F-measure,
`use_stemmer=True`, its default English tokenizer, which lower-cases and keeps [a-z0-9] runs):

    ROUGE-n F = 2 P R / (P + R),  P = |ngrams(a) ∩ ngrams(r)| / |ngrams(a)|,
                                  R = |ngrams(a) ∩ ngrams(r)| / |ngrams(r)|  (clipped counts)
    ROUGE-L: the same with P, R = LCS(a, r) / |a|, / |r| (tokens)

averaged over examples (an example with several references takes the best, as `score_multi`).

BLEU (Papineni et al. 2002) and chrF (Popović 2015) from `sacrebleu` with its defaults (BLEU:
13a tokenization, exponential smoothing; chrF: character 6-grams, β = 2), computed at the
corpus level, so they are not means of per-example scores:

    BLEU = BP · exp((1/4) Σ_{n=1..4} log p_n),  p_n = Σ clipped n-gram matches / Σ n-grams,
    BP = min(1, exp(1 - |refs| / |answers|))
    chrF = (1 + β²) P R / (β² P + R),  P, R averaged over the character n-gram orders

Every value is in [0, 1] (sacrebleu's 0-100 divided by 100).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from hfjax.data.records import DataError

__all__ = ["ROUGE_TYPES", "bleu_chrf", "rouge"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _reference_lists(answers: Sequence[str], references: Sequence) -> list[list[str]]:
    """Each example's references as a list (a str is one reference)."""
    if isinstance(answers, str) or isinstance(references, str):
        raise DataError("answers and references must be sequences of strings, not one string")
    if len(answers) != len(references):
        raise DataError(f"{len(answers)} answers but {len(references)} references")
    if len(answers) == 0:
        raise DataError("no examples to score")
    refs = [[r] if isinstance(r, str) else list(r) if isinstance(r, Sequence) else []
            for r in references]
    for i, r in enumerate(refs):
        if not r or not all(isinstance(x, str) for x in r):
            raise DataError(f"example {i}: references must be a string or a non-empty list of "
                            f"strings, got {references[i]!r}")
    if not all(isinstance(a, str) for a in answers):
        raise DataError("answers must be strings")
    return refs


def rouge(answers: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure of `answers` against `references` (a string or a list of
    strings per example): {"rouge1", "rouge2", "rougeL"}."""
    from rouge_score import rouge_scorer  # imported on use: it loads nltk (~0.6 s)

    refs = _reference_lists(answers, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score_multi(r, a) for a, r in zip(answers, refs, strict=True)]
    return {t: float(np.mean([s[t].fmeasure for s in scores])) for t in ROUGE_TYPES}


def bleu_chrf(answers: Sequence[str],
              references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF of `answers` against `references` (a string or a list of strings
    per example; examples may have different numbers of references): {"bleu", "chrf"}."""
    refs = _reference_lists(answers, references)
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    hyps = list(answers)
    return {"bleu": BLEU().corpus_score(hyps, streams).score / 100,
            "chrf": CHRF().corpus_score(hyps, streams).score / 100}
