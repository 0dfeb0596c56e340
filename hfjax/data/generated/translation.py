"""Offline English -> French sentence pairs in WMT14's schema {"translation": {"en", "fr"}},
composed from a phrase table: subject + verb + object + optional time phrase, each with its
French, the verb conjugated for a singular or plural subject:

    The children read a book every morning.  ->  Les enfants lisent un livre chaque matin.
"""

from __future__ import annotations

import itertools
from typing import Any

# (English, French, plural)
_SUBJECTS = (
    ("my brother", "mon frère", False), ("my sister", "ma sœur", False),
    ("the teacher", "le professeur", False), ("our neighbour", "notre voisin", False),
    ("the little girl", "la petite fille", False), ("the old man", "le vieil homme", False),
    ("the children", "les enfants", True), ("my parents", "mes parents", True),
    ("the students", "les étudiants", True), ("my friends", "mes amis", True),
)
# ((English singular, plural), (French singular, plural), objects (English, French))
_VERBS = (
    (("eats", "eat"), ("mange", "mangent"),
     (("an apple", "une pomme"), ("some bread", "du pain"), ("the cake", "le gâteau"))),
    (("reads", "read"), ("lit", "lisent"),
     (("the newspaper", "le journal"), ("a book", "un livre"), ("the letter", "la lettre"))),
    (("drinks", "drink"), ("boit", "boivent"),
     (("some water", "de l'eau"), ("a coffee", "un café"), ("some milk", "du lait"))),
    (("sees", "see"), ("voit", "voient"),
     (("the sea", "la mer"), ("a bird", "un oiseau"), ("the mountains", "les montagnes"))),
    (("buys", "buy"), ("achète", "achètent"),
     (("a new car", "une nouvelle voiture"), ("some flowers", "des fleurs"),
      ("the tickets", "les billets"))),
    (("opens", "open"), ("ouvre", "ouvrent"),
     (("the door", "la porte"), ("the window", "la fenêtre"))),
    (("likes", "like"), ("aime", "aiment"),
     (("music", "la musique"), ("chocolate", "le chocolat"), ("the garden", "le jardin"))),
)
_TIMES = (("", ""), ("every morning", "chaque matin"), ("today", "aujourd'hui"),
          ("in the evening", "le soir"), ("on Sundays", "le dimanche"))


def _sentence(*parts: str) -> str:
    text = " ".join(p for p in parts if p)
    return text[:1].upper() + text[1:] + "."


def wmt14_en_fr_rows() -> list[dict[str, Any]]:
    """Every subject x verb-object x time phrase (10 x 20 x 5 = 1000 pairs)."""
    rows = []
    for (en_s, fr_s, plural), (en_v, fr_v, objects), (en_t, fr_t) in itertools.product(
            _SUBJECTS, _VERBS, _TIMES):
        for en_o, fr_o in objects:
            rows.append({"translation": {
                "en": _sentence(en_s, en_v[plural], en_o, en_t),
                "fr": _sentence(fr_s, fr_v[plural], fr_o, fr_t)}})
    return rows
