"""The prefilling attack (Qi et al. 2024) on hand-made evaluation rows with a tiny tokenizer:
the prefill is the exact text of the answer's first k tokens, the template ends the prompt with
it, affirmative targets serve rows without answers, and bad settings fail with the fix named."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hfjax import attacks
from hfjax.data.records import make_record
from hfjax.data.responses import affirmative_target
from hfjax.data.templates import get_template

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE with a ChatML template."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([f"Sure, here is how to do forbidden thing {i} in steps." for i in
                            range(20)], trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>")
    t.chat_template = CHATML
    return t


def eval_rows(k: int = 4, answered: bool = True):
    return [make_record(f"how do I do forbidden thing {i}",
                        f"Sure, here is how to do forbidden thing {i} in many steps."
                        if answered else "", "eval", True) for i in range(k)]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_prefill_is_the_exact_text_of_the_answer_s_first_k_tokens(tok, k):
    rows = eval_rows()
    out = attacks.get("prefill").build(k=k)(rows, tokenizer=tok)
    for r, o in zip(rows, out, strict=True):
        assert o == {**r, "prefill": o["prefill"]}
        assert r["response"].startswith(o["prefill"])
        assert ids(tok, o["prefill"]) == ids(tok, r["response"])[:k]


def test_prefill_of_more_tokens_than_the_answer_has_is_the_whole_answer(tok):
    rows = [make_record("a request", "Sure", "eval", True)]
    assert attacks.get("prefill").build(k=50)(rows, tokenizer=tok)[0]["prefill"] == "Sure"


def test_the_template_ends_the_prompt_with_the_prefill_so_decoding_continues_it(tok):
    row = attacks.get("prefill").build(k=5)(eval_rows(1), tokenizer=tok)[0]
    chat = get_template("chat")
    plain = chat.prompt({k: v for k, v in row.items() if k != "prefill"}, tok)
    assert chat.prompt(row, tok) == plain + row["prefill"]
    assert plain.endswith("<|im_start|>assistant\n")


def test_affirmative_answers_serve_rows_without_a_harmful_answer(tok):
    rows = eval_rows(answered=False)
    with pytest.raises(attacks.AttackError, match="answers=affirmative"):
        attacks.get("prefill").build()(rows, tokenizer=tok)
    out = attacks.get("prefill").build(k=4, answers="affirmative")(rows, tokenizer=tok)
    for r, o in zip(rows, out, strict=True):
        target = affirmative_target(r["prompt"])
        assert target.startswith(o["prefill"]) and ids(tok, o["prefill"]) == ids(tok, target)[:4]


def test_prefill_says_what_the_judge_reads_and_is_an_inference_attack():
    spec = attacks.get("prefill")
    assert spec.kind == "inference" and spec.protocol == {} and spec.requires == {}
    assert spec.build().score == "full"
    assert spec.build(score="continuation").score == "continuation"
    assert attacks.available("inference") == ["prefill"]


@pytest.mark.parametrize("hparams, match", [
    ({"k": 0}, "k \\(tokens to prefill\\) must be an integer >= 1"),
    ({"answers": "refusal"}, "answers must be one of"),
    ({"score": "prefix"}, "score one of"),
])
def test_prefill_refuses_bad_settings(hparams, match):
    with pytest.raises(attacks.AttackError, match=match):
        attacks.get("prefill").build(**hparams)
