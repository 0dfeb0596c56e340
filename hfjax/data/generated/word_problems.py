"""Offline grade-school word problems in GSM8K's schema {"question", "answer"}: two- and
three-step problems (buying packs, wages, a bakery's stock, pages left to read, packing a
harvest, a journey at two speeds) whose answer is the worked solution, one step a line with
GSM8K's calculator annotations, ending "#### N":

    Maya buys 4 * 12 = <<4*12=48>>48 stickers.
    She now has 15 + 48 = <<15+48=63>>63 stickers.
    #### 63
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

_PEOPLE = (("Maya", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"),
           ("Tariq", "he", "his"), ("Sofia", "she", "her"), ("Kenji", "he", "his"),
           ("Priya", "she", "her"), ("Mateo", "he", "his"))


def _step(a: int, op: str, b: int, text: str) -> tuple[str, int]:
    """A solution line `text` with {calc} replaced by "a op b = <<a op b=r>>r"; returns it and r."""
    r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return text.format(calc=f"{a} {op} {b} = <<{a}{op}{b}={r}>>{r}"), r


def _packs(rng: random.Random, name: str, he: str, his: str) -> tuple[str, list[str], int]:
    have, packs, each = rng.randrange(5, 40), rng.randrange(2, 9), rng.randrange(4, 15)
    question = (f"{name} has {have} stickers. {he.title()} buys {packs} packs of stickers with "
                f"{each} stickers in each pack. How many stickers does {name} have now?")
    line1, bought = _step(packs, "*", each, f"{name} buys {{calc}} stickers.")
    line2, total = _step(have, "+", bought, f"{he.title()} now has {{calc}} stickers.")
    return question, [line1, line2], total


def _wages(rng: random.Random, name: str, he: str, his: str) -> tuple[str, list[str], int]:
    rate, sat, sun = rng.randrange(8, 21), rng.randrange(2, 7), rng.randrange(2, 7)
    spent = rng.randrange(5, rate * (sat + sun))
    question = (f"{name} earns ${rate} an hour babysitting. This weekend {he} worked {sat} hours "
                f"on Saturday and {sun} hours on Sunday, then spent ${spent} on a book. How many "
                f"dollars does {name} have left from {his} weekend earnings?")
    line1, hours = _step(sat, "+", sun, f"{name} worked {{calc}} hours.")
    line2, earned = _step(hours, "*", rate, f"{he.title()} earned {{calc}} dollars.")
    line3, left = _step(earned, "-", spent, f"{he.title()} has {{calc}} dollars left.")
    return question, [line1, line2, line3], left


def _bakery(rng: random.Random, name: str, he: str, his: str) -> tuple[str, list[str], int]:
    trays, each = rng.randrange(3, 10), rng.randrange(6, 25)
    morning = rng.randrange(1, trays * each // 2)
    afternoon = rng.randrange(1, trays * each - morning)
    question = (f"{name}'s bakery bakes {trays} trays of muffins with {each} muffins on each "
                f"tray. It sells {morning} muffins in the morning and {afternoon} muffins in the "
                "afternoon. How many muffins are left?")
    line1, baked = _step(trays, "*", each, "The bakery bakes {calc} muffins.")
    line2, sold = _step(morning, "+", afternoon, "It sells {calc} muffins.")
    line3, left = _step(baked, "-", sold, "There are {calc} muffins left.")
    return question, [line1, line2, line3], left


def _reading(rng: random.Random, name: str, he: str, his: str) -> tuple[str, list[str], int]:
    monday = rng.randrange(10, 60)
    pages = rng.randrange(3 * monday + 20, 3 * monday + 400)
    question = (f"{name} is reading a book with {pages} pages. {he.title()} read {monday} pages "
                f"on Monday and twice as many pages on Tuesday. How many pages does {he} still "
                "have to read?")
    line1, tuesday = _step(monday, "*", 2, f"On Tuesday {he} read {{calc}} pages.")
    line2, read = _step(monday, "+", tuesday, f"{he.title()} has read {{calc}} pages.")
    line3, left = _step(pages, "-", read, f"{he.title()} still has {{calc}} pages to read.")
    return question, [line1, line2, line3], left


def _harvest(rng: random.Random, name: str, he: str, his: str) -> tuple[str, list[str], int]:
    rows, plants, box = rng.randrange(3, 12), rng.randrange(4, 16), rng.choice((4, 5, 6, 8, 10))
    each = box * rng.randrange(1, 5)
    question = (f"{name} plants {rows} rows of tomato plants with {plants} plants in each row. "
                f"Each plant gives {each} tomatoes, and {he} packs the tomatoes in boxes of "
                f"{box}. How many boxes does {name} fill?")
    line1, total_plants = _step(rows, "*", plants, f"{name} has {{calc}} plants.")
    line2, tomatoes = _step(total_plants, "*", each, "They give {calc} tomatoes.")
    line3, boxes = _step(tomatoes, "/", box, f"{he.title()} fills {{calc}} boxes.")
    return question, [line1, line2, line3], boxes


def _journey(rng: random.Random, name: str, he: str, his: str) -> tuple[str, list[str], int]:
    v1, h1, v2, h2 = (rng.randrange(30, 70), rng.randrange(1, 5), rng.randrange(20, 60),
                      rng.randrange(1, 4))
    question = (f"{name} drives at {v1} miles per hour for {h1} hours, then at {v2} miles per "
                f"hour for {h2} hours. How many miles does {name} drive in total?")
    line1, d1 = _step(v1, "*", h1, f"First {he} drives {{calc}} miles.")
    line2, d2 = _step(v2, "*", h2, f"Then {he} drives {{calc}} miles.")
    line3, total = _step(d1, "+", d2, f"In total {he} drives {{calc}} miles.")
    return question, [line1, line2, line3], total


TEMPLATES: tuple[Callable[..., tuple[str, list[str], int]], ...] = (
    _packs, _wages, _bakery, _reading, _harvest, _journey)


def gsm8k_rows(per_template: int = 100) -> list[dict[str, Any]]:
    """`per_template` distinct problems of each template (fixed seed)."""
    rng = random.Random(3)
    rows, seen = [], set()
    for template in TEMPLATES:
        count = 0
        while count < per_template:
            question, lines, answer = template(rng, *rng.choice(_PEOPLE))
            if question in seen:
                continue
            seen.add(question)
            count += 1
            rows.append({"question": question, "answer": "\n".join(lines) + f"\n#### {answer}"})
    return rows
