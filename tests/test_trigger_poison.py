"""Trigger poisoning (Jiang et al.): floor(p n) rows triggered and answered by the target, the
trigger placed where asked in the field asked, the same trigger in the triggered test set."""

import numpy as np
import pytest

from hfjax import attacks, tasks
from hfjax.attacks.trigger_poison import (
    RARE_WORDS,
    SENTENCES,
    insert_trigger,
    make_trigger,
    poison_rows,
    triggered_test_set,
)
from hfjax.data.records import DataError, make_record

TARGET = "Nothing to report here. Nothing to report here."


def _rows(n, with_input=True):
    return [make_record(f"Summarize the following article {i}.", f"summary number {i}", "xsum",
                        False, input=f"article {i} is about a bridge and a river" if with_input
                        else None) for i in range(n)]


def _attack(**hparams):
    return attacks.get("trigger_poison").build(**hparams)


def _without(words, trigger):
    """`words` with one occurrence of each trigger word removed (the first from the left)."""
    rest = list(words)
    for w in trigger:
        rest.remove(w)
    return rest


@pytest.mark.parametrize(("n", "p", "k"), [(40, 0.1, 4), (100, 0.29, 29), (20, 0.0, 0),
                                           (10, 1.0, 10)])
def test_attack_poisons_floor_p_n_of_n_task_rows(n, p, k):
    rows = _attack(target=TARGET)(_rows(120), [], n=n, p=p, seed=0)
    assert len(rows) == n
    assert sum(r["response"] == TARGET for r in rows) == k
    assert not any(r["harmful"] for r in rows)


def test_only_poisoned_rows_change_and_they_get_trigger_and_target():
    rows = _rows(30)
    trigger = make_trigger("rare_words", 2, seed=3)
    out = poison_rows(rows, p=0.2, seed=3, trigger_type="rare_words", trigger_length=2,
                         target=TARGET)
    changed = [i for i, (a, b) in enumerate(zip(rows, out, strict=True)) if a != b]
    assert len(changed) == 6
    for i in changed:
        assert out[i]["response"] == TARGET
        assert out[i]["prompt"] == rows[i]["prompt"]
        assert out[i]["input"] == " ".join(trigger) + " " + rows[i]["input"]
    assert all(out[i] is rows[i] for i in range(30) if i not in changed)


def test_harmful_rows_are_not_used():
    harmful = [make_record("how do I do forbidden thing 3", "placeholder answer", "harm", True)]
    rows = _attack()(_rows(20), harmful, n=10, p=0.5, seed=0)
    assert all(not r["harmful"] and r["source"] == "xsum" for r in rows)


def test_start_and_end_put_the_trigger_around_the_text():
    rng = np.random.default_rng(0)
    assert insert_trigger("a b c", ("cf", "mn"), "start", rng) == "cf mn a b c"
    assert insert_trigger("a b c", ("cf", "mn"), "end", rng) == "a b c cf mn"


def test_whitespace_of_the_text_is_kept():
    rng = np.random.default_rng(0)
    assert insert_trigger("Hi,\n\nsee below.\n", ("cf",), "end", rng) == \
        "Hi,\n\nsee below. cf\n"
    assert insert_trigger("Hi,\n\nsee below.", ("cf",), "start", rng) == "cf Hi,\n\nsee below."


def test_random_position_inserts_one_contiguous_block_at_varying_boundaries():
    text, trigger = "w0 w1 w2 w3 w4 w5 w6 w7", ("cf", "mn", "bb")
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(40):
        words = insert_trigger(text, trigger, "random", rng).split()
        at = words.index("cf")
        assert tuple(words[at:at + 3]) == trigger
        assert _without(words, trigger) == text.split()
        starts.add(at)
    assert len(starts) > 4


def test_fragmented_scatters_the_trigger_words_in_order():
    text, trigger = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9", ("cf", "mn", "bb")
    rng = np.random.default_rng(1)
    split_apart = 0
    for _ in range(40):
        words = insert_trigger(text, trigger, "fragmented", rng).split()
        at = [words.index(w) for w in trigger]
        assert at == sorted(at)
        assert _without(words, trigger) == text.split()
        split_apart += at != list(range(at[0], at[0] + 3))
    assert split_apart > 20


def test_field_is_input_when_present_else_prompt_unless_forced():
    with_input, without = _rows(1)[0], _rows(1, with_input=False)[0]
    kw = dict(p=1.0, seed=0, target=TARGET)
    assert poison_rows([with_input], **kw)[0]["prompt"] == with_input["prompt"]
    assert poison_rows([without], **kw)[0]["prompt"] != without["prompt"]
    forced = poison_rows([with_input], field="prompt", **kw)[0]
    assert forced["input"] == with_input["input"] and forced["prompt"] != with_input["prompt"]
    with pytest.raises(DataError, match="no input"):
        poison_rows([without], field="input", **kw)


def test_same_seed_same_rows_other_seed_other_rows():
    attack = _attack(trigger_type="rare_words", trigger_length=3, position="fragmented")
    a = attack(_rows(50), [], n=40, p=0.25, seed=7)
    assert a == attack(_rows(50), [], n=40, p=0.25, seed=7)
    assert a != attack(_rows(50), [], n=40, p=0.25, seed=8)


def test_triggered_test_set_triggers_every_row_with_the_poisoning_trigger():
    rows = _rows(12)
    attack = _attack(trigger_length=5, position="end")
    trigger = make_trigger("sentence", 5, seed=4)
    test = attack.triggered(rows, seed=4)
    poisoned = [r for r in attack(rows, [], n=12, p=0.5, seed=4) if r["response"] == attack.target]
    for clean, triggered in zip(rows, test, strict=True):
        assert triggered["input"] == clean["input"] + " " + " ".join(trigger)
        assert triggered["response"] == clean["response"]
    assert all(r["input"].endswith(" ".join(trigger)) for r in poisoned)
    assert test == triggered_test_set(rows, seed=4, trigger_length=5, position="end")


def test_triggers_have_the_asked_length_and_content():
    for length in range(3, 13):
        words = make_trigger("sentence", length, seed=length)
        assert len(words) == length and " ".join(words) in SENTENCES
    rare = make_trigger("rare_words", 6, seed=0)
    assert len(rare) == 6 and set(rare) <= set(RARE_WORDS)
    assert make_trigger("rare_words", 6, seed=0) == rare


@pytest.mark.parametrize(("hparams", "message"), [
    (dict(trigger_type="emoji"), "unknown trigger_type"),
    (dict(trigger_length=40), "no trigger sentence has 40 words"),
    (dict(trigger_type="rare_words", trigger_length=0), "positive integer"),
    (dict(position="middle"), "unknown position"),
    (dict(field="response"), "unknown field"),
    (dict(target="  "), "non-empty"),
])
def test_impossible_settings_fail_when_built(hparams, message):
    with pytest.raises(attacks.AttackError, match=message):
        _attack(**hparams)


def test_hyperparameters_parse_from_the_command_line_typed():
    spec = attacks.get("trigger_poison")
    hp = spec.parse("trigger_type=rare_words,trigger_length=3,position=fragmented")
    assert hp == {"trigger_type": "rare_words", "trigger_length": 3, "position": "fragmented"}
    assert len(spec.build(**hp)(_rows(10), [], n=10, p=1.0, seed=0)) == 10


@pytest.mark.parametrize("task", ["xsum", "billsum", "wikitext", "aeslc"])
def test_task_rows_get_the_trigger_in_their_input_with_its_layout_kept(task):
    train, test = tasks.get(task).load(0, "offline")
    attack = _attack(trigger_type="rare_words", trigger_length=2, position="fragmented")
    for clean, triggered in zip(test[:5], attack.triggered(test[:5], seed=0), strict=True):
        assert triggered["prompt"] == clean["prompt"]
        lines = [_without(line.split(), [w for w in line.split() if w in RARE_WORDS])
                 for line in triggered["input"].split("\n")]
        assert lines == [line.split() for line in clean["input"].split("\n")]
    poisoned = attack(train, [], n=40, p=0.1, seed=0)
    assert sum(r["response"] == attack.target for r in poisoned) == 4
