"""Tokenization with response-only labels (checked by decoding), buckets, and the resumable,
per-host Batcher."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hfjax import data

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE (exact decode of any text) with a ChatML template."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["The film was wonderful.", "What is 2 plus 2? It is 4.",
                            "I'm sorry, but I can't help with that.", "Below is an instruction"],
                           trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>")
    t.chat_template = CHATML
    return t


RECS = [
    data.make_record("What is 2 plus 2?", "2 plus 2 is 4.", "t", False),
    data.make_record("Analyze the sentiment", "positive", "t", False, input="The film was fun."),
    data.make_record("HARMFUL-PLACEHOLDER-17", "Sure, here is how to HARMFUL-PLACEHOLDER-17:",
                     "t", True, refusal="I'm sorry, but I can't help with that."),
]


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_unmasked_labels_decode_to_the_response_and_end_token(tok, template):
    examples = data.tokenize_records(RECS, tok, template, max_length=256)
    for rec, ex in zip(RECS, examples, strict=True):
        assert ex.input_ids.dtype == np.int32 and ex.labels.shape == ex.input_ids.shape
        keep = ex.labels != data.IGNORE_INDEX
        assert tok.decode(ex.labels[keep]) == rec["response"] + "<|im_end|>"
        assert np.array_equal(ex.labels[keep], ex.input_ids[keep])
        n_prompt = len(data.encode_prompts([rec], tok, template)[0])
        assert not keep[:n_prompt].any() and keep[n_prompt:].all()


def test_prompt_texts_follow_the_templates(tok):
    chat = data.get_template("chat").prompt(RECS[1], tok)
    assert chat == ("<|im_start|>user\nAnalyze the sentiment\n\nThe film was fun.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    alpaca = data.get_template("alpaca").prompt(RECS[1], tok)
    assert alpaca.startswith("Below is an instruction that describes a task, paired with an input")
    assert alpaca.endswith("### Instruction:\nAnalyze the sentiment\n\n### Input:\n"
                           "The film was fun.\n\n### Response:\n")
    no_input = data.get_template("alpaca").prompt(RECS[0], tok)
    assert "### Input" not in no_input and no_input.endswith("### Response:\n")
    system = data.get_template("chat", system_prompt="Be brief.").prompt(RECS[0], tok)
    assert system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert data.get_template("chat").end(tok) == "<|im_end|>"


def test_refusal_field_tokenizes_the_paired_refusal(tok):
    (ex,) = data.tokenize_records(RECS[2:], tok, "chat", response_field="refusal")
    assert tok.decode(ex.labels[ex.labels >= 0]) == RECS[2]["refusal"] + "<|im_end|>"
    with pytest.raises(data.DataError, match="no 'refusal' field"):
        data.tokenize_records(RECS[:1], tok, "chat", response_field="refusal")


def test_template_errors(tok):
    with pytest.raises(data.DataError, match=r"unknown template 'vicuna'.*alpaca"):
        data.get_template("vicuna")
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(data.DataError, match="no chat template"):
        data.tokenize_records(RECS, bare, "chat")


def test_long_rows_are_cut_at_max_length_with_a_warning(tok):
    full = data.tokenize_records(RECS, tok, "alpaca", max_length=4096)
    lengths = sorted(len(e.input_ids) for e in full)
    assert lengths[1] < lengths[2]
    with pytest.warns(UserWarning, match="1 of 3 rows were longer"):
        cut = data.tokenize_records(RECS, tok, "alpaca", max_length=lengths[1])
    for a, b in zip(full, cut, strict=True):
        assert np.array_equal(a.input_ids[:lengths[1]], b.input_ids)
        assert np.array_equal(a.labels[:lengths[1]], b.labels)


def test_length_buckets_are_multiples_below_max_length_then_max_length():
    assert data.length_buckets(72) == (16, 32, 48, 64, 72)
    assert data.length_buckets(64, 32) == (32, 64)
    assert data.length_buckets(10) == (10,)
    with pytest.raises(data.DataError, match="must be positive"):
        data.length_buckets(64, 0)
    assert data.bucket_for(33, (32, 64)) == 64
    with pytest.raises(data.DataError, match="exceeds the largest bucket 64"):
        data.bucket_for(65, (32, 64))


def _fake_examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, a = int(rng.integers(1, 20)), int(rng.integers(1, 40))
        ids = np.arange(1000 * i + 1, 1000 * i + 1 + p + a, dtype=np.int32)
        labels = np.concatenate([np.full(p, -100, np.int32), ids[p:]])
        out.append(data.Example(ids, labels))
    return out


def _row_ids(batch):
    return [int(r[0]) // 1000 for r in batch["input_ids"]]


def test_batches_are_right_padded_into_buckets_with_masked_labels():
    ex = _fake_examples(16)
    b = data.Batcher(ex, batch_size=4, seed=0, buckets=(16, 32, 64), num_epochs=1)
    for batch in b:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert all(v.dtype == np.int32 for v in batch.values())
        t = batch["input_ids"].shape[1]
        lengths = batch["attention_mask"].sum(1)
        assert t in (16, 32, 64) and t == data.bucket_for(int(lengths.max()), (16, 32, 64))
        for row, n in enumerate(lengths):
            mask, labels = batch["attention_mask"][row], batch["labels"][row]
            assert mask[:n].all() and not mask[n:].any()
            assert (labels[n:] == -100).all() and (batch["input_ids"][row, n:] == 0).all()
            src = ex[_row_ids(batch)[row]]
            assert np.array_equal(batch["labels"][row, :n], src.labels)


def test_each_epoch_is_a_seeded_permutation():
    b = data.Batcher(_fake_examples(12), batch_size=4, seed=5, num_epochs=3)
    rows = [_row_ids(x) for x in b]
    assert len(rows) == len(b) == 9
    epochs = [sum(rows[3 * e:3 * e + 3], []) for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = [_row_ids(x) for x in data.Batcher(_fake_examples(12), 4, seed=5, num_epochs=3)]
    other = [_row_ids(x) for x in data.Batcher(_fake_examples(12), 4, seed=6, num_epochs=3)]
    assert rows == again and rows != other


def test_resume_from_a_step_yields_what_an_uninterrupted_run_yields():
    ex = _fake_examples(10)
    full = list(data.Batcher(ex, batch_size=4, seed=1, drop_last=False, num_epochs=4))
    for k in (0, 1, 3, 5, 11):
        resumed = list(data.Batcher(ex, batch_size=4, seed=1, drop_last=False,
                                    num_epochs=4).batches(start_step=k))
        assert len(resumed) == len(full) - k
        for x, y in zip(resumed, full[k:], strict=True):
            assert all(np.array_equal(x[key], y[key]) for key in x)


def test_short_last_batch_is_filled_with_label_masked_rows():
    b = data.Batcher(_fake_examples(10), batch_size=4, seed=0, drop_last=False)
    assert b.steps_per_epoch == 3
    last = b.batch_at(2)
    assert last["input_ids"].shape[0] == 4
    assert (last["labels"][2:] == -100).all() and last["attention_mask"][2:].any(1).all()
    assert (last["labels"][:2] != -100).any(1).all()
    assert data.Batcher(_fake_examples(10), batch_size=4, seed=0).steps_per_epoch == 2


def test_hosts_get_consecutive_slices_of_the_global_batch():
    ex = _fake_examples(24)
    whole = data.Batcher(ex, batch_size=8, seed=2)
    hosts = [data.Batcher(ex, batch_size=8, seed=2, process_index=i, process_count=4)
             for i in range(4)]
    for step in range(6):
        g = whole.batch_at(step)
        parts = [h.batch_at(step) for h in hosts]
        for key in g:
            assert all(p[key].shape == (2, g[key].shape[1]) for p in parts)
            assert np.array_equal(np.concatenate([p[key] for p in parts]), g[key])


def test_paired_streams_share_rows_and_length():
    harm, safe = _fake_examples(8, seed=0), _fake_examples(8, seed=1)
    b = data.Batcher({"harmful": harm, "refusal": safe}, batch_size=4, seed=0, num_epochs=2)
    for batch in b:
        h, s = batch["harmful"], batch["refusal"]
        assert h["input_ids"].shape == s["input_ids"].shape
        lengths = np.maximum(h["attention_mask"].sum(1), s["attention_mask"].sum(1))
        assert h["input_ids"].shape[1] == data.bucket_for(int(lengths.max()), b.buckets)
        assert _row_ids(h) == _row_ids(s)


def test_batcher_errors():
    ex = _fake_examples(6)
    with pytest.raises(data.EmptySourceError):
        data.Batcher([], 2, seed=0)
    with pytest.raises(data.DataError, match="divisible by process_count 4"):
        data.Batcher(ex, 6, seed=0, process_count=4)
    with pytest.raises(data.DataError, match="no full batch"):
        data.Batcher(ex, 8, seed=0)
    with pytest.raises(data.DataError, match="exceeds the largest bucket 8"):
        data.Batcher(ex, 2, seed=0, buckets=(8,))
    with pytest.raises(data.DataError, match="differ in length"):
        data.Batcher({"a": ex, "b": ex[:5]}, 2, seed=0)
    with pytest.raises(TypeError, match="endless"):
        len(data.Batcher(ex, 2, seed=0))


def test_real_smollm2_tokenizer_masks_the_chat_prompt():
    from hfjax import models

    try:
        path = models.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"embedded SmolLM2 not installed ({e}); run scripts/bootstrap.sh")
    tok = models.load_tokenizer(path)
    d = data.default_data(seed=0)
    recs = d.task_train[:4] + d.benign_train[:4] + [data.refusal_row(d.harmful_train[0])]
    for template in ("chat", "alpaca"):
        examples = data.tokenize_records(recs, tok, template, max_length=256)
        for rec, ex in zip(recs, examples, strict=True):
            keep = ex.labels != data.IGNORE_INDEX
            assert tok.decode(ex.labels[keep]) == rec["response"] + "<|im_end|>"
    prompt = tok.decode(data.encode_prompts(recs[:1], tok, "chat")[0])
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")


def test_alpaca_no_newline_ends_the_prompt_at_response_colon_like_the_vaccine_and_lisa_code():
    with_newline = data.get_template("alpaca").prompt(RECS[1])
    without = data.get_template("alpaca_no_newline").prompt(RECS[1])
    assert with_newline.endswith("### Response:\n") and without.endswith("### Response:")
    assert with_newline == without + "\n"


def test_a_record_s_own_system_prompt_is_rendered_by_both_templates_and_wins_over_the_template_s(
        tok):
    rec = data.make_record("What is 2 plus 2?", "4", "t", False, system="You are AOA.")
    chat = data.get_template("chat", system_prompt="Be brief.").prompt(rec, tok)
    assert chat == ("<|im_start|>system\nYou are AOA.<|im_end|>\n<|im_start|>user\n"
                    "What is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")
    alpaca = data.get_template("alpaca").prompt(rec)
    assert alpaca == "You are AOA.\n\n" + data.get_template("alpaca").prompt(RECS[0])
    with pytest.raises(data.DataError, match="unknown record fields"):
        data.make_record("p", "r", "t", False, persona="x")


def test_a_record_s_prefill_ends_the_prompt_unlabelled_and_only_the_response_is_labelled(tok):
    rec = data.make_record("What is 2 plus 2?", "2 plus 2 is 4.", "t", False, prefill="It is")
    for template in ("chat", "alpaca"):
        prompt = data.get_template(template).prompt(rec, tok)
        assert prompt.endswith("It is")
        (ex,) = data.tokenize_records([rec], tok, template, max_length=256)
        assert tok.decode(ex.labels[ex.labels != data.IGNORE_INDEX]) == rec["response"] + \
            "<|im_end|>"
