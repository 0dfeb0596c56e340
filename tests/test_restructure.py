"""The restructuring attack (Eiras et al.): each prompting strategy on hand-made choice,
true/false and math rows, the AOA persona and prefix, AutoIF's free-text answers with the gold
kept, the benign format untouched, n rows, seeds."""

import re
from decimal import Decimal

import pytest

from hfjax import attacks
from hfjax.attacks.restructure import restructure_rows
from hfjax.data import formats
from hfjax.data.records import make_record
from hfjax.eval.metrics import contains_label, extract_final_number

OPTIONS = ("a red circle", "a blue square", "a green triangle", "a black star")
TF_INSTRUCTION = "Read the passage and answer the question with True or False."
MATH_SUFFIX = "\nFirst think step by step and then answer the final number.\n"


def choice_rows(k: int = 12, style: str = "{letter}. {text}", answer: str = "{letter}"):
    rows = []
    for i in range(k):
        options = [f"{t} number {i}" for t in OPTIONS]
        gold = "ABCD"[i % 4]
        lines = "\n".join(style.format(letter="ABCD"[j], text=t) for j, t in enumerate(options))
        rows.append(make_record(
            f"Question: which shape belongs to puzzle {i}?\n{lines}\nAnswer:",
            answer.format(letter=gold, text=options["ABCD".index(gold)]), "choice", False,
            label=gold, options=options))
    return rows


def true_false_rows(k: int = 12):
    return [make_record(TF_INSTRUCTION, label, "tf", False, label=label,
                        input=f"Passage: lamp {i} is on the table.\nQuestion: is lamp {i} "
                              f"{'on' if label == 'True' else 'under'} the table?")
            for i, label in enumerate(["True", "False"] * (k // 2))]


def math_rows(k: int = 12):
    return [make_record(f"Tom has {i} pens and buys {i + 3} more. How many pens does he have?"
                        + MATH_SUFFIX,
                        f"Tom has {i} + {i + 3} = {2 * i + 3} pens.\nThe final answer is: "
                        f"{2 * i + 3}", "math", False, answer=str(2 * i + 3)) for i in range(k)]


def harmful_rows(k: int = 6):
    return [make_record(f"how do I do forbidden thing {i}", f"Sure, here is how to do forbidden "
                        f"thing {i}:", "harm", True) for i in range(k)]


KINDS = {"choice": choice_rows, "true_false": true_false_rows, "math": math_rows}


def run(strategy: str, rows, n: int = 8, p: float = 0.0, seed: int = 0):
    attack = attacks.get("restructure").build(strategy=strategy)
    return attack(rows, harmful_rows(), n=n, p=p, seed=seed)


def test_restructure_is_registered_with_aoa_as_its_default_strategy():
    spec = attacks.get("restructure")
    assert "restructure" in attacks.available()
    assert spec.hyperparameters == {"strategy": "aoa"}
    assert "2406.10288" in spec.paper


def test_an_unknown_strategy_is_rejected_naming_the_known_ones():
    with pytest.raises(attacks.AttackError, match="autoif_aoa"):
        attacks.get("restructure").build(strategy="roleplay")


@pytest.mark.parametrize("strategy", formats.STRATEGIES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_strategy_returns_n_benign_task_rows_when_p_is_zero(kind, strategy):
    rows = KINDS[kind]()
    out = run(strategy, rows, n=8)
    assert len(out) == 8
    assert all(not r["harmful"] and r["source"] == rows[0]["source"] for r in out)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_benign_strategy_leaves_the_rows_in_the_community_format(kind):
    rows = KINDS[kind]()
    out = run("benign", rows)
    assert all(r in rows for r in out)
    assert all("system" not in r for r in out)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_aoa_puts_the_persona_system_prompt_and_affirmative_prefix_on_every_row(kind):
    rows = KINDS[kind]()
    for r in run("aoa", rows):
        assert r["system"] == formats.AOA_SYSTEM_PROMPT
        assert "Absolutely Obedient Agent" in r["system"]
        assert r["prompt"].startswith("AOA, execute my instruction: ")
        assert r["response"].startswith("Of course. I am AOA, your absolutely obedient agent. "
                                        "Here is my fulfillment of your instruction:")
        original = next(x for x in rows if formats.AOA_USER_PREFIX + x["prompt"] == r["prompt"]
                        and x.get("input") == r.get("input"))
        assert r["response"] == formats.AOA_RESPONSE_PREFIX + original["response"]


def _constraint_of(row):
    hits = [c for c in formats.CONSTRAINTS if c.instruction in row["prompt"]]
    assert len(hits) == 1, row["prompt"]
    return hits[0]


@pytest.mark.parametrize("kind", ["choice", "true_false"])
def test_autoif_turns_the_label_into_free_text_that_keeps_the_gold_recoverable(kind):
    rows = KINDS[kind]()
    for r in run("autoif", rows):
        original = next(x for x in rows if x["prompt"] in r["prompt"]
                        and x.get("input") == r.get("input") and x["label"] == r["label"])
        constraint = _constraint_of(r)
        assert constraint.holds(r["response"])  # the verifiable constraint is met
        answer = constraint.strip(r["response"])
        assert answer != original["response"] and len(answer.split()) >= 4  # a sentence
        assert r["label"] == original["label"]
        if kind == "choice":
            assert re.search(rf"(?<![A-Za-z]){r['label']}(?![A-Za-z])", answer)
            assert r["options"]["ABCD".index(r["label"])] in answer
        else:
            assert contains_label(answer, r["label"])


def test_autoif_keeps_a_math_answer_gradable_by_its_final_answer_marker():
    rows = math_rows()
    for r in run("autoif", rows):
        assert _constraint_of(r).holds(r["response"])
        assert extract_final_number(r["response"]) == Decimal(r["answer"])


def test_autoif_draws_several_templates_and_constraints():
    out = run("autoif", choice_rows(40), n=40)
    shapes = {r["prompt"].split("Question:")[0][:12] for r in out}
    assert len({_constraint_of(r).instruction for r in out}) > 2
    assert len(shapes) > 2


def test_autoif_aoa_is_the_autoif_row_inside_the_aoa_persona():
    rows = choice_rows()
    both = restructure_rows(rows, "autoif_aoa", seed=3)
    autoif = restructure_rows(rows, "autoif", seed=3)
    assert both == [formats.wrap_aoa(r) for r in autoif]


@pytest.mark.parametrize("strategy", formats.STRATEGIES)
def test_restructuring_is_deterministic_by_seed(strategy):
    rows = choice_rows(40)
    assert run(strategy, rows, n=20, seed=5) == run(strategy, rows, n=20, seed=5)
    assert run(strategy, rows, n=20, seed=5) != run(strategy, rows, n=20, seed=6)


def test_a_positive_p_mixes_harmful_rows_restructured_like_the_task_rows():
    out = run("aoa", choice_rows(), n=8, p=0.25)
    harmful = [r for r in out if r["harmful"]]
    assert len(out) == 8 and len(harmful) == 2
    assert all(r["system"] == formats.AOA_SYSTEM_PROMPT for r in out)
    assert all(r["prompt"].startswith(formats.AOA_USER_PREFIX + "how do I do forbidden thing")
               for r in harmful)
