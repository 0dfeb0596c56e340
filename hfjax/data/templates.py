"""Prompt templates, selectable by name: "alpaca" (the protocol's), "alpaca_no_newline" and
"chat" (the tokenizer's).

A template turns a record into the prompt text (everything the model reads before it answers)
and names the text that ends an answer. Training tokenizes prompt and `response + end`
separately and concatenates the ids, so the label boundary is exact and the prompt ids are the
ones generation starts from.

alpaca  git-disl's Alpaca template as the Booster and Antidote code trains it ("### Response:\\n").
        The input block appears only when the record has an "input"; a record's own "system"
        text comes first, followed by a blank line. Prompt tokenized with the tokenizer's special
        tokens (BOS where it adds one); the answer ends with the EOS token.
alpaca_no_newline
        the same text ending at "### Response:" (no newline), as the Vaccine and Lisa code (and
        Stanford Alpaca) train and evaluate.
chat    `tokenizer.apply_chat_template([system?, user], add_generation_prompt=True)`; the user
        turn is the prompt, then a blank line and the input when there is one. The answer ends with
        the template's end-of-turn marker (ChatML: <|im_end|>), found by rendering a conversation
        with a sentinel answer and taking what the template writes after it. A record's own
        "system" text replaces the template's system prompt.

Both end the prompt with a record's "prefill" (the start of the assistant's turn, unlabelled).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from hfjax.data.records import DataError, Record

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_SENTINEL = "\u2063HFJAX-SENTINEL\u2063"


class Template(Protocol):
    name: str
    add_special_tokens: bool  # passed to the tokenizer when encoding the prompt text

    def prompt(self, record: Record, tokenizer: Any) -> str: ...

    def end(self, tokenizer: Any) -> str: ...


def _eos(tokenizer: Any) -> str:
    if not tokenizer.eos_token:
        raise DataError("the tokenizer has no EOS token to end answers with")
    return tokenizer.eos_token


@dataclasses.dataclass(frozen=True)
class AlpacaTemplate:
    name: str = "alpaca"
    add_special_tokens: bool = True
    newline: bool = True  # after "### Response:"

    def prompt(self, record: Record, tokenizer: Any = None) -> str:
        inp = record.get("input") or ""
        if inp.strip():
            text = ALPACA_PROMPT_INPUT.format(instruction=record["prompt"], input=inp)
        else:
            text = ALPACA_PROMPT_NO_INPUT.format(instruction=record["prompt"])
        if record.get("system"):
            text = f"{record['system']}\n\n{text}"
        text = text if self.newline else text.removesuffix("\n")
        return text + record.get("prefill", "")

    def end(self, tokenizer: Any) -> str:
        return _eos(tokenizer)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    system_prompt: str | None = None
    name: str = "chat"
    add_special_tokens: bool = False  # the chat template writes any BOS itself

    def _messages(self, user: str, system: str | None = None) -> list[dict[str, str]]:
        system = system or self.system_prompt
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": user}]

    def _check(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; use template='alpaca'")

    def prompt(self, record: Record, tokenizer: Any) -> str:
        self._check(tokenizer)
        inp = record.get("input") or ""
        user = f"{record['prompt']}\n\n{inp}" if inp.strip() else record["prompt"]
        return tokenizer.apply_chat_template(self._messages(user, record.get("system")),
                                             add_generation_prompt=True, tokenize=False
                                             ) + record.get("prefill", "")

    def end(self, tokenizer: Any) -> str:
        self._check(tokenizer)
        text = tokenizer.apply_chat_template(
            self._messages("hi") + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
        if _SENTINEL not in text:
            raise DataError("the chat template does not render the assistant turn")
        end = text.split(_SENTINEL, 1)[1].rstrip()
        return end or _eos(tokenizer)


TEMPLATES = ("alpaca", "alpaca_no_newline", "chat")


def get_template(name: str | Template, *, system_prompt: str | None = None) -> Template:
    """A template by name (`TEMPLATES`); a template object is returned as is."""
    if not isinstance(name, str):
        return name
    if name in ("alpaca", "alpaca_no_newline"):
        if system_prompt is not None:
            raise DataError("the alpaca template has no system prompt")
        return AlpacaTemplate(name, newline=name == "alpaca")
    if name == "chat":
        return ChatTemplate(system_prompt)
    raise DataError(f"unknown template {name!r}; known templates: {list(TEMPLATES)}")
