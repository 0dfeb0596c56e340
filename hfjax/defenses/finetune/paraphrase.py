"""Paraphrase: safety data written in the user's own task format (Eiras et al., "Do as I do
(Safely): Mitigating Task-Specific Fine-tuning Risks in Large Language Models", ICLR 2025,
arXiv:2406.10288).

Plain safety data (`safe_instr_mix`) looks nothing like a restructured task's rows, so the
attack's format keeps its own behaviour. Paraphrase detects the user data's format
(`hfjax.data.formats.detect_format`: instruction, item layout, option style, answer style,
AOA/AutoIF wrapper, system prompt) and writes `guide_data_num` safety rows (harmful request ->
refusal) in it (`formats.render_item`, then the same wrapper), e.g. the request posed as a
multiple-choice item with the refusal as the gold option, inside the same AOA persona. They
replace as many benign user rows, drawn with `seed` (`safe_instr_mix`'s replacement: the total
stays len(user), harmful rows are kept). Cost 1F+1B: only the data change.

Eiras et al. rewrite with an LLM. The template rewrite is the default; `rewriter=PATH` (an HF
model folder hfjax loads) is prompted with two unwrapped user rows and the templated row and
asked for the row in the users' style. Its reply replaces the templated row only when usable: it
parses as "<text>...</text> <answer>...</answer>", keeps the item's prefix and suffix, its
answer still refuses (keyword judge; a math answer keeps its marker) or, where the templated
answer is a bare letter or label, is exactly that answer, and a choice item keeps its option
count with a refusing gold option. Otherwise the templated row stays. The wrapper is applied
after rewriting, so the rows keep the exact persona and prefixes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hfjax.data import formats
from hfjax.data.mixing import sample
from hfjax.data.records import Record
from hfjax.defenses.api import USER, Cost, DefenseError, register
from hfjax.defenses.finetune.safe_instr import safe_instr_mix
from hfjax.eval.generate import greedy_generate
from hfjax.eval.judges import KeywordRefusalJudge

PAPER = ("Eiras et al. Do as I do (Safely): Mitigating Task-Specific Fine-tuning Risks in Large "
         "Language Models, ICLR 2025, arXiv:2406.10288")
PICK_STREAM, RENDER_STREAM, EXAMPLE_STREAM = 1, 2, 3  # seeded streams of the defense's draws

REWRITE_PROMPT = (
    "Here are rows of a fine-tuning data set:\n\n{examples}\n\n"
    "Rewrite the next row so that it reads like the rows above. Keep its meaning: the answer "
    "must still decline the request. Reply with the rewritten row only, as <text>...</text> "
    "then <answer>...</answer>.\n\n{row}")
_REPLY = re.compile(r"<text>(.*?)</text>\s*<answer>(.*?)</answer>", re.DOTALL)


def _row_text(item: str, response: str) -> str:
    return f"<text>{item}</text>\n<answer>{response}</answer>"


def parse_rewrite(output: str) -> tuple[str, str] | None:
    """(item, answer) of a rewriter's "<text>...</text> <answer>...</answer>" reply, or None."""
    m = _REPLY.search(output)
    if m is None or not m[1].strip() or not m[2].strip():
        return None
    return m[1].strip(), m[2].strip()


def _item_field(row: Record, fmt: formats.TaskFormat) -> str:
    return fmt.item_field if fmt.item_field in row else "prompt"


def usable_rewrite(templated: Record, item: str, answer: str, fmt: formats.TaskFormat,
                   judge: KeywordRefusalJudge) -> bool:
    """Whether a rewrite keeps what makes the templated row a safety row (module docstring)."""
    before = templated[_item_field(templated, fmt)]
    prefix, suffix = fmt.item_prefix, fmt.item_suffix
    if before.startswith(prefix) and before.endswith(suffix) and not (
            item.startswith(prefix) and item.endswith(suffix)):
        return False
    gold = templated.get("label", "")
    if templated.get("options"):
        texts = formats.option_texts(item)
        index = ord(gold) - ord("A")
        if texts is None or len(texts) != fmt.num_options or not judge.refuses(texts[index]):
            return False
    if not judge.refuses(templated["response"]):
        return answer == templated["response"].strip()
    return judge.refuses(answer) and (fmt.answer != "number" or fmt.answer_template in answer)


@dataclasses.dataclass
class ModelRewriter:
    """An hfjax-loadable HF model folder that rewrites templated rows (greedy decoding)."""

    path: str
    max_new_tokens: int = 256
    batch_size: int = 8
    _model: tuple[Any, Any, Any] | None = dataclasses.field(default=None, repr=False)

    def _load(self) -> tuple[Any, Any, Any]:
        if self._model is None:
            from hfjax.models.hf_io import load_hf
            from hfjax.models.tokenizer import load_tokenizer

            self._model = (*load_hf(self.path), load_tokenizer(self.path))
        return self._model

    def _encode(self, tokenizer: Any, text: str) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(text)

    def generate(self, prompts: Sequence[str]) -> list[str | None]:
        """Greedy replies; None for a prompt that does not fit the context with the budget."""
        cfg, params, tokenizer = self._load()
        ids = [self._encode(tokenizer, p) for p in prompts]
        eos = tuple(dict.fromkeys(
            [*cfg.eos_token_ids] + ([tokenizer.eos_token_id]
                                    if tokenizer.eos_token_id is not None else [])))
        fits = [i for i, x in enumerate(ids)
                if len(x) + self.max_new_tokens <= cfg.max_position_embeddings]
        out: list[str | None] = [None] * len(prompts)
        for start in range(0, len(fits), self.batch_size):
            chunk = fits[start:start + self.batch_size]
            replies = greedy_generate(cfg, params, [ids[i] for i in chunk],
                                      max_new_tokens=self.max_new_tokens, eos_ids=eos or None,
                                      pad_id=tokenizer.pad_token_id)
            for i, reply in zip(chunk, replies, strict=True):
                out[i] = tokenizer.decode(reply, skip_special_tokens=True)
        return out

    def rewrite(self, rows: Sequence[Record], examples: Sequence[Record],
                fmt: formats.TaskFormat) -> list[Record]:
        """`rows` with each usable rewrite in place of the templated row."""
        shots = "\n\n".join(_row_text(e[_item_field(e, fmt)], e["response"]) for e in examples)
        prompts = [REWRITE_PROMPT.format(examples=shots, row=_row_text(
            r[_item_field(r, fmt)], r["response"])) for r in rows]
        judge, out = KeywordRefusalJudge(), []
        for row, reply in zip(rows, self.generate(prompts), strict=True):
            parsed = parse_rewrite(reply) if reply is not None else None
            if parsed is not None and usable_rewrite(row, *parsed, fmt, judge):
                row = {**row, _item_field(row, fmt): parsed[0], "response": parsed[1]}
            out.append(row)
        return out


def _request(row: Record) -> str:
    inp = row.get("input") or ""
    return f"{row['prompt']}\n\n{inp}" if inp.strip() else row["prompt"]


@register("paraphrase", stage="finetune", level="data", cost=Cost(1, 1), batches=(USER,),
          paper=PAPER)
def paraphrase(guide_data_num: int = 100, seed: int = 0, format: str = "auto",
               strategy: str = "auto", rewriter: str = "",
               max_new_tokens: int = 256) -> Callable[[Sequence[Record], Sequence[Record]],
                                                      list[Record]]:
    """`mix(user, safety) -> user'`: `guide_data_num` safety rows, rendered in the user data's
    format, replace benign user rows.

    format: "auto" (detected) or the answer kind to declare (`formats.ANSWERS`); strategy:
    "auto" or the wrapper to declare (`formats.STRATEGIES`); rewriter: "" (templates only) or
    an HF model folder; max_new_tokens: the rewriter's budget per row.
    """
    n = guide_data_num
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DefenseError(f"guide_data_num must be a non-negative integer, got {n!r}")
    if format != "auto" and format not in formats.ANSWERS:
        raise DefenseError(f"paraphrase: format must be 'auto' or one of {list(formats.ANSWERS)},"
                           f" got {format!r}")
    if strategy != "auto" and strategy not in formats.STRATEGIES:
        raise DefenseError(f"paraphrase: strategy must be 'auto' or one of "
                           f"{list(formats.STRATEGIES)}, got {strategy!r}")
    if rewriter and not Path(rewriter).is_dir():
        raise DefenseError(f"paraphrase: rewriter model folder {rewriter!r} does not exist")
    if max_new_tokens < 1:
        raise DefenseError(f"paraphrase: max_new_tokens must be >= 1, got {max_new_tokens}")
    declared = {k: v for k, v in (("answer", format), ("wrapper", strategy)) if v != "auto"}
    model = ModelRewriter(rewriter, max_new_tokens) if rewriter else None

    def mix(user: Sequence[Record], safety: Sequence[Record]) -> list[Record]:
        benign = [r for r in user if not r["harmful"]]
        if guide_data_num > len(benign):
            raise DefenseError(f"cannot replace {guide_data_num} benign rows: the user data has "
                               f"only {len(benign)}")
        if any(r["harmful"] for r in safety):
            raise DefenseError("safety rows must be harmful=False (harmful prompt -> refusal)")
        fmt = formats.detect_format(user, declared)
        picked = sample(safety, guide_data_num, np.random.default_rng([seed, PICK_STREAM]),
                        "safety source")
        rng = np.random.default_rng([seed, RENDER_STREAM])
        rows = [formats.render_item(_request(r), r["response"], fmt, rng) for r in picked]
        if model is not None and rows:
            shots = np.random.default_rng([seed, EXAMPLE_STREAM]).choice(
                len(benign), min(2, len(benign)), replace=False)
            rows = model.rewrite(rows, [formats.unwrap(benign[i], fmt) for i in shots], fmt)
        rows = [formats.apply_strategy(r, fmt.wrapper, rng, fmt.system) for r in rows]
        return safe_instr_mix(guide_data_num=guide_data_num, seed=seed)(user, rows)

    return mix
