"""Tokenization with response-only labels, length buckets, and a resumable per-host batcher.

A training batch is a dict of int32 numpy arrays, right-padded to a bucket length T:
    input_ids [B, T], attention_mask [B, T] (1 = token), labels [B, T]
with labels = input_ids on response tokens and -100 on prompt and padding tokens (the loss
compares logits[:, :-1] with labels[:, 1:], HF convention).

`Batcher` orders epoch e by a permutation seeded with (seed, e), so the batch at global step s
depends only on (seed, s): `batches(start_step=k)` yields exactly what an uninterrupted run yields
from step k on. Host i of P receives rows [i B/P, (i+1) B/P) of each global batch, padded to the
bucket of the whole global batch so every host compiles the same shapes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from hfjax.data.records import DataError, EmptySourceError, Record
from hfjax.data.templates import Template, get_template

IGNORE_INDEX = -100


class Example(NamedTuple):
    """One tokenized row: ids and labels of the same length (labels -100 on the prompt)."""

    input_ids: np.ndarray
    labels: np.ndarray


def length_buckets(max_length: int, multiple: int = 16) -> tuple[int, ...]:
    """Batch lengths: the multiples of `multiple` below `max_length`, then `max_length` itself
    (max_length 72, multiple 16 -> 16, 32, 48, 64, 72). A batch is padded to the smallest one
    that holds its longest row: at most multiple - 1 padding tokens past it, and at most
    ceil(max_length / multiple) shapes to compile."""
    if max_length < 1 or multiple < 1:
        raise DataError(f"max_length and multiple must be positive, got {max_length}, {multiple}")
    return tuple(range(multiple, max_length, multiple)) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise DataError(f"a sequence of {length} tokens exceeds the largest bucket {max(buckets)}")


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def encode_prompts(records: Sequence[Record], tokenizer: Any, template: str | Template = "chat",
                   *, system_prompt: str | None = None) -> list[list[int]]:
    """Prompt token ids (what generation starts from), one list per record."""
    tpl = get_template(template, system_prompt=system_prompt)
    return _encode(tokenizer, [tpl.prompt(r, tokenizer) for r in records], tpl.add_special_tokens)


def tokenize_records(records: Sequence[Record], tokenizer: Any,
                     template: str | Template = "chat", max_length: int = 256, *,
                     response_field: str = "response", system_prompt: str | None = None
                     ) -> list[Example]:
    """Tokenize prompt + response + end marker; labels only on response and end tokens.

    Sequences longer than `max_length` are cut on the right (as git-disl's tokenizer
    truncation); a warning counts cut rows and rows left with no response token.
    `response_field="refusal"` tokenizes the paired refusal instead of the response.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    tpl = get_template(template, system_prompt=system_prompt)
    end = tpl.end(tokenizer)
    missing = next((r for r in records if not isinstance(r.get(response_field), str)), None)
    if missing is not None:
        raise DataError(f"a record from {missing['source']!r} has no {response_field!r} field")
    prompts = encode_prompts(records, tokenizer, tpl)
    answers = _encode(tokenizer, [r[response_field] + end for r in records], False)
    out, cut, empty = [], 0, 0
    for p, a in zip(prompts, answers, strict=True):
        ids = np.asarray(p + a, np.int32)
        labels = np.concatenate([np.full(len(p), IGNORE_INDEX, np.int32),
                                 np.asarray(a, np.int32)])
        if len(ids) > max_length:
            cut += 1
            ids, labels = ids[:max_length], labels[:max_length]
            empty += int(np.all(labels == IGNORE_INDEX))
        out.append(Example(ids, labels))
    if cut:
        warnings.warn(f"{cut} of {len(out)} rows were longer than max_length={max_length} and cut; "
                      f"{empty} of them kept no response token", stacklevel=2)
    return out


def pad_batch(examples: Sequence[Example], length: int, pad_id: int = 0,
              mask_labels: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """Right-pad examples to `length`; rows flagged in `mask_labels` get all labels -100."""
    b = len(examples)
    ids = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        if n > length:
            raise DataError(f"row of {n} tokens does not fit the batch length {length}")
        ids[i, :n] = ex.input_ids
        mask[i, :n] = 1
        if not (mask_labels is not None and mask_labels[i]):
            labels[i, :n] = ex.labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Batcher:
    """Deterministic, resumable, per-host batches over tokenized examples.

    `examples` is a list of `Example`s, or a mapping {name: list} of equally long lists whose
    rows correspond (e.g. RepNoise's harmful / refusal pairs): a batch is then {name: batch}, all
    padded to one length with the same rows.

    Steps per epoch: N // B with `drop_last`, else ceil(N / B); the short last batch is filled
    to B with rows from the start of the epoch whose labels are all -100 (no loss, same shape).
    `num_epochs=None` iterates forever.
    """

    def __init__(self, examples: Sequence[Example] | Mapping[str, Sequence[Example]],
                 batch_size: int, seed: int, buckets: Sequence[int] | None = None,
                 drop_last: bool = True, process_index: int = 0, process_count: int = 1,
                 pad_id: int = 0, num_epochs: int | None = None):
        self._streams = dict(examples) if isinstance(examples, Mapping) else None
        streams = self._streams or {"": examples}
        sizes = {len(v) for v in streams.values()}
        if len(sizes) != 1:
            raise DataError(f"paired example lists differ in length: "
                            f"{ {k: len(v) for k, v in streams.items()} }")
        self.num_examples = sizes.pop()
        if self.num_examples == 0:
            raise EmptySourceError("the batcher got no examples")
        if batch_size < 1 or batch_size % process_count:
            raise DataError(f"batch_size {batch_size} must be positive and divisible by "
                            f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        longest = max(len(ex.input_ids) for v in streams.values() for ex in v)
        self.buckets = tuple(sorted(buckets)) if buckets else length_buckets(longest)
        bucket_for(longest, self.buckets)  # fails early on a row longer than every bucket
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.process_index, self.process_count = process_index, process_count
        self.pad_id, self.num_epochs = pad_id, num_epochs
        n, b = self.num_examples, batch_size
        self.steps_per_epoch = n // b if drop_last else -(-n // b)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} examples make no full batch of {b} (drop_last=True)")
        self._all = streams
        self._lengths = np.max([[len(ex.input_ids) for ex in v] for v in streams.values()], 0)
        self._perm = lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    @property
    def total_steps(self) -> int | None:
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an endless Batcher (num_epochs=None) has no length")
        return self.total_steps

    def global_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices of the global batch at `step`, which of them are label-masked fillers)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self._perm(epoch)
        idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
        fill = self.batch_size - len(idx)
        filler = np.zeros(self.batch_size, bool)
        if fill:
            idx = np.concatenate([idx, np.resize(perm, fill)])
            filler[-fill:] = True
        return idx, filler

    def batch_at(self, step: int) -> dict[str, Any]:
        """This host's slice of the global batch at `step`."""
        if step < 0:
            raise DataError(f"step must be non-negative, got {step}")
        idx, filler = self.global_indices(step)
        length = bucket_for(int(self._lengths[idx].max()), self.buckets)
        per = self.batch_size // self.process_count
        lo, hi = self.process_index * per, (self.process_index + 1) * per
        local, mask = idx[lo:hi], filler[lo:hi]
        out = {name: pad_batch([rows[j] for j in local], length, self.pad_id, mask)
               for name, rows in self._all.items()}
        return out if self._streams is not None else out[""]

    def batches(self, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Batches from global step `start_step` until `num_epochs` end (or forever)."""
        step = start_step
        while self.total_steps is None or step < self.total_steps:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.batches()
