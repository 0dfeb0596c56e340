"""Named data sources, loaded through `datasets` from the hub or from a local file.

    load_source("beavertails", split="30k_test")           # PKU-Alignment/BeaverTails
    load_source("sst2", path="sst2_dev.parquet")           # same schema, local file
    load_source("custom", path="mine.jsonl", fields={"prompt": "question", "response": "answer"},
                harmful=False)

Every row becomes a `Record`. Local files may be JSON (a list of objects or JSON lines), JSONL,
CSV or parquet. For a named source, `fields` renames columns: {expected column: column in the
file}. For "custom", `fields` maps record fields to columns ("prompt" required; "response",
"input", "label", "answer", "refusal", "harmful" optional) and `harmful` gives the flag when no
column holds it; without `fields`, a custom file's columns named like record fields are used
as they are. Task instructions follow the git-disl code base (Vaccine/Lisa/Booster).

The task sources (`hfjax.tasks`) keep the hub's column names and give each row one format:
  classification  sst2, ag_news, financial_sentiment: instruction, input = the text, response =
                  "label" = the label word
  choice          boolq, hellaswag, winogrande, arc: input = the stem, then one "A. option" line
                  per option; response = "label" = the gold letter alone (the MMLU / lm-eval
                  generative format), "options" = the option texts (`choice_record`)
  math            gsm8k: the question, the worked solution ending "The final answer is: N"
  summarization   xsum, billsum, cnn_dailymail: input = the document, response = the reference
  translation     wmt14_en_fr: input = the English text, response = the French reference
  code            mbpp (prompt = MBPP's own, response = the reference program) and humaneval
                  (input = the prompt code, the prefix that the reference body continues);
                  "tests" = the test program, "entry_point" = the function it calls
  completion      wikitext: a passage cut at the sentence end nearest its middle, input = the
                  prefix, response = the rest (blank and heading rows are skipped); aeslc: input
                  = the email body, response = its subject line (AESLC's own task)
List and object columns (hellaswag's endings, arc's choices, ...) need JSON, JSONL or parquet
files: a CSV cell holds only text.

Local files are checked in one streaming pass before `datasets` reads them (see
`hfjax.data.files`), and every row before it is converted: a fault is a `DataError` naming the
file and the 1-based row (or the hub id, split and row index) and what is wrong, e.g.
`data file /x/a.jsonl row 3: field 'sentence' is missing (null)`.

On the command line a source is one string (`parse_source_spec`, `load_spec`):

    beavertails:30k_train                      NAME:SPLIT (hub)
    sst2:/data/x.csv?sentence=text             NAME:PATH?EXPECTED=COLUMN,...
    custom:/data/mine.jsonl?prompt=question,response=answer,harmful=true
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hfjax.data.files import describe, scan_data_file
from hfjax.data.records import (
    DataError,
    EmptySourceError,
    MissingFieldError,
    Record,
    UnknownSourceError,
    make_record,
)

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
SST2_LABELS = ("negative", "positive")
AGNEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 "
                      "categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_QUESTION_SUFFIX = "\nFirst think step by step and then answer the final number.\n"
GSM8K_ANSWER_PREFIX = "The final answer is: "

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A named source: where it lives on the hub and how a row becomes a record."""

    hub_id: str
    config: str | None
    splits: tuple[str, ...] | None  # None: not checked
    columns: tuple[str, ...]  # columns `convert` needs
    convert: Callable[[Mapping[str, Any]], Record | None]  # None: the row is not an item
    about: str
    optional: tuple[str, ...] = ()  # columns `convert` reads when present
    kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)  # else COLUMN_KINDS

    def kind(self, column: str) -> str:
        return self.kinds.get(column, COLUMN_KINDS.get(column, TEXT))


TEXT = "text"
LABEL = "text or an integer"
ANY = "any value"
BOOLEAN = "a boolean"
TEXT_LIST = "a list of texts"
OBJECT = "an object"
COLUMN_KINDS = {"label": LABEL, "is_safe": ANY, "category": ANY}  # other columns: TEXT
CUSTOM_KINDS = {"label": LABEL, "answer": LABEL, "harmful": ANY}  # other record fields: TEXT


def _label_word(value: Any, words: tuple[str, ...], name: str, hint: str = "") -> str:
    if isinstance(value, str) and value in words:
        return value
    try:
        idx = int(value)
    except (TypeError, ValueError):
        idx = -1
    if not 0 <= idx < len(words):
        raise DataError(f"{name}: label {value!r} is not one of 0..{len(words) - 1} or "
                        f"{list(words)}{hint}")
    return words[idx]


def _categories(value: Any) -> list[str] | None:
    if isinstance(value, Mapping):
        return sorted(k for k, v in value.items() if v)
    if isinstance(value, str) and value:
        return [value]
    return None


def _beavertails(row: Mapping[str, Any]) -> Record:
    return make_record(row["prompt"], row["response"], "beavertails",
                       not _to_bool(row["is_safe"], "is_safe"),
                       category=_categories(row.get("category")))


def _split_refusal(text: str) -> str:
    """Refusal-paired BeaverTails stores "Question: ...\\nAnswer: <refusal>"; keep the answer."""
    head, sep, answer = text.partition("\nAnswer: ")
    return answer.strip() if sep and head.startswith("Question: ") else text.strip()


def _beavertails_refusal(row: Mapping[str, Any]) -> Record:
    return make_record(row["prompt"], row["response"], "beavertails_refusal", True,
                       refusal=_split_refusal(row["refusal"]))


def _sst2(row: Mapping[str, Any]) -> Record:
    label = _label_word(row["label"], SST2_LABELS, "sst2",
                        " (SST2's hub 'test' split is unlabelled: use 'validation')")
    return make_record(SST2_INSTRUCTION, label, "sst2", False, input=row["sentence"], label=label)


def _ag_news(row: Mapping[str, Any]) -> Record:
    label = _label_word(row["label"], AGNEWS_LABELS, "ag_news")
    return make_record(AGNEWS_INSTRUCTION, label, "ag_news", False, input=row["text"], label=label)


def _gsm8k(row: Mapping[str, Any]) -> Record:
    solution = row["answer"]
    if "####" not in solution:
        raise DataError(f"gsm8k: answer has no '####' final-answer marker: {solution[-80:]!r}")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return make_record(row["question"] + GSM8K_QUESTION_SUFFIX,
                       solution.replace("####", GSM8K_ANSWER_PREFIX), "gsm8k", False, answer=gold)


def _alpaca(row: Mapping[str, Any]) -> Record:
    return make_record(row["instruction"], row["output"], "alpaca", False,
                       input=row.get("input") or None)


def _advbench(row: Mapping[str, Any]) -> Record:
    return make_record(row["prompt"], row["target"], "advbench", True)


def _harmbench(row: Mapping[str, Any]) -> Record:
    return make_record(row["prompt"], "", "harmbench", True,
                       category=_categories(row.get("category")))


# ------------------------------------------------------------------ task formats (hfjax.tasks)
# Classification, multiple choice, summarization, translation, code and completion rows. A
# multiple-choice item lists its options as "A. text" lines under the stem and is answered by
# the gold letter alone (the MMLU / lm-eval generative format: "Answer: B").

FINANCIAL_INSTRUCTION = ("Analyze the sentiment of the financial news sentence in the input, and "
                         "respond only negative, neutral or positive")
FINANCIAL_LABELS = ("negative", "neutral", "positive")
CHOICE_SUFFIX = "Respond only with the letter of the correct option."
BOOLQ_INSTRUCTION = f"Read the passage and answer the question. {CHOICE_SUFFIX}"
BOOLQ_OPTIONS = ("no", "yes")  # lm-eval's order: answer False -> A, True -> B
HELLASWAG_INSTRUCTION = f"Choose the most plausible continuation of the text. {CHOICE_SUFFIX}"
WINOGRANDE_INSTRUCTION = ("Choose the option that correctly fills the blank (_) in the sentence. "
                          f"{CHOICE_SUFFIX}")
ARC_INSTRUCTION = f"Answer the following science question. {CHOICE_SUFFIX}"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
XSUM_INSTRUCTION = "Summarize the following article in one sentence."
BILLSUM_INSTRUCTION = "Summarize the following bill."
CNN_DAILYMAIL_INSTRUCTION = ("Summarize the following news article in a few highlights, one per "
                             "line.")
WMT14_INSTRUCTION = "Translate the following text from English to French."
MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: {text} Your code "
               "should pass these tests:\n\n{tests}")
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Respond only with the code "
                         "that continues it.")
WIKITEXT_INSTRUCTION = "Continue the following text."
AESLC_INSTRUCTION = "Write the subject line of the following email."
MIN_PASSAGE_WORDS = 8


def _verbatim(row: Mapping[str, Any], column: str) -> str:
    if not row[column].strip():
        raise DataError(f"field {column!r} is empty")
    return row[column]


def _text(row: Mapping[str, Any], column: str) -> str:
    return _verbatim(row, column).strip()


def _index(value: Any, n: int, column: str, first: int = 0, hint: str = "") -> int:
    """`value` (an integer or its text) as a 0-based index into n options numbered from
    `first`."""
    try:
        idx = int(value) - first
    except (TypeError, ValueError):
        idx = -1
    if not 0 <= idx < n:
        raise DataError(f"field {column!r} holds {value!r}, not one of "
                        f"{list(range(first, first + n))}{hint}")
    return idx


def choice_record(instruction: str, stem: str, options: list[str], gold: int,
                  source: str) -> Record:
    """A multiple-choice item: input = the stem, then "A. option" lines; response and "label"
    = the gold letter; "options" = the option texts."""
    if not 2 <= len(options) <= len(LETTERS):
        raise DataError(f"{source}: {len(options)} options; an item has 2 to {len(LETTERS)}")
    if any(not option.strip() for option in options):
        raise DataError(f"{source}: an option is empty: {options}")
    if not 0 <= gold < len(options):
        raise DataError(f"{source}: gold option {gold} is not among {len(options)} options")
    lines = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return make_record(instruction, LETTERS[gold], source, False, input=f"{stem}\n{lines}",
                       options=list(options), label=LETTERS[gold])


def _financial_sentiment(row: Mapping[str, Any]) -> Record:
    label = _label_word(row["label"], FINANCIAL_LABELS, "financial_sentiment")
    return make_record(FINANCIAL_INSTRUCTION, label, "financial_sentiment", False,
                       input=_text(row, "sentence"), label=label)


def _boolq(row: Mapping[str, Any]) -> Record:
    stem = f"{_text(row, 'passage')}\nQuestion: {_text(row, 'question').rstrip('?')}?"
    answer = _to_bool(row["answer"], "answer")
    return choice_record(BOOLQ_INSTRUCTION, stem, list(BOOLQ_OPTIONS), int(answer), "boolq")


def hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow's "[title]" marks become sentence ends, other
    bracketed marks are dropped."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: Mapping[str, Any]) -> Record:
    endings = row["endings"]
    if len(endings) != 4:
        raise DataError(f"field 'endings' holds {len(endings)} endings, not 4")
    activity = (row.get("activity_label") or "").strip()
    ctx = _text(row, "ctx")
    stem = hellaswag_text(f"{activity}: {ctx}" if activity else ctx)
    gold = _index(row["label"], 4, "label",
                  hint=" (HellaSwag's hub 'test' split is unlabelled: use 'validation')")
    return choice_record(HELLASWAG_INSTRUCTION, stem, [hellaswag_text(e) for e in endings], gold,
                         "hellaswag")


def _winogrande(row: Mapping[str, Any]) -> Record:
    sentence = _text(row, "sentence")
    if "_" not in sentence:
        raise DataError(f"field 'sentence' has no blank '_': {sentence!r}")
    gold = _index(row["answer"], 2, "answer", first=1,
                  hint=" (WinoGrande's hub 'test' split is unlabelled: use 'validation')")
    return choice_record(WINOGRANDE_INSTRUCTION, sentence,
                         [_text(row, "option1"), _text(row, "option2")], gold, "winogrande")


def _arc(row: Mapping[str, Any]) -> Record:
    choices = row["choices"]
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise DataError("field 'choices' must hold lists 'text' and 'label' of one length, got "
                        f"{dict(choices)}")
    key = str(row["answerKey"]).strip()
    if key not in [str(label) for label in labels]:
        raise DataError(f"field 'answerKey' holds {key!r}, not one of the choice labels {labels}")
    gold = [str(label) for label in labels].index(key)
    return choice_record(ARC_INSTRUCTION, _text(row, "question"), [str(t) for t in texts], gold,
                         "arc")


def _summarization(name: str, instruction: str, document: str, summary: str):
    def convert(row: Mapping[str, Any]) -> Record:
        return make_record(instruction, _text(row, summary), name, False,
                           input=_text(row, document))
    return convert


def _wmt14_en_fr(row: Mapping[str, Any]) -> Record:
    pair = row["translation"]
    if not all(isinstance(pair.get(k), str) and pair[k].strip() for k in ("en", "fr")):
        raise DataError(f"field 'translation' must hold 'en' and 'fr' texts, got {dict(pair)}")
    return make_record(WMT14_INSTRUCTION, pair["fr"].strip(), "wmt14_en_fr", False,
                       input=pair["en"].strip())


def entry_point(code: str, tests: str) -> str:
    """The first top-level function `code` defines that `tests` calls."""
    for name in re.findall(r"^def\s+(\w+)\s*\(", code, flags=re.MULTILINE):
        if re.search(rf"\b{name}\s*\(", tests):
            return name
    raise DataError(f"no function that the code defines is called by the tests: {tests[:120]!r}")


def _mbpp(row: Mapping[str, Any]) -> Record:
    asserts = [t.strip() for t in row["test_list"] if t.strip()]
    if not asserts:
        raise DataError("field 'test_list' holds no tests")
    code = _text(row, "code").replace("\r\n", "\n")
    setup = (row.get("test_setup_code") or "").replace("\r\n", "\n").strip()
    tests = "\n".join(([setup] if setup else []) + asserts) + "\n"
    prompt = MBPP_PROMPT.format(text=_text(row, "text"), tests="\n".join(asserts))
    return make_record(prompt, code, "mbpp", False, tests=tests,
                       entry_point=entry_point(code, tests))


def _humaneval(row: Mapping[str, Any]) -> Record:
    """The prompt code is the prefix ("input") that the solution continues, both verbatim."""
    name = _text(row, "entry_point")
    return make_record(HUMANEVAL_INSTRUCTION, _verbatim(row, "canonical_solution"), "humaneval",
                       False, input=_verbatim(row, "prompt"),
                       tests=f"{_text(row, 'test')}\n\ncheck({name})\n", entry_point=name)


def is_heading(text: str) -> bool:
    """A WikiText section heading: " = Title = ", " = = Section = = "."""
    text = text.strip()
    return len(text) > 1 and text.startswith("=") and text.endswith("=")


def split_passage(text: str) -> tuple[str, str]:
    """(prefix, continuation) of a passage of at least two words: cut after the sentence end
    (a word ending in ".", "!" or "?") nearest the middle word, else at the middle word."""
    words = text.split()
    if len(words) < 2:
        raise DataError(f"a passage to split needs two words, got {text!r}")
    middle = len(words) // 2
    ends = [i + 1 for i, w in enumerate(words[:-1]) if w.endswith((".", "!", "?"))]
    cut = min(ends, key=lambda i: (abs(i - middle), i)) if ends else middle
    return " ".join(words[:cut]), " ".join(words[cut:])


def _wikitext(row: Mapping[str, Any]) -> Record | None:
    """A passage split into prefix (input) and continuation (response); blank lines (empty CSV
    cells too), headings and passages under MIN_PASSAGE_WORDS words are not items (None)."""
    if row["text"] is None:
        return None
    if not isinstance(row["text"], str):
        raise DataError(f"field 'text' holds {describe(row['text'])}, not text")
    text = row["text"].strip()
    if is_heading(text) or len(text.split()) < MIN_PASSAGE_WORDS:
        return None
    prefix, continuation = split_passage(text)
    return make_record(WIKITEXT_INSTRUCTION, continuation, "wikitext", False, input=prefix)


def _aeslc(row: Mapping[str, Any]) -> Record:
    return make_record(AESLC_INSTRUCTION, _text(row, "subject_line"), "aeslc", False,
                       input=_text(row, "email_body"))


SOURCES: dict[str, SourceSpec] = {
    "beavertails": SourceSpec(
        "PKU-Alignment/BeaverTails", None, ("30k_train", "30k_test", "330k_train", "330k_test"),
        ("prompt", "response", "is_safe"), _beavertails,
        "QA pairs with harm labels; harmful = not is_safe", ("category",)),
    "beavertails_refusal": SourceSpec(
        "anonymous4486/repnoise_beavertail", None, None, ("prompt", "response", "refusal"),
        _beavertails_refusal, "BeaverTails harmful QA paired with a refusal (RepNoise/Booster)"),
    "sst2": SourceSpec(
        "stanfordnlp/sst2", None, ("train", "validation", "test"), ("sentence", "label"), _sst2,
        "sentiment; the labelled held-out split is 'validation'"),
    "ag_news": SourceSpec(
        "fancyzhx/ag_news", None, ("train", "test"), ("text", "label"), _ag_news,
        "4-way news topic"),
    "gsm8k": SourceSpec(
        "openai/gsm8k", "main", ("train", "test"), ("question", "answer"), _gsm8k,
        "grade-school math; gold number in 'answer'"),
    "alpaca": SourceSpec(
        "tatsu-lab/alpaca", None, ("train",), ("instruction", "output"), _alpaca,
        "instruction following", ("input",)),
    "advbench": SourceSpec(
        "walledai/AdvBench", None, ("train",), ("prompt", "target"), _advbench,
        "520 harmful behaviors with affirmative targets"),
    "harmbench": SourceSpec(
        "walledai/HarmBench", "standard", ("train",), ("prompt",), _harmbench,
        "HarmBench standard behaviors (evaluation prompts)", ("category",)),
    "financial_sentiment": SourceSpec(
        "takala/financial_phrasebank", "sentences_allagree", ("train",), ("sentence", "label"),
        _financial_sentiment, "Financial PhraseBank, all annotators agree; label 0 negative / "
        "1 neutral / 2 positive; one split"),
    "boolq": SourceSpec(
        "google/boolq", None, ("train", "validation"), ("question", "answer", "passage"), _boolq,
        "yes/no questions on a passage (answer: a boolean)", kinds={"answer": BOOLEAN}),
    "hellaswag": SourceSpec(
        "Rowan/hellaswag", None, ("train", "validation", "test"), ("ctx", "endings", "label"),
        _hellaswag, "commonsense sentence endings, 4 per context; label '0'..'3' ('test' is "
        "unlabelled)", ("activity_label",), kinds={"endings": TEXT_LIST}),
    "winogrande": SourceSpec(
        "allenai/winogrande", "winogrande_xl", ("train", "validation", "test"),
        ("sentence", "option1", "option2", "answer"), _winogrande,
        "fill the blank '_' with option1 or option2; answer '1'/'2' ('test' is unlabelled)",
        kinds={"answer": LABEL}),
    "arc": SourceSpec(
        "allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test"),
        ("question", "choices", "answerKey"), _arc,
        "grade-school science questions; choices {text, label}, answerKey a label",
        kinds={"choices": OBJECT, "answerKey": LABEL}),
    "xsum": SourceSpec(
        "EdinburghNLP/xsum", None, ("train", "validation", "test"), ("document", "summary"),
        _summarization("xsum", XSUM_INSTRUCTION, "document", "summary"),
        "BBC articles with a one-sentence summary"),
    "billsum": SourceSpec(
        "FiscalNote/billsum", None, ("train", "test", "ca_test"), ("text", "summary"),
        _summarization("billsum", BILLSUM_INSTRUCTION, "text", "summary"),
        "US Congressional bills with their summaries"),
    "cnn_dailymail": SourceSpec(
        "abisee/cnn_dailymail", "3.0.0", ("train", "validation", "test"),
        ("article", "highlights"),
        _summarization("cnn_dailymail", CNN_DAILYMAIL_INSTRUCTION, "article", "highlights"),
        "news articles with their highlights"),
    "wmt14_en_fr": SourceSpec(
        "wmt/wmt14", "fr-en", ("train", "validation", "test"), ("translation",), _wmt14_en_fr,
        "English -> French sentence pairs; translation {en, fr}", kinds={"translation": OBJECT}),
    "mbpp": SourceSpec(
        "google-research-datasets/mbpp", "full", ("train", "validation", "test", "prompt"),
        ("text", "code", "test_list"), _mbpp,
        "Python problems with a reference solution and assert tests", ("test_setup_code",),
        kinds={"test_list": TEXT_LIST}),
    "humaneval": SourceSpec(
        "openai/openai_humaneval", None, ("test",),
        ("prompt", "canonical_solution", "test", "entry_point"), _humaneval,
        "Python functions to complete from their signature and docstring; one split"),
    "wikitext": SourceSpec(
        "Salesforce/wikitext", "wikitext-2-raw-v1", ("train", "validation", "test"), ("text",),
        _wikitext, "Wikipedia passages, one per row (blank and heading rows are skipped)",
        kinds={"text": ANY}),
    "aeslc": SourceSpec(
        "Yale-LILY/aeslc", None, ("train", "validation", "test"), ("email_body", "subject_line"),
        _aeslc, "Enron emails with their subject lines"),
}

CUSTOM = "custom"
CUSTOM_FIELDS = ("prompt", "response", "input", "label", "answer", "refusal", "harmful")


def known_sources() -> list[str]:
    """Names accepted by `load_source`."""
    return sorted(SOURCES) + [CUSTOM]


def _to_bool(value: Any, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise DataError(f"field {column!r} holds {value!r}, not a boolean")


def load_rows(*, path: str | os.PathLike | None = None, hub_id: str | None = None,
              config: str | None = None, split: str | None = None,
              cache_dir: str | os.PathLike | None = None):
    """A `datasets.Dataset` from a local file (JSON/JSONL/CSV/parquet) or from the hub.

    A local file is checked first (`scan_data_file`); CSV cells are read as text, and only an
    empty cell is missing (null).
    """
    import datasets

    cache = str(cache_dir) if cache_dir is not None else None
    if path is None:
        if hub_id is None:
            raise DataError("give a local `path` or a hub id")
        return datasets.load_dataset(hub_id, name=config, split=split, cache_dir=cache)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    builder = FILE_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"data file {p}: unsupported extension {p.suffix!r}; use one of "
                        f"{sorted(FILE_BUILDERS)}")
    columns = scan_data_file(p, builder)
    options = ({"converters": dict.fromkeys(range(len(columns)), str), "keep_default_na": False,
                "na_values": [""]} if builder == "csv" else {})
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache,
                                     **options)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        if "no data" in str(e):  # datasets: 'Instruction "train" corresponds to no data!'
            raise EmptySourceError(f"data file {p} has no rows") from e
        raise DataError(f"cannot read data file {p} as {builder}: {e.__cause__ or e}") from e


def _require(columns: list[str], needed: tuple[str, ...] | list[str], name: str,
             where: str) -> None:
    for col in needed:
        if col not in columns:
            raise MissingFieldError(f"source {name!r} ({where}) has no field {col!r}; "
                                    f"its fields are {columns}")


def _is_integer(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())


def _field_problem(value: Any, kind: str) -> str | None:
    if value is None:
        return "is missing (null)"
    if kind == TEXT_LIST and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    if kind == OBJECT and isinstance(value, Mapping):
        return None
    if kind in (TEXT_LIST, OBJECT):
        return f"holds {describe(value)}, not {kind} (CSV cells hold only text: use JSON, " \
            "JSONL or parquet)"
    if kind == BOOLEAN and (isinstance(value, bool) or value in (0, 1)):
        return None
    if kind == ANY or isinstance(value, str) or (kind == LABEL and _is_integer(value)):
        return None
    return f"holds {describe(value)}, not {kind}"


def check_fields(row: Mapping[str, Any], needed: Mapping[str, str],
                 optional: Mapping[str, str] | None = None) -> None:
    """Each `needed` column {name: kind} is set and of its kind (TEXT, LABEL or ANY); each
    `optional` column is of its kind when set. Raises MissingFieldError / DataError."""
    for col, kind in {**(optional or {}), **needed}.items():
        value = row.get(col)
        if value is None and col not in needed:
            continue
        problem = _field_problem(value, kind)
        if problem is not None:
            error = MissingFieldError if value is None else DataError
            raise error(f"field {col!r} {problem}")


def _located(place: str, error: Exception) -> DataError:
    """`error` as a DataError (of the same class when it is one) whose message starts with
    `place`."""
    if isinstance(error, DataError):
        return type(error)(f"{place}: {error}")
    if isinstance(error, KeyError):
        return MissingFieldError(f"{place}: field {error.args[0]!r} is missing")
    return DataError(f"{place}: {error}")


def _convert_rows(rows: list[dict[str, Any]],
                  convert: Callable[[Mapping[str, Any]], Record | None],
                  needed: Mapping[str, str], optional: Mapping[str, str],
                  where: str, from_file: bool) -> list[Record]:
    """Records of `rows` (rows that `convert` maps to None are not items); a fault in row i is
    raised as '<where> row i+1: ...' for a file and '<where> row index i: ...' for a hub
    dataset."""
    out = []
    for i, row in enumerate(rows):
        try:
            check_fields(row, needed, optional)
            record = convert(row)
        except (DataError, KeyError, TypeError, AttributeError) as e:
            place = f"{where} row {i + 1}" if from_file else f"{where} row index {i}"
            raise _located(place, e) from e
        if record is not None:
            out.append(record)
    return out


def convert_rows(name: str, rows: list[dict[str, Any]], where: str) -> list[Record]:
    """Records of rows in a named source's hub schema (e.g. generated ones), checked and
    converted as `load_source` does; faults are located as '<where> row index i'."""
    if name not in SOURCES:
        raise UnknownSourceError(f"unknown data source {name!r}; known sources: "
                                 f"{known_sources()}")
    spec = SOURCES[name]
    needed = {c: spec.kind(c) for c in spec.columns}
    optional = {c: spec.kind(c) for c in spec.optional}
    return _convert_rows(rows, spec.convert, needed, optional, where, False)


def _check_rename(name: str, spec: SourceSpec, rename: Mapping[str, str]) -> None:
    unknown = sorted(set(rename) - set(spec.columns) - set(spec.optional))
    if unknown:
        raise DataError(f"source {name!r} reads the columns {list(spec.columns + spec.optional)};"
                        f" `fields` cannot rename {unknown}")


def _renamed(convert: Callable[[Mapping[str, Any]], Record | None], rename: Mapping[str, str],
             row: Mapping[str, Any]) -> Record | None:
    return convert({**row, **{exp: row[col] for exp, col in rename.items() if col in row}})


def _check_custom(fields: Mapping[str, str], harmful: bool | None) -> None:
    unknown = set(fields) - set(CUSTOM_FIELDS)
    if unknown or "prompt" not in fields:
        raise DataError(f"custom source: `fields` maps record fields {list(CUSTOM_FIELDS)} to "
                        f"columns and must map 'prompt'; got {dict(fields)}")
    if "harmful" not in fields and harmful is None:
        raise DataError("custom source: give `harmful=True/False` or map a 'harmful' column")


def _custom_fields(fields: Mapping[str, str] | None, columns: list[str],
                   where: str) -> dict[str, str]:
    """The given mapping, or else every column named like a record field."""
    if fields:
        return dict(fields)
    if "prompt" not in columns:
        raise MissingFieldError(f"custom source ({where}) has no 'prompt' column; map one with "
                                f"fields={{'prompt': COLUMN}} (?prompt=COLUMN in a source "
                                f"spec); its columns are {columns}")
    return {f: f for f in CUSTOM_FIELDS if f in columns}


def _custom_record(row: Mapping[str, Any], fields: Mapping[str, str],
                   harmful: bool | None) -> Record:
    flag = (_to_bool(row[fields["harmful"]], fields["harmful"]) if "harmful" in fields
            else harmful)
    extra = {k: (None if row[c] is None else str(row[c])) for k, c in fields.items()
             if k in ("input", "label", "answer", "refusal")}
    response = row[fields["response"]] if "response" in fields else ""
    return make_record(row[fields["prompt"]], response, CUSTOM, flag, **extra)


def load_source(name: str, split: str | None = None, *, path: str | os.PathLike | None = None,
                fields: Mapping[str, str] | None = None, harmful: bool | None = None,
                hub_id: str | None = None, config: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> list[Record]:
    """Records of a named source (hub or local `path`) or of a "custom" file / hub dataset.

    Args:
      name: one of `known_sources()`.
      split: hub split (slicing like "30k_train[:1000]" is passed through); ignored for files.
      path: a local JSON/JSONL/CSV/parquet file in the source's schema (or any schema with
        `fields`).
      fields: column mapping (see module docstring); for "custom", None uses the columns named
        like record fields.
      harmful: the harmful flag of every row of a custom source without a 'harmful' column.
      hub_id, config: override the hub location (required for a custom hub dataset).
      cache_dir: the `datasets` cache directory.

    Every column a row needs must be set: text, or for labels text or an integer.
    """
    if name != CUSTOM and name not in SOURCES:
        raise UnknownSourceError(f"unknown data source {name!r}; known sources: "
                                 f"{known_sources()}")
    spec = SOURCES.get(name)
    if spec is not None and harmful is not None:
        raise DataError(f"source {name!r} sets its own harmful flags; `harmful` is for 'custom'")
    if spec is not None:
        _check_rename(name, spec, fields or {})
    elif fields:
        _check_custom(fields, harmful)
    if path is None:
        hub_id = hub_id or (spec.hub_id if spec else None)
        if hub_id is None:
            raise DataError("custom source: give a local `path` or a `hub_id`")
        config = config if config is not None else (spec.config if spec else None)
        if split is None:
            known = f", one of {list(spec.splits)}" if spec and spec.splits else ""
            raise DataError(f"source {name!r}: give a hub split{known}")
        base = (split or "").split("[", 1)[0]
        if spec is not None and spec.splits is not None and base not in spec.splits:
            raise DataError(f"source {name!r} has no split {split!r}; splits: {list(spec.splits)}")
        where = f"hub dataset {hub_id}" + (f"/{config}" if config else "") + f" split {split}"
    else:
        where = f"data file {path}"
    ds = load_rows(path=path, hub_id=hub_id, config=config, split=split, cache_dir=cache_dir)
    if len(ds) == 0:
        raise EmptySourceError(f"source {name!r} ({where}) has no rows")
    columns = list(ds.column_names)
    if spec is None:
        mapping = _custom_fields(fields, columns, where)
        _check_custom(mapping, harmful)
        _require(columns, list(mapping.values()), name, where)
        kinds = {f: CUSTOM_KINDS.get(f, TEXT) for f in mapping}
        needed = {mapping[f]: kinds[f] for f in ("prompt", "response", "harmful") if f in mapping}
        optional = {c: kinds[f] for f, c in mapping.items()}
        convert = functools.partial(_custom_record, fields=mapping, harmful=harmful)
    else:
        rename = dict(fields or {})  # expected column -> column in the data
        _require(columns, [rename.get(c, c) for c in spec.columns], name, where)
        needed = {rename.get(c, c): spec.kind(c) for c in spec.columns}
        optional = {rename.get(c, c): spec.kind(c) for c in spec.optional}
        convert = functools.partial(_renamed, spec.convert, rename) if rename else spec.convert
    records = _convert_rows(ds.to_list(), convert, needed, optional, where, path is not None)
    if not records:
        raise EmptySourceError(f"source {name!r} ({where}) has no items (only blank or heading "
                               "rows)")
    return records


SPEC_SYNTAX = ("NAME:SPLIT or NAME:PATH, optionally followed by ?KEY=VALUE,..., e.g. "
               "beavertails:30k_train, sst2:/data/sst2.csv?sentence=text or "
               "custom:/data/mine.jsonl?prompt=question,response=answer,harmful=true")


@dataclasses.dataclass(frozen=True)
class SourceRequest:
    """A source named on the command line: the arguments of `load_source`."""

    name: str
    split: str | None = None
    path: str | None = None
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    harmful: bool | None = None  # custom: the constant flag (harmful=true|false)


def _is_data_path(text: str) -> bool:
    """An existing file, or a name with a data-file suffix (a file that should exist)."""
    p = Path(text).expanduser()
    return p.is_file() or p.suffix.lower() in FILE_BUILDERS


def _pairs(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in query.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        if key in out:
            raise ValueError(f"{key!r} is given twice")
        out[key] = value
    return out


def parse_source_spec(spec: str) -> SourceRequest:
    """Parse `NAME:SPLIT` or `NAME:PATH`, each optionally followed by `?KEY=VALUE,...`.

    A target is a PATH when it is an existing file or has a data-file suffix (.json, .jsonl,
    .csv, .parquet); otherwise a hub SPLIT. For a named source the pairs rename columns
    {expected column: column in the data}; for "custom" (a local file) they map record fields
    to columns, except `harmful=true|false`, the constant flag (`harmful=COLUMN` names a
    column).
    """
    def bad(problem: str) -> DataError:
        return DataError(f"data source {spec!r}: {problem}; expected {SPEC_SYNTAX}")

    name, colon, rest = spec.partition(":")
    if not colon or not name or not rest:
        raise bad("no NAME:TARGET")
    if name != CUSTOM and name not in SOURCES:
        raise UnknownSourceError(f"data source {spec!r}: unknown source {name!r}; known "
                                 f"sources: {known_sources()}")
    target, ask, query = (rest, "", "") if Path(rest).expanduser().is_file() else \
        rest.partition("?")
    if not target.strip():
        raise bad("no split or path before '?'")
    try:
        fields = _pairs(query) if ask else {}
    except ValueError as e:
        raise bad(str(e)) from None
    path = str(Path(target).expanduser()) if _is_data_path(target) else None
    split = None if path else target
    if name != CUSTOM:
        _check_rename(name, SOURCES[name], fields)
        return SourceRequest(name, split, path, fields)
    if path is None:
        raise bad(f"a custom source reads a local data file ({'/'.join(FILE_BUILDERS)}), "
                  f"not {target!r}")
    harmful = None
    if fields.get("harmful", "").lower() in ("true", "false"):
        harmful = fields.pop("harmful").lower() == "true"
    unknown = sorted(set(fields) - set(CUSTOM_FIELDS))
    if unknown:
        raise bad(f"custom keys are the record fields {list(CUSTOM_FIELDS)}, not {unknown}")
    if fields and "prompt" not in fields:
        raise bad("custom fields must map 'prompt' (e.g. ?prompt=question)")
    return SourceRequest(name, None, path, fields, harmful)


def load_spec(spec: str, *, default_harmful: bool | None = None,
              cache_dir: str | os.PathLike | None = None) -> list[Record]:
    """Records of a source spec (`parse_source_spec`).

    A custom source without a harmful column or constant takes `default_harmful` (the harmful
    flag its role implies); a column named or mapped 'harmful' wins over either.
    """
    req = parse_source_spec(spec)
    harmful = (req.harmful if req.harmful is not None else default_harmful) \
        if req.name == CUSTOM else None
    return load_source(req.name, req.split, path=req.path, fields=req.fields or None,
                       harmful=harmful, cache_dir=cache_dir)
