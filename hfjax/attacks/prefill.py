"""Prefilling: the inference-time attack of Qi et al., "Safety Alignment Should Be Made More
Than Just a Few Tokens Deep" (ICLR 2025, arXiv:2406.05946, §2; Unispac/shallow-vs-deep-
alignment). An attacker who controls the start of the answer (open weights, or an API that
accepts a partial assistant turn) writes its first k tokens; a model whose alignment is only a
few tokens deep then continues the harmful answer:

    x  ->  prompt x,  prefill h_{≤k},  generate y ~ π(· | x, h_{≤k})      judged: h_{≤k} y

for each harmful evaluation prompt x with a harmful answer h. h_{≤k} is h up to the end of its
k-th token (`hfjax.defenses.alignment.deep_align.token_prefix`: the tokenizer's offsets, an
exact prefix of the text; the whole answer when it has fewer tokens). The prefix goes into the
row's "prefill" field, which the template renders right after the prompt, so decoding continues
it. The judge reads the prefix followed by the continuation (`score="full"`, the official
GPT-4-judge input `res[-2]['content'] + " " + res[-1]['content']`, `logs/prefilling/
gpt_4_judge.ipynb`; hfjax joins the texts as the model's tokens do, without the extra space), or
the continuation alone (`score="continuation"`, what the official keyword evaluator reads,
`finetuning_buckets/inference/safety_eval/evaluator.py:62`).

Harmful answers (`answers`): "response" takes each evaluation row's own response (BeaverTails'
harmful answers, AdvBench's "Sure, here is ..." targets); a row without one is an error.
"affirmative" builds AdvBench's target from the request (`hfjax.data.responses.
affirmative_target`), for prompt sets that carry no answer (the offline default, HarmBench).
The paper prefills a growing number of tokens of the Harmful HEx-PHI answers; the README's run
uses k = 10 (`finetuning_buckets/datasets/utils/get_eval_data.py:164`:
`tokenizer.encode(answer)[:k]`, which counts Llama's BOS among the k, so its k = 10 is 9 answer
tokens; hfjax's k counts answer tokens only). Its decoding samples (top-p 0.6, temperature
0.9, 512 new tokens); hfjax's evaluation is greedy with --max_new_tokens.

Selected with --eval_attack=prefill --eval_attack_hparams=k=10; it applies to every evaluated
model (base, aligned, final), so it combines with any fine-tuning attack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hfjax.attacks.api import INFERENCE, AttackError, register
from hfjax.data.records import Record
from hfjax.data.responses import affirmative_target
from hfjax.defenses.alignment.deep_align import PREFILL, token_prefix

PAPER = ("Qi et al. Safety Alignment Should Be Made More Than Just a Few Tokens Deep, ICLR 2025, "
         "arXiv:2406.05946")
ANSWERS = ("response", "affirmative")
SCORES = ("full", "continuation")


def harmful_answer(record: Record, answers: str) -> str:
    """The harmful answer whose start is prefilled (module docstring)."""
    if answers == "affirmative":
        return affirmative_target(record["prompt"])
    if not record["response"].strip():
        raise AttackError(
            f"prefill: the harmful evaluation row from {record['source']!r} has no answer to "
            f"prefill ({record['prompt'][:80]!r}); use an evaluation set with harmful answers "
            f"(e.g. --harmful_eval_data=advbench:train or beavertails:30k_test) or "
            f"--eval_attack_hparams=answers=affirmative")
    return record["response"]


@register("prefill", paper=PAPER, kind=INFERENCE)
def prefill(k: int = 10, answers: str = "response",
            score: str = "full") -> Callable[..., list[Record]]:
    """`attack(records, *, tokenizer) -> records`: every row with the first k tokens of its
    harmful answer in "prefill"; `attack.score` says what the judge reads."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AttackError(f"prefill: k (tokens to prefill) must be an integer >= 1, got {k!r}")
    if answers not in ANSWERS or score not in SCORES:
        raise AttackError(f"prefill: answers must be one of {ANSWERS} and score one of {SCORES},"
                          f" got {answers!r} and {score!r}")

    def attack(records: Sequence[Record], *, tokenizer: Any) -> list[Record]:
        out = []
        for r in records:
            answer = harmful_answer(r, answers)
            n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            out.append({**r, PREFILL: token_prefix(answer, min(k, n), tokenizer)})
        return out

    attack.score = score  # type: ignore[attr-defined]
    return attack
