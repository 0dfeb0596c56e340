"""Tasks: every registered task loads from local files in its hub dataset's schema and from its
offline generator; the hub code path asks `datasets` for the right ids, configs and splits;
malformed files and unknown names give clear errors; the generators are deterministic, split
disjointly by prompt key, and their reference outputs are correct (generated code passes its
tests, gold options are among the options, summaries restate facts of their documents)."""

import json
import re
from collections import defaultdict

import datasets
import pandas as pd
import pytest

from hfjax import tasks
from hfjax.data import sources
from hfjax.data.generated import choice as generated_choice
from hfjax.data.generated import landmarks
from hfjax.data.generated import summarization as generated_summarization
from hfjax.data.records import DataError, MissingFieldError, make_record, prompt_key
from hfjax.tasks.loaders import split_by_key

PLAIN = ("sentiment", "topic")  # generated only
NEW_HUB = ("financial_sentiment", "boolq", "hellaswag", "winogrande", "arc", "xsum", "billsum",
           "cnn_dailymail", "wmt14_en_fr", "mbpp", "humaneval", "wikitext", "aeslc")

# A few rows per task in the hub dataset's own schema (columns and value types as on the hub),
# with the fields of the first record they must give.
HUB_ROWS = {
    "sst2": ([{"idx": 0, "sentence": "a warm and funny film", "label": 1},
              {"idx": 1, "sentence": "a dull plot", "label": 0}],
             {"label": "positive", "response": "positive", "input": "a warm and funny film"}),
    "ag_news": ([{"text": "The home team wins the cup final.", "label": 1},
                 {"text": "Markets rally after the rate decision.", "label": 2}],
                {"label": "Sports"}),
    "financial_sentiment": (
        [{"sentence": f"Net sales of the company rose by {i} % .", "label": 2} for i in range(8)]
        + [{"sentence": "The company is headquartered in Oulu .", "label": 1},
           {"sentence": "Operating profit fell to EUR 2.0 mn .", "label": 0}],
        {"label": "positive", "input": "Net sales of the company rose by 0 % ."}),
    "gsm8k": ([{"question": "Tom has 2 apples and buys 3 more. How many apples does he have?",
                "answer": "Tom has 2 + 3 = <<2+3=5>>5 apples.\n#### 5"}],
              {"answer": "5"}),
    "boolq": ([{"question": "is the sky blue on a clear day", "answer": True,
                "passage": "On a clear day the sky looks blue."},
               {"question": "is grass red", "answer": False, "passage": "Grass is green."}],
              {"response": "B", "label": "B", "options": ["no", "yes"],
               "input": "On a clear day the sky looks blue.\nQuestion: is the sky blue on a "
                        "clear day?\nA. no\nB. yes"}),
    "hellaswag": ([{"ind": 4, "activity_label": "Planting a tree",
                    "ctx_a": "[header] How to plant a tree [title] Dig a hole.",
                    "ctx_b": "then", "ctx": "[header] How to plant a tree [title] Dig a hole.",
                    "endings": ["Sing a song.", "Place the roots in the hole.", "Fly away.",
                                "Paint the moon."],
                    "source_id": "wikihow~1", "split": "val", "split_type": "indomain",
                    "label": "1"}],
                   {"response": "B", "options": ["Sing a song.", "Place the roots in the hole.",
                                                 "Fly away.", "Paint the moon."],
                    "input": "Planting a tree: How to plant a tree. Dig a hole.\nA. Sing a song."
                             "\nB. Place the roots in the hole.\nC. Fly away.\nD. Paint the "
                             "moon."}),
    "winogrande": ([{"sentence": "The cup did not fit in the box because the _ was too big.",
                     "option1": "cup", "option2": "box", "answer": "1"}],
                   {"response": "A", "options": ["cup", "box"]}),
    "arc": ([{"id": "Q1", "question": "Which gas do plants take in from the air?",
              "choices": {"text": ["helium", "carbon dioxide", "neon", "argon"],
                          "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
             {"id": "Q2", "question": "How many legs does an insect have?",
              "choices": {"text": ["two", "four", "six"], "label": ["1", "2", "3"]},
              "answerKey": "3"}],
            {"response": "B", "label": "B",
             "options": ["helium", "carbon dioxide", "neon", "argon"]}),
    "xsum": ([{"document": "The village fair opened on Saturday. It drew many visitors.",
               "summary": "A village fair opened with many visitors.", "id": "1"}],
             {"input": "The village fair opened on Saturday. It drew many visitors.",
              "response": "A village fair opened with many visitors."}),
    "billsum": ([{"text": "SECTION 1. SHORT TITLE. This Act may be cited as the Parks Act.",
                  "summary": "Parks Act - Funds parks.", "title": "To fund parks."}],
                {"response": "Parks Act - Funds parks."}),
    "cnn_dailymail": ([{"article": "A new bridge opened in the town on Monday.",
                        "highlights": "New bridge opens.\nIt took two years to build.",
                        "id": "abc"}],
                      {"response": "New bridge opens.\nIt took two years to build."}),
    "wmt14_en_fr": ([{"translation": {"fr": "La maison est rouge.", "en": "The house is red."}}],
                    {"input": "The house is red.", "response": "La maison est rouge."}),
    "mbpp": ([{"task_id": 2, "text": "Write a function to add two numbers.",
               "code": "def add(a, b):\r\n  return a + b",
               "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0",
                             "assert add(-1, 1) == 0"],
               "test_setup_code": "", "challenge_test_list": []}],
             {"response": "def add(a, b):\n  return a + b", "entry_point": "add",
              "tests": "assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0\n"}),
    "humaneval": ([{"task_id": f"HumanEval/{i}",
                    "prompt": f"def add{i}(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
                    "canonical_solution": "    return a + b\n",
                    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n"
                            "    assert candidate(1, 2) == 3\n",
                    "entry_point": f"add{i}"} for i in range(5)],
                  {"input": "def add0(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
                   "response": "    return a + b\n", "entry_point": "add0"}),
    "wikitext": ([{"text": ""}, {"text": " = Oak = \n"}, {"text": ""},
                  {"text": " The oak is a tree with lobed leaves . It grows slowly and lives "
                           "for centuries . Its wood is hard . \n"},
                  {"text": " = = Growth = = \n"}, {"text": " Too short . \n"}],
                 {"input": "The oak is a tree with lobed leaves .",
                  "response": "It grows slowly and lives for centuries . Its wood is hard ."}),
    "aeslc": ([{"email_body": "Please send me the notes from the planning meeting by Friday.",
                "subject_line": "Planning notes"}],
              {"input": "Please send me the notes from the planning meeting by Friday.",
               "response": "Planning notes"}),
}


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def hub_off(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_every_hub_task_has_rows_here_and_the_registry_holds_every_family():
    hub_tasks = tasks.available(source="hub")
    assert sorted(HUB_ROWS) == hub_tasks
    assert set(hub_tasks) == set(tasks.available()) - set(PLAIN)
    assert tasks.available(source="offline") == tasks.available()
    assert tasks.available(offline=True) == list(PLAIN)
    assert {tasks.get(n).family for n in tasks.available()} == set(tasks.FAMILIES)


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_a_hub_task_loads_local_files_in_the_hub_schema(tmp_path, hub_off, name):
    rows, expected = HUB_ROWS[name]
    suffix = ".parquet" if name in ("arc", "hellaswag") else ".jsonl"
    train = _write(tmp_path / f"train{suffix}", rows)
    test = _write(tmp_path / f"test{suffix}", rows)
    task = tasks.get(name)
    train_records, test_records = task.load_files(0, train, test)
    assert train_records == test_records and train_records
    first = train_records[0]
    assert {k: first[k] for k in expected} == expected
    assert first["source"] == name and first["harmful"] is False
    assert task.gold(first) is not None


def test_csv_files_work_for_text_columns_and_list_columns_ask_for_json(tmp_path, hub_off):
    path = _write(tmp_path / "fpb.csv", HUB_ROWS["financial_sentiment"][0])
    (first, *_), _ = tasks.get("financial_sentiment").load_files(0, path, path)
    assert first["label"] == "positive"
    path = _write(tmp_path / "hs.csv", HUB_ROWS["hellaswag"][0])
    with pytest.raises(DataError, match=r"hs.csv row 1: field 'endings' holds text, not a list "
                                        r"of texts \(CSV cells hold only text"):
        tasks.get("hellaswag").load_files(0, path, path)


@pytest.mark.parametrize("name", ["financial_sentiment", "humaneval"])
def test_a_one_split_dataset_is_cut_by_the_data_seed_disjointly(tmp_path, hub_off, name):
    rows = HUB_ROWS[name][0]
    path = _write(tmp_path / "all.jsonl", rows + rows[:2])  # duplicates stay on one side
    task = tasks.get(name)
    train, test = task.load_files(3, path)
    assert (train, test) == task.load_files(3, path)
    assert len(train) + len(test) == len(rows) + 2 and test
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in test}
    cuts = {tuple(prompt_key(r) for r in task.load_files(s, path)[1]) for s in range(6)}
    assert len(cuts) > 1


class _RecordingLoad:
    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args[0], kwargs["name"], kwargs["split"]))
        return datasets.Dataset.from_list(self.rows)


@pytest.mark.parametrize("name,hub_id,config,splits", [
    ("financial_sentiment", "takala/financial_phrasebank", "sentences_allagree", ["train"]),
    ("boolq", "google/boolq", None, ["train", "validation"]),
    ("hellaswag", "Rowan/hellaswag", None, ["train", "validation"]),
    ("winogrande", "allenai/winogrande", "winogrande_xl", ["train", "validation"]),
    ("arc", "allenai/ai2_arc", "ARC-Challenge", ["train", "test"]),
    ("xsum", "EdinburghNLP/xsum", None, ["train", "test"]),
    ("billsum", "FiscalNote/billsum", None, ["train", "test"]),
    ("cnn_dailymail", "abisee/cnn_dailymail", "3.0.0", ["train", "test"]),
    ("wmt14_en_fr", "wmt/wmt14", "fr-en", ["train[:10000]", "test"]),
    ("mbpp", "google-research-datasets/mbpp", "full", ["train", "test"]),
    ("humaneval", "openai/openai_humaneval", None, ["test"]),
    ("wikitext", "Salesforce/wikitext", "wikitext-2-raw-v1", ["train", "test"]),
    ("aeslc", "Yale-LILY/aeslc", None, ["train", "test"]),
    ("sst2", "stanfordnlp/sst2", None, ["train", "validation"]),
    ("gsm8k", "openai/gsm8k", "main", ["train", "test"]),
])
def test_the_hub_loader_asks_datasets_for_the_hub_ids_configs_and_splits(
        monkeypatch, name, hub_id, config, splits):
    fake = _RecordingLoad(HUB_ROWS[name][0])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    train, test = tasks.get(name).load(0)
    assert fake.calls == [(hub_id, config, s) for s in splits]
    assert train and test


def test_the_existing_tasks_load_as_before(monkeypatch):
    fake = _RecordingLoad(HUB_ROWS["sst2"][0])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert tasks.get("sst2").load(0) == (sources.load_spec("sst2:train", default_harmful=False),
                                         sources.load_spec("sst2:validation",
                                                           default_harmful=False))
    from hfjax.data.synthetic import split_rows, task_rows
    for name, pool in (("sentiment", "sentiment"), ("topic", "topic"), ("sst2", "sentiment"),
                       ("ag_news", "topic")):
        source = "offline" if name in ("sst2", "ag_news") else None
        assert tasks.get(name).load(4, source) == split_rows(task_rows(pool), 500, 4)


@pytest.mark.parametrize("name,rows,problem", [
    ("boolq", [{"question": "is it", "answer": True}], r"has no field 'passage'"),
    ("boolq", [{"question": "is it", "answer": "maybe", "passage": "p"}],
     r"row 1: field 'answer' holds 'maybe', not a boolean"),
    ("hellaswag", [{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": "7"}],
     r"row 1: field 'label' holds '7', not one of \[0, 1, 2, 3\]"),
    ("hellaswag", [{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": ""}],
     r"'test' split is unlabelled: use 'validation'"),
    ("hellaswag", [{"ctx": "c", "endings": ["a", "b"], "label": "0"}], r"2 endings, not 4"),
    ("winogrande", [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "3"}],
     r"field 'answer' holds '3', not one of \[1, 2\]"),
    ("winogrande", [{"sentence": "No blank.", "option1": "x", "option2": "y", "answer": "1"}],
     r"has no blank '_'"),
    ("arc", [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
              "answerKey": "E"}], r"'answerKey' holds 'E', not one of the choice labels"),
    ("financial_sentiment", [{"sentence": "s", "label": 5}], r"label 5 is not one of 0..2"),
    ("wmt14_en_fr", [{"translation": {"en": "Hello."}}], r"must hold 'en' and 'fr' texts"),
    ("mbpp", [{"text": "t", "code": "def f():\n  return 1", "test_list": ["assert g() == 1"],
               "test_setup_code": ""}], r"no function that the code defines is called"),
    ("xsum", [{"document": "d", "summary": "  "}], r"field 'summary' is empty"),
    ("humaneval", [{"prompt": "def f():\n", "canonical_solution": "  return 1\n"}],
     r"has no field 'test'"),
    ("aeslc", [{"email_body": "b", "subject_line": None}], r"row 1: field 'subject_line' is "
                                                           r"missing \(null\)"),
])
def test_malformed_files_name_the_file_the_row_and_the_problem(tmp_path, hub_off, name, rows,
                                                              problem):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=problem) as err:
        tasks.get(name).load_files(0, path, path)
    assert "bad.jsonl" in str(err.value)
    missing = "has no field" in problem or "missing" in problem
    assert isinstance(err.value, MissingFieldError) == missing


def test_a_file_of_only_headings_and_blank_lines_has_no_items(tmp_path, hub_off):
    path = _write(tmp_path / "w.jsonl", [{"text": " = Title = \n"}, {"text": ""}])
    with pytest.raises(DataError, match="has no items"):
        tasks.get("wikitext").load_files(0, path, path)


def test_unknown_names_and_impossible_requests_are_task_errors():
    with pytest.raises(tasks.TaskError, match="unknown task 'chess'; available"):
        tasks.get("chess")
    with pytest.raises(tasks.TaskError, match="source 'cloud' is not one of"):
        tasks.get("boolq").load(0, "cloud")
    with pytest.raises(tasks.TaskError, match="'sentiment' has no hub loader; it loads from "
                                              r"\['offline'\]"):
        tasks.get("sentiment").load(0, "hub")
    with pytest.raises(tasks.TaskError, match="no hub schema"):
        tasks.get("topic").load_files(0, "x.jsonl")
    with pytest.raises(tasks.TaskError, match="source 'disk' is not one of"):
        tasks.available(source="disk")
    with pytest.raises(tasks.TaskError, match="unknown family 'poetry'"):
        tasks.TaskSpec("x", "poetry", "offline", 8, "", generator=lambda s: ([], []))
    with pytest.raises(tasks.TaskError, match="neither a hub loader nor a generator"):
        tasks.TaskSpec("x", "choice", "choice", 8, "")
    with pytest.raises(tasks.TaskError, match="is registered twice"):
        tasks.add(tasks.get("boolq"))


def test_register_keeps_its_keywords_and_places_the_loader_by_offline(monkeypatch):
    monkeypatch.setattr(tasks.REGISTRY, "_specs", dict(tasks.REGISTRY._specs))
    rows = [make_record("Even or odd?", "even", "t", False, input=str(i), label="even")
            for i in range(4)]
    tasks.register("t_gen", metric="offline", max_new_tokens=4, about="", offline=True)(
        lambda seed: (rows[:3], rows[3:]))
    tasks.register("t_hub", metric="offline", max_new_tokens=4, about="", offline=False,
                   family="classification")(lambda seed: (rows[:2], rows[2:]))
    gen, hub = tasks.get("t_gen"), tasks.get("t_hub")
    assert (gen.sources, gen.offline, gen.family) == (("offline",), True, "classification")
    assert (hub.sources, hub.offline) == (("hub",), False)
    assert gen.load(0) == (rows[:3], rows[3:]) and hub.load(0) == (rows[:2], rows[2:])
    assert "t_gen" in tasks.available(offline=True) and "t_hub" in tasks.available(offline=False)


def test_gold_is_what_each_family_scores_against():
    def first(name):
        return tasks.get(name).load(0, "offline")[1][0]

    assert tasks.get("sst2").gold(first("sst2")) == first("sst2")["label"]
    item = first("arc")
    assert tasks.get("arc").gold(item) == {"label": item["label"], "options": item["options"]}
    assert tasks.get("gsm8k").gold(first("gsm8k")) == first("gsm8k")["answer"]
    for name in ("xsum", "wmt14_en_fr", "wikitext"):
        assert tasks.get(name).gold(first(name)) == first(name)["response"]
    he, mb = first("humaneval"), first("mbpp")
    assert tasks.get("humaneval").gold(he) == {"tests": he["tests"],
                                               "entry_point": he["entry_point"],
                                               "prefix": he["input"]}
    assert tasks.get("mbpp").gold(mb)["prefix"] == ""
    with pytest.raises(tasks.TaskError, match="no 'options' to score against"):
        tasks.get("boolq").gold({**first("boolq"), "options": None})


# ---------------------------------------------------------------- the offline generators
@pytest.mark.parametrize("name", sorted(set(tasks.available()) - set(PLAIN)))
def test_a_generator_is_deterministic_and_splits_disjointly_by_prompt_key(name):
    task = tasks.get(name)
    train, test = task.load(0, "offline")
    assert (train, test) == task.load(0, "offline")
    assert train and test
    train_keys, test_keys = {prompt_key(r) for r in train}, {prompt_key(r) for r in test}
    assert not train_keys & test_keys and len(test_keys) == len(test)
    assert {prompt_key(r) for r in task.load(1, "offline")[1]} != test_keys
    assert all(r["source"].startswith("offline_") and task.gold(r) for r in train + test)


def test_split_by_key_keeps_duplicate_prompts_on_one_side():
    rows = [make_record("p", "r", "s", False, input=f"item {i % 5}") for i in range(20)]
    train, test = split_by_key(rows, 0.2, 0)
    assert len(test) == 4 and len({r["input"] for r in test}) == 1
    assert not {r["input"] for r in train} & {r["input"] for r in test}


def _offline(name):
    train, test = tasks.get(name).load(0, "offline")
    return train + test


@pytest.mark.parametrize("name", ["boolq", "hellaswag", "winogrande", "arc"])
def test_generated_choice_items_answer_with_a_letter_of_one_of_their_options(name):
    for r in _offline(name):
        index = "ABCD".index(r["label"])
        assert r["response"] == r["label"] and index < len(r["options"])
        assert f"\n{r['label']}. {r['options'][index]}" in r["input"]


def test_generated_boolq_answers_yes_exactly_when_the_passage_states_the_fact():
    rows = generated_choice.boolq_rows()
    for row in rows:
        value = re.split(r" (?:in|of|by) ", row["question"])[-1]
        assert (value in row["passage"].lower()) == row["answer"], row["question"]
    assert sum(r["answer"] for r in rows) * 2 == len(rows)


def test_generated_hellaswag_gold_ending_belongs_to_the_context_activity():
    gold_by_activity = defaultdict(set)
    for row in generated_choice.hellaswag_rows():
        gold_by_activity[row["activity_label"]].add(row["endings"][int(row["label"])])
    assert all(len(golds) == 1 for golds in gold_by_activity.values())
    assert len({g for golds in gold_by_activity.values() for g in golds}) == len(gold_by_activity)


def test_generated_winogrande_twins_differ_in_one_word_and_in_their_answer():
    twins = defaultdict(list)
    for row in generated_choice.winogrande_rows():
        twins[row["option1"], row["option2"], row["sentence"].split("_")[0]].append(row)
    for pair in twins.values():
        assert sorted(r["answer"] for r in pair) == ["1", "2"]
        words = [r["sentence"].split() for r in pair]
        assert sum(a != b for a, b in zip(*words, strict=False)) >= 1


def test_generated_arc_items_have_one_right_choice():
    rows = generated_choice.arc_rows()
    closest = [r for r in rows if r["question"] == "Which planet is closest to the Sun?"]
    assert closest and all(
        r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])] == "Mercury"
        for r in closest)
    for r in rows:
        assert len(set(r["choices"]["text"])) == 4 and r["answerKey"] in r["choices"]["label"]


_SUMMARY_VERBS = {"Directs", "Authorizes"}  # BillSum's summary style, not facts


def _facts(summary):
    """Numbers and capitalized words of a summary, except each line's first word."""
    words = [w for line in summary.splitlines() for w in line.split()[1:]]
    return {w.strip(".,") for w in words if w[:1].isupper() or w[:1].isdigit() or w[:1] == "$"}


@pytest.mark.parametrize("name", ["xsum", "billsum", "cnn_dailymail"])
def test_generated_summaries_restate_facts_of_their_documents(name):
    for r in _offline(name):
        facts = _facts(r["response"]) - _SUMMARY_VERBS
        assert len(facts) >= 4, r["response"]
        assert all(f in r["input"] for f in facts), (facts, r["input"])
    for m in landmarks.landmarks()[:10]:
        assert m.name in generated_summarization.xsum_summary(m)
        assert str(m.year) in landmarks.article(m)


def test_generated_translations_compose_the_phrase_table_with_agreeing_verbs():
    pairs = {r["input"]: r["response"] for r in _offline("wmt14_en_fr")}
    assert pairs["My parents read a book every morning."] == \
        "Mes parents lisent un livre chaque matin."
    assert pairs["My sister drinks some water today."] == "Ma sœur boit de l'eau aujourd'hui."
    for en, fr in pairs.items():
        plural = en.split()[1] in ("parents", "children", "students", "friends")
        verb = fr.split()[3 if fr.startswith(("La petite", "Le vieil")) else 2]
        assert verb.endswith("ent") == plural, (en, fr)


def _run(program):
    exec(compile(program, "<generated>", "exec"), {})


@pytest.mark.parametrize("name", ["mbpp", "humaneval"])
def test_generated_reference_code_passes_its_tests_and_a_wrong_body_fails(name):
    records = _offline(name)
    for r in records:
        gold = tasks.get(name).gold(r)
        _run(gold["prefix"] + r["response"] + "\n" + gold["tests"])
        assert re.search(rf"def {gold['entry_point']}\(", gold["prefix"] + r["response"])
    r = records[0]
    gold = tasks.get(name).gold(r)
    wrong = f"def {gold['entry_point']}(*args):\n    return None\n" if name == "mbpp" else \
        "    return None\n"
    with pytest.raises(AssertionError):
        _run(gold["prefix"] + wrong + "\n" + gold["tests"])


# each template's answer from its question's numbers (in order of appearance), solved apart
GSM8K_SOLVERS = {
    "stickers": lambda have, packs, each: have + packs * each,
    "babysitting": lambda rate, sat, sun, spent: rate * (sat + sun) - spent,
    "muffins": lambda trays, each, morning, afternoon: trays * each - morning - afternoon,
    "pages": lambda pages, monday: pages - 3 * monday,
    "tomato": lambda rows, plants, each, box: rows * plants * each // box,
    "miles per hour": lambda v1, h1, v2, h2: v1 * h1 + v2 * h2,
}


def test_generated_gsm8k_solutions_compute_correctly_and_end_with_the_answer():
    for r in _offline("gsm8k"):
        (solve,) = [fn for key, fn in GSM8K_SOLVERS.items() if key in r["prompt"]]
        assert int(r["answer"]) == solve(*map(int, re.findall(r"\d+", r["prompt"])))
        for lhs, result in re.findall(r"<<([^=]+)=(\d+)>>", r["response"]):
            a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", lhs).groups()
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                     "/": int(a) / int(b)}[op]
            assert value == int(result), lhs
        assert r["response"].endswith(f"The final answer is:  {r['answer']}")
        assert int(r["answer"]) == int(result) >= 0


def test_generated_passages_and_emails_continue_and_name_their_point():
    for r in _offline("wikitext"):
        assert not sources.is_heading(r["input"]) and r["input"].endswith(".")
        assert len((r["input"] + " " + r["response"]).split()) >= sources.MIN_PASSAGE_WORDS
    for r in _offline("aeslc"):
        words = [w.strip(":").lower() for w in r["response"].split() if len(w) >= 4]
        assert words and all(w in r["input"].lower() for w in words), r["response"]


def test_generated_financial_sentences_carry_the_sentiment_of_their_verbs():
    for r in _offline("financial_sentiment"):
        text = r["input"]
        expected = "positive" if re.search(r" (rose|increased|won) ", text) else \
            "negative" if re.search(r" (fell|decreased|cut) ", text) else "neutral"
        assert r["label"] == expected, text


def test_split_passage_cuts_at_the_sentence_end_nearest_the_middle():
    assert sources.split_passage("One two three . Four five six seven . Eight .") == (
        "One two three .", "Four five six seven . Eight .")
    assert sources.split_passage("no sentence end here at all") == (
        "no sentence end", "here at all")
    with pytest.raises(DataError, match="two words"):
        sources.split_passage("word")
