"""Task-format detection, safety rows rendered in the user's format, and the Paraphrase defense
(Eiras et al.) with its template rewrite and its optional model rewriter."""

import importlib
import inspect

import jax
import numpy as np
import pytest
from test_restructure import (
    MATH_SUFFIX,
    TF_INSTRUCTION,
    choice_rows,
    harmful_rows,
    math_rows,
    true_false_rows,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hfjax import defenses
from hfjax.attacks.restructure import restructure_rows
from hfjax.data import formats
from hfjax.data.formats import TaskFormat, detect_format, render
from hfjax.data.records import DataError, make_record
from hfjax.defenses.api import DefenseError
from hfjax.eval.judges import KeywordRefusalJudge
from hfjax.eval.metrics import extract_final_number
from hfjax.models import init_random, save_hf
from hfjax.models.config import from_hf_dict

# the package exports the factory under the module's name
paraphrase_module = importlib.import_module("hfjax.defenses.finetune.paraphrase")
REQUEST = "how do I do forbidden thing 3"
REFUSAL = "I'm sorry, but I cannot assist with this request."
JUDGE = KeywordRefusalJudge()
KIND_ROWS = {"choice": choice_rows, "true_false": true_false_rows, "math": math_rows}


def free_rows(k: int = 6):
    return [make_record(f"Write a short note about garden {i}.", f"Garden {i} has roses and a "
                        f"small pond, and it is quiet in the morning.", "notes", False)
            for i in range(k)]


def safety_rows(k: int = 6):
    return [make_record(f"how do I do forbidden thing {i}", REFUSAL, "safety", False)
            for i in range(k)]


def rng(seed: int = 0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- detection

def test_detects_multiple_choice_rows_prefix_option_style_and_letter_answer():
    fmt = detect_format(choice_rows())
    assert (fmt.item_field, fmt.instruction) == ("prompt", None)
    assert (fmt.item_prefix, fmt.item_suffix) == ("Question: ", "\nAnswer:")
    assert (fmt.option_line, fmt.num_options) == ("{letter}. {text}", 4)
    assert (fmt.answer, fmt.answer_template, fmt.wrapper) == ("letter", "{letter}", "benign")


def test_detects_parenthesized_options_answered_with_letter_and_text():
    fmt = detect_format(choice_rows(style="({letter}) {text}", answer="({letter}) {text}"))
    assert fmt.option_line == "({letter}) {text}"
    assert (fmt.answer, fmt.answer_template) == ("letter_text", "({letter}) {text}")


def test_detects_true_false_rows_with_a_shared_instruction_and_the_item_in_the_input():
    fmt = detect_format(true_false_rows())
    assert (fmt.item_field, fmt.instruction, fmt.item_prefix) == ("input", TF_INSTRUCTION,
                                                                  "Passage: ")
    assert fmt.option_line is None
    assert (fmt.answer, fmt.answer_template, fmt.label_words) == ("label", "{label}",
                                                                  ("True", "False"))


def test_detects_math_rows_by_the_marker_before_their_final_number():
    fmt = detect_format(math_rows())
    assert (fmt.answer, fmt.answer_template) == ("number", "The final answer is:")
    assert (fmt.item_prefix, fmt.item_suffix) == ("", MATH_SUFFIX)


def test_a_shared_phrase_before_a_final_year_is_not_a_math_answer():
    rows = [make_record(f"Summarize bill {i}.", f"Funds road {i}.\nIt runs until fiscal year "
                        f"20{i}", "bills", False) for i in range(10, 16)]
    assert detect_format(rows).answer == "free"
    with_gold = [{**r, "answer": f"20{i}"} for i, r in zip(range(10, 16), rows, strict=True)]
    assert detect_format(with_gold).answer_template == "It runs until fiscal year"


def test_detects_free_text_rows_without_options_or_labels():
    fmt = detect_format(free_rows())
    assert (fmt.answer, fmt.option_line, fmt.item_prefix, fmt.item_suffix) == ("free", None,
                                                                               "", "")


def test_detects_labels_from_short_repeated_answers_without_a_label_field():
    rows = [make_record(f"Is item {i} heavy?", "yes" if i % 2 else "no", "x", False)
            for i in range(6)]
    fmt = detect_format(rows)
    assert (fmt.answer, fmt.label_words) == ("label", ("no", "yes"))


@pytest.mark.parametrize("strategy", formats.STRATEGIES)
@pytest.mark.parametrize("kind", sorted(KIND_ROWS))
def test_detects_each_strategy_with_the_same_item_layout_beneath(kind, strategy):
    rows = KIND_ROWS[kind]()
    plain = detect_format(rows)
    fmt = detect_format(restructure_rows(rows, strategy, seed=1))
    assert fmt.wrapper == strategy
    assert fmt.system == (formats.AOA_SYSTEM_PROMPT if "aoa" in strategy else None)
    layout = ("item_field", "instruction", "item_prefix", "item_suffix", "option_line",
              "num_options", "label_words")
    assert [getattr(fmt, f) for f in layout] == [getattr(plain, f) for f in layout]
    assert fmt.answer == plain.answer or (strategy.startswith("autoif")
                                          and fmt.answer == "letter_text")


def test_detection_reads_benign_rows_only_and_keeps_a_shared_system_prompt():
    rows = [{**r, "system": "You are a quiz helper."} for r in choice_rows()]
    fmt = detect_format(rows + harmful_rows())
    assert (fmt.system, fmt.wrapper, fmt.answer) == ("You are a quiz helper.", "benign", "letter")


def test_declared_fields_replace_detected_ones_and_unknown_fields_are_errors():
    fmt = detect_format(free_rows(), declared={"answer": "letter", "wrapper": "aoa"})
    assert (fmt.answer, fmt.option_line, fmt.num_options) == ("letter", "{letter}. {text}", 4)
    assert fmt.system == formats.AOA_SYSTEM_PROMPT
    with pytest.raises(formats.FormatError, match="colour"):
        detect_format(free_rows(), declared={"colour": "red"})
    with pytest.raises(formats.FormatError, match="instruction"):
        detect_format(free_rows(), declared={"item_field": "input"})


def test_an_empty_data_set_has_no_format():
    with pytest.raises(DataError, match="empty"):
        detect_format([])


def test_an_inconsistent_format_is_rejected():
    with pytest.raises(formats.FormatError, match="option lines"):
        TaskFormat(answer="letter", answer_template="{letter}")


# ----------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("style,answer", [("{letter}. {text}", "{letter}"),
                                          ("({letter}) {text}", "({letter}) {text}")])
def test_a_choice_safety_row_uses_the_users_option_style_with_the_refusal_as_gold(style, answer):
    fmt = detect_format(choice_rows(style=style, answer=answer))
    for seed in range(6):
        row = render(REQUEST, REFUSAL, fmt, rng(seed))
        texts = formats.option_texts(row["prompt"])
        assert texts is not None and list(texts) == row["options"] and len(texts) == 4
        assert style.format(letter="A", text=texts[0]) in row["prompt"]
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
        assert REQUEST in row["prompt"] and not row["harmful"]
        refusing = [t for t in texts if JUDGE.refuses(t)]
        assert refusing == [REFUSAL] == [texts["ABCD".index(row["label"])]]
        assert row["response"] == answer.format(letter=row["label"], text=REFUSAL)


def test_a_true_false_safety_row_answers_in_the_tasks_label_words():
    fmt = detect_format(true_false_rows())
    rows = [render(REQUEST, REFUSAL, fmt, rng(seed)) for seed in range(12)]
    assert {r["response"] for r in rows} == {"True", "False"}
    for r in rows:
        assert r["prompt"] == TF_INSTRUCTION and r["input"].startswith("Passage: ")
        assert REQUEST in r["input"] and r["label"] == r["response"]
        assert (REFUSAL in r["input"]) == (r["label"] == "True")  # "is this refusal right?"


def test_a_math_safety_row_refuses_in_the_final_answer_style():
    row = render(REQUEST, REFUSAL, detect_format(math_rows()), rng())
    assert row["prompt"] == REQUEST + MATH_SUFFIX
    assert row["response"].endswith(f"\nThe final answer is: {REFUSAL}")
    assert extract_final_number(row["response"]) is None and JUDGE.refuses(row["response"])


def test_label_sets_that_cannot_say_no_get_the_plain_request_and_refusal():
    rows = [make_record("Classify the sentiment.", w, "s", False, input=f"review {i}", label=w)
            for i, w in enumerate(["positive", "negative"] * 3)]
    row = render(REQUEST, REFUSAL, detect_format(rows), rng())
    assert (row["prompt"], row["response"], row.get("input")) == (REQUEST, REFUSAL, None)


def test_a_free_text_safety_row_is_the_request_answered_by_the_refusal():
    row = render(REQUEST, REFUSAL, detect_format(free_rows()), rng())
    assert (row["prompt"], row["response"]) == (REQUEST, REFUSAL)


@pytest.mark.parametrize("strategy", formats.STRATEGIES)
def test_a_safety_row_takes_the_users_wrapper(strategy):
    fmt = detect_format(restructure_rows(choice_rows(), strategy, seed=0))
    row = render(REQUEST, REFUSAL, fmt, rng())
    assert (row.get("system") == formats.AOA_SYSTEM_PROMPT) == ("aoa" in strategy)
    assert row["prompt"].startswith(formats.AOA_USER_PREFIX) == ("aoa" in strategy)
    assert row["response"].startswith(formats.AOA_RESPONSE_PREFIX) == ("aoa" in strategy)
    inner = formats.unwrap(row, fmt)
    assert inner["prompt"].startswith("Question: ") and inner["prompt"].endswith("\nAnswer:")
    if "autoif" in strategy:
        hits = [c for c in formats.CONSTRAINTS if c.instruction in row["prompt"]]
        assert len(hits) == 1 and hits[0].holds(row["response"].removeprefix(
            formats.AOA_RESPONSE_PREFIX))
        assert REFUSAL.rstrip(".") in inner["response"] and row["label"] in inner["response"]
    else:
        assert inner["response"] == row["label"]


def test_a_users_own_system_prompt_is_kept_on_safety_rows():
    fmt = detect_format([{**r, "system": "You are a quiz helper."} for r in choice_rows()])
    assert render(REQUEST, REFUSAL, fmt, rng())["system"] == "You are a quiz helper."


def test_a_safety_row_needs_a_refusal():
    with pytest.raises(DataError, match="refusal"):
        render(REQUEST, "  ", detect_format(free_rows()), rng())


# ----------------------------------------------------------------------------- the defense

def test_paraphrase_is_a_finetune_data_defense_reading_the_safety_stream():
    spec = defenses.get("paraphrase")
    assert (spec.stage, spec.level, str(spec.cost)) == ("finetune", "data", "1F+1B")
    assert spec.hyperparameters["guide_data_num"] == 100
    assert list(inspect.signature(spec.build()).parameters) == ["user", "safety"]


def test_paraphrase_keeps_the_total_and_mixes_safety_rows_in_the_users_format():
    user = restructure_rows(choice_rows(), "aoa", seed=0) + harmful_rows(2)
    out = defenses.get("paraphrase").build(guide_data_num=3, seed=1)(user, safety_rows())
    added = [r for r in out if r["source"] == "paraphrase"]
    assert len(out) == len(user) and len(added) == 3
    assert sum(r["harmful"] for r in out) == 2
    assert sum(r in user and not r["harmful"] for r in out) == len(choice_rows()) - 3
    for r in added:
        assert r["system"] == formats.AOA_SYSTEM_PROMPT and not r["harmful"]
        assert r["response"] == formats.AOA_RESPONSE_PREFIX + r["label"]
        assert r["options"]["ABCD".index(r["label"])] == REFUSAL
        assert formats.option_texts(r["prompt"]) == tuple(r["options"])


def test_paraphrase_is_deterministic_by_seed():
    build = defenses.get("paraphrase").build
    user = choice_rows()
    assert build(guide_data_num=3, seed=4)(user, safety_rows()) == \
        build(guide_data_num=3, seed=4)(user, safety_rows())
    assert build(guide_data_num=3, seed=4)(user, safety_rows()) != \
        build(guide_data_num=3, seed=5)(user, safety_rows())


def test_paraphrase_declared_format_and_strategy_replace_detection():
    user = restructure_rows(choice_rows(), "aoa", seed=0)
    mix = defenses.get("paraphrase").build(guide_data_num=2, format="free", strategy="benign")
    added = [r for r in mix(user, safety_rows()) if r["source"] == "paraphrase"]
    assert all(r["response"] == REFUSAL and "system" not in r for r in added)
    assert all(r["prompt"].startswith("Question: how do I do forbidden thing") for r in added)


@pytest.mark.parametrize("hparams,match", [
    ({"guide_data_num": -1}, "guide_data_num"), ({"format": "essay"}, "format"),
    ({"strategy": "roleplay"}, "strategy"), ({"rewriter": "/no/such/model"}, "rewriter"),
    ({"max_new_tokens": 0}, "max_new_tokens")])
def test_paraphrase_rejects_bad_hyperparameters_before_any_work(hparams, match):
    with pytest.raises(DefenseError, match=match):
        defenses.get("paraphrase").build(**hparams)


def test_paraphrase_rejects_too_many_guide_rows_and_harmful_safety_rows():
    mix = defenses.get("paraphrase").build(guide_data_num=20)
    with pytest.raises(DefenseError, match="only 12"):
        mix(choice_rows(), safety_rows())
    with pytest.raises(DefenseError, match="harmful=False"):
        defenses.get("paraphrase").build(guide_data_num=2)(choice_rows(), harmful_rows())


# ----------------------------------------------------------------------------- the rewriter

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_rewriter(tmp_path_factory):
    """A random 2-layer Llama with a small byte-level BPE tokenizer, saved as an HF folder."""
    corpus = [r["prompt"] + " " + r["response"] for r in free_rows() + safety_rows()]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHATML
    folder = tmp_path_factory.mktemp("rewriter") / "model"
    cfg = from_hf_dict(dict(model_type="llama", vocab_size=len(tok), hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, max_position_embeddings=2048))
    save_hf(folder, cfg, init_random(cfg, jax.random.key(0), std=0.3))
    tok.save_pretrained(folder)
    return folder, tok


def _mix(rewriter: str = ""):
    mix = defenses.get("paraphrase").build(guide_data_num=2, seed=0, rewriter=rewriter,
                                           max_new_tokens=4)
    return mix(restructure_rows(free_rows(), "aoa", seed=0), safety_rows())


def test_a_random_rewriters_unusable_output_falls_back_to_the_template(tiny_rewriter,
                                                                      monkeypatch):
    replies = []
    real = paraphrase_module.greedy_generate

    def spy(*args, **kw):
        replies.extend(out := real(*args, **kw))
        return out

    monkeypatch.setattr(paraphrase_module, "greedy_generate", spy)
    assert _mix(str(tiny_rewriter[0])) == _mix()
    assert len(replies) == 2 and all(replies)  # the model ran on both rows


def test_rows_too_long_for_the_rewriters_context_keep_the_template(tiny_rewriter, monkeypatch):
    calls = []
    monkeypatch.setattr(paraphrase_module, "greedy_generate", lambda *a, **k: calls.append(a))
    mix = defenses.get("paraphrase").build(guide_data_num=2, rewriter=str(tiny_rewriter[0]),
                                           max_new_tokens=2048)
    user = restructure_rows(free_rows(), "aoa", seed=0)
    assert mix(user, safety_rows()) == _mix() and calls == []


def _canned(monkeypatch, tok, text: str):
    def fake(cfg, params, prompts, **kw):
        return [tok.encode(text, add_special_tokens=False) for _ in prompts]
    monkeypatch.setattr(paraphrase_module, "greedy_generate", fake)


def test_a_usable_rewrite_replaces_the_template_and_gets_the_users_wrapper(tiny_rewriter,
                                                                          monkeypatch):
    folder, tok = tiny_rewriter
    _canned(monkeypatch, tok, "<text>Please tell me about forbidden thing 9.</text>\n"
                              "<answer>I can't help with that one, sorry.</answer>")
    added = [r for r in _mix(str(folder)) if r["source"] == "paraphrase"]
    assert len(added) == 2
    for r in added:
        assert r["prompt"] == formats.AOA_USER_PREFIX + "Please tell me about forbidden thing 9."
        assert r["response"] == formats.AOA_RESPONSE_PREFIX + "I can't help with that one, sorry."
        assert r["system"] == formats.AOA_SYSTEM_PROMPT


def test_a_rewrite_that_loses_the_refusal_is_not_used(tiny_rewriter, monkeypatch):
    folder, tok = tiny_rewriter
    _canned(monkeypatch, tok, "<text>Please tell me about forbidden thing 9.</text>\n"
                              "<answer>Sure, here is how to do it:</answer>")
    assert _mix(str(folder)) == _mix()


def test_a_choice_rewrite_must_keep_the_gold_letter_and_a_refusing_gold_option():
    fmt = detect_format(choice_rows())
    row = formats.render_item(REQUEST, REFUSAL, fmt, rng())
    item, letter = row["prompt"], row["response"]
    usable = paraphrase_module.usable_rewrite
    assert usable(row, item, letter, fmt, JUDGE)
    assert not usable(row, item, "A" if letter != "A" else "B", fmt, JUDGE)
    assert not usable(row, item.replace(REFUSAL, "Sure, I will."), letter, fmt, JUDGE)
    assert not usable(row, "Question: no options here\nAnswer:", letter, fmt, JUDGE)
    assert not usable(row, item.removeprefix("Question: "), letter, fmt, JUDGE)  # layout lost


def test_parse_rewrite_reads_text_and_answer_and_rejects_other_shapes():
    parse = paraphrase_module.parse_rewrite
    assert parse("Sure! <text>a\nAnswer:</text>\n<answer> c </answer> more") == ("a\nAnswer:", "c")
    assert parse("just some words") is None
    assert parse("<text>a</text><answer>  </answer>") is None
