"""Offline text for the completion tasks, in the hub schemas:

    wikitext  {"text"}: one row per line of an encyclopedia article about a made-up landmark
              (`landmarks`), laid out as WikiText-2-raw is: " = Title = " and " = = Section = = "
              headings, blank rows, and one row per paragraph
    aeslc     {"email_body", "subject_line"}: short office emails (a moved meeting, a document
              to review, a reminder, a team lunch, an absence) with the subject line that
              names their point
"""

from __future__ import annotations

import itertools
from typing import Any

from hfjax.data.generated.landmarks import history, introduction, landmarks


def wikitext_rows() -> list[dict[str, Any]]:
    rows = []
    for m in landmarks():
        for line in (f" = {m.name} = ", "", " ".join(introduction(m)), "", " = = History = = ",
                     "", " ".join(history(m)), ""):
            rows.append({"text": f" {line.strip()} \n" if line else ""})
    return rows


_PEOPLE = ("Sara", "Mike", "Julia", "Tom", "Karen", "Dave")
_TOPICS = ("budget", "pipeline", "staffing", "contract", "quarterly review", "safety")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
_EMAILS = (
    ("{a},\n\nThe {topic} meeting planned for {day} has been moved to {day2} at 2 pm in the "
     "large conference room. Please let me know if the new time does not work for you.\n\n"
     "Thanks,\n{b}", "{Topic} meeting moved to {day2}"),
    ("{a},\n\nAttached is the draft {topic} report. Could you review it and send me your "
     "comments by {day}? I would like to send it out on {day2}.\n\n{b}",
     "Draft {topic} report for review"),
    ("Hi {a},\n\nJust a reminder that the {topic} figures are due on {day}. {day2} is the last "
     "day I can include late numbers.\n\nRegards,\n{b}", "Reminder: {topic} figures due {day}"),
    ("All,\n\nTo thank everyone for the work on the {topic} project we are having a team lunch "
     "on {day2} at noon. {a} is collecting lunch orders until {day}.\n\n{b}",
     "Team lunch on {day2}"),
    ("{a},\n\nI will be out of the office on {day} and {day2}. Please send anything urgent on the "
     "{topic} work to my assistant.\n\nThanks,\n{b}", "Out of office {day} and {day2}"),
)


def aeslc_rows() -> list[dict[str, Any]]:
    """Every email template x topic x pair of days (the first one earlier in the week),
    between a rotating pair of people."""
    rows = []
    pairs = list(itertools.permutations(_PEOPLE, 2))
    combos = itertools.product(_EMAILS, _TOPICS, itertools.combinations(_DAYS, 2))
    for i, ((body, subject), topic, (day, day2)) in enumerate(combos):
        a, b = pairs[i % len(pairs)]
        values = {"a": a, "b": b, "topic": topic, "Topic": topic[:1].upper() + topic[1:],
                  "day": day, "day2": day2}
        rows.append({"email_body": body.format(**values),
                     "subject_line": subject.format(**values)})
    return rows
