"""Disjoint slices of the harmful training pool, one per role of a run.

A run draws harmful rows for several roles: the alignment refusals (harmful prompt -> refusal),
the attack's harmful rows in the user data, and the extra streams of defenses (Booster's harmful
batches, Lisa's and SafeInstr's safety data, Antidote's calibration set). Drawn independently
from one pool they overlap (with the offline pool and seed 0, 8 of the 20 attack prompts were
alignment refusals and 6 were in Booster's harmful stream), which flatters the defenses that saw
the attack's prompts. The official code bases take index ranges of their data files; hfjax takes
ranges of one seeded permutation of the pool's distinct prompts (a source like BeaverTails
answers one prompt several times; each prompt goes to one role, with its first row):

    permuted prompts: [ attack | finetune streams | post streams ... | align streams | alignment ]
                        front, in this order ->                     <- back, in this order

The alignment rows come from the back and the attack from the front, so the alignment never
depends on the attack's size (a sweep over p or n shares one alignment) and the attack's rows
never depend on the defenses (every defense of a sweep faces the same harmful rows, and the rows
of a smaller p are a prefix of a larger p's). A stream a run does not use takes no rows. The two
ends must not meet: `plan_roles` raises `DataError` with the sizes when the pool is too small.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from hfjax.data.records import DataError, Record, prompt_key

ALIGNMENT = "alignment"
ATTACK = "attack"


@dataclasses.dataclass(frozen=True)
class RolePlan:
    """Row indices into the pool per role (disjoint prompts), and the pool size."""

    pool_size: int
    rows: Mapping[str, np.ndarray]

    def take(self, pool: Sequence[Record], role: str) -> list[Record]:
        """The records of `role` (in plan order; none for a role the run does not use)."""
        if len(pool) != self.pool_size:
            raise DataError(f"the role plan was made for a pool of {self.pool_size} rows, not "
                            f"{len(pool)}")
        return [pool[i] for i in self.rows.get(role, ())]

    def summary(self, pool: Sequence[Record]) -> dict[str, dict]:
        """{role: {"count", "sha256" of its prompt keys, "indices"}}: what run.json records."""
        out = {}
        for role, idx in self.rows.items():
            keys = "\n".join(prompt_key(pool[i]) for i in idx)
            out[role] = {"count": int(len(idx)),
                         "sha256": hashlib.sha256(keys.encode()).hexdigest(),
                         "indices": [int(i) for i in idx]}
        return out


def plan_roles(pool: Sequence[Record], seed: int, *, alignment: int = 0, attack: int = 0,
               alignment_streams: Mapping[str, int] | None = None,
               finetune_streams: Mapping[str, int] | None = None,
               post_streams: Mapping[str, int] | None = None) -> RolePlan:
    """Disjoint ranges of a seeded permutation of the pool's distinct prompts (module docstring).

    Stream names become roles as "<stage>:<name>" (e.g. "alignment:harmful",
    "finetune:align", "post:harmful"); sizes of 0 take no rows.
    """
    sizes = {ALIGNMENT: alignment, ATTACK: attack}
    for stage, streams in (("alignment", alignment_streams), ("finetune", finetune_streams),
                           ("post", post_streams)):
        sizes.update({f"{stage}:{name}": n for name, n in (streams or {}).items()})
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(
        v, int | np.integer) or v < 0}
    if bad:
        raise DataError(f"role sizes must be non-negative integers, got {bad}")
    back = [ALIGNMENT, *(f"alignment:{n}" for n in alignment_streams or {})]
    front = [ATTACK, *(f"finetune:{n}" for n in finetune_streams or {}),
             *(f"post:{n}" for n in post_streams or {})]
    firsts: dict[str, int] = {}
    for i, r in enumerate(pool):
        firsts.setdefault(prompt_key(r), i)
    distinct = np.fromiter(firsts.values(), np.int64, len(firsts))
    need = sum(sizes.values())
    if need > len(distinct):
        detail = ", ".join(f"{k} {v}" for k, v in sizes.items() if v)
        raise DataError(f"the harmful training pool has {len(distinct)} distinct prompts but the "
                        f"run's roles need {need} disjoint ones ({detail}); use a larger source "
                        f"or smaller --align_refusals / --num_samples / --harmful_ratio / "
                        f"--defense_data_size")
    perm = distinct[np.random.default_rng([seed, len(distinct)]).permutation(len(distinct))]
    pool_size = len(distinct)
    rows: dict[str, np.ndarray] = {}
    start = 0
    for role in front:
        rows[role] = perm[start:start + sizes[role]]
        start += sizes[role]
    stop = pool_size
    for role in back:
        rows[role] = perm[stop - sizes[role]:stop]
        stop -= sizes[role]
    return RolePlan(len(pool), {k: rows[k] for k in sizes if sizes[k]})
