"""Made-up landmarks with facts: the shared material of the offline summarization, reading
comprehension (BoolQ) and completion (WikiText) generators.

Each landmark (a bridge, lighthouse, library, observatory, museum or dam in a made-up town) has
a completion year, a designer, a size, and a later event; `article(landmark)` states them in a
few encyclopedia sentences, so every fact a summary or a question uses is in the text.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

_PREFIXES = (
    "Marlow", "Ashby", "Brenton", "Caldor", "Denholm", "Elvar", "Fenwick", "Garrow", "Holmby",
    "Iverly", "Kestrel", "Lorne", "Merrow", "Norcott", "Orwin", "Pellow", "Quenby", "Radley",
    "Selwick", "Tarrant",
)
_TOWNS = (
    "Eldham", "North Brackley", "Wrenford", "Tamsworth", "Pellingham", "Oakridge Vale",
    "Castmere", "Rydal Cross", "Hollinby", "Ashcombe", "Stavely", "Dunmore Green",
)
_REGIONS = ("Westmarch", "Lowfield", "Harrowdale", "Eastmere")
_RIVERS = ("Wend", "Aske", "Tolle", "Brede", "Lune", "Cray")
_PEOPLE = (
    "Edith Calloway", "Thomas Reyne", "Margit Olsen", "Samuel Ortega", "Ada Whitcombe",
    "Hugh Penrose", "Clara Baptiste", "Walter Finch", "Rosa Lindgren", "Arthur Maddox",
)
_RESIDENTS = ("Joan Harper", "Peter Kowal", "Amira Haddad", "Liam Doyle", "Nora Fischer")
# kind: (description with {river} / {town}, size predicate with {n}, range of n)
_KINDS = {
    "bridge": ("a stone bridge over the River {river}", "is {n} metres long", (60, 420)),
    "lighthouse": ("a lighthouse on the headland above the harbour",
                   "is {n} metres tall", (18, 62)),
    "library": ("a public library", "holds {n:,} books", (40_000, 300_000)),
    "observatory": ("an astronomical observatory",
                    "houses a telescope with a mirror {n} centimetres wide", (40, 180)),
    "museum": ("a museum of local history", "welcomes about {n:,} visitors a year",
               (8_000, 90_000)),
    "dam": ("a concrete dam on the River {river}", "is {n} metres high", (20, 140)),
}
_EVENTS = (
    "was badly damaged by a flood", "was restored with money raised by local residents",
    "was declared a protected monument", "lost part of its roof in a storm",
    "was closed for two years for repairs", "was visited by the queen of a neighbouring country",
)
_FILLERS = (
    "Today it is one of the best-known sights of {town}.",
    "It appears on many of the postcards sold in {town}.",
    "Guided tours of the {kind} are held on summer weekends.",
)


@dataclasses.dataclass(frozen=True)
class Landmark:
    name: str  # "Marlow Bridge"
    kind: str  # "bridge"
    description: str  # "a stone bridge over the River Wend"
    town: str
    region: str
    year: int  # completed
    designer: str
    size: str  # "is 212 metres long"
    event_year: int
    event: str  # "was badly damaged by a flood"
    resident: str
    filler: str


def landmarks() -> list[Landmark]:
    """Every landmark (20 names x 6 kinds = 120), with facts drawn from a fixed seed."""
    rng = random.Random(7)
    out = []
    for prefix, kind in itertools.product(_PREFIXES, _KINDS):
        description, size, (lo, hi) = _KINDS[kind]
        town = rng.choice(_TOWNS)
        year = rng.randrange(1780, 1960)
        out.append(Landmark(
            name=f"{prefix} {kind.title()}", kind=kind,
            description=description.format(river=rng.choice(_RIVERS), town=town), town=town,
            region=rng.choice(_REGIONS), year=year, designer=rng.choice(_PEOPLE),
            size=size.format(n=rng.randrange(lo, hi)),
            event_year=rng.randrange(year + 15, 2024), event=rng.choice(_EVENTS),
            resident=rng.choice(_RESIDENTS),
            filler=rng.choice(_FILLERS).format(town=town, kind=kind)))
    return out


def introduction(m: Landmark) -> list[str]:
    """What the landmark is, where, when and by whom it was built, and its size."""
    return [f"The {m.name} is {m.description} in the town of {m.town}, in the {m.region} region.",
            f"It was completed in {m.year} to a design by {m.designer}.",
            f"The {m.kind} {m.size}.", m.filler]


def history(m: Landmark) -> list[str]:
    """How it was built and its later event."""
    return [f"Plans for the {m.name} in {m.town} were first drawn up in {m.year - 6}.",
            f"Building work began in {m.year - 3} and took three years.",
            f"In {m.event_year}, the {m.name} {m.event}."]


def article(m: Landmark) -> str:
    """The landmark's facts in one passage."""
    return " ".join(introduction(m) + history(m)[2:])
