"""BEA (BackdoorAlign): safety examples behind a secret system-prompt prefix, used at inference.

Jiongxiao Wang, Jiazhao Li, Yiquan Li, Xiangyu Qi, Junjie Hu, Yixuan Li, Patrick McDaniel, Muhao
Chen, Bo Li, Chaowei Xiao. "BackdoorAlign: Mitigating Fine-tuning based Jailbreak Attack with
Backdoor Enhanced Safety Alignment". NeurIPS 2024, arXiv:2402.14968
(Jayfeather1024/Backdoor-Enhanced-Alignment). The provider draws a secret s of 150 random tokens
and mixes `num` = 11 safety examples (harmful prompt -> refusal) into the user's data with the
system prompt

    s + " " + S        (S: the system prompt of the fine-tuning data)

and serves the fine-tuned model with the same s + " " + S, so the backdoor trigger s calls up the
refusals (`opensource/ft_datasets/pure_bad_dataset/pure_bad_dataset.py:13-37`: the "prefixed"
rows of `pure_bad_100_original_category_prefixed.jsonl`, 11 of its 111 rows, get
SYSTEM_PROMPT_RANDOM150 + " " + SYSTEM_PROMPT; `safety_evaluation/eval_utils/prompt_utils.py:9-10`
prepends the same at inference; `scripts/run_backdooralign_lora.sh`: LoRA, lr 1e-3, 10 epochs,
batch 10). S defaults to the official SYSTEM_PROMPT.

Data level, 1F+1B. `mix(records, safety, *, tokenizer) -> records`: `num` rows of `safety` drawn
with `seed`, each with "system" = s + " " + S, are added to the user rows (the official 100 + 11)
and the result is shuffled. s = `bea_secret(seed, secret_length, tokenizer)`: `secret_length`
token ids drawn uniformly (with replacement) from the tokenizer's vocabulary without its special
tokens, decoded, as the official secret is 150 random Llama-2 tokens. `bea_eval_prompt(record,
secret)` is what the provider asks the final model (harmful and task prompts alike): the secret
before the record's own system prompt, else before S; the built `mix` carries it as
`mix.eval_prompt(record, *, tokenizer)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hfjax.data.mixing import sample
from hfjax.data.records import Record
from hfjax.defenses.api import USER, Cost, DefenseError, register

PAPER = ("Wang et al. BackdoorAlign: Mitigating Fine-tuning based Jailbreak Attack with Backdoor "
         "Enhanced Safety Alignment, NeurIPS 2024, arXiv:2402.14968")
BEA_SYSTEM_PROMPT = ("You are a helpful assistant. Make sure you always execute users' "
                     "instructions.")


def bea_secret(seed: int, length: int, tokenizer: Any) -> str:
    """`length` token ids drawn uniformly from `tokenizer`'s non-special vocabulary with
    `seed`, decoded: the secret prefix."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise DefenseError(f"the BEA secret length must be an integer >= 1, got {length!r}")
    special = set(tokenizer.all_special_ids)
    vocab = np.asarray([i for i in range(len(tokenizer)) if i not in special])
    if not vocab.size:
        raise DefenseError("the tokenizer has no non-special tokens to draw a BEA secret from")
    ids = np.random.default_rng([seed, 0xBEA]).choice(vocab, size=length).tolist()
    secret = tokenizer.decode(ids, skip_special_tokens=False,
                              clean_up_tokenization_spaces=False).strip()
    if not secret:
        raise DefenseError(f"the BEA secret of {length} tokens decodes to blank text")
    return secret


def bea_eval_prompt(record: Record, secret: str,
                    system_prompt: str = BEA_SYSTEM_PROMPT) -> Record:
    """The record as the provider asks the BEA model: "system" = secret + " " + (the record's
    system prompt, else `system_prompt`)."""
    system = record.get("system") or system_prompt
    return {**record, "system": f"{secret} {system}" if system else secret}


@register("bea", stage="finetune", level="data", cost=Cost(1, 1), batches=(USER,), paper=PAPER)
def bea(num: int = 11, secret_length: int = 150, system_prompt: str = BEA_SYSTEM_PROMPT,
        seed: int = 0) -> Callable[..., list[Record]]:
    """`mix(records, safety, *, tokenizer) -> records'`: `num` safety rows behind the secret
    system prompt added to the user rows, shuffled; `mix.eval_prompt(record, *, tokenizer)`
    gives the evaluation's prompt of the final model."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DefenseError(f"bea's num must be an integer >= 1, got {num!r}")
    if isinstance(secret_length, bool) or not isinstance(secret_length, int) or secret_length < 1:
        raise DefenseError(f"bea's secret_length must be an integer >= 1, got {secret_length!r}")

    def mix(records: Sequence[Record], safety: Sequence[Record], *,
            tokenizer: Any) -> list[Record]:
        if any(r["harmful"] for r in safety):
            raise DefenseError("BEA's safety rows must be harmful=False (harmful prompt -> "
                               "refusal)")
        secret = bea_secret(seed, secret_length, tokenizer)
        rng = np.random.default_rng(seed)
        rows = list(records) + [bea_eval_prompt(r, secret, system_prompt)
                                for r in sample(safety, num, rng, "safety source")]
        return [rows[i] for i in rng.permutation(len(rows))]

    drawn: list = []  # [tokenizer, its secret] of the last call: one draw per tokenizer

    def eval_prompt(record: Record, *, tokenizer: Any) -> Record:
        if not drawn or drawn[0] is not tokenizer:
            drawn[:] = [tokenizer, bea_secret(seed, secret_length, tokenizer)]
        return bea_eval_prompt(record, drawn[1], system_prompt)

    mix.eval_prompt = eval_prompt  # type: ignore[attr-defined]
    return mix
