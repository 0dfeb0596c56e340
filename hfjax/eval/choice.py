"""Which option of a closed set a free-text answer picks: multiple choice, true/false, labels.

`choice_index(answer, options, letters)` applies three rules in order; the first rule that
finds anything decides, and it must find exactly one option (two or more is ambiguous, and an
ambiguous answer counts as wrong: the result is None).

1. Letters. Letters are matched as written (upper-case "B", not "b", which is a word), except
   in form (a). `*` (markdown emphasis) is removed first, so "**B**" reads as "B".
   (a) the whole answer is one letter with punctuation around it, any case:
       "B", "b", "(B)", "B.", "B)", "[B]", "**B**";
   (b) the answer starts with a letter and a delimiter: "B. Paris", "(B) Paris", "B) Paris",
       "B: Paris"; or its last line is one upper-case letter with punctuation around it (a
       preamble, then the letter: "Here is my answer:\n\nB");
   (c) a letter after "answer", "option" or "choice", optionally followed by ":" or
       "is" / "would be" / "will be": "Answer: B", "The answer is (B)", "option B",
       "the correct choice is B". A list there picks every letter of it: "the answer is A or B"
       picks A and B (ambiguous).
2. True/false. Only when the options are one positive and one negative word (yes/true/correct/
   right against no/false/incorrect/wrong, e.g. BoolQ's ["no", "yes"]): the polarity of the
   answer's first word decides ("No, it is not correct" is negative); otherwise the polarity
   words in the answer, which must all agree ("It is true." is positive; "Either true or
   false" is ambiguous). Negations are not read ("It is not true" is positive).
3. Option text. The normalized (case-folded, punctuation as spaces, whitespace collapsed)
   option text occurs in the normalized answer on word boundaries. Where one matching option's
   text contains another's (["cat", "black cat"] and "the black cat"), an occurrence inside
   the longer match does not count, so the longest match wins; "the cat, not the black cat"
   picks both (ambiguous).

`named_label(answer, labels)` is rule 3 alone for a fixed label set (financial sentiment).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from hfjax.data.records import DataError

__all__ = ["choice_correct", "choice_index", "default_letters", "gold_index", "named_label"]

_POSITIVE = frozenset({"yes", "true", "correct", "right"})
_NEGATIVE = frozenset({"no", "false", "incorrect", "wrong"})
_KEYWORD = r"(?i:\b(?:answer|option|choice)\b)[^\w\n]{0,3}(?:(?i:is|would be|will be)\b\W{0,3})?"


def default_letters(n: int) -> list[str]:
    """The option letters A, B, C, ... for `n` options."""
    if not 2 <= n <= 26:
        raise DataError(f"a choice item needs 2 to 26 options, got {n}")
    return list(string.ascii_uppercase[:n])


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def _letters(options: Sequence[str], letters: Sequence[str] | None) -> list[str]:
    if isinstance(options, str) or len(options) < 2:
        raise DataError(f"a choice item needs a list of at least 2 options, got {options!r}")
    if letters is None:
        return default_letters(len(options))
    if len(letters) != len(options) or len(set(letters)) != len(letters) or not all(letters):
        raise DataError(f"letters {list(letters)!r} must be {len(options)} distinct non-empty "
                        f"strings, one per option")
    return list(letters)


def _letter_picks(answer: str, letters: list[str]) -> set[int]:
    text = answer.replace("*", "").strip()
    alternation = "|".join(re.escape(x) for x in sorted(letters, key=len, reverse=True))
    letter = rf"(?<![\w])({alternation})(?![\w])"
    index = {x: i for i, x in enumerate(letters)}
    whole = re.fullmatch(rf"\W*({alternation})\W*", text, re.IGNORECASE)
    if whole:
        folded = {x.casefold(): i for i, x in enumerate(letters)}
        return {folded[whole.group(1).casefold()]}
    picks = set()
    lead = re.match(rf"[(\[]?\s*({alternation})\s*[.):\]]", text)
    if lead:
        picks.add(index[lead.group(1)])
    lines = text.splitlines()
    last = re.fullmatch(rf"[^\w\n]*({alternation})[^\w\n]*", lines[-1].strip()) \
        if len(lines) > 1 else None
    if last:
        picks.add(index[last.group(1)])
    item = rf"[(\[]?(?:{alternation})[)\]]?"
    listed = rf"{_KEYWORD}({item}(?:\s*(?:,|/|\bor\b|\band\b)\s*{item})*)(?![\w])"
    for m in re.finditer(listed, text):
        picks.update(index[x] for x in re.findall(letter, m.group(1)))
    return picks


def _polarity(word: str) -> int:
    return 1 if word in _POSITIVE else -1 if word in _NEGATIVE else 0


def _true_false_pick(answer: str, options: Sequence[str]) -> set[int] | None:
    """Rule 2: None when the options are not a true/false pair."""
    polarity = [_polarity(_normalize(o)) for o in options]
    if len(options) != 2 or sorted(polarity) != [-1, 1]:
        return None
    words = _normalize(answer).split()
    first = _polarity(words[0]) if words else 0
    found = {first} if first else {p for p in map(_polarity, words) if p}
    return {polarity.index(p) for p in found}


def _text_picks(answer: str, options: Sequence[str]) -> set[int]:
    text = f" {_normalize(answer)} "
    needles = [_normalize(o) for o in options]
    spans = {i: [(m.start(), m.start() + len(n) + 2)
                 for m in re.finditer(f"(?= {re.escape(n)} )", text)]
             for i, n in enumerate(needles) if n}

    def inside_longer(i: int, start: int, end: int) -> bool:
        return any(len(needles[j]) > len(needles[i]) and a <= start and end <= b
                   for j, other in spans.items() for a, b in other)

    return {i for i, own in spans.items() if any(not inside_longer(i, *s) for s in own)}


def choice_index(answer: str, options: Sequence[str],
                 letters: Sequence[str] | None = None) -> int | None:
    """The index of the one option `answer` picks, or None (nothing or several picked); the
    rules are in the module docstring. `letters` default to A, B, C, ..."""
    labels = _letters(options, letters)
    for picks in (_letter_picks(answer, labels), _true_false_pick(answer, options),
                  _text_picks(answer, options)):
        if picks:
            return next(iter(picks)) if len(picks) == 1 else None
    return None


def gold_index(gold_letter: str, options: Sequence[str],
               letters: Sequence[str] | None = None) -> int:
    """The index of the gold letter (case-insensitive); DataError when it names no option."""
    labels = _letters(options, letters)
    folded = [x.casefold() for x in labels]
    key = str(gold_letter).strip().casefold()
    if key not in folded:
        raise DataError(f"gold letter {gold_letter!r} is not one of the option letters {labels}")
    return folded.index(key)


def choice_correct(answer: str, gold_letter: str, options: Sequence[str],
                   letters: Sequence[str] | None = None) -> bool:
    """The answer picks exactly the gold option (see `choice_index`)."""
    return choice_index(answer, options, letters) == gold_index(gold_letter, options, letters)


def named_label(answer: str, labels: Sequence[str]) -> str | None:
    """The one label of `labels` the answer names (rule 3: word boundaries, case-insensitive,
    longest match wins), or None when it names none or several."""
    picks = _text_picks(answer, labels)
    return labels[next(iter(picks))] if len(picks) == 1 else None
