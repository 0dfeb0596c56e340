"""Which harmful prompts each role of a run gets: the attack's never reach any other role.

A run draws harmful rows for several roles: the alignment refusals (harmful prompt -> refusal),
the attack's harmful rows in the user data, and the extra streams of defenses (Booster's harmful
batches, Lisa's and SafeInstr's safety data, Antidote's calibration set). Drawn independently
from one pool they overlap: with the offline pool and seed 0, 8 of the 20 attack prompts were
alignment refusals and 6 were in Booster's harmful stream, which flatters the defenses that saw
the attack's prompts. Each role therefore takes a range of one ordering of the pool's distinct
prompts (a source like BeaverTails answers one prompt several times; a prompt goes to one range,
with its first row):

    ordered prompts: [ attack | own streams ... | shared streams / alignment ]
                       front, in this order ->        <- back, overlapping

- The attack takes the front: its rows depend on nothing but its size (every defense of a sweep
  faces the same harmful rows; a smaller p's rows are a prefix of a larger p's).
- The alignment takes the back; a *shared* stream takes the back too, so it reuses the
  alignment's prompts (and continues past them when larger), as the official code bases do:
  Booster's harmful batches are the harmful answers to its alignment prompts, Lisa's alignment
  state reuses its alignment data. The alignment never depends on the attack's size (a sweep over
  p shares one alignment).
- An *own* stream (Antidote's calibration set, harmful batches during fine-tuning) takes the
  range after the attack: disjoint from every other role.
The ordering is a seeded permutation ("random", default) or the source's own order ("file",
as the official loaders read files; the alignment then gets the first prompts). With a separate
attack source (`attack_pool`), the attack takes that pool's prompts in the same ordering, minus
every prompt another role got. `plan_roles` raises `DataError` with the sizes when a pool is too
small.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from hfjax.data.records import DataError, Record, prompt_key

ALIGNMENT = "alignment"
ATTACK = "attack"
ORDERS = ("random", "file")


@dataclasses.dataclass(frozen=True)
class RolePlan:
    """Per role, the indices of its rows in the pool it draws from ("pool" or "attack")."""

    rows: Mapping[str, np.ndarray]
    sources: Mapping[str, str]

    def take(self, pools: Mapping[str, Sequence[Record]], role: str) -> list[Record]:
        """The records of `role` (in plan order; none for a role the run does not use)."""
        if role not in self.rows:
            return []
        pool = pools[self.sources[role]]
        return [pool[i] for i in self.rows[role]]

    def summary(self, pools: Mapping[str, Sequence[Record]]) -> dict[str, dict]:
        """{role: {"source", "count", "sha256" of its prompt keys, "indices"}} (run.json)."""
        out = {}
        for role, idx in self.rows.items():
            pool = pools[self.sources[role]]
            keys = "\n".join(prompt_key(pool[i]) for i in idx)
            out[role] = {"source": self.sources[role], "count": int(len(idx)),
                         "sha256": hashlib.sha256(keys.encode()).hexdigest(),
                         "indices": [int(i) for i in idx]}
        return out


def _distinct(pool: Sequence[Record]) -> tuple[list[str], np.ndarray]:
    """(distinct prompt keys, index of each key's first row), in pool order."""
    firsts: dict[str, int] = {}
    for i, r in enumerate(pool):
        firsts.setdefault(prompt_key(r), i)
    return list(firsts), np.fromiter(firsts.values(), np.int64, len(firsts))


def _ordering(n: int, seed: int, order: str) -> np.ndarray:
    if order not in ORDERS:
        raise DataError(f"row order must be one of {ORDERS}, got {order!r}")
    if order == "file":
        return np.arange(n)[::-1]  # the back of the ordering is the start of the file
    return np.random.default_rng([seed, n]).permutation(n)


def _too_small(what: str, have: int, sizes: Mapping[str, int], need: int) -> DataError:
    detail = ", ".join(f"{k} {v}" for k, v in sizes.items() if v)
    return DataError(f"the {what} has {have} distinct prompts but the run's roles need {need} "
                     f"({detail}); use a larger source or smaller --align_refusals / "
                     f"--num_samples / --harmful_ratio / --defense_data_size")


def plan_roles(pool: Sequence[Record], seed: int, *, alignment: int = 0, attack: int = 0,
               shared_streams: Mapping[str, int] | None = None,
               own_streams: Mapping[str, int] | None = None,
               attack_pool: Sequence[Record] | None = None, order: str = "random") -> RolePlan:
    """The rows of every role (module docstring). Stream roles are named by the caller
    ("<stage>:<kind>", e.g. "alignment:harmful", "finetune:align", "post:harmful"); sizes of 0
    take no rows."""
    shared, own = dict(shared_streams or {}), dict(own_streams or {})
    sizes = {ALIGNMENT: alignment, ATTACK: attack, **shared, **own}
    bad = {k: v for k, v in sizes.items()
           if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0}
    if bad:
        raise DataError(f"role sizes must be non-negative integers, got {bad}")
    _, firsts = _distinct(pool)
    ordered = firsts[_ordering(len(firsts), seed, order)]
    front = ([ATTACK] if attack_pool is None else []) + list(own)
    back_size = max([alignment, *shared.values()])
    need = sum(sizes[r] for r in front) + back_size
    if need > len(ordered):
        raise _too_small("harmful training pool", len(ordered), sizes, need)
    rows: dict[str, np.ndarray] = {}
    start = 0
    for role in front:
        rows[role] = ordered[start:start + sizes[role]]
        start += sizes[role]
    for role in (ALIGNMENT, *shared):
        rows[role] = ordered[len(ordered) - sizes[role]:]
    sources = {role: "pool" for role in rows}
    if attack_pool is not None:
        used = {prompt_key(pool[i]) for idx in rows.values() for i in idx}
        _, attack_firsts = _distinct(attack_pool)
        candidates = attack_firsts[_ordering(len(attack_firsts), seed, order)[::-1]]
        free = [i for i in candidates if prompt_key(attack_pool[i]) not in used]
        if len(free) < attack:
            raise _too_small("attack source (minus the prompts of the other roles)", len(free),
                             {ATTACK: attack}, attack)
        rows[ATTACK], sources[ATTACK] = np.asarray(free[:attack], np.int64), "attack"
    return RolePlan({k: v for k, v in rows.items() if len(v)},
                    {k: v for k, v in sources.items() if len(rows[k])})
