"""Multitask safety data: refusals in every task framing, mixed into the training data.

Essa Jan, Nouar AlDahoul, Moiz Ali, Faizan Ahmad, Fareed Zaffar, Yasir Zaki. "Multitask Mayhem:
Unveiling and Mitigating Safety Gaps in LLMs Fine-tuning". COLING 2025, arXiv:2409.15361: safety
data of plain refusals does not carry over to requests framed as a task (classification,
translation, code, text generation); their MultiTaskBench pairs requests in each framing with
refusals.

Data level, 1F+1B. The safety rows (harmful request -> refusal, harmful=False) are either the
stage's safety stream, each posed in every framing of `hfjax.data.framings.FRAMINGS` (the
refusal kept as the response), or, with `file=PATH`, the rows of a MultiTaskBench-format file
(`hfjax.data.multitaskbench`, framing read from each Query). `num` of them, split equally over
the framings (the first `num mod F` framings get one more), replace as many benign rows of the
data by SafeInstr's rule (`safe_instr_mix`): the total stays the same, every harmful row stays,
the result is shuffled. The mix depends only on its inputs, so it serves the alignment stage's
data as well as the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hfjax.data.framings import FRAMINGS, frame
from hfjax.data.mixing import sample
from hfjax.data.multitaskbench import load_multitaskbench, safety_rows
from hfjax.data.records import Record
from hfjax.defenses.api import USER, Cost, DefenseError, register
from hfjax.defenses.finetune.safe_instr import safe_instr_mix

PAPER = ("Jan et al. Multitask Mayhem: Unveiling and Mitigating Safety Gaps in LLMs Fine-tuning, "
         "COLING 2025, arXiv:2409.15361")


def per_framing(num: int, framings: Sequence[str]) -> dict[str, int]:
    """`num` rows split over `framings` in order: num // F each, one more for the first num % F."""
    q, r = divmod(num, len(framings))
    return {f: q + (i < r) for i, f in enumerate(framings)}


def pick_framed(pools: dict[str, list[Record]], num: int, seed: int) -> list[Record]:
    """`per_framing(num, pools)` rows drawn without replacement from each framing's pool."""
    rng = np.random.default_rng([seed, 7])
    return [row for f, k in per_framing(num, list(pools)).items()
            for row in sample(pools[f], k, rng, f"safety data in the {f!r} framing")]


@register("multitask_safety", stage=("finetune", "alignment"), level="data", cost=Cost(1, 1),
          batches=(USER,), paper=PAPER)
def multitask_safety(num: int = 100, file: str = "", seed: int = 0) -> Callable[..., list[Record]]:
    """`mix(records, safety) -> records'` (or `mix(records)` with `file`): `num` framed safety
    rows, equal per framing, replace benign rows; len(records) is kept."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise DefenseError(f"multitask_safety's num must be a non-negative integer, got {num!r}")
    replace = safe_instr_mix(guide_data_num=num, seed=seed)
    if file:
        if not Path(file).is_file():
            raise DefenseError(f"multitask_safety's file {file!r} does not exist")

        def mix_file(records: Sequence[Record]) -> list[Record]:
            rows = safety_rows(load_multitaskbench(file))
            pools = {f: [r for r in rows if r["framing"] == f] for f in FRAMINGS}
            return replace(records, pick_framed({f: p for f, p in pools.items() if p}, num, seed))

        return mix_file

    def mix(records: Sequence[Record], safety: Sequence[Record]) -> list[Record]:
        pools = {f: [frame(r, f, seed) for r in safety] for f in FRAMINGS}
        return replace(records, pick_framed(pools, num, seed))

    return mix
