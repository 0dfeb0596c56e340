"""Guard filter: the service moderates the user's data with a guard model before fine-tuning.

The setting of Huang et al., "Virus: Harmful Fine-tuning Attack for Large Language Models
Bypassing Guardrail Moderation" (arXiv:2501.17433): Llama Guard 2 reads every user row (the user
turn and the answer) and the rows it flags are dropped (github.com/git-disl/Virus, trainer.py
`VirusAttackFinetuneTrainer.init`, 256-300; --moderation True):

    D' = {r ∈ D : the guard does not flag r}

Data level, 1F+1B per training step (the guard runs once, before training). The guard is the
pipeline's --guard (`hfjax.eval.guard`); a row is flagged when p(unsafe | safe or unsafe) > 0.5,
the guard's verdict. The report counts the rows of each origin that passed
(`hfjax.attacks.virus.row_origin`: benign, plain harmful, Virus-optimized), the official code's
false-negative ratio (harmful rows that pass, trainer.py:304) and false positives (benign rows
dropped, :306).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from hfjax.attacks.virus import row_origin
from hfjax.data.records import Record
from hfjax.defenses.api import USER, Cost, DefenseError, register
from hfjax.eval.guard import user_text

PAPER = ("Huang et al. Virus: Harmful Fine-tuning Attack for Large Language Models Bypassing "
         "Guardrail Moderation, arXiv:2501.17433")
ORIGINS = ("benign", "harmful", "virus")


@register("guard_filter", stage="finetune", level="data", cost=Cost(1, 1), batches=(USER,),
          paper=PAPER)
def guard_filter() -> Callable[..., tuple[list[Record], dict]]:
    """`filter(records, *, guard) -> (kept, report)`: the rows the guard does not flag, in
    order; report {"guard": name, "rows": {origin: {"total", "passed"}}, "kept", "dropped"}."""

    def filter_rows(records: Sequence[Record], *, guard) -> tuple[list[Record], dict]:
        if guard is None:
            raise DefenseError("guard_filter needs a guard model (the pipeline's --guard)")
        records = list(records)
        scores = np.asarray(guard([user_text(r) for r in records],
                                  [r["response"] for r in records])) if records else np.zeros(0)
        passed = scores <= 0.5
        origins = [row_origin(r) for r in records]
        rows = {o: {"total": origins.count(o),
                    "passed": int(sum(p for p, q in zip(passed, origins, strict=True) if q == o))}
                for o in ORIGINS}
        kept = [r for r, p in zip(records, passed, strict=True) if p]
        return kept, {"guard": guard.name, "rows": rows, "kept": len(kept),
                      "dropped": len(records) - len(kept)}

    return filter_rows
