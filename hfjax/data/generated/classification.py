"""Offline financial news sentences in Financial PhraseBank's schema {"sentence", "label"}
(0 negative, 1 neutral, 2 positive), written in the PhraseBank's style about made-up companies:
results that rise (positive) or fall (negative), orders won or jobs cut, and plain company facts
(neutral).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

NEGATIVE, NEUTRAL, POSITIVE = 0, 1, 2
_COMPANIES = ("Aldera Oyj", "Borvik Group", "Celsto Corporation", "Dunmere Systems",
              "Eskola Foods", "Fjordline Logistics", "Granvik Paper", "Halvo Metals")
_CITIES = ("Helsinki", "Tampere", "Oulu", "Turku", "Espoo", "Vaasa")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_EXCHANGES = ("Helsinki", "Stockholm", "Oslo", "Copenhagen")
_METRICS = ("operating profit", "net sales", "net profit", "order intake")


def _sentences(company: str, rng: random.Random) -> list[tuple[str, int]]:
    """One sentence of each kind for `company` (figures from `rng`)."""
    low, high = sorted(rng.sample(range(20, 990), 2))
    old, new = f"{low / 10:.1f}", f"{high / 10:.1f}"
    metric, pct = rng.choice(_METRICS), rng.randrange(3, 40)
    year, city = rng.randrange(2005, 2010), rng.choice(_CITIES)
    return [
        (f"{company} 's {metric} rose to EUR {new} mn from EUR {old} mn in the corresponding "
         f"period in {year} .", POSITIVE),
        (f"The {metric} of {company} increased by {pct} % to EUR {new} mn .", POSITIVE),
        (f"{company} won an order worth EUR {new} mn from a customer in {city} .", POSITIVE),
        (f"{company} 's {metric} fell to EUR {old} mn from EUR {new} mn in the corresponding "
         f"period in {year} .", NEGATIVE),
        (f"The {metric} of {company} decreased by {pct} % to EUR {old} mn .", NEGATIVE),
        (f"{company} will cut {rng.randrange(20, 400)} jobs at its plant in {city} .",
         NEGATIVE),
        (f"{company} is headquartered in {city} .", NEUTRAL),
        (f"{company} will publish its interim report on {rng.randrange(1, 29)} "
         f"{rng.choice(_MONTHS)} {year} .", NEUTRAL),
        (f"The shares of {company} are listed on the {rng.choice(_EXCHANGES)} stock exchange .",
         NEUTRAL),
    ]


def financial_phrasebank_rows(draws: int = 12) -> list[dict[str, Any]]:
    """Companies x `draws` figure draws x nine sentence kinds; repeated sentences dropped."""
    rng = random.Random(5)
    rows, seen = [], set()
    for company, _ in itertools.product(_COMPANIES, range(draws)):
        for sentence, label in _sentences(company, rng):
            if sentence not in seen:
                seen.add(sentence)
                rows.append({"sentence": sentence, "label": label})
    return rows
