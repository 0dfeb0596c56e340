"""Deep safety alignment: safety recovery examples that refuse after a harmful start.

Xiangyu Qi, Ashwinee Panda, Kaifeng Lyu, Xiao Ma, Subhrajit Roy, Ahmad Beirami, Prateek Mittal,
Peter Henderson. "Safety Alignment Should Be Made More Than Just a Few Tokens Deep". ICLR 2025,
arXiv:2406.05946, §3 (Unispac/shallow-vs-deep-alignment). For every safety triplet (x a harmful
prompt, h its harmful answer, r a refusal), with probability 1/2 (`augment_prob`):

    prompt x,  prefill h_{≤k} (no loss),  response r (loss)      k ~ U{1, …, min(100, |h|)}

else the plain row x -> r; benign rows, the utility anchor, stay as they are. So the model
learns to steer back to a refusal after up to 100 harmful tokens of its own answer
(`finetuning_buckets/trainer/trainer.py:1023-1035`: toss = randint(0, 1), cutoff =
randint(1, min(100, len(harmful_item))), the harmful tokens labelled −100). The official run
(README, "data augmentation"): 256 triplets, anchor batches of benign rows whose token losses are
averaged with the safety rows' (`trainer.py:984-993`), lr 2e-5, 10 epochs.

Data level, 1F+1B. `augment(records, harmful, *, tokenizer) -> records`: a row of `records` is a
safety row when it is harmful=False and its prompt (`prompt_key`) is the prompt of a row of
`harmful` (harmful prompt -> harmful answer; the first answer of a prompt counts). |h| counts the
tokens of the harmful answer as the tokenizer encodes it alone (no special tokens) and h_{≤k} is
the answer's text up to the end of its k-th token (the tokenizer's offsets: an exact prefix of
the text, no decode round trip). The prefix goes to the record field "prefill": text of the
assistant's turn before "response", which the template renders right after the prompt, so it is
unlabelled and the refusal follows it in the same turn.

Differences from the official code: the coin and k are drawn once per row with `seed` (the
official trainer draws them again each time a batch is built, so each epoch sees a new draw);
|h| excludes the end-of-turn tokens after the answer, which the official label mask counts (a
prefix never holds the end marker); a refusal row whose prompt has no harmful answer in
`harmful` cannot be told from a benign row and stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hfjax.data.records import Record, prompt_key
from hfjax.defenses.api import ALIGN, Cost, DefenseError, register

PAPER = ("Qi et al. Safety Alignment Should Be Made More Than Just a Few Tokens Deep, ICLR 2025, "
         "arXiv:2406.05946")
PREFILL = "prefill"


def token_prefix(text: str, k: int, tokenizer: Any) -> str:
    """`text` up to the end of its k-th token (the tokenizer's character offsets)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = offsets["offset_mapping"]
    if not 1 <= k <= len(spans):
        raise DefenseError(f"cannot cut {k} tokens off an answer of {len(spans)} tokens")
    return text[:spans[k - 1][1]]


def harmful_answers(harmful: Sequence[Record]) -> dict[str, str]:
    """{prompt_key: the first harmful answer of that prompt}."""
    if any(not r["harmful"] for r in harmful):
        raise DefenseError("deep_align's harmful rows must be harmful=True (harmful prompt -> "
                           "harmful answer)")
    out: dict[str, str] = {}
    for r in harmful:
        out.setdefault(prompt_key(r), r["response"])
    return out


@register("deep_align", stage="alignment", level="data", cost=Cost(1, 1), batches=(ALIGN,),
          paper=PAPER)
def deep_align(augment_prob: float = 0.5, max_prefix_tokens: int = 100,
               seed: int = 0) -> Callable[..., list[Record]]:
    """`augment(records, harmful, *, tokenizer) -> records'`: each safety row, with probability
    `augment_prob`, gets the first k ~ U{1..min(max_prefix_tokens, |h|)} tokens of its harmful
    answer as an unlabelled "prefill"; order and length of `records` are kept."""
    if not 0.0 <= augment_prob <= 1.0:
        raise DefenseError(f"deep_align's augment_prob must be in [0, 1], got {augment_prob!r}")
    if isinstance(max_prefix_tokens, bool) or not isinstance(max_prefix_tokens, int) or \
            max_prefix_tokens < 1:
        raise DefenseError(f"deep_align's max_prefix_tokens must be an integer >= 1, got "
                           f"{max_prefix_tokens!r}")

    def augment(records: Sequence[Record], harmful: Sequence[Record], *,
                tokenizer: Any) -> list[Record]:
        answers = harmful_answers(harmful)
        safety = [i for i, r in enumerate(records)
                  if not r["harmful"] and prompt_key(r) in answers]
        if not safety:
            raise DefenseError("deep_align found no safety row: no harmful=False row of the data "
                               "has the prompt of one of the harmful rows")
        rng = np.random.default_rng(seed)
        out = list(records)
        for i in safety:
            if rng.random() >= augment_prob:
                continue
            answer = answers[prompt_key(records[i])]
            n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            if n == 0:
                continue  # an empty harmful answer has no prefix to start from
            k = int(rng.integers(1, min(max_prefix_tokens, n) + 1))
            out[i] = {**records[i], PREFILL: token_prefix(answer, k, tokenizer)}
        return out

    return augment
