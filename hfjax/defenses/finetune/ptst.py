"""PTST (Pure Tuning, Safe Testing): fine-tune without a safety system prompt, serve with it.

Kaifeng Lyu, Haoyu Zhao, Xinran Gu, Dingli Yu, Anirudh Goyal, Sanjeev Arora. "Keeping LLMs
Aligned After Fine-tuning: The Crucial Role of Prompt Templates". NeurIPS 2024, arXiv:2402.18540.
Fine-tuning and testing with the same template loses safety; fine-tuning without the safety
system prompt and testing with it keeps most of it (PTST; the paper's Llama-2-chat runs train
with "chat:vanilla", the chat format without a system prompt, and test with "chat:llama", the
same format with Llama 2's default system prompt below).

Data level, 1F+1B, no extra data. `strip(records) -> records` drops every row's own "system"
field, so the user rows are rendered with the template's default (no safety prompt);
`ptst_eval_prompt(record)` is what the provider asks the final model (harmful and task prompts
alike): the record with "system" = the safety system prompt (`system_prompt`, default
`LLAMA2_SAFETY_SYSTEM_PROMPT`); the built `strip` carries it as `strip.eval_prompt(record)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hfjax.data.records import Record
from hfjax.defenses.api import USER, Cost, DefenseError, register

PAPER = ("Lyu et al. Keeping LLMs Aligned After Fine-tuning: The Crucial Role of Prompt "
         "Templates, NeurIPS 2024, arXiv:2402.18540")
LLAMA2_SAFETY_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n\nIf a question does not make any sense, or is not "
    "factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information.")
"""Llama 2's default system prompt (meta-llama/llama, `llama/generation.py` DEFAULT_SYSTEM_PROMPT
in the first release), the safety prompt of the paper's "chat:llama" template."""


def ptst_eval_prompt(record: Record, system_prompt: str = LLAMA2_SAFETY_SYSTEM_PROMPT) -> Record:
    """The record as the provider asks the PTST model: under the safety system prompt."""
    return {**record, "system": system_prompt}


@register("ptst", stage="finetune", level="data", cost=Cost(1, 1), batches=(USER,), paper=PAPER)
def ptst(system_prompt: str = LLAMA2_SAFETY_SYSTEM_PROMPT) -> Callable[..., list[Record]]:
    """`strip(records) -> records'` without any "system" field; `strip.eval_prompt(record)`
    gives the evaluation's prompt of the final model (under `system_prompt`)."""
    if not isinstance(system_prompt, str) or not system_prompt.strip():
        raise DefenseError(f"ptst's system_prompt must be a non-empty text, got {system_prompt!r}")

    def strip(records: Sequence[Record]) -> list[Record]:
        return [{k: v for k, v in r.items() if k != "system"} for r in records]  # type: ignore

    def eval_prompt(record: Record) -> Record:
        return ptst_eval_prompt(record, system_prompt)

    strip.eval_prompt = eval_prompt  # type: ignore[attr-defined]
    return strip
