"""ONION: outlier-word removal from inputs at inference (Qi et al. 2021, "ONION: A Simple and
Effective Defense Against Textual Backdoor Attacks", EMNLP 2021, arXiv:2011.10369; official code
thunlp/ONION, also in thunlp/OpenBackdoor).

A trigger word is out of place, so dropping it makes the text more fluent. For a text of words
w_1..w_n (whitespace-separated) and a reference LM with perplexity PPL:

    p_0 = PPL(w_1 .. w_n),   p_i = PPL(w_1 .. w_{i-1} w_{i+1} .. w_n),   f_i = p_0 − p_i

and every word with f_i > threshold is removed; the rest stay in order, each after the whitespace
that preceded it in the original (the text's ends stripped). `threshold` 0 is the official code's
default `bar`; that code removes f_i >= bar, the paper says "larger than": hfjax removes
f_i > threshold. Texts of fewer than two words are left as they are (the official code drops
them from the data set).

PPL(s) = exp(mean_t −log p(s_t | s_<t)) over every token of `tokenizer(s)` (no special tokens),
each predicted after a start token: the tokenizer's BOS, else its EOS (GPT-2, the paper's
reference LM, has only <|endoftext|>). The reference LM is any hfjax model (cfg, params, an
optional LoRA). All n + 1 variants of all texts are scored together, sorted by length, in
batches of `batch_size` right-padded to multiples of 16 tokens, so a text of n words costs n + 1
sequence scorings.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.data.batching import bucket_for, length_buckets
from hfjax.errors import UserError
from hfjax.models import forward
from hfjax.models.config import ModelConfig, at_least_float32

PAPER = ("Qi et al. ONION: A Simple and Effective Defense Against Textual Backdoor Attacks, "
         "EMNLP 2021, arXiv:2011.10369")
PAD_MULTIPLE = 16


class OnionError(UserError, ValueError):
    """Bad input or settings for the ONION filter."""


@functools.partial(jax.jit, static_argnums=0)
def _nll_rows(cfg: ModelConfig, params: dict, lora, input_ids: jax.Array,
              attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: (Σ −log p(x_t | x_<t) over the real tokens t ≥ 1, number of those tokens)."""
    logits = forward(cfg, params, input_ids, attention_mask, lora=lora)[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(at_least_float32(logits.dtype)), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    mask = attention_mask[:, 1:]
    return jnp.sum(jnp.where(mask > 0, nll, 0.0), axis=1), jnp.sum(mask, axis=1)


def _start_token(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    raise OnionError("ONION needs a tokenizer with a BOS or EOS token to start every text")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OnionError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise OnionError("texts must be a list of strings")


def text_perplexities(texts: Sequence[str], *, cfg: ModelConfig, params: dict, tokenizer: Any,
                      lora=None, batch_size: int = 32) -> np.ndarray:
    """PPL of each whole text (module docstring), float64 [len(texts)]; NaN for a text with no
    tokens."""
    _check_texts(texts)
    _check_batch_size(batch_size)
    if not texts:
        return np.zeros(0)
    start = _start_token(tokenizer)
    rows = [[start, *ids] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    buckets = length_buckets(max(len(r) for r in rows), PAD_MULTIPLE)
    order = np.argsort([len(r) for r in rows], kind="stable")
    nll, count = np.zeros(len(rows)), np.zeros(len(rows))
    for s in range(0, len(order), batch_size):
        index = order[s:s + batch_size]
        length = bucket_for(max(len(rows[i]) for i in index), buckets)
        ids = np.zeros((batch_size, length), np.int32)  # short last batch: empty rows
        mask = np.zeros((batch_size, length), np.int32)
        for j, i in enumerate(index):
            ids[j, :len(rows[i])] = rows[i]
            mask[j, :len(rows[i])] = 1
        sums, tokens = _nll_rows(cfg, params, lora, jnp.asarray(ids), jnp.asarray(mask))
        nll[index] = np.asarray(sums, np.float64)[:len(index)]
        count[index] = np.asarray(tokens)[:len(index)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.exp(nll / np.maximum(count, 1)), np.nan)


def _word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def _keep_words(text: str, spans: Sequence[tuple[int, int]], keep: Sequence[int]) -> str:
    """The kept words of `text`, each after the whitespace that preceded it there."""
    parts = []
    for j, i in enumerate(keep):
        if j:
            parts.append(text[spans[i - 1][1]:spans[i][0]])
        parts.append(text[spans[i][0]:spans[i][1]])
    return "".join(parts)


def suspicion_scores(texts: Sequence[str], *, cfg: ModelConfig, params: dict, tokenizer: Any,
                     lora=None, batch_size: int = 32) -> list[np.ndarray]:
    """f_i = p_0 − p_i for every word of every text (module docstring): one float64 array per
    text, one entry per whitespace-separated word; empty for texts of fewer than two words."""
    _check_texts(texts)
    variants, sizes = [], []
    for text in texts:
        spans = _word_spans(text)
        n = len(spans) if len(spans) >= 2 else 0
        sizes.append(n)
        if n:
            variants.append(_keep_words(text, spans, range(n)))
            variants += [_keep_words(text, spans, [j for j in range(n) if j != i])
                         for i in range(n)]
    ppl = text_perplexities(variants, cfg=cfg, params=params, tokenizer=tokenizer, lora=lora,
                            batch_size=batch_size)
    scores, at = [], 0
    for n in sizes:
        scores.append(ppl[at] - ppl[at + 1:at + 1 + n] if n else np.zeros(0))
        at += n + 1 if n else 0
    return scores


def onion_filter(texts: Sequence[str], *, cfg: ModelConfig, params: dict, tokenizer: Any,
                 threshold: float = 0.0, lora=None, batch_size: int = 32) -> list[str]:
    """Each text without its words of suspicion f_i > threshold (module docstring)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or \
            np.isnan(threshold):
        raise OnionError(f"threshold must be a number, got {threshold!r}")
    scores = suspicion_scores(texts, cfg=cfg, params=params, tokenizer=tokenizer, lora=lora,
                              batch_size=batch_size)
    out = []
    for text, f in zip(texts, scores, strict=True):
        if not len(f):
            out.append(text)
            continue
        spans = _word_spans(text)
        out.append(_keep_words(text, spans, [i for i in range(len(spans)) if not f[i] > threshold]))
    return out
