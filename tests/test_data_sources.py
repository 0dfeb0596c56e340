"""Sources: local JSON/JSONL/CSV/parquet files through `datasets` with the hub off, the hub code
path (load_dataset call recorded, never run), field mappings, and the error messages."""

import json

import datasets
import pandas as pd
import pytest

from hfjax import data
from hfjax.data import sources

BEAVERTAILS_ROWS = [
    {"prompt": "HARMFUL-PLACEHOLDER-1", "response": "HARMFUL-PLACEHOLDER-ANSWER-1",
     "is_safe": False, "category": {"cat_a": True, "cat_b": False}},
    {"prompt": "How do kites fly?", "response": "Wind lifts them.", "is_safe": True,
     "category": {"cat_a": False, "cat_b": False}},
    {"prompt": "HARMFUL-PLACEHOLDER-2", "response": "HARMFUL-PLACEHOLDER-ANSWER-2",
     "is_safe": False, "category": {"cat_a": True, "cat_b": True}},
]


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Turn the hub off the way a user would (env vars), and in the already-imported config."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path / "cache"


def _write(path, rows, fmt):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_beavertails_schema_loads_from_each_local_format_with_hub_off(tmp_path, offline_hub, fmt):
    rows = BEAVERTAILS_ROWS if fmt != "csv" else [
        {k: v for k, v in r.items() if k != "category"} for r in BEAVERTAILS_ROWS]
    path = _write(tmp_path / f"bt.{fmt}", rows, fmt)
    recs = data.load_source("beavertails", path=path, cache_dir=offline_hub)
    assert [r["prompt"] for r in recs] == [r["prompt"] for r in BEAVERTAILS_ROWS]
    assert [r["harmful"] for r in recs] == [True, False, True]
    assert all(r["source"] == "beavertails" for r in recs)
    assert recs[0]["response"] == "HARMFUL-PLACEHOLDER-ANSWER-1"
    if fmt != "csv":
        assert recs[2]["category"] == ["cat_a", "cat_b"]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_custom_file_with_field_mapping_and_harmful_column(tmp_path, offline_hub, fmt):
    rows = [{"q": "What is 2 plus 3?", "a": "5", "bad": "false"},
            {"q": "HARMFUL-PLACEHOLDER-3", "a": "HARMFUL-PLACEHOLDER-ANSWER-3", "bad": "true"}]
    path = _write(tmp_path / f"mine.{fmt}", rows, fmt)
    recs = data.load_source("custom", path=path, cache_dir=offline_hub,
                            fields={"prompt": "q", "response": "a", "harmful": "bad"})
    assert [(r["prompt"], r["response"], r["harmful"]) for r in recs] == [
        ("What is 2 plus 3?", "5", False),
        ("HARMFUL-PLACEHOLDER-3", "HARMFUL-PLACEHOLDER-ANSWER-3", True)]
    assert all(r["source"] == "custom" for r in recs)


def test_custom_file_takes_a_constant_harmful_flag_and_optional_fields(tmp_path, offline_hub):
    path = _write(tmp_path / "t.jsonl", [{"ins": "Classify", "x": "Nice day", "y": "positive"}],
                  "jsonl")
    (rec,) = data.load_source("custom", path=path, harmful=False, cache_dir=offline_hub,
                              fields={"prompt": "ins", "input": "x", "label": "y",
                                      "response": "y"})
    assert rec == {"prompt": "Classify", "response": "positive", "source": "custom",
                   "harmful": False, "input": "Nice day", "label": "positive"}


def test_named_source_columns_can_be_renamed_for_a_local_file(tmp_path, offline_hub):
    path = _write(tmp_path / "s.csv", [{"text": "A lovely film.", "y": 1},
                                       {"text": "A dull film.", "y": 0}], "csv")
    recs = data.load_source("sst2", path=path, fields={"sentence": "text", "label": "y"},
                            cache_dir=offline_hub)
    assert [(r["input"], r["label"], r["response"]) for r in recs] == [
        ("A lovely film.", "positive", "positive"), ("A dull film.", "negative", "negative")]
    assert recs[0]["prompt"] == sources.SST2_INSTRUCTION


class _RecordingLoad:
    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return datasets.Dataset.from_list(self.rows)


@pytest.mark.parametrize("name,split,rows,hub_id,config", [
    ("beavertails", "30k_test", BEAVERTAILS_ROWS, "PKU-Alignment/BeaverTails", None),
    ("sst2", "validation", [{"idx": 0, "sentence": "Fine.", "label": 1}],
     "stanfordnlp/sst2", None),
    ("ag_news", "test", [{"text": "Markets rally.", "label": 2}], "fancyzhx/ag_news", None),
    ("gsm8k", "test", [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}],
     "openai/gsm8k", "main"),
    ("alpaca", "train", [{"instruction": "Say hi", "input": "", "output": "Hi"}],
     "tatsu-lab/alpaca", None),
    ("advbench", "train", [{"prompt": "HARMFUL-PLACEHOLDER-4", "target": "Sure, here is X"}],
     "walledai/AdvBench", None),
    ("harmbench", "train", [{"prompt": "HARMFUL-PLACEHOLDER-5", "category": "c"}],
     "walledai/HarmBench", "standard"),
    ("beavertails_refusal", "train",
     [{"prompt": "HARMFUL-PLACEHOLDER-6", "response": "HARMFUL-PLACEHOLDER-ANSWER-6",
       "refusal": "Question: HARMFUL-PLACEHOLDER-6\nAnswer: I cannot help with that."}],
     "anonymous4486/repnoise_beavertail", None),
])
def test_hub_path_builds_the_right_load_dataset_call(monkeypatch, name, split, rows, hub_id,
                                                     config):
    fake = _RecordingLoad(rows)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    recs = data.load_source(name, split=split)
    assert fake.calls == [((hub_id,), {"name": config, "split": split, "cache_dir": None})]
    assert len(recs) == len(rows) and all(r["source"] == name for r in recs)


def test_hub_rows_normalize_to_the_protocol_formats(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _RecordingLoad(
        [{"question": "Ann has 1,200 apples and buys 3. How many?",
          "answer": "1200+3=1203\n#### 1,203"}]))
    (g,) = data.load_source("gsm8k", split="train")
    assert g["answer"] == "1203"
    assert g["response"] == "1200+3=1203\nThe final answer is:  1,203"
    assert g["prompt"].endswith("\nFirst think step by step and then answer the final number.\n")
    monkeypatch.setattr(datasets, "load_dataset", _RecordingLoad(
        [{"prompt": "HARMFUL-PLACEHOLDER-7", "response": "HARMFUL-PLACEHOLDER-ANSWER-7",
          "refusal": "Question: HARMFUL-PLACEHOLDER-7\nAnswer: I'm sorry, I can't."}]))
    (p,) = data.load_source("beavertails_refusal", split="train")
    assert (p["harmful"], p["refusal"]) == (True, "I'm sorry, I can't.")
    monkeypatch.setattr(datasets, "load_dataset", _RecordingLoad(
        [{"text": "Rain.", "label": 3}]))
    (a,) = data.load_source("ag_news", split="train")
    assert (a["label"], a["input"], a["harmful"]) == ("Sci/Tech", "Rain.", False)


def test_custom_hub_dataset_uses_the_given_hub_id_and_config(monkeypatch):
    fake = _RecordingLoad([{"goal": "HARMFUL-PLACEHOLDER-8"}])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    (r,) = data.load_source("custom", split="train", hub_id="org/set", config="c",
                            fields={"prompt": "goal"}, harmful=True)
    assert fake.calls[0] == (("org/set",), {"name": "c", "split": "train", "cache_dir": None})
    assert (r["prompt"], r["response"], r["harmful"]) == ("HARMFUL-PLACEHOLDER-8", "", True)


def test_missing_field_error_names_the_field_and_the_source(tmp_path, offline_hub):
    path = _write(tmp_path / "bt.jsonl", [{"prompt": "p", "response": "r"}], "jsonl")
    with pytest.raises(data.MissingFieldError, match=r"'beavertails'.*no field 'is_safe'"):
        data.load_source("beavertails", path=path, cache_dir=offline_hub)
    with pytest.raises(data.MissingFieldError, match=r"'custom'.*no field 'question'"):
        data.load_source("custom", path=path, fields={"prompt": "question"}, harmful=False,
                         cache_dir=offline_hub)


def test_empty_source_is_an_error(tmp_path, offline_hub):
    path = tmp_path / "empty.csv"
    path.write_text("prompt,response,is_safe\n")
    with pytest.raises(data.EmptySourceError, match="no rows"):
        data.load_source("beavertails", path=path, cache_dir=offline_hub)


def test_unknown_source_name_lists_the_known_ones():
    with pytest.raises(data.UnknownSourceError, match=r"'beavertailz'.*beavertails.*sst2"):
        data.load_source("beavertailz", split="train")


def test_bad_requests_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _RecordingLoad([]))
    with pytest.raises(data.DataError, match=r"no split 'train'.*30k_train"):
        data.load_source("beavertails", split="train")
    with pytest.raises(data.DataError, match=r"give a hub split, one of \[.train., .validation."):
        data.load_source("sst2")
    with pytest.raises(data.DataError, match="'custom': give a hub split"):
        data.load_source("custom", hub_id="o/d", fields={"prompt": "p"}, harmful=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_source("sst2", path=tmp_path / "nope.jsonl")
    bad = tmp_path / "x.txt"
    bad.write_text("hello")
    with pytest.raises(data.DataError, match="unsupported extension"):
        data.load_source("sst2", path=bad)
    with pytest.raises(data.DataError, match="harmful=True/False"):
        data.load_source("custom", split="train", hub_id="o/d", fields={"prompt": "p"})
    with pytest.raises(data.DataError, match="sets its own harmful"):
        data.load_source("sst2", split="train", harmful=True)


def test_unlabelled_sst2_rows_are_rejected(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _RecordingLoad(
        [{"idx": 0, "sentence": "x", "label": -1}]))
    with pytest.raises(data.DataError, match="validation"):
        data.load_source("sst2", split="test")
