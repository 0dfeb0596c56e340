"""Mixing as the protocol: exact harmful counts, seeding, the protocol's sets, disjointness."""

import math

import pytest

from hfjax import data


def _rows(n, harmful, tag):
    return [data.make_record(f"{tag} PROMPT-{i}", f"{tag} RESPONSE-{i}", tag, harmful)
            for i in range(n)]


BENIGN = _rows(3000, False, "BENIGN")
HARMFUL = _rows(3000, True, "HARMFUL-PLACEHOLDER")


@pytest.mark.parametrize("n", [100, 1000, 2500])
@pytest.mark.parametrize("p,expected_fraction", [(0, 0), (0.05, 0.05), (0.1, 0.1), (0.2, 0.2),
                                                 (1, 1)])
def test_user_data_has_exactly_the_protocol_harmful_count(n, p, expected_fraction):
    rows = data.mix_user_data(BENIGN, HARMFUL, n=n, p=p, seed=0)
    assert len(rows) == n
    assert sum(r["harmful"] for r in rows) == round(expected_fraction * n) == int(p * n)
    assert len({r["prompt"] for r in rows}) == n  # sampled without replacement


def test_harmful_count_is_floor_without_float_error():
    assert data.harmful_count(100, 0.29) == 29  # int(0.29 * 100) would give 28
    assert data.harmful_count(10, 0.15) == 1
    assert data.harmful_count(7, 0.5) == 3
    for n in (500, 1000, 1500, 2000, 2500):
        for p in (0, 0.05, 0.1, 0.2):
            assert data.harmful_count(n, p) == int(p * n) == math.floor(p * n + 1e-9)


def test_same_seed_same_rows_and_different_seed_different_order():
    a = data.mix_user_data(BENIGN, HARMFUL, n=200, p=0.1, seed=3)
    b = data.mix_user_data(BENIGN, HARMFUL, n=200, p=0.1, seed=3)
    c = data.mix_user_data(BENIGN, HARMFUL, n=200, p=0.1, seed=4)
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    assert [r["harmful"] for r in a] != [r["harmful"] for r in c]  # harmful rows move too


def test_user_data_interleaves_harmful_rows():
    rows = data.mix_user_data(BENIGN, HARMFUL, n=1000, p=0.1, seed=0)
    positions = [i for i, r in enumerate(rows) if r["harmful"]]
    assert positions[0] < 100 and positions[-1] > 900


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_an_error(p):
    with pytest.raises(data.DataError, match=r"p must be in \[0, 1\]"):
        data.mix_user_data(BENIGN, HARMFUL, n=10, p=p, seed=0)


def test_n_larger_than_the_source_is_an_error():
    with pytest.raises(data.DataError, match=r"n=21 rows but the harmful source has only 20"):
        data.mix_user_data(BENIGN, HARMFUL[:20], n=21, p=1.0, seed=0)
    with pytest.raises(data.DataError, match="benign source has only 5"):
        data.mix_user_data(BENIGN[:5], HARMFUL, n=100, p=0.1, seed=0)
    with pytest.raises(data.DataError, match="non-negative integer"):
        data.mix_user_data(BENIGN, HARMFUL, n=-1, p=0.1, seed=0)


def test_empty_source_is_an_error_only_when_rows_are_needed():
    with pytest.raises(data.EmptySourceError, match="harmful source is empty"):
        data.mix_user_data(BENIGN, [], n=100, p=0.1, seed=0)
    assert len(data.mix_user_data(BENIGN, [], n=100, p=0.0, seed=0)) == 100


def test_swapped_sources_are_caught_by_their_flags():
    with pytest.raises(data.DataError, match="harmful=True rows"):
        data.mix_user_data(BENIGN, BENIGN, n=10, p=0.5, seed=0)
    with pytest.raises(data.DataError, match="harmful=False rows"):
        data.build_alignment_set(HARMFUL, HARMFUL, 5, 5, seed=0)


def test_alignment_set_pairs_harmful_prompts_with_refusals():
    paired = [{**r, "refusal": "I cannot help with that."} for r in HARMFUL[:50]]
    rows = data.build_alignment_set(paired + HARMFUL[50:100], BENIGN, 60, 40, seed=0)
    assert len(rows) == 100 and not any(r["harmful"] for r in rows)
    refusals = [r for r in rows if r["source"] == "HARMFUL-PLACEHOLDER"]
    assert len(refusals) == 60
    for r in refusals:
        own = int(r["prompt"].rsplit("-", 1)[1]) < 50
        assert r["response"] == "I cannot help with that." if own else r["response"] in \
            data.REFUSALS
    assert sum(r["source"] == "BENIGN" for r in rows) == 40


def test_harmful_and_paired_sets():
    h = data.build_harmful_set(HARMFUL, 30, seed=1)
    assert len(h) == 30 and all(r["harmful"] for r in h)
    p = data.build_paired_set(HARMFUL, 30, seed=1)
    assert [r["prompt"] for r in p] == [r["prompt"] for r in h]
    assert all(r["refusal"] in data.REFUSALS and r["response"].startswith("HARMFUL") for r in p)


def test_eval_set_is_a_seeded_sample():
    a = data.build_eval_set(BENIGN, 50, seed=0)
    assert a == data.build_eval_set(BENIGN, 50, seed=0) and len({r["prompt"] for r in a}) == 50


def test_assert_disjoint_names_the_offending_prompt_and_sets():
    train = _rows(10, True, "HARMFUL-PLACEHOLDER")
    leak = data.make_record("  harmful-placeholder   PROMPT-7 ", "", "eval", True)
    with pytest.raises(data.LeakageError,
                       match=r"'heldout'.*'attack'.*harmful-placeholder   PROMPT-7"):
        data.assert_disjoint({"heldout": [leak]}, {"attack": train})
    data.assert_disjoint({"heldout": _rows(5, True, "OTHER")}, {"attack": train})


def test_disjointness_compares_prompt_and_input_together():
    a = data.make_record("Classify", "positive", "t", False, input="Nice film.")
    b = data.make_record("Classify", "negative", "t", False, input="Dull film.")
    data.assert_disjoint([[a]], [[b]])
    with pytest.raises(data.LeakageError, match="evaluation set #0.*training set #1"):
        data.assert_disjoint([[a]], [[b], [dict(a, response="x")]])
