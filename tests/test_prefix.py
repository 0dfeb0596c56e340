"""Prefix tuning: PEFT's init, layout and format, logits equal to PEFT's on Llama (grouped-query)
and Qwen2 in both directions, cached generation, sharding, the adapter registry, and training
that follows PyTorch + PEFT step by step.

Golden fixtures in tests/fixtures/prefix_peft/ and tests/fixtures/prefix_train/ come from
scripts/make_prefix_fixture.py (see its docstring); with HFJAX_TORCH_PYTHON set, the live tests
regenerate them with torch + PEFT and compare.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from torch_live import run_script, torch_python

from hfjax import sharding
from hfjax.eval.generate import ContextLengthError, generate
from hfjax.models import adapters, load_pretrained
from hfjax.models import params as params_lib
from hfjax.models import prefix as prefix_lib
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import KVCache, forward
from hfjax.pipeline import ConfigError, RunFlags, validate
from hfjax.train import builder, optim
from hfjax.train.loss import make_loss_fn, token_cross_entropy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_prefix_fixture.py"
PEFT_FIXTURES = ROOT / "tests" / "fixtures" / "prefix_peft"
TRAIN_FIXTURES = ROOT / "tests" / "fixtures" / "prefix_train"
PARITY_TOL = 1e-4
LOSS_RTOL = 1e-5
FINAL_ATOL = 3e-5  # the encoder output after 8 AdamW steps of lr 1e-2 (measured ≤ 7.1e-6)

CFG = ModelConfig(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, layer_windows=(0, 0), eos_token_ids=(2,),
    max_position_embeddings=64,
)
WIDTH = 2 * 2 * 2 * 16  # L · 2 · H_kv · head_dim
PARAMS = params_lib.init_random(CFG, jax.random.key(0), std=0.2)


def _script():
    spec = importlib.util.spec_from_file_location("make_prefix_fixture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


REF = _script()


def _tokens(batch: int = 2, length: int = 7):
    ids = jax.random.randint(jax.random.key(7), (batch, length), 3, CFG.vocab_size)
    mask = jnp.ones((batch, length), jnp.int32).at[1, :2].set(0)
    return ids, mask


def _valid_max_abs(a, b, mask) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


# --- init, materialize, layout ---------------------------------------------------------------


def test_init_table_is_a_standard_normal_of_peft_shape():
    prefix = prefix_lib.init(CFG, jax.random.key(0), num_virtual_tokens=40)
    table = np.asarray(prefix.embedding)
    assert prefix.transform is None and prefix.num_virtual_tokens == 40
    assert table.shape == (40, WIDTH) and table.dtype == np.float32
    assert abs(table.mean()) < 0.05 and table.std() == pytest.approx(1.0, rel=0.05)
    assert prefix_lib.materialize(prefix) is prefix.embedding


def test_init_projection_draws_normal_embedding_and_linears_within_one_over_sqrt_fan_in():
    prefix = prefix_lib.init(CFG, jax.random.key(0), num_virtual_tokens=30, projection=24)
    t = {k: np.asarray(v) for k, v in prefix.transform.items()}
    assert prefix.embedding.shape == (30, 32)  # token_dim = H_kv · head_dim
    assert np.asarray(prefix.embedding).std() == pytest.approx(1.0, rel=0.1)
    shapes = {"w_in": (32, 24), "b_in": (24,), "w_out": (24, WIDTH), "b_out": (WIDTH,)}
    fan_in = {"w_in": 32, "b_in": 32, "w_out": 24, "b_out": 24}
    for name, shape in shapes.items():
        bound = 1 / math.sqrt(fan_in[name])
        assert t[name].shape == shape
        assert np.abs(t[name]).max() <= bound and np.abs(t[name]).max() > 0.8 * bound
    assert prefix_lib.materialize(prefix).shape == (30, WIDTH)


@pytest.mark.parametrize("kw, match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1"),
    (dict(num_virtual_tokens=2.5), "num_virtual_tokens must be an integer >= 1"),
    (dict(num_virtual_tokens=True), "num_virtual_tokens must be an integer >= 1"),
    (dict(projection=0), "projection size must be an integer >= 1"),
])
def test_init_rejects_impossible_sizes(kw, match):
    with pytest.raises(prefix_lib.PrefixError, match=match):
        prefix_lib.init(CFG, jax.random.key(0), **kw)


def test_materialize_applies_the_tanh_mlp():
    prefix = prefix_lib.init(CFG, jax.random.key(1), num_virtual_tokens=3, projection=8)
    t = {k: np.asarray(v, np.float64) for k, v in prefix.transform.items()}
    emb = np.asarray(prefix.embedding, np.float64)
    want = np.tanh(emb @ t["w_in"] + t["b_in"]) @ t["w_out"] + t["b_out"]
    np.testing.assert_allclose(prefix_lib.materialize(prefix), want, atol=1e-5)


def test_layer_kv_reads_the_flat_index_layer_then_k_or_v_then_head_then_dim():
    p = 3
    table = jnp.arange(p * WIDTH, dtype=jnp.float32).reshape(p, WIDTH)
    k, v = prefix_lib.layer_kv(CFG, prefix_lib.Prefix(table), jnp.float32)
    assert k.shape == v.shape == (2, p, 2, 16)  # [L, P, H_kv, head_dim]
    h_kv, d = CFG.num_kv_heads, CFG.head_dim
    for layer in range(2):
        for kv, got in ((0, k), (1, v)):
            for tok, head, j in ((0, 0, 0), (2, 1, 15), (1, 1, 3)):
                flat = ((2 * layer + kv) * h_kv + head) * d + j
                assert got[layer, tok, head, j] == table[tok, flat]


def test_a_prefix_that_does_not_fit_the_model_is_refused():
    prefix = prefix_lib.init(CFG, jax.random.key(0), num_virtual_tokens=2)
    with pytest.raises(prefix_lib.PrefixError, match=r"embedding has shape \(2, 128\), expected"):
        forward(CFG.replace(num_layers=3, layer_windows=(0,) * 3), PARAMS, *_tokens(),
                prefix=prefix)


# --- forward ----------------------------------------------------------------------------------


def test_prefix_of_cached_keys_of_real_tokens_equals_running_those_tokens_first():
    """A prefix whose K/V are the (rotated) cache entries of u real tokens makes the model see
    u before the input: logits(prefix, x) = logits(u ⊕ x)[len(u):], positions continuing at P."""
    ids, _ = _tokens(batch=1)
    u = jnp.asarray([[9, 41, 77]])
    cache = KVCache.create(CFG, 1, 3)
    _, cache = forward(CFG, PARAMS, u, kv_cache=cache)
    # cache.k [L, 1, P, H_kv, d] -> PEFT's table [P, ((2l + kv) H + h) d + j]
    kv = jnp.stack([cache.k[:, 0], cache.v[:, 0]], axis=1)  # [L, 2, P, H, d]
    table = kv.transpose(2, 0, 1, 3, 4).reshape(3, WIDTH)
    with_prefix = forward(CFG, PARAMS, ids, prefix=prefix_lib.Prefix(table))
    joined = forward(CFG, PARAMS, jnp.concatenate([u, ids], axis=1))[:, 3:]
    np.testing.assert_allclose(with_prefix, joined, atol=1e-5)


def test_left_padding_with_a_prefix_gives_the_unpadded_logits():
    prefix = prefix_lib.init(CFG, jax.random.key(2), num_virtual_tokens=3)
    ids, mask = _tokens()
    padded = forward(CFG, PARAMS, ids, mask, prefix=prefix)
    alone = forward(CFG, PARAMS, ids[1:, 2:], prefix=prefix)
    np.testing.assert_allclose(padded[1, 2:], alone[0], atol=1e-5)
    assert _valid_max_abs(padded, forward(CFG, PARAMS, ids, mask), mask) > 0.5  # it acts


def test_forward_refuses_a_prefix_beside_a_kv_cache():
    prefix = prefix_lib.init(CFG, jax.random.key(2), num_virtual_tokens=3)
    with pytest.raises(ValueError, match="pass the prefix to KVCache.create"):
        forward(CFG, PARAMS, *_tokens(), prefix=prefix, kv_cache=KVCache.create(CFG, 2, 16))


def test_loss_oracle_trains_the_prefix_beside_the_frozen_base():
    prefix = prefix_lib.init(CFG, jax.random.key(2), num_virtual_tokens=3, projection=8)
    ids, mask = _tokens()
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": jnp.where(mask > 0, ids, -100).at[:, :3].set(-100)}
    loss_fn = make_loss_fn(CFG, PARAMS)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(prefix, batch)
    want, _ = token_cross_entropy(forward(CFG, PARAMS, ids, mask, prefix=prefix),
                                  batch["labels"])
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert isinstance(grads, prefix_lib.Prefix)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# --- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [None, 8], ids=["table", "projection"])
def test_cached_generation_with_a_prefix_equals_recomputing_the_forward(projection):
    prefix = prefix_lib.init(CFG, jax.random.key(3), num_virtual_tokens=3, projection=projection)
    prompts = [[5, 6, 7, 8], [9, 10]]
    kw = dict(max_new_tokens=6, eos_ids=(), prefix=prefix)
    cached = generate(CFG, PARAMS, prompts, **kw)
    assert cached == generate(CFG, PARAMS, prompts, use_cache=False, **kw)
    assert cached != generate(CFG, PARAMS, prompts, max_new_tokens=6, eos_ids=())


def test_generation_counts_the_prefix_in_the_context():
    prefix = prefix_lib.init(CFG, jax.random.key(3), num_virtual_tokens=10)
    with pytest.raises(ContextLengthError, match="and 10 prefix tokens exceeds"):
        generate(CFG, PARAMS, [[5] * 50], max_new_tokens=10, prefix=prefix)


# --- PEFT interchange -------------------------------------------------------------------------


def test_save_peft_writes_one_materialized_table_and_peft_config(tmp_path):
    prefix = prefix_lib.init(CFG, jax.random.key(4), num_virtual_tokens=3, projection=8)
    out = prefix_lib.save_peft(tmp_path / "a", CFG, prefix, base_model_name_or_path="org/base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == {**config, "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                      "num_virtual_tokens": 3, "token_dim": 32, "num_layers": 2,
                      "num_attention_heads": 2, "num_transformer_submodules": 1,
                      "prefix_projection": False, "base_model_name_or_path": "org/base"}
    tensors = safetensors.numpy.load_file(str(out / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    np.testing.assert_array_equal(tensors["prompt_embeddings"], prefix_lib.materialize(prefix))
    loaded = prefix_lib.load_peft(out, CFG)
    assert loaded.transform is None
    ids, mask = _tokens()
    np.testing.assert_allclose(forward(CFG, PARAMS, ids, mask, prefix=loaded),
                               forward(CFG, PARAMS, ids, mask, prefix=prefix), atol=1e-5)


def _saved(tmp_path) -> tuple[dict, dict]:
    out = prefix_lib.save_peft(tmp_path / "src", CFG,
                               prefix_lib.init(CFG, jax.random.key(5), num_virtual_tokens=2))
    return (json.loads((out / "adapter_config.json").read_text()),
            safetensors.numpy.load_file(str(out / "adapter_model.safetensors")))


@pytest.mark.parametrize("change, match", [
    (lambda c, t: c.update(peft_type="LORA"), "peft_type is 'LORA'.*models.lora.load_peft"),
    (lambda c, t: c.update(task_type="SEQ_2_SEQ_LM"), "task_type is 'SEQ_2_SEQ_LM'"),
    (lambda c, t: c.update(num_layers=3), "num_layers=3, but this model needs 2"),
    (lambda c, t: c.update(token_dim=64, num_attention_heads=4), "num_attention_heads=4"),
    (lambda c, t: c.update(token_dim=64), "token_dim=64, but this model needs 32"),
    (lambda c, t: c.update(num_transformer_submodules=2), "num_transformer_submodules=2"),
    (lambda c, t: c.pop("num_virtual_tokens"), "no 'num_virtual_tokens' field"),
    (lambda c, t: c.update(num_virtual_tokens=3), r"shape \(2, 128\), expected \(3, 128\)"),
    (lambda c, t: t.update(extra=np.zeros(2, np.float32)), "holds \\['extra', 'prompt_emb"),
    (lambda c, t: t.update(prompt_embeddings=np.full((2, 128), np.nan, np.float32)),
     "finite floats"),
])
def test_load_peft_rejects_what_does_not_fit_with_a_clear_error(tmp_path, change, match):
    config, tensors = _saved(tmp_path)
    change(config, tensors)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(prefix_lib.PrefixError, match=match):
        prefix_lib.load_peft(bad, CFG)


def test_load_peft_names_missing_folders_and_files_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prefix_lib.load_peft(tmp_path / "nope", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        prefix_lib.load_peft(tmp_path / "empty", CFG)
    (tmp_path / "empty" / "adapter_config.json").write_text("{not json")
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        prefix_lib.load_peft(tmp_path / "empty", CFG)
    safetensors.numpy.save_file({"prompt_embeddings": np.zeros((1, WIDTH), np.float32)},
                                str(tmp_path / "empty" / "adapter_model.safetensors"))
    with pytest.raises(prefix_lib.PrefixError, match="is not valid JSON"):
        prefix_lib.load_peft(tmp_path / "empty", CFG)


# --- parity with PEFT (committed fixtures) -----------------------------------------------------


@functools.cache
def _base(family: str):
    return load_pretrained(REF.BASES[family])


def _check_peft_made(folder: Path, family: str) -> float:
    """hfjax's logits with a PEFT-made prefix vs PEFT's."""
    cfg, params = _base(family)
    golden = np.load(folder / family / "peft_logits.npz")
    ids, mask = golden["input_ids"], golden["attention_mask"]
    prefix = prefix_lib.load_peft(folder / family / "peft_adapter", cfg)
    assert prefix.num_virtual_tokens == REF.PEFT_TOKENS[family]
    assert _valid_max_abs(golden["logits"], golden["base_logits"], mask) > 1.0  # prefix matters
    assert _valid_max_abs(forward(cfg, params, ids, mask), golden["base_logits"], mask) \
        <= PARITY_TOL
    err = _valid_max_abs(forward(cfg, params, ids, mask, prefix=prefix), golden["logits"], mask)
    assert err <= PARITY_TOL, f"{family}: max |Δ| {err:.2e} vs PEFT > {PARITY_TOL}"
    return err


def _torch_projection(folder: Path) -> prefix_lib.Prefix:
    """PEFT's projection encoder (torch layout, Linear weight [out, in]) as an hfjax Prefix."""
    w = np.load(folder / "llama" / "projection_weights.npz")
    return prefix_lib.Prefix(jnp.asarray(w["embedding"]), {
        "w_in": jnp.asarray(w["transform.0.weight"].T), "b_in": jnp.asarray(w["transform.0.bias"]),
        "w_out": jnp.asarray(w["transform.2.weight"].T),
        "b_out": jnp.asarray(w["transform.2.bias"])})


def _check_peft_projection(folder: Path) -> float:
    """PEFT's prefix_projection encoder in hfjax: its materialized table equals what PEFT
    saved, and its logits (and those of the saved adapter) equal PEFT's."""
    cfg, params = _base("llama")
    golden = np.load(folder / "llama" / "projection_logits.npz")
    ids, mask = golden["input_ids"], golden["attention_mask"]
    prefix = _torch_projection(folder)
    saved = prefix_lib.load_peft(folder / "llama" / "projection_adapter", cfg)
    np.testing.assert_allclose(prefix_lib.materialize(prefix), saved.embedding, atol=1e-5)
    err = max(_valid_max_abs(forward(cfg, params, ids, mask, prefix=p), golden["logits"], mask)
              for p in (prefix, saved))
    assert err <= PARITY_TOL, f"projection: max |Δ| {err:.2e} vs PEFT > {PARITY_TOL}"
    return err


def _check_hfjax_made(folder: Path, family: str) -> float:
    """PEFT's logits with the hfjax-written prefix vs hfjax's."""
    cfg, params = _base(family)
    golden = np.load(folder / family / "hfjax_adapter_logits.npz")
    ids, mask = golden["input_ids"], golden["attention_mask"]
    prefix = REF.make_hfjax_prefix(cfg, family)
    assert _valid_max_abs(forward(cfg, params, ids, mask), golden["logits"], mask) > 1.0
    err = _valid_max_abs(forward(cfg, params, ids, mask, prefix=prefix), golden["logits"], mask)
    assert err <= PARITY_TOL, f"{family}: max |Δ| {err:.2e} vs PEFT > {PARITY_TOL}"
    return err


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_made_prefix_in_hfjax_gives_peft_logits(family):
    _check_peft_made(PEFT_FIXTURES, family)


def test_peft_projection_encoder_in_hfjax_gives_peft_table_and_logits():
    _check_peft_projection(PEFT_FIXTURES)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_logits_with_the_hfjax_written_prefix_match_hfjax(family):
    _check_hfjax_made(PEFT_FIXTURES, family)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_committed_hfjax_prefix_is_what_save_peft_writes_today(tmp_path, family):
    cfg, _ = _base(family)
    out = prefix_lib.save_peft(tmp_path / family, cfg, REF.make_hfjax_prefix(cfg, family))
    committed = PEFT_FIXTURES / family / "hfjax_adapter"
    name = "adapter_config.json"
    assert (out / name).read_bytes() == (committed / name).read_bytes()
    today, stored = (safetensors.numpy.load_file(str(d / "adapter_model.safetensors"))
                     for d in (out, committed))
    np.testing.assert_allclose(today["prompt_embeddings"], stored["prompt_embeddings"],
                               rtol=1e-6, atol=1e-6)


def test_live_peft_parity_both_directions(tmp_path):
    python = torch_python("live PEFT prefix comparison")
    out, train_out = tmp_path / "peft", tmp_path / "train"
    args = ("--out", str(out), "--train-out", str(train_out))
    run_script(python, SCRIPT, "peft", *args)
    run_script(sys.executable, SCRIPT, "write-hfjax", *args)
    run_script(python, SCRIPT, "record-hfjax", *args)
    errors = {f"{f} {what}": check(out, f) for f in ("llama", "qwen2")
              for what, check in (("peft", _check_peft_made), ("hfjax", _check_hfjax_made))}
    errors["projection"] = _check_peft_projection(out)
    print("live PEFT prefix parity:", errors)


# --- sharding ---------------------------------------------------------------------------------


def test_prefix_leaves_are_placed_by_their_logical_axes_replicated():
    mesh = sharding.make_mesh(2, 2, 2)
    prefix = prefix_lib.init(CFG, jax.random.key(0), num_virtual_tokens=4, projection=8)
    shardings = prefix_lib.shardings(prefix, mesh)
    for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(prefix), strict=True):
        assert s.spec == jax.sharding.PartitionSpec(*([None] * x.ndim))
    with pytest.raises(KeyError, match="'prefix_tokens' has no sharding rule"):
        prefix_lib.shardings(prefix, mesh, rules={})


def _synthetic_batches(steps: int, batch: int = 8, length: int = 12):
    for i in range(steps):
        r = np.random.default_rng(i)
        ids = r.integers(3, CFG.vocab_size, (batch, length)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[:, length - 1 - i % 3:] = 0
        labels = np.where(mask == 1, ids, -100).astype(np.int32)
        labels[:, :4] = -100
        yield {"user": {"input_ids": ids, "attention_mask": mask, "labels": labels}}


def _run(cfg, params, init, mesh_shape, batches, opt_cfg):
    """(losses, grad norms, final prefix) of hfjax's train step on a mesh."""
    from hfjax.train.step import put_batches

    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    t = builder.build_training(cfg, init, mesh=mesh, optimizer=opt_cfg)
    st, frozen = t.state, jax.device_put(params, t.frozen_shardings)
    losses, norms = [], []
    for b in batches:
        st, m = t.step(st, frozen, put_batches(b, mesh))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    assert t.step.compiles == 1
    return np.array(losses), np.array(norms), jax.device_get(st.trainable)


def test_prefix_training_on_8_devices_matches_1_device():
    init = prefix_lib.init(CFG, jax.random.key(1), num_virtual_tokens=4, projection=8)
    opt = optim.OptimizerConfig(learning_rate=1e-2, total_steps=4)
    single = _run(CFG, PARAMS, init, (1, 1, 1), _synthetic_batches(4), opt)
    sharded = _run(CFG, PARAMS, init, (2, 2, 2), _synthetic_batches(4), opt)
    assert np.all(np.isfinite(single[0])) and single[0][0] != single[0][-1]
    np.testing.assert_allclose(sharded[0], single[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(prefix_lib.materialize(sharded[2]),
                               prefix_lib.materialize(single[2]), atol=1e-5)


def test_builder_refuses_a_prefix_as_a_full_fine_tune():
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="a prefix trains beside the frozen base"):
        builder.build_training(CFG, prefix_lib.init(CFG, jax.random.key(0), 2), mesh=mesh,
                               full_finetune=True)


# --- training parity with PyTorch + PEFT ------------------------------------------------------


def _train_init(folder: Path, run: str) -> prefix_lib.Prefix:
    cfg, _ = _base("llama")
    if run == "table":
        return prefix_lib.load_peft(folder / "init_table", cfg)
    w = np.load(folder / "init_projection.npz")
    return prefix_lib.Prefix(jnp.asarray(w["embedding"]),
                             {k: jnp.asarray(w[k]) for k in ("w_in", "b_in", "w_out", "b_out")})


@functools.cache
def _hfjax_training(run: str):
    cfg, params = _base("llama")
    batches = REF.train_batches()
    data = ({"user": {k: v[i] for k, v in batches.items()}} for i in range(REF.TRAIN_STEPS))
    opt = optim.OptimizerConfig(learning_rate=REF.TRAIN_LR, total_steps=REF.TRAIN_STEPS,
                                b1=REF.BETAS[0], b2=REF.BETAS[1], eps=REF.EPS, weight_decay=0.0)
    return _run(cfg, params, _train_init(TRAIN_FIXTURES, run), (1, 1, 1), data, opt)


def _check_training(reference: Path, run: str) -> dict[str, float]:
    ref = np.load(reference / "reference.npz")
    losses, norms, final = _hfjax_training(run)
    errors = {
        "loss": float(np.max(np.abs(losses / ref[f"losses_{run}"] - 1))),
        "grad_norm": float(np.max(np.abs(norms / ref[f"grad_norms_{run}"] - 1))),
        "final": float(np.abs(prefix_lib.materialize(final) - ref[f"final_{run}"]).max()),
    }
    assert errors["loss"] <= LOSS_RTOL and errors["grad_norm"] <= 1e-4, errors
    assert errors["final"] <= FINAL_ATOL, errors
    moved = np.abs(ref[f"final_{run}"] - prefix_lib.materialize(_train_init(TRAIN_FIXTURES, run)))
    assert moved.max() > 100 * FINAL_ATOL  # the 8 steps moved the prefix well past the tolerance
    return errors


@pytest.mark.parametrize("run", ["table", "projection"])
def test_prefix_training_follows_pytorch_peft_step_by_step(run):
    _check_training(TRAIN_FIXTURES, run)


def test_live_pytorch_peft_prefix_training_matches_hfjax(tmp_path):
    python = torch_python("live PyTorch + PEFT prefix training")
    for item in ("init_table", "init_projection.npz"):  # the committed hfjax inits
        src = TRAIN_FIXTURES / item
        dst = tmp_path / item
        if src.is_dir():
            dst.mkdir()
            for f in src.iterdir():
                (dst / f.name).write_bytes(f.read_bytes())
        else:
            dst.write_bytes(src.read_bytes())
    run_script(python, SCRIPT, "train", "--out", str(tmp_path / "peft"), "--train-out",
               str(tmp_path))
    print("live prefix training parity:", {r: _check_training(tmp_path, r)
                                           for r in ("table", "projection")})


# --- the adapter registry and the pipeline's refusal -------------------------------------------


def test_prefix_adapter_type_inits_saves_loads_and_refuses_to_merge(tmp_path):
    kind = adapters.get("prefix")
    settings = adapters.AdapterSettings("prefix", num_virtual_tokens=5, prefix_projection=8)
    trainable = kind.init(CFG, jax.random.key(0), PARAMS, settings)
    assert not kind.full_finetune and trainable.num_virtual_tokens == 5
    assert trainable.transform["w_in"].shape == (32, 8)
    kind.save(tmp_path / "a", CFG, trainable, base_model="org/base")
    loaded = kind.load(tmp_path / "a", CFG)
    np.testing.assert_allclose(loaded.embedding, prefix_lib.materialize(trainable), atol=1e-6)
    assert kind.forward_kwargs(loaded) == {"prefix": loaded}
    assert adapters.get("full").forward_kwargs(PARAMS) == {}
    with pytest.raises(adapters.AdapterError, match="a prefix cannot be merged into the weights"):
        kind.merge(CFG, PARAMS, loaded)


@pytest.mark.parametrize("defense", ["safelora", "antidote"])
def test_weights_level_defenses_refuse_a_prefix_adapter(defense):
    with pytest.raises(ConfigError, match=f"--repair_defense={defense} maps a LoRA adapter; it "
                                          "does not apply to --adapter=prefix"):
        validate(RunFlags(run_dir="r", adapter="prefix", align_epochs=0, repair_defense=defense))
