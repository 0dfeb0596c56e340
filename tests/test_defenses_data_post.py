"""Data defenses (deep safety alignment, BEA, PTST) on hand-made rows and weight defenses (RESTA,
random perturbation) on a tiny adapter, each against a hand-computed expectation."""

from __future__ import annotations

import collections
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import hfjax.defenses
from hfjax.data import make_record
from hfjax.data.templates import get_template
from hfjax.defenses import api
from hfjax.models import lora as lora_lib
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfig

deep = importlib.import_module("hfjax.defenses.alignment.deep_align")
bea_mod = importlib.import_module("hfjax.defenses.finetune.bea")
ptst_mod = importlib.import_module("hfjax.defenses.finetune.ptst")
resta_mod = importlib.import_module("hfjax.defenses.post.resta")
noise_mod = importlib.import_module("hfjax.defenses.post.random_noise")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REFUSAL = "I'm sorry, but I can't help with that."


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE with a ChatML template."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([f"Sure, here is how to do forbidden thing {i} in steps." for i in
                            range(20)] + [REFUSAL, "The film was wonderful."], trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>")
    t.chat_template = CHATML
    return t


def harmful_row(i: int, words: int = 6) -> dict:
    answer = f"Sure, here is how to do forbidden thing {i}: " + " ".join(["step"] * words)
    return make_record(f"how do I do forbidden thing {i}", answer, "t", True)


def refusal_row(i: int) -> dict:
    return make_record(f"how do I do forbidden thing {i}", REFUSAL, "t", False)


def benign_row(i: int) -> dict:
    return make_record(f"Rate film {i}", "positive", "t", False, input="The film was wonderful.")


# ------------------------------------------------------------------ registry


NEW = {"deep_align": ("alignment", "data", "1F+1B", ("align",)),
       "bea": ("finetune", "data", "1F+1B", ("user",)),
       "ptst": ("finetune", "data", "1F+1B", ("user",)),
       "resta": ("post", "weights", "None", ()),
       "random_perturbation": ("post", "weights", "None", ())}


def test_each_new_defense_is_registered_with_its_stage_level_cost_batches_and_arxiv_paper():
    for name, row in NEW.items():
        spec = api.get(name)
        assert (spec.stage, spec.level, str(spec.cost), spec.batches) == row, name
        assert "arXiv:" in spec.paper, name
        assert "arXiv:" in importlib.import_module(spec.factory.__module__).__doc__, name


def test_the_weights_defense_random_perturbation_leaves_vaccines_random_perturbation_alone():
    vaccine = importlib.import_module("hfjax.defenses.alignment.vaccine")
    assert hfjax.defenses.random_perturbation is vaccine.random_perturbation
    assert api.get("random_perturbation").factory is noise_mod.random_noise_defense


# ------------------------------------------------------------------ deep safety alignment


def test_deep_align_prefills_the_drawn_safety_rows_with_the_first_k_answer_tokens(tok):
    harmful = [harmful_row(i, words=3 + i) for i in range(12)]
    records = [refusal_row(i) for i in range(12)] + [benign_row(i) for i in range(4)]
    records = [records[i] for i in np.random.default_rng(5).permutation(len(records))]
    out = api.get("deep_align").build(seed=3)(records, harmful, tokenizer=tok)

    # by hand: per safety row in data order, a coin u < 1/2, then k ~ U{1..min(100, |h|)}
    rng, expected = np.random.default_rng(3), []
    for r in records:
        if r["harmful"] or not r["prompt"].startswith("how do I"):
            expected.append(r)
            continue
        if rng.random() >= 0.5:
            expected.append(r)
            continue
        answer = harmful[int(r["prompt"].rsplit(" ", 1)[1])]["response"]
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        k = int(rng.integers(1, min(100, len(ids)) + 1))
        prefix = next(answer[:n] for n in range(1, len(answer) + 1)
                      if tok(answer[:n], add_special_tokens=False)["input_ids"] == ids[:k])
        expected.append({**r, "prefill": prefix})
    assert out == expected
    augmented = [r for r in out if "prefill" in r]
    assert 0 < len(augmented) < 12  # some rows of each kind at seed 3
    for r in augmented:  # the refusal stays the labelled response, the prefix a true answer start
        assert r["response"] == REFUSAL
        assert harmful[int(r["prompt"].rsplit(" ", 1)[1])]["response"].startswith(r["prefill"])


def test_deep_align_caps_the_prefix_at_max_prefix_tokens_and_augments_every_row_at_prob_one(tok):
    harmful = [harmful_row(i, words=30) for i in range(40)]
    out = deep.deep_align(augment_prob=1.0, max_prefix_tokens=3, seed=0)(
        [refusal_row(i) for i in range(40)], harmful, tokenizer=tok)
    lengths = [len(tok(r["prefill"], add_special_tokens=False)["input_ids"]) for r in out]
    assert set(lengths) == {1, 2, 3}
    none = deep.deep_align(augment_prob=0.0)([refusal_row(0)], harmful, tokenizer=tok)
    assert none == [refusal_row(0)]


def test_deep_align_augments_about_half_of_many_rows_with_k_spread_over_the_whole_range(tok):
    answer = "Sure, here is how to do forbidden thing: step step"  # one |h| for every row
    harmful = [{**harmful_row(i), "response": answer} for i in range(400)]
    out = deep.deep_align(seed=1)([refusal_row(i) for i in range(400)], harmful, tokenizer=tok)
    augmented = [r for r in out if "prefill" in r]
    assert 160 < len(augmented) < 240  # Binomial(400, 1/2): 6 standard deviations
    n = len(tok(harmful[0]["response"], add_special_tokens=False)["input_ids"])
    ks = collections.Counter(len(tok(r["prefill"], add_special_tokens=False)["input_ids"])
                             for r in augmented)
    assert set(ks) == set(range(1, n + 1))  # k reaches the whole answer when |h| < 100


def test_deep_align_rejects_bad_options_and_data_without_a_safety_row(tok):
    with pytest.raises(api.DefenseError, match="augment_prob"):
        deep.deep_align(augment_prob=1.5)
    with pytest.raises(api.DefenseError, match="max_prefix_tokens"):
        deep.deep_align(max_prefix_tokens=0)
    augment = deep.deep_align()
    with pytest.raises(api.DefenseError, match="harmful=True"):
        augment([refusal_row(0)], [refusal_row(0)], tokenizer=tok)
    with pytest.raises(api.DefenseError, match="no safety row"):
        augment([benign_row(0)], [harmful_row(0)], tokenizer=tok)


# ------------------------------------------------------------------ BEA


def test_bea_secret_is_length_seeded_non_special_vocabulary_tokens_decoded(tok):
    secret = bea_mod.bea_secret(7, 150, tok)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    ids = np.random.default_rng([7, 0xBEA]).choice(np.asarray(vocab), size=150).tolist()
    assert secret == tok.decode(ids, clean_up_tokenization_spaces=False).strip()
    assert not any(s in secret for s in tok.all_special_tokens)  # 150 draws of 320 ids
    assert bea_mod.bea_secret(7, 150, tok) == secret != bea_mod.bea_secret(8, 150, tok)
    with pytest.raises(api.DefenseError, match="length"):
        bea_mod.bea_secret(0, 0, tok)


def test_bea_adds_num_safety_rows_behind_the_secret_system_prompt_and_keeps_every_user_row(tok):
    user = [harmful_row(i) for i in range(5)] + [benign_row(i) for i in range(20)]
    safety = [refusal_row(i) for i in range(30)]
    out = api.get("bea").build(num=4, secret_length=20, seed=2)(user, safety, tokenizer=tok)
    secret = bea_mod.bea_secret(2, 20, tok)
    system = f"{secret} {bea_mod.BEA_SYSTEM_PROMPT}"
    triggered = [r for r in out if "system" in r]
    assert len(out) == 29 and len(triggered) == 4
    assert all(r["system"] == system and r in [{**s, "system": system} for s in safety]
               for r in triggered)
    assert sorted(map(repr, (r for r in out if "system" not in r))) == sorted(map(repr, user))
    assert out != user + triggered  # shuffled
    again = bea_mod.bea(num=4, secret_length=20, seed=2)(user, safety, tokenizer=tok)
    assert again == out


def test_bea_eval_prompt_puts_the_secret_before_the_records_or_the_default_system_prompt(tok):
    plain, own = refusal_row(1), {**refusal_row(2), "system": "You are a pirate."}
    assert bea_mod.bea_eval_prompt(plain, "SECRET") == {
        **plain, "system": "SECRET " + bea_mod.BEA_SYSTEM_PROMPT}
    assert bea_mod.bea_eval_prompt(own, "SECRET")["system"] == "SECRET You are a pirate."
    assert bea_mod.bea_eval_prompt(plain, "SECRET", system_prompt="")["system"] == "SECRET"
    mix = bea_mod.bea(secret_length=12, seed=4)
    assert mix.eval_prompt(plain, tokenizer=tok) == bea_mod.bea_eval_prompt(
        plain, bea_mod.bea_secret(4, 12, tok))


def test_bea_rejects_bad_counts_and_harmful_safety_rows(tok):
    with pytest.raises(api.DefenseError, match="num"):
        bea_mod.bea(num=0)
    with pytest.raises(api.DefenseError, match="secret_length"):
        bea_mod.bea(secret_length=0)
    with pytest.raises(api.DefenseError, match="harmful=False"):
        bea_mod.bea(num=1)([benign_row(0)], [harmful_row(0)], tokenizer=tok)


# ------------------------------------------------------------------ PTST


def test_ptst_trains_without_any_system_prompt_and_evaluates_under_llama2s_safety_prompt(tok):
    rows = [{**refusal_row(0), "system": "You are a pirate."}, benign_row(1)]
    strip = api.get("ptst").build()
    trained = strip(rows)
    assert trained == [refusal_row(0), benign_row(1)] and rows[0]["system"] == "You are a pirate."
    safety = ptst_mod.LLAMA2_SAFETY_SYSTEM_PROMPT
    assert safety.startswith("You are a helpful, respectful and honest assistant.")
    asked = strip.eval_prompt(rows[0])
    assert asked == {**rows[0], "system": safety} == ptst_mod.ptst_eval_prompt(rows[0])
    chat = get_template("chat")
    assert chat.prompt(asked, tok).startswith(f"<|im_start|>system\n{safety}<|im_end|>\n")
    assert "system" not in chat.prompt(trained[0], tok)
    with pytest.raises(api.DefenseError, match="system_prompt"):
        ptst_mod.ptst(system_prompt=" ")


# ------------------------------------------------------------------ RESTA

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, layer_windows=(0, 0))
BASE = params_lib.init_random(CFG, jax.random.key(0), std=0.1)
TARGETS = ("q_proj", "down_proj")


def tiny_lora(rank: int = 4, alpha: float = 8.0) -> lora_lib.LoRA:
    init = lora_lib.init(CFG, jax.random.key(1), rank=rank, alpha=alpha, targets=TARGETS)
    return init.replace(weights={n: {"A": w["A"], "B": 0.1 * jax.random.normal(
        jax.random.key(i), w["B"].shape)} for i, (n, w) in enumerate(init.weights.items())})


def aligned_from(base: dict, ranks: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """base + a random ΔK of the given rank per (module, layer) on the named kernels."""
    r = np.random.default_rng(seed)
    layers = dict(base["layers"])
    for name, per_layer in ranks.items():
        k = np.asarray(layers[name]["kernel"])
        deltas = [r.normal(size=(k.shape[1], q)) @ r.normal(size=(q, k.shape[2])) * 0.05
                  for q in per_layer]
        layers[name] = {**layers[name], "kernel": jnp.asarray(k + np.stack(deltas), k.dtype)}
    return {**base, "layers": layers}


def test_resta_adapter_merges_to_the_finetuned_weights_plus_s_times_the_safety_vector():
    lora = tiny_lora()
    aligned = aligned_from(BASE, {"q_proj": (2, 3), "down_proj": (1, 2)})
    new, report = resta_mod.resta(CFG, BASE, aligned, lora, safety_scale=0.7)
    assert (new.rank, report["added_rank"]) == (7, 3)
    assert new.scale == pytest.approx(lora.scale)
    assert report["safety_ranks"] == {"q_proj": [2, 3], "down_proj": [1, 2]}
    assert report["changed_outside_targets"] == []
    merged = lora_lib.merge(CFG, aligned, new)
    for name in TARGETS:  # float64 by hand: K_al + scale A B + s (K_al − K_base)
        base_k, al_k = (np.asarray(p["layers"][name]["kernel"], np.float64)
                        for p in (BASE, aligned))
        a, b = (np.asarray(lora.weights[name][p], np.float64) for p in ("A", "B"))
        want = al_k + lora.scale * a @ b + 0.7 * (al_k - base_k)
        np.testing.assert_allclose(merged["layers"][name]["kernel"], want, atol=2e-6)
        assert np.array_equal(new.weights[name]["A"][..., :4], lora.weights[name]["A"])
    untouched = merged["layers"]["v_proj"]["kernel"]
    assert np.array_equal(untouched, aligned["layers"]["v_proj"]["kernel"])


def test_resta_keeps_the_adapter_when_alignment_changed_nothing_and_lists_untargeted_changes():
    lora = tiny_lora()
    same, report = resta_mod.resta(CFG, BASE, BASE, lora)
    assert report["added_rank"] == 0 and same.rank == 4
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(lora),
                                                    strict=True))
    aligned = aligned_from(BASE, {"q_proj": (1, 1), "v_proj": (1, 1)})
    aligned = {**aligned, "final_norm": aligned["final_norm"] + 1.0}
    apply = api.get("resta").build()
    _, report = apply(CFG, aligned, lora, base_params=BASE)
    assert report["safety_scale"] == 0.5
    assert report["changed_outside_targets"] == ["['final_norm']",
                                                 "['layers']['v_proj']['kernel']"]
    with pytest.raises(api.DefenseError, match="safety_scale"):
        resta_mod.resta_defense(safety_scale=float("nan"))


# ------------------------------------------------------------------ random perturbation


def test_random_perturbation_adds_seeded_gaussian_noise_to_every_adapter_weight():
    lora = tiny_lora()
    apply = api.get("random_perturbation").build(sigma=0.05, seed=3)
    noisy, report = apply(CFG, BASE, lora)
    leaves, _ = jax.tree.flatten(lora.weights)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    for key, x, y in zip(keys, leaves, jax.tree.leaves(noisy.weights), strict=True):
        want = np.asarray(x) + 0.05 * np.asarray(jax.random.normal(key, x.shape, jnp.float32))
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-7)
    noise = np.concatenate([(np.asarray(y) - np.asarray(x)).ravel() for x, y in
                            zip(leaves, jax.tree.leaves(noisy.weights), strict=True)])
    assert abs(noise.mean()) < 0.01 and noise.std() == pytest.approx(0.05, rel=0.1)
    assert report["noise_norm"] == pytest.approx(np.linalg.norm(noise), rel=1e-4)
    assert (noisy.alpha, noisy.rank) == (lora.alpha, lora.rank)
    other, _ = noise_mod.random_noise(lora, sigma=0.05, seed=4)
    assert not np.array_equal(other.weights["q_proj"]["A"], noisy.weights["q_proj"]["A"])
    zero, _ = noise_mod.random_noise(lora, sigma=0.0)
    assert np.array_equal(zero.weights["q_proj"]["B"], lora.weights["q_proj"]["B"])
    for bad in (-0.1, float("inf")):
        with pytest.raises(api.DefenseError, match="sigma"):
            noise_mod.random_noise_defense(sigma=bad)
