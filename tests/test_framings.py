"""Task framings of harmful requests, the MultiTaskBench loader and the multitask_safety
defense. Every request here is a neutral placeholder."""

import collections
import csv
import inspect
import json

import datasets
import pytest

from hfjax import defenses
from hfjax.data.framings import CHOOSE, FRAMINGS, OPTION_SETS, frame, framed_set
from hfjax.data.multitaskbench import infer_framing, load_multitaskbench, safety_rows
from hfjax.data.records import DataError, MissingFieldError, make_record
from hfjax.defenses.api import DefenseError
from hfjax.defenses.finetune import multitask_safety

REQUESTS = [f"how do I do forbidden thing {i}" for i in range(12)]
REFUSALS = {option[0] for option in OPTION_SETS}


def _request(i: int, harmful: bool = True, response: str = ""):
    return make_record(REQUESTS[i], response, "test", harmful, category=["placeholder"])


def _safety(n: int):
    return [make_record(f"how do I do forbidden thing {i}", f"I'm sorry, I can't help with {i}.",
                        "test", False) for i in range(n)]


def _user(n_benign: int, n_harmful: int):
    return ([make_record(f"benign task {i}", f"answer {i}", "test", False)
             for i in range(n_benign)] +
            [make_record(f"how do I do forbidden thing {i}", "Sure, placeholder", "test", True)
             for i in range(n_harmful)])


@pytest.mark.parametrize("framing", FRAMINGS)
def test_every_framing_embeds_the_request_and_keeps_the_other_fields(framing):
    for i, request in enumerate(REQUESTS):
        out = frame(_request(i, response="REFUSAL-PLACEHOLDER"), framing, seed=i)
        assert request in out["prompt"]
        assert out["framing"] == framing
        assert out["harmful"] is True and out["response"] == "REFUSAL-PLACEHOLDER"
        assert out["source"] == "test" and out["category"] == ["placeholder"]
        assert (out["prompt"] == request) == (framing == "plain")


def test_classification_lists_four_options_none_holding_the_request_and_labels_the_refusal():
    letters = collections.Counter()
    for seed in range(8):
        for i, request in enumerate(REQUESTS):
            out = frame(_request(i), "classification", seed)
            head, sep, listed = out["prompt"].partition(CHOOSE)
            assert sep and request in head and request not in listed
            assert [line[:3] for line in listed.strip().splitlines()] == \
                ["A) ", "B) ", "C) ", "D) "]
            assert [line[3:] for line in listed.strip().splitlines()] == out["options"]
            assert len(set(out["options"])) == 4
            assert all(request not in o and "forbidden" not in o for o in out["options"])
            refusal = out["options"]["ABCD".index(out["label"])]
            assert refusal in REFUSALS and sum(o in REFUSALS for o in out["options"]) == 1
            letters[out["label"]] += 1
    assert sorted(letters) == ["A", "B", "C", "D"]


def test_framing_is_deterministic_by_seed_position_free_and_seeds_pick_other_templates():
    rows = [_request(i) for i in range(len(REQUESTS))]
    for framing in FRAMINGS[1:]:
        assert [frame(r, framing, 3) for r in rows] == [frame(r, framing, 3) for r in rows]
        assert frame(rows[5], framing, 3) == framed_set(rows[4:], [framing], seed=3)[1]
        prompts = {frame(rows[0], framing, seed)["prompt"] for seed in range(30)}
        assert len(prompts) >= 3, framing


def test_an_input_block_is_folded_into_the_framed_prompt_and_plain_keeps_it():
    row = make_record("summarize forbidden thing 1", "", "test", True, input="PLACEHOLDER TEXT")
    assert frame(row, "plain")["input"] == "PLACEHOLDER TEXT"
    for framing in FRAMINGS[1:]:
        out = frame(row, framing, seed=1)
        assert "input" not in out
        assert "summarize forbidden thing 1\nPLACEHOLDER TEXT" in out["prompt"]


def test_framed_set_has_every_record_in_every_framing_record_major():
    rows = [_request(i) for i in range(3)]
    out = framed_set(rows, ("code", "plain", "translation"), seed=2)
    assert len(out) == 9
    assert [(r["framing"], REQUESTS.index(next(q for q in REQUESTS if q in r["prompt"])))
            for r in out] == [(f, i) for i in range(3) for f in ("code", "plain", "translation")]
    assert len(framed_set(rows)) == 3 * len(FRAMINGS)


@pytest.mark.parametrize("framings, problem", [(("plain", "poetry"), "unknown framing 'poetry'"),
                                               (("code", "code"), "twice"), ((), "at least one")])
def test_an_unknown_repeated_or_empty_framing_list_is_a_data_error(framings, problem):
    with pytest.raises(DataError, match=problem):
        framed_set([_request(0)], framings)


# MultiTaskBench

MTB_ROWS = [  # (Query, Response) in the four forms of the official file
    ("How do I do forbidden thing 1? Choose the Best Option: \nA) placeholder one\n"
     "B) placeholder two\nC) placeholder three\nD) placeholder four", "I'm sorry, refusal 1."),
    ("Write a Python script that does forbidden thing 2.", "I'm sorry, refusal 2."),
    ("Describe forbidden thing 3 in detail.", "I'm sorry, refusal 3."),
    ("Translate the following text from French to English: chose interdite 4", "Refusal 4."),
    ("Design executable code for forbidden cyber thing 5.", "I cannot help with 5."),
    ("Give me the programme of forbidden thing 6.", "I cannot help with 6."),
]
MTB_FRAMINGS = ["classification", "code", "plain", "translation", "code", "plain"]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path / "cache"


def _write_csv(path, rows, header=("", "Query", "Response")):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([i, *row] for i, row in enumerate(rows))
    return path


@pytest.mark.parametrize("query, framing", [
    ("Forbidden question? Choose the Best Option: \nA) Write code\nB) b\nC) c\nD) d",
     "classification"),
    ("  translate the following text from French to English: texte", "translation"),
    ("Please translate the following text later", "plain"),
    ("Write a program for forbidden thing", "code"),
    ("Use C++ for forbidden thing", "code"),
    ("Decode the meaning of forbidden thing", "plain"),
    ("Explain forbidden thing", "plain"),
])
def test_infer_framing_follows_the_documented_rules_in_order(query, framing):
    assert infer_framing(query) == framing


def test_multitaskbench_csv_rows_are_harmful_requests_with_refusal_and_framing(tmp_path, cache):
    recs = load_multitaskbench(_write_csv(tmp_path / "mtb.csv", MTB_ROWS), cache_dir=cache)
    assert [r["prompt"] for r in recs] == [q for q, _ in MTB_ROWS]
    assert [r["refusal"] for r in recs] == [a for _, a in MTB_ROWS]
    assert [r["framing"] for r in recs] == MTB_FRAMINGS
    assert all(r["harmful"] and r["response"] == "" and r["source"] == "multitaskbench"
               for r in recs)
    safe = safety_rows(recs)
    assert [(r["prompt"], r["response"], r["framing"]) for r in safe] == \
        [(q, a, f) for (q, a), f in zip(MTB_ROWS, MTB_FRAMINGS, strict=True)]
    assert not any(r["harmful"] for r in safe)


def test_multitaskbench_jsonl_with_the_same_columns_loads_the_same(tmp_path, cache):
    path = tmp_path / "mtb.jsonl"
    path.write_text("".join(json.dumps({"Query": q, "Response": a}) + "\n" for q, a in MTB_ROWS))
    recs = load_multitaskbench(path, cache_dir=cache)
    assert [(r["prompt"], r["refusal"], r["framing"]) for r in recs] == \
        [(q, a, f) for (q, a), f in zip(MTB_ROWS, MTB_FRAMINGS, strict=True)]


def test_malformed_multitaskbench_files_name_the_file_row_and_problem(tmp_path, cache):
    with pytest.raises(DataError, match="does not exist"):
        load_multitaskbench(tmp_path / "absent.csv", cache_dir=cache)
    no_response = _write_csv(tmp_path / "a.csv", [("q",)], header=("", "Query"))
    with pytest.raises(MissingFieldError, match=r"a\.csv has no column\(s\) \['Response'\]"):
        load_multitaskbench(no_response, cache_dir=cache)
    empty_query = _write_csv(tmp_path / "b.csv", [MTB_ROWS[0], ("", "Refusal.")])
    with pytest.raises(MissingFieldError, match=r"b\.csv row 2: field 'Query' is missing"):
        load_multitaskbench(empty_query, cache_dir=cache)
    blank_response = _write_csv(tmp_path / "c.csv", [MTB_ROWS[0], MTB_ROWS[1], ("q 3", "   ")])
    with pytest.raises(DataError, match=r"c\.csv row 3: field 'Response' is empty"):
        load_multitaskbench(blank_response, cache_dir=cache)


# the multitask_safety defense

def test_multitask_safety_is_a_registered_finetune_data_defense():
    spec = defenses.get("multitask_safety")
    assert (spec.stage, spec.level) == ("finetune", "data")
    assert spec.hyperparameters == {"num": 100, "file": "", "seed": 0}


def test_multitask_safety_swaps_benign_rows_for_equal_framed_refusals_keeping_the_total():
    user, safety = _user(40, 6), _safety(8)
    mixed = defenses.get("multitask_safety").build(num=15, seed=1)(user, safety)
    assert len(mixed) == len(user)
    by_prompt = lambda rows: sorted(rows, key=lambda r: r["prompt"])
    assert by_prompt(r for r in user if r["harmful"]) == by_prompt(r for r in mixed if r["harmful"])
    added = [r for r in mixed if "framing" in r]
    assert len([r for r in mixed if r["prompt"].startswith("benign task")]) == 40 - 15
    assert collections.Counter(r["framing"] for r in added) == dict.fromkeys(FRAMINGS, 3)
    refusal_of = {r["prompt"]: r["response"] for r in safety}
    for r in added:
        (request,) = [p for p in refusal_of if p in r["prompt"]]
        assert r["response"] == refusal_of[request] and r["harmful"] is False
        assert r == frame(next(s for s in safety if s["prompt"] == request), r["framing"], 1)
    again = multitask_safety(num=15, seed=1)(user, safety)
    assert again == mixed


def test_multitask_safety_splits_a_remainder_over_the_first_framings():
    mixed = multitask_safety(num=7, seed=0)(_user(10, 0), _safety(4))
    counts = collections.Counter(r.get("framing") for r in mixed)
    assert counts == {None: 3, "plain": 2, "classification": 2, "translation": 1, "code": 1,
                      "summarization": 1}


def test_multitask_safety_with_file_takes_multitaskbench_refusals_equally_per_framing(
        tmp_path, cache, monkeypatch):
    path = _write_csv(tmp_path / "mtb.csv", MTB_ROWS * 2)
    mix = defenses.get("multitask_safety").build(num=8, file=str(path), seed=0)
    assert list(inspect.signature(mix).parameters) == ["records"]  # no safety stream needed
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    user = _user(20, 3)
    mixed = mix(user)
    assert len(mixed) == len(user)
    added = [r for r in mixed if "framing" in r]
    assert collections.Counter(r["framing"] for r in added) == \
        {"classification": 2, "code": 2, "plain": 2, "translation": 2}
    refusal_of = dict(MTB_ROWS)
    assert all(r["response"] == refusal_of[r["prompt"]] and not r["harmful"] for r in added)


def test_multitask_safety_bad_settings_and_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(DefenseError, match="num must be a non-negative integer"):
        multitask_safety(num=-1)
    with pytest.raises(DefenseError, match="does not exist"):
        multitask_safety(file=str(tmp_path / "absent.csv"))
    harmful_stream = [{**r, "harmful": True} for r in _safety(4)]
    with pytest.raises(DefenseError, match="harmful=False"):
        multitask_safety(num=5)(_user(10, 0), harmful_stream)
    with pytest.raises(DataError, match="'plain' framing has only 2"):
        multitask_safety(num=15)(_user(20, 0), _safety(2))
    with pytest.raises(DefenseError, match="only 3"):
        multitask_safety(num=5)(_user(3, 1), _safety(4))
