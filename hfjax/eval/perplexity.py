"""Perplexity of reference responses under a model: the completion tasks' metric.

    PPL = exp( Σ_i Σ_t m_it · (−log p_θ(y_i,t+1 | y_i,≤t)) / Σ_i Σ_t m_it )

over the response tokens (m = 1 where the label is not −100, `hfjax.data.tokenize_records`) of
every example: a corpus-level perplexity (the token-weighted mean NLL, then exp), as
Hugging Face's perplexity guide and lm-eval's `word_perplexity` aggregate, not a mean of
per-example perplexities. Teacher forcing, no sampling; the adapter (LoRA) applied unmerged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.data.batching import Example, bucket_for, length_buckets, pad_batch
from hfjax.models import forward
from hfjax.models.config import ModelConfig
from hfjax.train.loss import token_cross_entropy


@functools.partial(jax.jit, static_argnums=0)
def _nll_sums(cfg: ModelConfig, params: dict, lora, prefix, batch: dict
              ) -> tuple[jax.Array, jax.Array]:
    logits = forward(cfg, params, batch["input_ids"], batch["attention_mask"], lora=lora,
                     prefix=prefix)
    _, aux = token_cross_entropy(logits, batch["labels"])
    return aux["loss_sum"], aux["tokens"]


def nll_sums(cfg: ModelConfig, params: dict, examples: Sequence[Example], *, lora=None,
             prefix=None, batch_size: int = 8, pad_id: int = 0, multiple: int = 16
             ) -> tuple[float, int]:
    """(Σ response-token NLL, number of response tokens) over `examples`, batched by length
    (padded to multiples of `multiple`, so few shapes compile)."""
    if not examples:
        raise ValueError("no examples to score")
    longest = max(len(ex.input_ids) for ex in examples)
    buckets = length_buckets(longest, multiple)
    order = np.argsort([len(ex.input_ids) for ex in examples], kind="stable")
    total, tokens = 0.0, 0
    for s in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[s:s + batch_size]]
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # one batch shape; repeats masked
        length = bucket_for(max(len(ex.input_ids) for ex in chunk), buckets)
        real = min(batch_size, len(order) - s)
        batch = pad_batch(chunk, length, pad_id, mask_labels=[i >= real for i in range(len(chunk))])
        loss_sum, n = _nll_sums(cfg, params, lora, prefix,
                                {k: jnp.asarray(v) for k, v in batch.items()})
        total += float(loss_sum)
        tokens += int(n)
    return total, tokens


def perplexity(cfg: ModelConfig, params: dict, examples: Sequence[Example], *, lora=None,
               prefix=None, batch_size: int = 8, pad_id: int = 0) -> float:
    """Corpus perplexity of the examples' response tokens (module docstring); the adapter
    (a LoRA or a prefix) applied unmerged."""
    total, tokens = nll_sums(cfg, params, examples, lora=lora, prefix=prefix,
                             batch_size=batch_size, pad_id=pad_id)
    if tokens == 0:
        raise ValueError("the examples have no response tokens to score")
    return math.exp(total / tokens)
