"""HF folder weight IO: exact save/load round trips, HF naming, sharded loading, and errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from hfjax import sharding as sharding_lib
from hfjax.models import config as config_lib
from hfjax.models import hf_io, safetensors_reader
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfigError
from hfjax.models.hf_io import load_hf, save_hf, weight_mappings
from hfjax.models.safetensors_reader import (
    Checkpoint,
    MissingWeightError,
    SafetensorsError,
    WeightShapeError,
)

_BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "gemma2": dict(model_type="gemma2", sliding_window=4, query_pre_attn_scalar=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "mistral": dict(model_type="mistral", sliding_window=4),
}


def tiny_cfg(family: str, dtype: str = "float32"):
    return config_lib.from_hf_dict({**_BASE, **_FAMILIES[family]}, dtype=dtype)


def tiny_params(cfg, seed: int = 0, dtype=jnp.float32):
    return params_lib.init_random(cfg, jax.random.key(seed), dtype=dtype)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# ------------------------------------------------------------------------- mapping and naming


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_weight_mappings_cover_every_param_exactly_once(family):
    cfg = tiny_cfg(family)
    table = weight_mappings(cfg)
    paths = [m.path for m in table]
    leaves = jax.tree.leaves_with_path(params_lib.param_shapes(cfg))
    want = [tuple(k.key for k in p) for p, _ in leaves]
    assert sorted(paths) == sorted(want)
    names = [n for m in table for n in m.hf_names(cfg.num_layers)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_saved_tensors_carry_hf_names_shapes_and_transposed_values(family, tmp_path):
    cfg = tiny_cfg(family)
    params = tiny_params(cfg)
    save_hf(tmp_path / "m", cfg, params)
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    with safe_open(tmp_path / "m" / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
    q, kv, d, f_, v = 64, 32, 64, 128, 96
    want = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "model.layers.1.input_layernorm.weight": (d,),
        "model.layers.1.self_attn.q_proj.weight": (q, d),
        "model.layers.1.self_attn.k_proj.weight": (kv, d),
        "model.layers.1.self_attn.v_proj.weight": (kv, d),
        "model.layers.1.self_attn.o_proj.weight": (d, q),
        "model.layers.1.mlp.gate_proj.weight": (f_, d),
        "model.layers.1.mlp.up_proj.weight": (f_, d),
        "model.layers.1.mlp.down_proj.weight": (d, f_),
        "model.layers.1.post_attention_layernorm.weight": (d,),
    }
    if family == "qwen2":
        want.update({"model.layers.1.self_attn.q_proj.bias": (q,),
                     "model.layers.1.self_attn.k_proj.bias": (kv,)})
    if family == "gemma2":
        want.update({"model.layers.1.pre_feedforward_layernorm.weight": (d,),
                     "model.layers.1.post_feedforward_layernorm.weight": (d,)})
    else:
        want["lm_head.weight"] = (v, d)
    for name, shape in want.items():
        assert tensors[name].shape == shape, name
    per_layer = 9 + (3 if family == "qwen2" else 0) + (2 if family == "gemma2" else 0)
    assert len(tensors) == 2 + 2 * per_layer + (0 if cfg.tie_word_embeddings else 1)
    layers = params["layers"]
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.down_proj.weight"],
                                  np.asarray(layers["down_proj"]["kernel"][1]).T)
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                                  np.asarray(layers["q_proj"]["kernel"][0]).T)
    norm_after_attn = "attn_post_norm" if family == "gemma2" else "mlp_norm"
    np.testing.assert_array_equal(tensors["model.layers.1.post_attention_layernorm.weight"],
                                  np.asarray(layers[norm_after_attn][1]))
    if family == "gemma2":
        np.testing.assert_array_equal(tensors["model.layers.0.pre_feedforward_layernorm.weight"],
                                      np.asarray(layers["mlp_norm"][0]))
        np.testing.assert_array_equal(tensors["model.layers.0.post_feedforward_layernorm.weight"],
                                      np.asarray(layers["mlp_post_norm"][0]))
    else:
        np.testing.assert_array_equal(tensors["lm_head.weight"], np.asarray(params["lm_head"]).T)
    hf_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf_config["model_type"] == cfg.model_type and hf_config["dtype"] == "float32"


# ------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_save_then_load_returns_identical_config_and_params(family, tmp_path):
    cfg = tiny_cfg(family)
    params = tiny_params(cfg, seed=1)
    out = save_hf(tmp_path / "model", cfg, params)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "model"]  # no temp folder left
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)


def test_sharded_index_save_splits_by_size_and_loads_back_exactly(tmp_path):
    cfg = tiny_cfg("qwen2")
    params = tiny_params(cfg, seed=2)
    limit = 40_000
    save_hf(tmp_path / "m", cfg, params, shard_size_bytes=limit)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "m" / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        tensors = load_file(tmp_path / "m" / shard)
        size = sum(t.nbytes for t in tensors.values())
        assert size <= limit or len(tensors) == 1
        assert all(index["weight_map"][k] == shard for k in tensors)
        total += size
    assert index["metadata"]["total_size"] == total
    cfg2, params2 = load_hf(tmp_path / "m")
    assert cfg2 == cfg
    assert_trees_equal(params2, params)


def test_bf16_params_round_trip_exactly_and_are_stored_as_bf16(tmp_path):
    cfg = tiny_cfg("gemma2", dtype="bfloat16")
    params = tiny_params(cfg, seed=3, dtype=jnp.bfloat16)
    save_hf(tmp_path / "m", cfg, params)
    with safe_open(tmp_path / "m" / "model.safetensors", "np") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == ml_dtypes.bfloat16
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    cfg2, params2 = load_hf(tmp_path / "m", dtype=jnp.bfloat16)
    assert cfg2.dtype == "bfloat16"
    assert_trees_equal(params2, params)


def test_save_casts_to_dtype_and_load_casts_back(tmp_path):
    cfg = tiny_cfg("llama")
    params = tiny_params(cfg, seed=4)
    save_hf(tmp_path / "m", cfg, params, dtype=jnp.bfloat16)
    cfg2, loaded = load_hf(tmp_path / "m", dtype=jnp.float32)
    assert cfg2.dtype == "float32"
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    assert_trees_equal(loaded, rounded)
    embed = np.asarray(params["embed_tokens"])
    assert not np.array_equal(np.asarray(loaded["embed_tokens"]), embed)  # bf16 did round
    _, half = load_hf(tmp_path / "m", dtype=jnp.float16)
    assert half["layers"]["q_proj"]["kernel"].dtype == jnp.float16


def test_saving_into_existing_folder_keeps_other_files_and_drops_stale_shards(tmp_path):
    cfg = tiny_cfg("llama")
    out = tmp_path / "m"
    save_hf(out, cfg, tiny_params(cfg, seed=5), shard_size_bytes=40_000)
    (out / "tokenizer.json").write_text("{}")
    params = tiny_params(cfg, seed=6)
    save_hf(out, cfg, params)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert_trees_equal(load_hf(out)[1], params)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.numpy

    cfg = tiny_cfg("llama")
    calls = []

    def fail_on_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        save_hf(tmp_path / "m", cfg, tiny_params(cfg), shard_size_bytes=40_000)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- sharded loading


def _mesh(data, fsdp, tensor):
    if jax.device_count() < data * fsdp * tensor:
        pytest.skip("needs 8 simulated CPU devices (tests/conftest.py sets jax_num_cpu_devices)")
    return sharding_lib.make_mesh(data, fsdp, tensor)


@pytest.fixture(scope="module")
def saved_gemma2_and_qwen2(tmp_path_factory):
    out = {}
    for family in ("gemma2", "qwen2"):
        cfg = tiny_cfg(family)
        path = tmp_path_factory.mktemp(family) / "m"
        save_hf(path, cfg, tiny_params(cfg, seed=7), shard_size_bytes=60_000)
        out[family] = path
    return out


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 4, 1)])
def test_mesh_loading_matches_unsharded_values_shardings_and_logits(
    family, mesh_shape, saved_gemma2_and_qwen2
):
    from hfjax.models.decoder import forward

    path = saved_gemma2_and_qwen2[family]
    mesh = _mesh(*mesh_shape)
    cfg, plain = load_hf(path)
    cfg_s, sharded = load_hf(path, mesh=mesh)
    assert cfg_s == cfg
    assert_trees_equal(sharded, plain)
    want = sharding_lib.tree_shardings(params_lib.logical_axes(cfg),
                                       params_lib.param_shapes(cfg), mesh)
    for m in weight_mappings(cfg):
        arr, sh = _leaf(sharded, m.path), _leaf(want, m.path)
        assert arr.sharding.mesh == mesh and arr.sharding.spec == sh.spec, m.path
        if m.path[-1] == "kernel":
            assert not arr.sharding.is_fully_replicated, m.path
            assert arr.addressable_shards[0].data.size < arr.size, m.path
    kernel = sharded["layers"]["q_proj"]["kernel"]
    want_spec = P(None, "fsdp", "tensor") if mesh_shape[2] > 1 else P(None, "fsdp", None)
    assert kernel.sharding.spec == want_spec

    ids = jnp.asarray(np.random.default_rng(0).integers(3, 96, size=(2, 8)), jnp.int32)
    logits_plain = forward(cfg, plain, ids)
    logits_sharded = jax.jit(forward, static_argnums=0)(cfg, sharded, ids)
    np.testing.assert_allclose(np.asarray(logits_sharded), np.asarray(logits_plain), atol=1e-5)


class _RecordingSlice:
    """The library's slice of one tensor; records the shape of every read."""

    def __init__(self, name, view, reads):
        self.name, self.view, self.reads = name, view, reads
        self.get_shape, self.get_dtype = view.get_shape, view.get_dtype

    def __getitem__(self, index):
        out = self.view[index]
        self.reads.append((self.name, out.shape))
        return out


class _RecordingFile:
    """A `safe_open` handle whose only data access is `get_slice` (recorded): a whole-tensor
    read by any other path fails."""

    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def keys(self):
        return self.handle.keys()

    def get_slice(self, name):
        return _RecordingSlice(name, self.handle.get_slice(name), self.reads)


def test_each_device_reads_only_its_slice(saved_gemma2_and_qwen2, monkeypatch):
    """With fsdp=4 x tensor=2, every HF kernel is read as 8 disjoint [out/2, in/4] blocks (and
    data-replicated shards are read once), never as the whole tensor: counted at the
    safetensors library's slice reads."""
    path = saved_gemma2_and_qwen2["qwen2"]
    reads: list[tuple[str, tuple[int, ...]]] = []
    monkeypatch.setattr(safetensors_reader, "safe_open",
                        lambda *a, **k: _RecordingFile(safe_open(*a, **k), reads))
    for mesh_shape in [(1, 4, 2), (2, 4, 1)]:
        reads.clear()
        cfg, _ = load_hf(path, mesh=_mesh(*mesh_shape))
        fsdp, tensor = mesh_shape[1], mesh_shape[2]
        # HF q_proj [Q, D]; hfjax [L, D, Q] is sharded (None, fsdp, tensor)
        q_name = "model.layers.1.self_attn.q_proj.weight"
        q_reads = [shape for name, shape in reads if name == q_name]
        assert q_reads == [(64 // tensor, 64 // fsdp)] * (fsdp * tensor)
        down = [s for n, s in reads if n == "model.layers.0.mlp.down_proj.weight"]  # HF [D, F]
        assert down == [(64 // fsdp, 128 // tensor)] * (fsdp * tensor)
        # every element of every needed tensor is read exactly once in total
        per_name: dict[str, int] = {}
        for name, shape in reads:
            per_name[name] = per_name.get(name, 0) + int(np.prod(shape))
        ckpt = Checkpoint(path)
        assert per_name == {n: int(np.prod(ckpt.shape(n))) for n in ckpt.keys()}


# ------------------------------------------------------------------------- errors


@pytest.fixture
def saved_llama(tmp_path):
    cfg = tiny_cfg("llama")
    params = tiny_params(cfg)
    return save_hf(tmp_path / "m", cfg, params), cfg, params


def _rewrite_config(path: Path, **changes):
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    (path / "config.json").write_text(json.dumps(d))


def test_missing_folder_and_config_json_raise_file_not_found(saved_llama, tmp_path):
    path, _, _ = saved_llama
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nowhere")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf(path)


def test_missing_weights_file_and_missing_shard_raise_file_not_found(saved_llama, tmp_path):
    path, cfg, params = saved_llama
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor"):
        load_hf(path)
    sharded = save_hf(tmp_path / "s", cfg, params, shard_size_bytes=40_000)
    second = sorted(sharded.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=second.name):
        load_hf(sharded)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: raw[:5], "header too small"),
        (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "header too large"),
        (lambda raw: raw[:8] + b"#" + raw[9:], "invalid JSON in header"),
        (lambda raw: raw[:-100], "not fully covered"),
    ],
    ids=["no_header", "bad_length", "bad_json", "truncated"],
)
def test_corrupt_safetensors_raise_naming_the_file(saved_llama, corrupt, message):
    path, _, _ = saved_llama
    f = path / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes()))
    with pytest.raises(SafetensorsError, match=message) as e:
        load_hf(path)
    assert "model.safetensors" in str(e.value)


def test_missing_weight_is_named(saved_llama):
    path, _, _ = saved_llama
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(MissingWeightError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(path)


def test_untied_config_without_lm_head_is_an_error(saved_llama):
    path, _, _ = saved_llama
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(MissingWeightError, match=r"lm_head\.weight.*tie_word_embeddings"):
        load_hf(path)
    _rewrite_config(path, tie_word_embeddings=True)
    cfg, params = load_hf(path)
    assert cfg.tie_word_embeddings and "lm_head" not in params


def test_shape_mismatch_names_tensor_and_both_shapes(saved_llama):
    path, _, _ = saved_llama
    _rewrite_config(path, intermediate_size=96)
    with pytest.raises(WeightShapeError, match=r"gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        load_hf(path)


def test_unknown_model_type_surfaces_as_model_config_error(saved_llama):
    path, _, _ = saved_llama
    _rewrite_config(path, model_type="gpt2")
    with pytest.raises(ModelConfigError, match=r"config\.json.*unknown model_type 'gpt2'"):
        load_hf(path)


def test_unsupported_tensor_dtype_and_target_dtype_are_errors(saved_llama):
    path, _, _ = saved_llama
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(SafetensorsError, match=r"model\.norm\.weight.*F64"):
        load_hf(path)
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_hf(path, dtype=jnp.int8)


def test_unmappable_extra_weight_is_an_error(saved_llama):
    path, _, _ = saved_llama
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(hf_io.UnexpectedWeightError, match=r"o_proj\.bias"):
        load_hf(path)


def test_save_rejects_params_that_do_not_match_config(tmp_path):
    cfg = tiny_cfg("llama")
    params = tiny_params(cfg)
    with pytest.raises(ValueError, match="do not match"):
        save_hf(tmp_path / "a", cfg.replace(tie_word_embeddings=True), params)
    with pytest.raises(WeightShapeError, match="embed_tokens"):
        save_hf(tmp_path / "b", cfg.replace(vocab_size=100), params)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_slices_read_what_numpy_indexing_gives(saved_llama):
    """Checkpoint.read clips and empties ranges as numpy does (the library itself rejects
    out-of-range and empty ranges) and keeps the stored dtype."""
    path, _, _ = saved_llama
    name = "model.layers.1.mlp.down_proj.weight"  # [64, 128]
    whole = load_file(path / "model.safetensors")[name]
    ckpt = Checkpoint(path)
    for index in [(), (slice(None),), (slice(3, 9), slice(100, 200)), (slice(-5, None),),
                  (slice(64, 64),), (slice(10, 2), slice(0, 4)), (slice(0, 0), slice(5, 5))]:
        got = ckpt.read(name, index)
        assert got.dtype == whole.dtype and got.shape == whole[index].shape, index
        np.testing.assert_array_equal(got, whole[index], err_msg=str(index))
    with pytest.raises(IndexError, match="step 2"):
        ckpt.read(name, (slice(None, None, 2),))


def test_classifier_folder_loads_score_head_in_place_of_lm_head(saved_llama):
    path, cfg, params = saved_llama
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    head = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    save_file({**tensors, "score.weight": head}, path / "model.safetensors")
    cfg2, loaded = load_hf(path, num_labels=5)
    assert not cfg2.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"]), head.T)
    np.testing.assert_array_equal(np.asarray(loaded["embed_tokens"]),
                                  np.asarray(params["embed_tokens"]))
    with pytest.raises(WeightShapeError, match=r"score\.weight.*\[5, 64\].*\[3, 64\]"):
        load_hf(path, num_labels=3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(MissingWeightError, match=r"score\.weight.*sequence classifier"):
        load_hf(path, num_labels=5)
