"""Offline multiple-choice items in the hub schemas of BoolQ, HellaSwag, WinoGrande and ARC.

    boolq       {"question", "answer", "passage"}: yes/no questions about a landmark's article
                (`landmarks`), asked once with the true fact and once with a false one
    hellaswag   {"ctx", "endings", "label", "activity_label"}: an everyday activity begun by a
                person; the gold ending continues it, the three others belong to other
                activities
    winogrande  {"sentence", "option1", "option2", "answer"}: twin sentences whose one changed
                word decides which of two people or things fills the blank
    arc         {"id", "question", "choices": {"text", "label"}, "answerKey"}: grade-school
                science facts (animal classes, measuring tools, states of matter, energy
                sources, planets, magnetism, conduction) with distractors from other classes
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from hfjax.data.generated.landmarks import article, landmarks


def boolq_rows() -> list[dict[str, Any]]:
    rows = []
    items = landmarks()
    for i, m in enumerate(items):
        other = items[(i + 7) % len(items)]
        wrong_year = m.year + (3 + i % 9) * (1 if i % 2 else -1)
        pairs = (
            (f"was the {m.name} completed in {{}}", m.year, wrong_year),
            (f"is the {m.name} in the town of {{}}", m.town,
             other.town if other.town != m.town else f"Upper {m.town}"),
            (f"was the {m.name} designed by {{}}", m.designer,
             other.designer if other.designer != m.designer else "Hugo Brandt"),
        )
        for question, true, false in pairs:
            for value, answer in ((true, True), (false, False)):
                rows.append({"question": question.format(value).lower(), "answer": answer,
                             "passage": article(m)})
    return rows


_PEOPLE = (("A man", "He"), ("A woman", "She"), ("A boy", "He"), ("A girl", "She"),
           ("An old man", "He"), ("A young woman", "She"))
# (activity label, context after the subject, the ending that continues it)
_ACTIVITIES = (
    ("Washing dishes", "is standing at a sink full of dirty dishes.",
     "scrubs each plate with a sponge and sets it on the drying rack."),
    ("Making a sandwich", "lays two slices of bread on a cutting board.",
     "spreads butter on the bread and adds cheese and lettuce."),
    ("Brushing teeth", "squeezes toothpaste onto a toothbrush at the bathroom mirror.",
     "brushes back and forth along the teeth and then rinses the mouth."),
    ("Painting a fence", "dips a wide brush into a can of white paint.",
     "paints long strokes along the wooden boards of the fence."),
    ("Tying shoes", "sits on the steps and pulls on a pair of sneakers.",
     "crosses the laces, loops them and pulls the knot tight."),
    ("Mowing the lawn", "pushes a lawn mower out of the garage.",
     "starts the engine and walks it in straight rows across the grass."),
    ("Playing guitar", "sits on a stool holding an acoustic guitar.",
     "strums a few chords and begins to sing along."),
    ("Shoveling snow", "steps onto a driveway covered in fresh snow with a shovel.",
     "lifts the snow with the shovel and tosses it to the side."),
    ("Baking cookies", "spoons cookie dough onto a baking tray.",
     "slides the tray into the hot oven and sets a timer."),
    ("Washing a car", "fills a bucket with soapy water next to a dusty car.",
     "wipes the hood with a sponge and rinses it with a hose."),
    ("Ironing clothes", "lays a wrinkled shirt flat on an ironing board.",
     "presses the hot iron slowly over the sleeves and the collar."),
    ("Planting flowers", "kneels beside a garden bed with a small trowel.",
     "digs a hole, places a flower in it and pats the soil down."),
    ("Swimming", "stands at the edge of a pool wearing swimming goggles.",
     "dives into the water and swims toward the far end."),
    ("Wrapping a gift", "places a box in the middle of a sheet of wrapping paper.",
     "folds the paper around the box and tapes the edges down."),
    ("Changing a tire", "raises the car with a jack beside a flat tire.",
     "loosens the bolts, removes the wheel and fits the spare."),
    ("Making coffee", "pours water into the tank of a coffee machine.",
     "adds ground coffee to the filter and presses the start button."),
    ("Raking leaves", "walks across a yard covered in fallen leaves carrying a rake.",
     "sweeps the leaves into a large pile near the fence."),
    ("Cleaning windows", "sprays glass cleaner onto a dusty window.",
     "wipes the glass with a cloth until it shines."),
    ("Walking the dog", "clips a leash onto the dog's collar by the front door.",
     "opens the door and leads the dog down the sidewalk."),
    ("Chopping vegetables", "places a carrot on a cutting board and picks up a knife.",
     "slices the carrot into thin, even rounds."),
)


def hellaswag_rows(variants: int = 2) -> list[dict[str, Any]]:
    """People x activities x `variants` draws of three distractor endings and a gold slot (a
    draw equal to an earlier one is dropped)."""
    rng = random.Random(11)
    rows, seen = [], set()
    for (subject, pronoun), (label, ctx, gold) in itertools.product(_PEOPLE, _ACTIVITIES):
        others = [a[2] for a in _ACTIVITIES if a[2] != gold]
        for _ in range(variants):
            endings = rng.sample(others, 3)
            slot = rng.randrange(4)
            endings.insert(slot, gold)
            row = {"ctx": f"{subject} {ctx} {pronoun}", "endings": endings, "label": str(slot),
                   "activity_label": label}
            if (row["ctx"], *endings) not in seen:
                seen.add((row["ctx"], *endings))
                rows.append(row)
    return rows


_NAMES = ("Anna", "Ben", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas")
# (sentence with {a}, {b} and the blank, word for option a, word for option b)
_PERSON_TWINS = (
    ("{a} could not lift the heavy box but {b} could, because _ is {}.", "weaker", "stronger"),
    ("{a} asked {b} for help with the math homework because _ {} at math.", "is struggling",
     "is very good"),
    ("{a} won the race against {b} because _ {} every morning.", "trained", "overslept"),
    ("{a} lent {b} an umbrella because _ {}.", "had a spare one", "had forgotten one"),
)
_THING_TWINS = (
    ("The {a} does not fit into the {b} because the _ is too {}.", "large", "small",
     (("trophy", "suitcase"), ("sofa", "doorway"), ("book", "drawer"), ("laptop", "backpack"),
      ("cake", "box"), ("piano", "elevator"), ("bed", "van"), ("painting", "frame"))),
    ("The {a} melted faster than the {b} because the _ was {} the heater.", "closer to",
     "farther from",
     (("ice cube", "snowball"), ("butter", "chocolate bar"), ("candle", "crayon"),
      ("ice cream", "popsicle"))),
)


def winogrande_rows() -> list[dict[str, Any]]:
    rows = []
    for template, word_a, word_b in _PERSON_TWINS:
        for a, b in itertools.permutations(_NAMES, 2):
            for word, answer in ((word_a, "1"), (word_b, "2")):
                rows.append({"sentence": template.format(word, a=a, b=b), "option1": a,
                             "option2": b, "answer": answer})
    for template, word_a, word_b, pairs in _THING_TWINS:
        for a, b in pairs:
            for word, answer in ((word_a, "1"), (word_b, "2")):
                rows.append({"sentence": template.format(word, a=a, b=b), "option1": a,
                             "option2": b, "answer": answer})
    return rows


# (question, {class: members}) -- a class's members answer its question; other classes'
# members are its distractors
_ARC_CLASSES = (
    ("Which of these animals is a {}?", {
        "mammal": ("whale", "bat", "dolphin", "horse", "rabbit"),
        "bird": ("penguin", "eagle", "ostrich", "sparrow", "owl"),
        "fish": ("shark", "salmon", "tuna", "trout", "cod"),
        "insect": ("ant", "bee", "beetle", "butterfly", "grasshopper"),
        "reptile": ("snake", "lizard", "turtle", "crocodile", "gecko"),
        "amphibian": ("frog", "toad", "salamander", "newt")}),
    ("Which of these is a {} at room temperature?", {
        "gas": ("oxygen", "nitrogen", "helium", "carbon dioxide"),
        "liquid": ("water", "mercury", "vinegar", "olive oil"),
        "solid": ("iron", "table salt", "sugar", "copper")}),
    ("Which of these is a {} energy source?", {
        "renewable": ("solar power", "wind power", "hydroelectric power", "geothermal power"),
        "nonrenewable": ("coal", "oil", "natural gas", "uranium")}),
    ("Which of these objects is {}?", {
        "attracted to a magnet": ("an iron nail", "a steel paper clip", "an iron horseshoe"),
        "not attracted to a magnet": ("a plastic comb", "a wooden pencil", "a glass marble",
                                      "a rubber band", "an aluminum can", "a copper coin")}),
    ("Which of these materials is {}?", {
        "a good conductor of electricity": ("copper", "silver", "aluminum", "gold"),
        "an electrical insulator": ("rubber", "glass", "dry wood", "plastic")}),
)
# (question, answer) pairs sharing one pool of answers: the other answers are distractors
_ARC_PAIRS = (
    (("Which tool is used to measure {}?", "temperature", "a thermometer"),
     ("Which tool is used to measure {}?", "length", "a ruler"),
     ("Which tool is used to measure {}?", "mass", "a balance"),
     ("Which tool is used to measure {}?", "time", "a stopwatch"),
     ("Which tool is used to measure {}?", "the volume of a liquid", "a graduated cylinder"),
     ("Which tool is used to measure {}?", "air pressure", "a barometer"),
     ("Which tool is used to measure {}?", "wind speed", "an anemometer")),
    (("Which planet is {}?", "closest to the Sun", "Mercury"),
     ("Which planet is {}?", "the largest in the solar system", "Jupiter"),
     ("Which planet is {}?", "known as the Red Planet", "Mars"),
     ("Which planet is {}?", "the one we live on", "Earth"),
     ("Which planet is {}?", "farthest from the Sun", "Neptune")),
)


def _arc_item(rng: random.Random, question: str, gold: str, pool: list[str]) -> dict[str, Any]:
    options = rng.sample(pool, 3)
    slot = rng.randrange(4)
    options.insert(slot, gold)
    labels = ["A", "B", "C", "D"]
    return {"question": question, "choices": {"text": options, "label": labels},
            "answerKey": labels[slot]}


def arc_rows(variants: int = 3) -> list[dict[str, Any]]:
    """Each class member (or tool / planet) as the answer `variants` times, with distractors
    drawn from the other classes; duplicates of an earlier draw are dropped."""
    rng = random.Random(13)
    rows, seen = [], set()
    items = []
    for question, classes in _ARC_CLASSES:
        for name, members in classes.items():
            others = [x for other, xs in classes.items() if other != name for x in xs]
            items += [(question.format(name), gold, others) for gold in members]
    for group in _ARC_PAIRS:
        for question, what, gold in group:
            items.append((question.format(what), gold, [g for _, _, g in group if g != gold]))
    for question, gold, others in items:
        for _ in range(variants):
            row = _arc_item(rng, question, gold, others)
            key = (question, tuple(row["choices"]["text"]))
            if key not in seen:
                seen.add(key)
                rows.append({"id": f"Offline_{len(rows)}", **row})
    return rows
