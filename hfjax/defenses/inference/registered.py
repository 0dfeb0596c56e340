"""ONION as a registered post-fine-tuning defense of level "inference": it changes no weight;
the evaluation of the final model passes every task test input through it (clean and
triggered rows alike), with the base model as the reference LM.

Fanchao Qi, Yangyi Chen, Mukai Li, Yuan Yao, Zhiyuan Liu, Maosong Sun. "ONION: A Simple and
Effective Defense Against Textual Backdoor Attacks". EMNLP 2021, arXiv:2011.10369.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hfjax.data.records import Record
from hfjax.defenses.api import DefenseError, register
from hfjax.defenses.inference.onion import onion_filter

PAPER = ("Qi et al. ONION: A Simple and Effective Defense Against Textual Backdoor Attacks, "
         "EMNLP 2021, arXiv:2011.10369")


@register("onion", stage="post", level="inference", paper=PAPER)
def onion(threshold: float = 0.0, batch_size: int = 32) -> Callable[..., list[Record]]:
    """`filter(records, *, cfg, params, tokenizer) -> records`: each row's item (its "input",
    else its "prompt") without the words whose removal lowers the reference LM's perplexity by
    more than `threshold` (the paper's default 0)."""
    if batch_size < 1:
        raise DefenseError(f"onion's batch_size must be >= 1, got {batch_size}")

    def apply(records: Sequence[Record], *, cfg: Any, params: dict, tokenizer: Any
              ) -> list[Record]:
        fields = ["input" if r.get("input") else "prompt" for r in records]
        texts = [r[f] for r, f in zip(records, fields, strict=True)]
        kept = onion_filter(texts, cfg=cfg, params=params, tokenizer=tokenizer,
                            threshold=threshold, batch_size=batch_size)
        return [{**r, f: t if t.strip() else r[f]} for r, f, t in
                zip(records, fields, kept, strict=True)]

    return apply
