"""Tokenizers from GGUF metadata and local HF folders, offline.

SmolLM2's GGUF tokenizer is checked against the ids HF transformers produced for the same file
(tests/fixtures/smollm2/golden.json, scripts/make_smollm2_fixture.py); tiny synthetic GGUFs
check the byte-level BPE rebuild (merges, special tokens, BOS) and the error paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hfjax.models import embedded
from hfjax.models.tokenizer import (
    TokenizerError,
    TokenizerNotFoundError,
    load_tokenizer,
    tokenizer_from_gguf,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "smollm2" / "golden.json"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        path = embedded.default_model_path()
    except embedded.DefaultModelNotFoundError as e:
        pytest.skip(f"embedded SmolLM2 GGUF not installed; run `{embedded.BOOTSTRAP}` ({e})")
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def golden():
    with open(FIXTURE) as f:
        return json.load(f)


def test_smollm2_gguf_tokenizer_matches_transformers_on_test_strings(smollm2_tokenizer, golden):
    for text, ids in zip(golden["tokenizer_texts"], golden["tokenizer_ids"], strict=True):
        assert smollm2_tokenizer(text)["input_ids"] == ids, repr(text)


def test_smollm2_chat_template_is_chatml_from_gguf_metadata(smollm2_tokenizer, golden):
    tok = smollm2_tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    messages = [{"role": "user", "content": golden["prompt"]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == golden["chat_text"]
    assert text.endswith("<|im_start|>assistant\n")


def test_smollm2_special_tokens_and_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert len(tok) == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
    )
    assert tok("<|im_start|>user<|im_end|>")["input_ids"] == [1, 4093, 2]
    assert tok("hello")["input_ids"] == [28120]  # no BOS: the GGUF says add_bos_token = false


def test_smollm2_decode_round_trips_unicode(smollm2_tokenizer):
    text = "naïve café: 東京 → 🙂 (tabs\tand\nnewlines)"
    ids = smollm2_tokenizer(text)["input_ids"]
    assert smollm2_tokenizer.decode(ids) == text


def test_saved_tokenizer_reloads_from_hf_folder_with_same_ids(smollm2_tokenizer, tmp_path, golden):
    smollm2_tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.chat_template == smollm2_tokenizer.chat_template
    for text, ids in zip(golden["tokenizer_texts"], golden["tokenizer_ids"], strict=True):
        assert reloaded(text)["input_ids"] == ids, repr(text)


# ----------------------------------------------------------------------------- tiny GGUFs


def _tiny_tokenizer_gguf(path: Path, *, model: str = "gpt2", pre: str = "gpt2",
                         add_bos: bool = True, with_tokenizer: bool = True) -> Path:
    """Byte alphabet + 'he','hel','hell','hello' merges + control tokens <s> (1) and </s> (2)."""
    w = gguf.GGUFWriter(str(path), "llama")
    if with_tokenizer:
        alphabet = [bytes_to_unicode()[b] for b in range(256)]
        tokens = ["<unk>", "<s>", "</s>", *alphabet, "he", "hel", "hell", "hello"]
        types = [3, 3, 3] + [1] * (len(tokens) - 3)
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(["h e", "he l", "hel l", "hell o"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(add_bos)
        w.add_chat_template("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_tokenizer_applies_merges_specials_and_bos(tmp_path):
    tok = load_tokenizer(_tiny_tokenizer_gguf(tmp_path / "t.gguf"))
    byte_id = lambda ch: 3 + ord(ch)  # noqa: E731  (token 3 + b is byte b)
    hello = 3 + 256 + 3
    # BOS, the fully merged "hello", the byte-level space "Ġ" (no merge), h, i, the control </s>
    assert tok("hello hi</s>")["input_ids"] == [1, hello, byte_id(" "), byte_id("h"),
                                               byte_id("i"), 2]
    assert tok.convert_ids_to_tokens(byte_id(" ")) == "\u0120"
    ids = tok("hello hi</s>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello hi"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[x]"


def test_tiny_gguf_tokenizer_without_bos_flag_adds_no_bos(tmp_path):
    tok = tokenizer_from_gguf(_tiny_tokenizer_gguf(tmp_path / "t.gguf", add_bos=False))
    assert tok("hello")["input_ids"] == [3 + 256 + 3]


def test_gguf_without_tokenizer_metadata_is_an_error(tmp_path):
    path = _tiny_tokenizer_gguf(tmp_path / "t.gguf", with_tokenizer=False)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(path)


def test_sentencepiece_gguf_tokenizer_is_rejected_with_advice(tmp_path):
    path = _tiny_tokenizer_gguf(tmp_path / "t.gguf", model="llama")
    with pytest.raises(TokenizerError, match="'llama' is not supported.*HF tokenizer files"):
        load_tokenizer(path)


def test_unknown_pre_tokenizer_is_rejected(tmp_path):
    path = _tiny_tokenizer_gguf(tmp_path / "t.gguf", pre="some-new-model")
    with pytest.raises(TokenizerError, match="'some-new-model'"):
        load_tokenizer(path)


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_folder_without_tokenizer_files_raises_file_not_found(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_file_that_is_neither_folder_nor_gguf_is_an_error(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="neither"):
        load_tokenizer(path)
