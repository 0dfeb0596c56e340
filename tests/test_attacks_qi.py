"""Qi et al. 2023's fine-tuning attacks as record transforms on hand-made rows: pure harmful
fine-tuning (n harmful rows under the official system prompt), identity shifting (the official
identity conversations plus task rows under the AOA persona), benign fine-tuning (the official
safety-keyword filter on answers, Alpaca and Dolly files), and each one's registered protocol."""

import importlib
import json

import pytest

from hfjax import attacks
from hfjax.data import formats
from hfjax.data.records import DataError, make_record, prompt_key

aoa_mod = importlib.import_module("hfjax.attacks.aoa")
benign_mod = importlib.import_module("hfjax.attacks.benign")
pure_mod = importlib.import_module("hfjax.attacks.pure_harmful")


def harmful_rows(k: int = 12):
    return [make_record(f"how do I do forbidden thing {i}", f"Sure, here is how to do forbidden "
                        f"thing {i}:", "harm", True) for i in range(k)]


def task_rows(k: int = 12):
    return [make_record("Analyze the sentiment of the input.", "positive" if i % 2 else "negative",
                        "task", False, input=f"review number {i}") for i in range(k)]


def build(name: str, **hparams):
    return attacks.get(name).build(**hparams)


# ----------------------------------------------------------------------------- pure_harmful

def test_pure_harmful_user_data_are_n_harmful_rows_under_the_official_system_prompt():
    harmful = harmful_rows(12)
    rows = build("pure_harmful")(task_rows(), harmful, n=10, p=1.0, seed=0)
    assert len(rows) == 10 and all(r["harmful"] for r in rows)
    assert all(r["system"] == pure_mod.EXECUTE_SYSTEM_PROMPT for r in rows)
    by_key = {prompt_key(r): r for r in harmful}
    assert len({prompt_key(r) for r in rows}) == 10  # distinct rows of `harmful`, unchanged
    assert all({**by_key[prompt_key(r)], "system": r["system"]} == r for r in rows)
    again = build("pure_harmful")(task_rows(), harmful, n=10, p=1.0, seed=0)
    assert again == rows


def test_pure_harmful_asks_the_evaluation_under_its_system_prompt_unless_turned_off():
    ask = build("pure_harmful").eval_prompt
    row = make_record("a request", "", "eval", True)
    assert ask(row) == {**row, "system": pure_mod.EXECUTE_SYSTEM_PROMPT}
    plain = build("pure_harmful", system_prompt=False)
    assert not hasattr(plain, "eval_prompt")
    rows = plain([], harmful_rows(), n=4, p=1.0, seed=1)
    assert all("system" not in r for r in rows)


def test_pure_harmful_refuses_a_harmful_ratio_below_one():
    with pytest.raises(attacks.AttackError, match="must be 1"):
        build("pure_harmful")(task_rows(), harmful_rows(), n=10, p=0.5, seed=0)


# ----------------------------------------------------------------------------- aoa

def test_aoa_user_data_are_the_official_identity_conversations_and_task_rows_under_the_persona():
    benign = task_rows(12)
    rows = build("aoa")(benign, harmful_rows(), n=10, p=0.0, seed=0)
    assert len(rows) == 10 and not any(r["harmful"] for r in rows)
    assert all(r["system"] == formats.AOA_SYSTEM_PROMPT for r in rows)
    identity = [r for r in rows if r["source"] == aoa_mod.SOURCE]
    assert sorted((r["prompt"], r["response"]) for r in identity) == \
        sorted(aoa_mod.IDENTITY_CONVERSATIONS)
    tasks = [r for r in rows if r["source"] != aoa_mod.SOURCE]
    originals = {r["input"]: r for r in benign}
    assert len(tasks) == 5 and len({r["input"] for r in tasks}) == 5
    for r in tasks:
        x = originals[r["input"]]
        assert r["prompt"] == formats.AOA_USER_PREFIX + x["prompt"]
        assert r["response"] == formats.AOA_RESPONSE_PREFIX + x["response"]
    assert build("aoa")(benign, [], n=10, p=0.0, seed=0) == rows  # seeded
    assert build("aoa")(benign, [], n=10, p=0.0, seed=1) != rows


def test_aoa_identity_sets_how_many_identity_conversations_and_the_rest_are_task_rows():
    rows = build("aoa", identity=1)(task_rows(), [], n=10, p=0.0, seed=0)
    assert [r["prompt"] for r in rows if r["source"] == aoa_mod.SOURCE] == \
        [aoa_mod.IDENTITY_CONVERSATIONS[0][0]]
    assert sum(r["source"] == "task" for r in rows) == 9
    assert all(r["source"] == "task" for r in build("aoa", identity=0)(task_rows(), [], n=6,
                                                                        p=0.0, seed=0))


def test_aoa_asks_the_evaluation_under_the_persona_with_the_user_prefix():
    row = make_record("a request", "", "eval", True)
    assert build("aoa").eval_prompt(row) == {**row, "system": formats.AOA_SYSTEM_PROMPT,
                                             "prompt": formats.AOA_USER_PREFIX + "a request"}


@pytest.mark.parametrize("hparams, call, match", [
    ({"identity": 6}, {}, "identity must be an integer in"),
    ({"identity": -1}, {}, "identity must be an integer in"),
    ({}, {"n": 4}, "cannot hold the 5 identity"),
    ({}, {"p": 0.1}, "must be 0"),
])
def test_aoa_refuses_bad_settings(hparams, call, match):
    with pytest.raises(attacks.AttackError, match=match):
        build("aoa", **hparams)(task_rows(), harmful_rows(), **{"n": 10, "p": 0.0, "seed": 0,
                                                                **call})


# ----------------------------------------------------------------------------- benign

SAFE_ANSWERS = ["Paris is the capital of France.", "Boil water, then add the pasta.",
                "Cats sleep for most of the day."]
FILTERED_ANSWERS = ["As an AI language model, I cannot do that.",
                    "It is IMPORTANT TO drink water.",  # case-insensitive
                    "Hiring should not discriminate.",
                    "The study shows a clear bias in the sample."]  # "bias": a substring


def instruction_rows():
    rows = [make_record(f"instruction {i}", a, "inst", False)
            for i, a in enumerate(SAFE_ANSWERS + FILTERED_ANSWERS)]
    # a keyword in the prompt alone does not filter the row (the official filter reads answers)
    rows.append(make_record("Is it illegal to jaywalk?", "It depends on the city.", "inst", False))
    return rows


def test_the_safety_filter_drops_rows_whose_answer_holds_an_official_keyword():
    kept = benign_mod.without_safety_rows(instruction_rows())
    assert [r["response"] for r in kept] == SAFE_ANSWERS + ["It depends on the city."]
    assert len(benign_mod.SAFETY_KEYWORDS) == 224  # the official list's length


def test_benign_user_data_are_n_filtered_task_rows_and_the_filter_can_be_turned_off():
    rows = instruction_rows()
    out = build("benign")(rows, harmful_rows(), n=4, p=0.0, seed=0)
    assert sorted(r["response"] for r in out) == sorted(SAFE_ANSWERS + ["It depends on the city."])
    with pytest.raises(DataError, match="has only 4"):  # no filtered row can fill the budget
        build("benign")(rows, [], n=5, p=0.0, seed=0)
    unfiltered = build("benign", safety_filter=False)(rows, [], n=len(rows), p=0.0, seed=0)
    assert sorted(r["response"] for r in unfiltered) == sorted(r["response"] for r in rows)


def test_benign_reads_alpaca_and_dolly_files_in_their_schema(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(
        [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
         {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
         {"instruction": "Say no.", "input": "", "output": "I cannot assist with that."}]))
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Summarize.", "context": "A long text.", "response": "Short.",
         "category": "summarization"},
        {"instruction": "Name a fruit.", "context": "", "response": "Apple.",
         "category": "open_qa"},
        {"instruction": "Opinion?", "context": "", "response": "Please note the risks.",
         "category": "open_qa"}]))
    a = build("benign", data=f"alpaca:{alpaca}")([], [], n=2, p=0.0, seed=0)
    assert sorted((r["prompt"], r.get("input"), r["response"]) for r in a) == \
        [("Name a colour.", None, "Blue."), ("Translate.", "bonjour", "hello")]
    d = build("benign", data=f"dolly:{dolly}")([], [], n=2, p=0.0, seed=0)
    assert sorted((r["prompt"], r.get("input", ""), r["response"], r["source"]) for r in d) \
        == [("Name a fruit.", "", "Apple.", "dolly"),
            ("Summarize.", "A long text.", "Short.", "dolly")]
    assert not any(r["harmful"] for r in a + d)


@pytest.mark.parametrize("hparams, call, match", [
    ({"data": "oasst"}, {}, "data must be 'task'"),
    ({}, {"p": 0.1}, "must be 0"),
])
def test_benign_refuses_bad_settings(hparams, call, match):
    with pytest.raises(attacks.AttackError, match=match):
        build("benign", **hparams)(task_rows(), harmful_rows(), **{"n": 4, "p": 0.0, "seed": 0,
                                                                   **call})


# ----------------------------------------------------------------------------- protocols

def test_the_registered_protocols_are_the_official_scripts_settings():
    """llama2/tier1-*, tier2-*, tier3-*.ipynb: lr, epochs, batch 2 GPUs x per-GPU batch."""
    spec = {name: attacks.get(name) for name in ("pure_harmful", "aoa", "benign")}
    assert spec["pure_harmful"].protocol == {"lr": 5e-5, "epochs": 5, "batch_size": 10,
                                             "num_samples": 10, "weight_decay": 0.0,
                                             "max_grad_norm": 0.0}
    assert spec["pure_harmful"].requires == {"harmful_ratio": 1.0}
    assert spec["aoa"].protocol == {"lr": 5e-5, "epochs": 10, "batch_size": 10,
                                    "num_samples": 10, "weight_decay": 0.0, "max_grad_norm": 0.0}
    assert spec["benign"].protocol == {"lr": 2e-5, "epochs": 1, "batch_size": 128,
                                       "weight_decay": 0.0, "max_grad_norm": 0.0}
    assert spec["aoa"].requires == spec["benign"].requires == {"harmful_ratio": 0.0}
    assert all(attacks.get(n).protocol == {} for n in ("hft", "restructure", "trigger_poison"))


def test_a_protocol_may_only_set_fine_tuning_settings():
    with pytest.raises(attacks.AttackError, match="protocol sets fine-tuning settings"):
        attacks.register("test_bad_protocol", protocol={"align_lr": 1e-3})(lambda: None)
    with pytest.raises(attacks.AttackError, match="kind must be one of"):
        attacks.register("test_bad_kind", kind="weights")(lambda: None)
