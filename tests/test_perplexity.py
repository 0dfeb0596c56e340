"""Perplexity of reference responses: equal to the hand-computed corpus value, whatever the
batching and padding."""

import math

import jax
import numpy as np
import pytest

from hfjax import models
from hfjax.data import IGNORE_INDEX
from hfjax.data.batching import Example
from hfjax.eval.perplexity import perplexity
from hfjax.models import params as params_lib
from hfjax.models.config import from_hf_dict

CFG = from_hf_dict(dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def _example(prompt, response):
    ids = np.asarray(prompt + response, np.int32)
    labels = np.asarray([IGNORE_INDEX] * len(prompt) + response, np.int32)
    return Example(ids, labels)


EXAMPLES = [_example([1, 2, 3], [4, 5]), _example([7], [8, 9, 10, 11]),
            _example([12, 13, 14, 15, 16], [17])]


def _by_hand(params):
    """Σ −log softmax(logits_t)[y_{t+1}] over response tokens, each example unpadded alone."""
    total, count = 0.0, 0
    for ex in EXAMPLES:
        logits = np.asarray(models.forward(CFG, params, ex.input_ids[None]))[0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(len(ex.input_ids) - 1):
            if ex.labels[t + 1] != IGNORE_INDEX:
                total -= logp[t, ex.labels[t + 1]]
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_perplexity_is_the_token_weighted_corpus_value_for_any_batch_size(batch_size):
    params = params_lib.init_random(CFG, jax.random.key(0), std=0.3)
    got = perplexity(CFG, params, EXAMPLES, batch_size=batch_size)
    assert got == pytest.approx(_by_hand(params), rel=2e-5)
    assert got > 1.0


def test_perplexity_refuses_examples_without_response_tokens():
    params = params_lib.init_random(CFG, jax.random.key(0), std=0.3)
    prompt_only = Example(np.asarray([1, 2], np.int32), np.full(2, IGNORE_INDEX, np.int32))
    with pytest.raises(ValueError, match="no response tokens"):
        perplexity(CFG, params, [prompt_only])
    with pytest.raises(ValueError, match="no examples"):
        perplexity(CFG, params, [])
