"""Sources: local JSON/JSONL/CSV/parquet files through `datasets` with the hub off, the hub code
path (load_dataset call recorded, never run), field mappings, and the error messages."""

import json

import datasets
import pandas as pd
import pytest

from hfjax import data
from hfjax.data import files, sources

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


# --------------------------------------------------------------------------- faulty files

BT_ROW = {"prompt": "How do kites fly?", "response": "Wind lifts them.", "is_safe": True}


def _load(name, path, cache, **kw):
    return data.load_source(name, path=path, cache_dir=cache, **kw)


@pytest.mark.parametrize("fmt,content,why", [
    ("jsonl", b"", "0 bytes"), ("json", b"", "0 bytes"), ("csv", b"", "0 bytes"),
    ("parquet", b"", "0 bytes"), ("jsonl", b"  \n\n\t\n", "only whitespace"),
    ("json", b" \n \n", "only whitespace"), ("csv", b"\n  \n", "only whitespace")])
def test_empty_or_whitespace_only_file_is_an_empty_source_error_naming_the_file(
        tmp_path, offline_hub, fmt, content, why):
    path = tmp_path / f"e.{fmt}"
    path.write_bytes(content)
    with pytest.raises(data.EmptySourceError, match=rf"data file {path} is empty \({why}\)"):
        _load("beavertails", path, offline_hub)


def test_empty_json_array_is_an_empty_source_error(tmp_path, offline_hub):
    path = tmp_path / "e.json"
    path.write_text("[]")
    with pytest.raises(data.EmptySourceError, match=rf"data file {path} has no rows"):
        _load("beavertails", path, offline_hub)


def test_bad_json_line_names_the_file_line_and_column(tmp_path, offline_hub):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(BT_ROW) + "\n\n" + '{"prompt": "a" "response": "b"}\n')
    with pytest.raises(data.DataError, match=rf"data file {path} line 3: invalid JSON "
                                             r"\(Expecting ',' delimiter at column 16\)"):
        _load("beavertails", path, offline_hub)


def test_bad_json_array_names_the_line_of_the_fault(tmp_path, offline_hub):
    path = tmp_path / "bad.json"
    path.write_text("[\n" + json.dumps(BT_ROW) + ",\n" + '{"prompt": "a",, "x": 1}\n]')
    with pytest.raises(data.DataError, match=rf"data file {path} line 3: invalid JSON "
                                             r"\(Expecting property name .* at column 16\)"):
        _load("beavertails", path, offline_hub)


@pytest.mark.parametrize("fmt,body,where", [
    ("jsonl", json.dumps(BT_ROW) + "\n[1, 2]\n", "line 2"),
    ("json", json.dumps([BT_ROW, "text row"]), "row 2")])
def test_json_row_that_is_not_an_object_is_named(tmp_path, offline_hub, fmt, body, where):
    path = tmp_path / f"rows.{fmt}"
    path.write_text(body)
    with pytest.raises(data.DataError, match=rf"data file {path} {where}: holds .*not a JSON "
                                             "object"):
        _load("beavertails", path, offline_hub)


@pytest.mark.parametrize("line,fields", [('"c,d",e,False,extra', 4), ("c,d", 2)])
def test_csv_row_with_the_wrong_field_count_names_its_line_and_row(tmp_path, offline_hub, line,
                                                                    fields):
    path = tmp_path / "bad.csv"
    path.write_text(f"prompt,response,is_safe\na,b,True\n\n{line}\n")
    with pytest.raises(data.DataError, match=rf"data file {path} line 4 \(row 2\): {fields} "
                                             "fields where the header has 3"):
        _load("beavertails", path, offline_hub)


def test_csv_unclosed_quote_names_the_line_where_the_field_starts(tmp_path, offline_hub):
    path = tmp_path / "bad.csv"
    path.write_text('prompt,response,is_safe\na,b,True\n"c,d,False\ne,f,True\n')
    with pytest.raises(data.DataError, match=rf"data file {path} line 3: invalid CSV "):
        _load("beavertails", path, offline_hub)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_non_utf8_bytes_name_the_line_and_byte(tmp_path, offline_hub, fmt):
    first = {"jsonl": json.dumps(BT_ROW).encode() + b"\n", "json": b"[\n",
             "csv": b"prompt,response,is_safe\n"}[fmt]
    path = tmp_path / f"latin1.{fmt}"
    path.write_bytes(first + b'"caf\xe9"\n')
    with pytest.raises(data.DataError, match=rf"data file {path} line 2: not UTF-8 \(byte 0xe9 "
                                             rf"at file offset {len(first) + 4}\)"):
        _load("beavertails", path, offline_hub)


@pytest.mark.parametrize("value,kind", [(5, "an integer"), (["x"], "a list"),
                                        ({"a": 1}, "an object")])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_non_string_prompt_names_the_file_row_and_what_it_holds(tmp_path, offline_hub, value,
                                                                kind, fmt):
    rows = [BT_ROW, {**BT_ROW, "prompt": value}]
    path = _write(tmp_path / f"p.{fmt}", rows, fmt) if fmt != "parquet" else None
    if fmt == "parquet":  # parquet columns have one type: the odd value is in its own column
        path = _write(tmp_path / "p.parquet", [{**BT_ROW, "q": value}] * 2, fmt)
    fields = {"prompt": "q"} if fmt == "parquet" else {}
    row = 1 if fmt == "parquet" else 2
    col = "q" if fmt == "parquet" else "prompt"
    with pytest.raises(data.DataError, match=rf"data file {path} row {row}: field '{col}' holds "
                                             rf"{kind}, not text"):
        _load("beavertails", path, offline_hub, fields=fields)
    with pytest.raises(data.DataError, match=rf"data file {path} row {row}: field '{col}' holds "
                                             rf"{kind}, not text"):
        _load("custom", path, offline_hub, fields={"prompt": col}, harmful=False)


def test_custom_response_that_is_a_list_is_an_error_not_text(tmp_path, offline_hub):
    path = _write(tmp_path / "c.jsonl", [{"q": "Q1", "a": "A1"}, {"q": "Q2", "a": ["A", "B"]}],
                  "jsonl")
    with pytest.raises(data.DataError, match=rf"data file {path} row 2: field 'a' holds a list"):
        _load("custom", path, offline_hub, fields={"prompt": "q", "response": "a"},
              harmful=False)


@pytest.mark.parametrize("fmt,row", [
    ("jsonl", {"label": 0}), ("jsonl", {"sentence": None, "label": 0}),
    ("csv", {"sentence": "", "label": 0})])
def test_row_missing_its_text_field_is_an_error_not_a_record_without_input(
        tmp_path, offline_hub, fmt, row):
    path = _write(tmp_path / f"s.{fmt}", [{"sentence": "Fine.", "label": 1}, row], fmt)
    with pytest.raises(data.MissingFieldError,
                       match=rf"data file {path} row 2: field 'sentence' is missing \(null\)"):
        _load("sst2", path, offline_hub)


def test_label_that_is_a_list_names_the_field_and_the_allowed_kinds(tmp_path, offline_hub):
    path = _write(tmp_path / "s.jsonl", [{"sentence": "Fine.", "label": [1]}], "jsonl")
    with pytest.raises(data.DataError, match=rf"{path} row 1: field 'label' holds a list, not "
                                             "text or an integer"):
        _load("sst2", path, offline_hub)


def test_converter_error_gets_the_file_and_row(tmp_path, offline_hub):
    path = _write(tmp_path / "b.jsonl", [BT_ROW, {**BT_ROW, "is_safe": "maybe"}], "jsonl")
    with pytest.raises(data.DataError, match=rf"{path} row 2: field 'is_safe' holds 'maybe', "
                                             "not a boolean"):
        _load("beavertails", path, offline_hub)


def test_file_that_is_not_parquet_is_a_data_error(tmp_path, offline_hub):
    path = tmp_path / "x.parquet"
    path.write_text("prompt,response\na,b\n")
    with pytest.raises(data.DataError, match=rf"data file {path}: not a parquet file"):
        _load("sst2", path, offline_hub)


def test_hub_row_fault_names_the_hub_id_split_and_row_index(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _RecordingLoad(
        [{"question": "What is 1+1?", "answer": "#### 2"},
         {"question": None, "answer": "#### 3"}]))
    with pytest.raises(data.MissingFieldError, match=r"hub dataset openai/gsm8k/main split test "
                                                     r"row index 1: field 'question' is missing"):
        data.load_source("gsm8k", split="test")


def test_csv_cells_are_text_and_only_an_empty_cell_is_missing(tmp_path, offline_hub):
    path = tmp_path / "n.csv"
    path.write_text("prompt,response,label\n12,34,1\nNA,None,0\n")
    recs = _load("custom", path, offline_hub, harmful=False)
    assert [(r["prompt"], r["response"], r["label"]) for r in recs] == [
        ("12", "34", "1"), ("NA", "None", "0")]


def test_json_file_may_hold_json_lines_or_one_object(tmp_path, offline_hub):
    lines = _write(tmp_path / "lines.json", BEAVERTAILS_ROWS, "jsonl")
    assert len(_load("beavertails", lines, offline_hub)) == 3
    one = tmp_path / "one.json"
    one.write_text(json.dumps(BT_ROW, indent=2))
    assert [r["prompt"] for r in _load("beavertails", one, offline_hub)] == [BT_ROW["prompt"]]


# --------------------------------------------------------------------------- source specs

@pytest.mark.parametrize("spec,expected", [
    ("beavertails:30k_train", sources.SourceRequest("beavertails", "30k_train")),
    ("beavertails:30k_train[:100]", sources.SourceRequest("beavertails", "30k_train[:100]")),
    ("sst2:validation?sentence=text", sources.SourceRequest("sst2", "validation", None,
                                                            {"sentence": "text"})),
    ("sst2:/data/x.csv?sentence=text,label=y",
     sources.SourceRequest("sst2", None, "/data/x.csv", {"sentence": "text", "label": "y"})),
    ("custom:/data/m.jsonl?prompt=question,response=answer,harmful=true",
     sources.SourceRequest("custom", None, "/data/m.jsonl",
                           {"prompt": "question", "response": "answer"}, True)),
    ("custom:/data/m.jsonl?prompt=q,harmful=False",
     sources.SourceRequest("custom", None, "/data/m.jsonl", {"prompt": "q"}, False)),
    ("custom:/data/m.jsonl?prompt=q,harmful=bad",
     sources.SourceRequest("custom", None, "/data/m.jsonl", {"prompt": "q", "harmful": "bad"})),
    ("custom:/data/m.csv", sources.SourceRequest("custom", None, "/data/m.csv")),
])
def test_source_spec_parses_to_its_request(spec, expected):
    assert sources.parse_source_spec(spec) == expected


def test_source_spec_takes_an_existing_file_without_a_data_suffix_as_a_path(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("x")
    assert sources.parse_source_spec(f"sst2:{path}").path == str(path)


@pytest.mark.parametrize("spec,problem", [
    ("beavertails", "no NAME:TARGET"), (":30k_train", "no NAME:TARGET"),
    ("sst2:", "no NAME:TARGET"), ("sst2:?sentence=text", "no split or path"),
    ("custom:train", "reads a local data file"), ("custom:/d/m.jsonl?", "'' is not KEY=VALUE"),
    ("custom:/d/m.jsonl?prompt", "'prompt' is not KEY=VALUE"),
    ("custom:/d/m.jsonl?prompt=", "'prompt=' is not KEY=VALUE"),
    ("custom:/d/m.jsonl?prompt=q,prompt=r", "'prompt' is given twice"),
    ("custom:/d/m.jsonl?question=q", r"record fields .* not \['question'\]"),
    ("custom:/d/m.jsonl?response=a", "must map 'prompt'"),
])
def test_malformed_source_spec_says_what_is_wrong_and_shows_the_syntax(spec, problem):
    with pytest.raises(data.DataError, match=rf"{problem}.*e\.g\. beavertails:30k_train"):
        sources.parse_source_spec(spec)


def test_source_spec_rejects_unknown_sources_and_columns():
    with pytest.raises(data.UnknownSourceError, match="'sst3'.*known sources"):
        sources.parse_source_spec("sst3:train")
    with pytest.raises(data.DataError, match=r"cannot rename \['harmful'\]"):
        sources.parse_source_spec("sst2:/d/x.csv?harmful=true")


def test_load_spec_custom_file_with_mapping_and_constant_flag(tmp_path, offline_hub):
    path = _write(tmp_path / "m.jsonl", [{"question": "Q1", "answer": "A1"}], "jsonl")
    (rec,) = sources.load_spec(f"custom:{path}?prompt=question,response=answer,harmful=true",
                               default_harmful=False, cache_dir=offline_hub)
    assert rec == {"prompt": "Q1", "response": "A1", "source": "custom", "harmful": True}


def test_load_spec_custom_file_takes_its_harmful_column(tmp_path, offline_hub):
    path = _write(tmp_path / "m.csv", [{"q": "Q1", "bad": "true"}, {"q": "Q2", "bad": "false"}],
                  "csv")
    recs = sources.load_spec(f"custom:{path}?prompt=q,harmful=bad", default_harmful=False,
                             cache_dir=offline_hub)
    assert [r["harmful"] for r in recs] == [True, False]


@pytest.mark.parametrize("default", [True, False])
def test_load_spec_custom_file_named_like_records_needs_no_mapping_and_takes_the_role_flag(
        tmp_path, offline_hub, default):
    path = _write(tmp_path / "r.jsonl", [{"prompt": "P1", "response": "R1", "input": "I1",
                                          "other": "x"}], "jsonl")
    (rec,) = sources.load_spec(f"custom:{path}", default_harmful=default, cache_dir=offline_hub)
    assert rec == {"prompt": "P1", "response": "R1", "source": "custom", "harmful": default,
                   "input": "I1"}


def test_load_spec_custom_without_a_flag_or_prompt_column_is_an_error(tmp_path, offline_hub):
    path = _write(tmp_path / "r.jsonl", [{"prompt": "P1"}], "jsonl")
    with pytest.raises(data.DataError, match="harmful=True/False"):
        sources.load_spec(f"custom:{path}", cache_dir=offline_hub)
    other = _write(tmp_path / "q.jsonl", [{"question": "P1"}], "jsonl")
    with pytest.raises(data.MissingFieldError, match=r"no 'prompt' column.*\['question'\]"):
        sources.load_spec(f"custom:{other}", default_harmful=True, cache_dir=offline_hub)


def test_load_spec_named_source_renames_columns_of_a_local_file(tmp_path, offline_hub):
    path = _write(tmp_path / "s.csv", [{"text": "A lovely film.", "y": 1}], "csv")
    (rec,) = sources.load_spec(f"sst2:{path}?sentence=text,label=y", default_harmful=True,
                               cache_dir=offline_hub)
    assert (rec["input"], rec["label"], rec["harmful"]) == ("A lovely film.", "positive", False)


@pytest.mark.parametrize("fmt,builder", [("json", "json"), ("jsonl", "json"), ("csv", "csv"),
                                         ("parquet", "parquet")])
def test_scan_of_a_good_file_returns_its_columns(tmp_path, fmt, builder):
    rows = [{"prompt": "P1", "response": "R1"}, {"prompt": "P2", "response": "R2", "x": "X"}]
    path = _write(tmp_path / f"g.{fmt}", rows, fmt)
    assert files.scan_data_file(path, builder) == ["prompt", "response", "x"]
