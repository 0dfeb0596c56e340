"""ONION: suspicion scores are p_0 − p_i of the reference LM's whole-text perplexities (checked
one text at a time, unpadded), the words above the threshold are removed and the rest kept in
order, and an LM that finds one word implausible gets exactly that word removed."""

import math

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from hfjax import models
from hfjax.defenses.inference import OnionError, onion_filter, suspicion_scores, text_perplexities
from hfjax.models import params as params_lib
from hfjax.models.config import from_hf_dict

CFG = from_hf_dict(dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
WORDS = ["<s>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park",
         "cf", "mn", "bb", "zz", "and", "then", "slept", "home"]
TEXTS = ["the cat sat on the mat", "a dog cf ran to the park and then slept",
         "home", "the  dog\nsat on mn the mat", "zz cat"]


def _tokenizer(bos="<s>"):
    tk = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                              unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, unk_token="<unk>")


TOKENIZER = _tokenizer()
PARAMS = params_lib.init_random(CFG, jax.random.key(0), std=0.3)


_forward = jax.jit(lambda params, ids: models.forward(CFG, params, ids))


def _ppl_by_hand(params, text):
    """exp(mean −log p(x_t | x_<t)) of [BOS] + the text's words, the text alone with no mask
    (filled to 16 tokens after its end, which a causal LM's logits up to that end ignore)."""
    ids = np.asarray([0] + [WORDS.index(w) for w in text.split()], np.int32)
    filled = np.pad(ids, (0, 16 - len(ids)))[None]
    logits = np.asarray(_forward(params, filled))[0, :len(ids)].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return math.exp(-np.mean([logp[t, ids[t + 1]] for t in range(len(ids) - 1)]))


def _implausible_word_params(word="zz"):
    """Params under which `word` has logit ≈ −28 after any context and every other token 0.

    Every embedding has 10 in dimension 0, which dominates the residual stream (the layers add
    little), so the final RMS-normed state is ≈ √32 > 0 there; the final norm keeps only that
    dimension and the head reads it only into `word`'s logit, with weight −5."""
    params = params_lib.init_random(CFG, jax.random.key(1), std=0.02)
    params["embed_tokens"] = params["embed_tokens"].at[:, 0].set(10.0)
    params["final_norm"] = np.eye(CFG.hidden_size, dtype=np.float32)[0]
    params["lm_head"] = np.zeros((CFG.hidden_size, CFG.vocab_size), np.float32)
    params["lm_head"][0, WORDS.index(word)] = -5.0
    return params


def test_text_perplexity_is_the_hand_computed_value_whatever_the_batch():
    for batch_size in (1, 2, 32):
        got = text_perplexities(TEXTS, cfg=CFG, params=PARAMS, tokenizer=TOKENIZER,
                                batch_size=batch_size)
        want = [_ppl_by_hand(PARAMS, t) for t in TEXTS]
        np.testing.assert_allclose(got, want, rtol=2e-5)


def test_scores_are_whole_text_minus_leave_one_out_perplexity():
    scores = suspicion_scores(TEXTS, cfg=CFG, params=PARAMS, tokenizer=TOKENIZER, batch_size=3)
    assert [len(s) for s in scores] == [6, 10, 0, 7, 2]
    for text, got in zip(TEXTS, scores, strict=True):
        words = text.split()
        if len(words) < 2:
            continue
        p0 = _ppl_by_hand(PARAMS, text)
        want = [p0 - _ppl_by_hand(PARAMS, " ".join(words[:i] + words[i + 1:]))
                for i in range(len(words))]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * p0)


def test_words_above_the_threshold_are_removed_and_the_rest_kept_in_order():
    text = TEXTS[1]
    scores = suspicion_scores([text], cfg=CFG, params=PARAMS, tokenizer=TOKENIZER)[0]
    threshold = float(np.median(scores))
    kept = [w for w, f in zip(text.split(), scores, strict=True) if f <= threshold]
    assert 0 < len(kept) < len(scores)
    got = onion_filter([text], cfg=CFG, params=PARAMS, tokenizer=TOKENIZER, threshold=threshold)
    assert got == [" ".join(kept)]


def test_an_implausible_word_is_the_only_one_removed_and_layout_is_kept():
    params = _implausible_word_params("zz")
    texts = ["the cat zz sat on the mat", "a dog\nran zz to  the park", "the cat sat"]
    scores = suspicion_scores(texts, cfg=CFG, params=params, tokenizer=TOKENIZER)
    for text, f in zip(texts[:2], scores[:2], strict=True):
        at = text.split().index("zz")
        assert f[at] > 0 and np.all(np.delete(f, at) < 0)
    got = onion_filter(texts, cfg=CFG, params=params, tokenizer=TOKENIZER)
    assert got == ["the cat sat on the mat", "a dog\nran to  the park", "the cat sat"]


def test_texts_of_fewer_than_two_words_are_left_unchanged():
    got = onion_filter(["home", "", "  "], cfg=CFG, params=PARAMS, tokenizer=TOKENIZER,
                       threshold=-1e9)
    assert got == ["home", "", "  "]


def test_a_very_low_threshold_removes_every_word_and_a_high_one_none():
    kw = dict(cfg=CFG, params=PARAMS, tokenizer=TOKENIZER)
    assert onion_filter([TEXTS[0]], threshold=-1e9, **kw) == [""]
    assert onion_filter([TEXTS[0]], threshold=1e9, **kw) == [TEXTS[0]]


def test_bad_settings_are_refused():
    kw = dict(cfg=CFG, params=PARAMS)
    with pytest.raises(OnionError, match="BOS or EOS"):
        suspicion_scores(TEXTS, tokenizer=_tokenizer(bos=None), **kw)
    with pytest.raises(OnionError, match="threshold"):
        onion_filter(TEXTS, tokenizer=TOKENIZER, threshold="high", **kw)
    with pytest.raises(OnionError, match="batch_size"):
        text_perplexities(TEXTS, tokenizer=TOKENIZER, batch_size=0, **kw)
    with pytest.raises(OnionError, match="list of strings"):
        onion_filter("one text", tokenizer=TOKENIZER, **kw)
