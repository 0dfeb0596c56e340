"""Generation: KV-cached decoding equals full recomputation, batching, sampling, prefixes."""

import json
from pathlib import Path

import jax
import pytest

from hfjax import models
from hfjax.eval.generate import generate, greedy_generate, left_pad
from hfjax.models import params as params_lib
from hfjax.models.config import from_hf_dict

FAMILIES = {
    "llama": dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  eos_token_id=5),
    "gemma2": dict(model_type="gemma2", vocab_size=100, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=24, sliding_window=3, attn_logit_softcapping=5.0,
                   final_logit_softcapping=10.0, query_pre_attn_scalar=20,
                   hidden_activation="gelu_pytorch_tanh", eos_token_id=5),
}
PROMPTS = [[1, 2, 3, 4, 9, 11], [7, 8], [20, 21, 22, 23]]


def tiny(family):
    cfg = from_hf_dict(FAMILIES[family])
    return cfg, params_lib.init_random(cfg, jax.random.key(0), std=0.3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_greedy_equals_recomputing_the_full_forward_each_step(family):
    cfg, p = tiny(family)
    cached = generate(cfg, p, PROMPTS, max_new_tokens=12)
    full = generate(cfg, p, PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached == full
    assert max(len(r) for r in cached) > 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_padded_batch_equals_one_by_one_generation(family):
    cfg, p = tiny(family)
    batched = generate(cfg, p, PROMPTS, max_new_tokens=10)
    assert batched == [generate(cfg, p, [q], max_new_tokens=10)[0] for q in PROMPTS]


def test_generation_stops_after_first_eos_per_row():
    cfg, p = tiny("llama")
    out = generate(cfg, p, PROMPTS, max_new_tokens=12, eos_ids=(56, 48))
    assert out[0][-1] == 56 and 56 not in out[0][:-1]
    assert out[1][-1] == 48


def test_sampling_is_reproducible_by_seed_and_differs_across_seeds():
    cfg, p = tiny("llama")
    a = generate(cfg, p, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1)
    b = generate(cfg, p, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1)
    c = generate(cfg, p, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=2)
    assert a == b
    assert a != c


def test_tiny_top_p_sampling_reduces_to_greedy():
    cfg, p = tiny("llama")
    greedy = greedy_generate(cfg, p, PROMPTS, max_new_tokens=8)
    assert generate(cfg, p, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6) == greedy


def test_forced_prefix_is_emitted_then_decoding_continues_from_it():
    cfg, p = tiny("llama")
    out = generate(cfg, p, PROMPTS, max_new_tokens=8, forced_prefix=[[40, 41], [42], []])
    assert out[0][:2] == [40, 41] and out[1][:1] == [42]
    assert out[2] == generate(cfg, p, [PROMPTS[2]], max_new_tokens=8)[0]
    continued = generate(cfg, p, [PROMPTS[0] + [40, 41]], max_new_tokens=6)[0]
    assert out[0][2:] == continued[: len(out[0]) - 2]


def test_bad_generation_arguments_raise():
    cfg, p = tiny("llama")
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(cfg, p, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(cfg, p, PROMPTS, temperature=1.0, top_p=0.0)


def test_smollm2_cached_greedy_20_tokens_equal_transformers_generate():
    golden = json.loads((Path(__file__).parent / "fixtures/smollm2/golden.json").read_text())
    path = models.default_model_path()
    cfg, p = models.load_pretrained(path)
    (out,) = greedy_generate(cfg, p, [golden["input_ids"]], max_new_tokens=20)
    assert out == golden["greedy_new_tokens"]


def test_generation_with_unmerged_lora_equals_generation_with_merged_weights():
    cfg, p = tiny("llama")
    lora = models.lora.init(cfg, jax.random.key(3), rank=4, alpha=8, targets=models.PROJECTIONS)
    lora = lora.replace(weights=jax.tree.map(
        lambda x: x + 0.2 * jax.random.normal(jax.random.key(4), x.shape), lora.weights))
    unmerged = generate(cfg, p, PROMPTS, max_new_tokens=10, lora=lora)
    merged = generate(cfg, models.lora.merge(cfg, p, lora), PROMPTS, max_new_tokens=10)
    assert unmerged == merged
    assert unmerged != generate(cfg, p, PROMPTS, max_new_tokens=10)


def test_generation_on_8_device_sharded_params_equals_single_device():
    from hfjax import sharding

    cfg, p = tiny("gemma2")
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    shards = sharding.tree_shardings(models.logical_axes(cfg), models.param_shapes(cfg), mesh)
    sharded = jax.device_put(p, shards)
    assert len(sharded["layers"]["up_proj"]["kernel"].sharding.device_set) == 8
    assert generate(cfg, sharded, PROMPTS, max_new_tokens=10) == generate(
        cfg, p, PROMPTS, max_new_tokens=10)
