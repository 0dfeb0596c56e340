"""Offline summarization items about made-up landmarks (`landmarks`), in the hub schemas:

    xsum           {"document", "summary", "id"}: an article; one sentence naming the landmark,
                   its town, its completion year and its later event
    cnn_dailymail  {"article", "highlights", "id"}: a news story with a resident's quote;
                   highlights = three facts, one per line
    billsum        {"text", "summary", "title"}: a bill granting money to restore the landmark;
                   BillSum's summary style ("<Short title> - Directs ... Authorizes ...")

Every fact a summary states is in its document.
"""

from __future__ import annotations

import random
from typing import Any

from hfjax.data.generated.landmarks import Landmark, article, history, introduction, landmarks

_USES = ("repair its foundations", "replace its roof", "restore its stonework",
         "make it accessible to wheelchair users")


def xsum_summary(m: Landmark) -> str:
    return f"The {m.name} in {m.town}, completed in {m.year}, {m.event} in {m.event_year}."


def xsum_rows() -> list[dict[str, Any]]:
    return [{"document": article(m), "summary": xsum_summary(m), "id": str(i)}
            for i, m in enumerate(landmarks())]


def cnn_dailymail_rows() -> list[dict[str, Any]]:
    rows = []
    for i, m in enumerate(landmarks()):
        quote = (f'"It is part of who we are," said {m.resident}, who has lived in {m.town} '
                 f"for {10 + i % 40} years.")
        story = history(m)[2:] + introduction(m) + [quote] + history(m)[:2]
        highlights = [f"The {m.name} in {m.town} was completed in {m.year}.",
                      f"In {m.event_year}, it {m.event}.", f"The {m.kind} {m.size}."]
        rows.append({"article": " ".join(story), "highlights": "\n".join(highlights),
                     "id": f"{i:040x}"})
    return rows


def grant(m: Landmark, index: int) -> tuple[str, int, str]:
    """(dollar amount, fiscal year, use of funds) of the landmark's bill."""
    rng = random.Random(index)
    return f"${rng.randrange(5, 90) * 50_000:,}", rng.randrange(2012, 2024), rng.choice(_USES)


def billsum_rows() -> list[dict[str, Any]]:
    rows = []
    for i, m in enumerate(landmarks()):
        amount, year, use = grant(m, i)
        title = f"{m.name} Preservation Act of {year}"
        text = (
            f"SECTION 1. SHORT TITLE.\n\nThis Act may be cited as the ``{title}''.\n\n"
            f"SEC. 2. FINDINGS.\n\nCongress finds that the {m.name}, completed in {m.year} in "
            f"the town of {m.town}, {m.size}.\n\nSEC. 3. GRANT.\n\n(a) In General.--The "
            f"Secretary of the Interior shall award a grant of {amount} to the town of "
            f"{m.town} to restore the {m.name}.\n\n(b) Use of Funds.--A grant under this "
            f"section shall be used to {use}.\n\nSEC. 4. AUTHORIZATION OF APPROPRIATIONS.\n\n"
            f"There is authorized to be appropriated {amount} for fiscal year {year} to carry "
            "out this Act.")
        summary = (f"{title} - Directs the Secretary of the Interior to award a grant of "
                   f"{amount} to the town of {m.town} to restore the {m.name} and to {use}.\n\n"
                   f"Authorizes appropriations for fiscal year {year}.")
        rows.append({"text": text, "summary": summary, "title": f"To restore the {m.name}."})
    return rows
