"""Judge inputs: (prompt, response) pairs and the BeaverTails QA-moderation text format.

Imports nothing heavier than the standard library, so the torch judge (`hf_classifier`) can be
used from a Python without JAX.
"""

from __future__ import annotations

from collections.abc import Sequence

BEAVERTAILS_PROMPT = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
"""QA-moderation input, PKU-Alignment's `PROMPT_INPUT` ('BEGINNING OF CONVERSATION: ' +
'USER: {input} ' + 'ASSISTANT:'); the response is appended directly (no separator) and
`QAModeration.predict` then appends the tokenizer's EOS token."""


def check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    """Raise ValueError unless prompts and responses are equally long sequences of strings."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ValueError("prompts and responses must be sequences of strings, not one string")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


def qa_moderation_text(prompt: str, response: str) -> str:
    """BEAVERTAILS_PROMPT with the prompt, then the response (EOS is added at tokenization)."""
    return BEAVERTAILS_PROMPT.format(prompt=prompt) + response
