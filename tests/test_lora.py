"""LoRA: PEFT-exact init, merge, and PEFT adapter interchange in both directions.

Golden fixtures in tests/fixtures/peft/ come from scripts/make_peft_fixture.py (see its
docstring); with HFJAX_TORCH_PYTHON set, the live test regenerates them with torch + PEFT.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference_decoder
import safetensors.numpy
from torch_live import run_fixture_script, run_script

from hfjax.models import lora as lora_lib
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import forward
from hfjax.models.params import PROJECTIONS, init_random, projection_dims

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "peft"
SCRIPT = ROOT / "scripts" / "make_peft_fixture.py"
PARITY_TOL = 1e-4

CFG = ModelConfig(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, layer_windows=(0, 0),
)


def _script():
    spec = importlib.util.spec_from_file_location("make_peft_fixture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_b(lora: lora_lib.LoRA, key: jax.Array, scale: float = 0.3) -> lora_lib.LoRA:
    keys = jax.random.split(key, len(lora.weights))
    weights = {
        name: {"A": w["A"], "B": scale * jax.random.normal(k, w["B"].shape, jnp.float32)}
        for (name, w), k in zip(lora.weights.items(), keys, strict=True)
    }
    return lora.replace(weights=weights)


def _tokens(batch: int = 2, length: int = 7) -> tuple[jax.Array, jax.Array]:
    ids = jax.random.randint(jax.random.key(7), (batch, length), 0, CFG.vocab_size)
    mask = jnp.ones((batch, length), jnp.int32).at[1, :2].set(0)
    return ids, mask


def _valid_max_abs(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


def _write_adapter(directory: Path, config: dict, tensors: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / lora_lib.ADAPTER_CONFIG).write_text(json.dumps(config))
    safetensors.numpy.save_file(tensors, str(directory / lora_lib.ADAPTER_WEIGHTS))
    return directory


# --- init ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in", [1, 64, 128, 576, 1536])
def test_kaiming_bound_equals_torch_formula_for_a_sqrt5(fan_in):
    a = math.sqrt(5)
    gain = math.sqrt(2.0 / (1.0 + a * a))  # torch.nn.init.calculate_gain("leaky_relu", a)
    torch_bound = gain * math.sqrt(3.0 / fan_in)  # kaiming_uniform_, mode="fan_in"
    assert lora_lib.kaiming_uniform_bound(fan_in) == pytest.approx(torch_bound, rel=1e-12)
    assert lora_lib.kaiming_uniform_bound(fan_in) == pytest.approx(1 / math.sqrt(fan_in))
    assert lora_lib.kaiming_uniform_bound(fan_in, a=0.0) == pytest.approx(math.sqrt(6 / fan_in))


def test_init_shapes_dtype_a_uniform_within_kaiming_bound_and_b_zero():
    lora = lora_lib.init(CFG, jax.random.key(0), rank=8, alpha=16, targets=PROJECTIONS)
    assert lora.targets == PROJECTIONS
    assert lora.rank == 8 and lora.alpha == 16.0 and lora.scale == 2.0
    dims = projection_dims(CFG)
    for name, w in lora.weights.items():
        fin, fout = dims[name]
        assert w["A"].shape == (2, fin, 8) and w["B"].shape == (2, 8, fout)
        assert w["A"].dtype == jnp.float32 and w["B"].dtype == jnp.float32
        a = np.asarray(w["A"])
        bound = 1 / math.sqrt(fin)
        assert np.abs(a).max() <= bound
        assert np.abs(a).max() > 0.95 * bound  # fills the interval, not a narrower one
        assert abs(a.mean()) < 0.1 * bound
        assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # U(-b, b) std
        assert not np.array_equal(a[0], a[1])  # layers drawn independently
        assert not np.any(np.asarray(w["B"]))
    qa, ka = np.asarray(lora.weights["q_proj"]["A"]), np.asarray(lora.weights["k_proj"]["A"])
    assert not np.array_equal(qa, ka)  # targets drawn independently


def test_init_is_deterministic_in_the_key_and_defaults_to_q_v_rank_8():
    a = lora_lib.init(CFG, jax.random.key(3))
    b = lora_lib.init(CFG, jax.random.key(3))
    c = lora_lib.init(CFG, jax.random.key(4))
    assert a.targets == ("q_proj", "v_proj") and a.rank == 8 and a.scale == 2.0
    np.testing.assert_array_equal(a.weights["q_proj"]["A"], b.weights["q_proj"]["A"])
    assert not np.array_equal(a.weights["q_proj"]["A"], c.weights["q_proj"]["A"])


def test_init_bound_matches_the_range_of_torch_initialized_peft_lora_a():
    """PEFT's lora_A in the fixture was drawn by torch's kaiming_uniform_(a=√5)."""
    path = FIXTURES / "peft_adapter" / lora_lib.ADAPTER_WEIGHTS
    tensors = safetensors.numpy.load_file(str(path))
    dims = projection_dims(_fixture_cfg())
    for name in PROJECTIONS:
        a = np.concatenate([tensors[lora_lib.peft_key(i, name, "A")].ravel() for i in range(2)])
        bound = lora_lib.kaiming_uniform_bound(dims[name][0])
        assert np.abs(a).max() <= bound
        assert np.abs(a).max() > 0.9 * bound


def test_zero_b_lora_leaves_logits_unchanged():
    params = init_random(CFG, jax.random.key(1))
    lora = lora_lib.init(CFG, jax.random.key(2), rank=4, alpha=8, targets=PROJECTIONS)
    ids, mask = _tokens()
    np.testing.assert_array_equal(
        forward(CFG, params, ids, mask, lora=lora), forward(CFG, params, ids, mask)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ("q_proj", "qkv_proj")}, "'qkv_proj'"),
        ({"targets": ("lm_head",)}, "'lm_head'"),
        ({"targets": ()}, "at least one target"),
        ({"targets": ("q_proj", "q_proj")}, "duplicates"),
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"rank": 2.5}, "rank must be an integer >= 1"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\)"),
    ],
)
def test_init_rejects_bad_arguments_with_a_clear_error(kwargs, message):
    with pytest.raises(lora_lib.LoRAError, match=message):
        lora_lib.init(CFG, jax.random.key(0), **kwargs)


# --- the branch and its VJP -----------------------------------------------------------------


def _branch_inputs(n, d_in, d_out, rank, dtype=jnp.float32, param_dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (n, d_in), jnp.float32).astype(dtype)
    a = (0.2 * jax.random.normal(k[1], (d_in, rank), jnp.float32)).astype(param_dtype)
    b = (0.2 * jax.random.normal(k[2], (rank, d_out), jnp.float32)).astype(param_dtype)
    g = jax.random.normal(k[3], (n, d_out), jnp.float32).astype(dtype)
    return x, a, b, g


def _branch_vjp(x, a, b, g, scale, forward_mode_ad):
    fn = lambda x, a, b: lora_lib.apply(  # noqa: E731
        x, {"q_proj": {"A": a, "B": b}}, "q_proj", scale, forward_mode_ad=forward_mode_ad)
    y, vjp = jax.vjp(fn, x, a, b)
    return (y, *vjp(g))


@pytest.mark.parametrize(("n", "d_in", "d_out", "rank", "scale"),
                         [(12, 16, 24, 4, 2.0), (7, 24, 8, 1, 16 / 3), (32, 8, 40, 8, 0.5)])
def test_branch_value_and_vjp_equal_autodiff_of_the_plain_branch_in_float32(
        n, d_in, d_out, rank, scale):
    x, a, b, g = _branch_inputs(n, d_in, d_out, rank)
    got = _branch_vjp(x, a, b, g, scale, forward_mode_ad=False)
    want = _branch_vjp(x, a, b, g, scale, forward_mode_ad=True)
    np.testing.assert_array_equal(got[0], want[0])
    for name, u, v in zip(("dx", "dA", "dB"), got[1:], want[1:], strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype, name
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6, err_msg=name)
        assert float(jnp.abs(v).max()) > 0.1, name  # not a trivially zero gradient


def test_branch_vjp_in_bfloat16_is_the_float32_gradient_within_bfloat16_rounding():
    x, a, b, g = _branch_inputs(64, 48, 96, 8, dtype=jnp.bfloat16)
    got = _branch_vjp(x, a, b, g, 2.0, forward_mode_ad=False)
    exact = _branch_vjp(x.astype(jnp.float32), a, b, g.astype(jnp.float32), 2.0, True)
    assert got[1].dtype == jnp.bfloat16 and got[2].dtype == got[3].dtype == jnp.float32
    for name, u, v in zip(("y", "dx", "dA", "dB"), got, exact, strict=True):
        err = float(jnp.abs(u.astype(jnp.float32) - v).max() / jnp.abs(v).max())
        assert err < 2e-2, (name, err)  # bf16: 8 mantissa bits, rounded intermediates


def test_branch_vjp_returns_gradients_in_the_parameters_dtype():
    x, a, b, g = _branch_inputs(8, 16, 16, 2, param_dtype=jnp.bfloat16)
    _, dx, da, db = _branch_vjp(x, a, b, g, 2.0, forward_mode_ad=False)
    assert (dx.dtype, da.dtype, db.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)


def _dot_generals(jaxpr):
    """Every dot_general equation in a jaxpr and its sub-jaxprs, with the equations that
    produced its operands (None for inputs of the (sub-)jaxpr)."""
    producers = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn, [producers.get(v) if isinstance(v, jax.extend.core.Var) else None
                        for v in eqn.invars]
        producers.update(dict.fromkeys(eqn.outvars, eqn))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _dot_generals(sub)


def _row_major_products(forward_mode_ad: bool) -> list[bool]:
    """Per product in the branch's forward + backward: does it contract the left operand's last
    axis, the right one's first or last, with no transposed operand?"""
    x, a, b, g = _branch_inputs(16, 8, 12, 4, dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda *args: _branch_vjp(*args, 2.0, forward_mode_ad))(x, a, b, g)
    out = []
    for eqn, producers in _dot_generals(jaxpr.jaxpr):
        (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.ndim for v in eqn.invars)
        transposed = any(p is not None and p.primitive.name == "transpose" for p in producers)
        out.append(tuple(lhs_c) == (lhs - 1,) and tuple(rhs_c) in ((0,), (rhs - 1,))
                   and not transposed)
    return out


def test_branch_vjp_contracts_each_left_operand_over_its_last_axis_with_no_transposes():
    # XLA:CPU runs such products in YNNPACK; autodiff's x^T dh (token axis of both operands)
    # runs as an f32 dot on upcast copies (commit d274e59)
    custom = _row_major_products(forward_mode_ad=False)
    assert len(custom) == 8 and all(custom), custom  # 2 forward, 6 backward products
    assert not all(_row_major_products(forward_mode_ad=True))  # what the custom VJP avoids


def test_forward_mode_through_the_branch_needs_forward_mode_ad():
    x, a, b, _ = _branch_inputs(6, 8, 10, 2)
    tangents = (jnp.ones_like(x), jnp.ones_like(a), jnp.ones_like(b))
    fn = lambda fm: lambda x, a, b: lora_lib.apply(  # noqa: E731
        x, {"v_proj": {"A": a, "B": b}}, "v_proj", 3.0, forward_mode_ad=fm)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(fn(False), (x, a, b), tangents)
    _, tangent_out = jax.jvp(fn(True), (x, a, b), tangents)
    # the branch is bilinear: its derivative along (dx, dA, dB) is the sum of three terms
    want = 3.0 * (tangents[0] @ a @ b + x @ tangents[1] @ b + x @ a @ tangents[2])
    np.testing.assert_allclose(tangent_out, want, rtol=1e-5)


def test_model_loss_gradient_with_the_lora_vjp_equals_plain_autodiff():
    from hfjax.train.loss import make_loss_fn

    params = init_random(CFG, jax.random.key(1), std=0.1)
    lora = _random_b(lora_lib.init(CFG, jax.random.key(2), rank=4, alpha=8,
                                   targets=PROJECTIONS), jax.random.key(3))
    ids, mask = _tokens()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    grads = [jax.grad(lambda t, fm=fm: make_loss_fn(CFG, params, forward_mode_ad=fm)(
        t, batch)[0])(lora) for fm in (False, True)]
    for u, v in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    assert len(jax.tree.leaves(grads[0])) == 2 * len(PROJECTIONS)


# --- LoRA dropout ----------------------------------------------------------------------------

P = 0.3


def _dropped_branch(x, a, b, key, p=P, forward_mode_ad=False):
    return lora_lib.apply(x, {"v_proj": {"A": a, "B": b}}, "v_proj", 2.0, dropout=p,
                          dropout_key=key, forward_mode_ad=forward_mode_ad)


def test_lora_dropout_zero_or_without_a_key_traces_exactly_the_plain_branch():
    x, a, b, _ = _branch_inputs(12, 16, 24, 4)
    plain = jax.make_jaxpr(lambda x: _dropped_branch(x, a, b, None, p=0.0))(x)
    for p, key in ((0.0, jax.random.key(5)), (P, None)):
        fn = lambda x, p=p, key=key: _dropped_branch(x, a, b, key, p)  # noqa: E731
        assert str(jax.make_jaxpr(fn)(x)) == str(plain)
        np.testing.assert_array_equal(fn(x), _dropped_branch(x, a, b, None, p=0.0))


def test_lora_dropout_branch_and_its_gradients_equal_the_explicitly_masked_branch():
    """y = ((m ⊙ x / (1 − p)) A · s) B with m = dropout_mask(key, "v_proj", ...) = Bernoulli
    drawn with fold_in(key, index of v_proj); the same through the custom VJP and autodiff."""
    x, a, b, g = _branch_inputs(64, 16, 24, 4)
    key = jax.random.key(5)
    keep = jax.random.bernoulli(jax.random.fold_in(key, PROJECTIONS.index("v_proj")), 1 - P,
                                x.shape)
    np.testing.assert_array_equal(lora_lib.dropout_mask(key, "v_proj", P, x.shape), keep)
    assert 0.25 < 1 - float(keep.mean()) < 0.35
    explicit = lambda x, a, b: ((jnp.where(keep, x / (1 - P), 0.0) @ a) * 2.0) @ b  # noqa: E731
    want, want_vjp = jax.vjp(explicit, x, a, b)
    for forward_mode_ad in (False, True):
        got, got_vjp = jax.vjp(lambda x, a, b, fm=forward_mode_ad: _dropped_branch(
            x, a, b, key, forward_mode_ad=fm), x, a, b)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for u, v in zip(got_vjp(g), want_vjp(g), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
            assert float(jnp.abs(v).max()) > 0.1  # the gradient flows
        assert not np.any(np.asarray(got_vjp(g)[0])[~np.asarray(keep)])  # none into dropped x


def test_lora_dropout_is_unbiased_its_mean_over_2000_keys_is_the_plain_branch():
    """y_k = Σ_j x'_j M_jk (M = s A B) with independent x'_j: E y = x M and
    Var y_k = p/(1 − p) Σ_j x_j² M_jk²; the mean over 2000 masks is within 5 standard errors
    (without the 1/(1 − p) it would sit at (1 − p) x M, ~50 standard errors off)."""
    x, a, b, _ = _branch_inputs(4, 16, 8, 4)
    n = 2000
    outs = jax.vmap(lambda k: _dropped_branch(x, a, b, k))(jax.random.split(jax.random.key(9), n))
    plain = _dropped_branch(x, a, b, None)
    m = 2.0 * a @ b
    std = jnp.sqrt(P / (1 - P) * (x * x) @ (m * m))
    z = (outs.mean(0) - plain) / (std / np.sqrt(n))
    assert float(jnp.abs(z).max()) < 5
    np.testing.assert_allclose(outs.std(0), std, rtol=0.1)


def _dropout_setup():
    params = init_random(CFG, jax.random.key(1), std=0.1)
    lora = _random_b(lora_lib.init(CFG, jax.random.key(2), rank=4, alpha=8, targets=PROJECTIONS,
                                   dropout=P), jax.random.key(3))
    return params, lora


def test_forward_lora_dropout_equals_the_reference_with_one_mask_per_layer_and_module():
    """forward(dropout_rng=r) = the reference decoder with masks dropout_mask(dropout_keys(r, L)[l],
    module) applied explicitly (q/k/v share an input but not a mask); loss gradients too."""
    params, lora = _dropout_setup()
    ids, mask = _tokens()
    rng = jax.random.key(21)
    got = forward(CFG, params, ids, mask, lora=lora, dropout_rng=rng)
    want = reference_decoder.forward(CFG, params, ids, mask, lora, dropout_rng=rng)[0]
    assert _valid_max_abs(got, want, mask) <= 1e-5
    remat = forward(CFG.replace(remat=True), params, ids, mask, lora=lora, dropout_rng=rng)
    np.testing.assert_array_equal(remat, got)
    evaluation = forward(CFG, params, ids, mask, lora=lora)
    np.testing.assert_array_equal(evaluation, forward(CFG, params, ids, mask,
                                                      lora=lora.replace(dropout=0.0)))
    assert _valid_max_abs(got, evaluation, mask) > 1e-2
    other_step = forward(CFG, params, ids, mask, lora=lora, dropout_rng=jax.random.key(22))
    assert _valid_max_abs(other_step, got, mask) > 1e-2

    from hfjax.train.loss import make_loss_fn

    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    grads = jax.grad(lambda t: make_loss_fn(CFG, params)(t, batch, dropout_rng=rng)[0])(lora)
    want_grads = jax.grad(lambda w: reference_decoder.loss(
        CFG, params, lora.replace(weights=w), batch, dropout_rng=rng))(lora.weights)
    for u, v in zip(jax.tree.leaves(grads.weights), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def test_dropout_keys_give_every_layer_and_module_its_own_mask():
    keys = lora_lib.dropout_keys(jax.random.key(21), 3)
    masks = [np.asarray(lora_lib.dropout_mask(k, name, P, (14, 64))).tobytes()
             for k in keys for name in PROJECTIONS]
    assert len(set(masks)) == len(masks) == 3 * len(PROJECTIONS)


def test_merge_ignores_dropout():
    params, lora = _dropout_setup()
    merged = lora_lib.merge(CFG, params, lora)
    jax.tree.map(np.testing.assert_array_equal, merged,
                 lora_lib.merge(CFG, params, lora.replace(dropout=0.0)))


# --- merge -----------------------------------------------------------------------------------


def test_forward_with_lora_equals_forward_on_merged_params():
    params = init_random(CFG, jax.random.key(1), std=0.1)
    lora = lora_lib.init(CFG, jax.random.key(2), rank=4, alpha=8, targets=PROJECTIONS)
    lora = _random_b(lora, jax.random.key(3))
    ids, mask = _tokens()
    with_lora = forward(CFG, params, ids, mask, lora=lora)
    merged = forward(CFG, lora_lib.merge(CFG, params, lora), ids, mask)
    base = forward(CFG, params, ids, mask)
    assert _valid_max_abs(with_lora, base, mask) > 0.05  # the adapter does change the logits
    assert _valid_max_abs(with_lora, merged, mask) <= 1e-5


def test_merge_adds_scaled_a_times_b_keeps_dtype_and_does_not_mutate_input():
    params = init_random(CFG, jax.random.key(1), dtype=jnp.bfloat16)
    lora = _random_b(lora_lib.init(CFG, jax.random.key(2), rank=2, alpha=6), jax.random.key(3))
    before = jax.tree.map(np.asarray, params)
    merged = lora_lib.merge(CFG, params, lora)
    for name in PROJECTIONS:
        assert merged["layers"][name]["kernel"].dtype == jnp.bfloat16
        if name not in lora.weights:
            assert merged["layers"][name]["kernel"] is params["layers"][name]["kernel"]
    a, b = np.asarray(lora.weights["v_proj"]["A"]), np.asarray(lora.weights["v_proj"]["B"])
    want = before["layers"]["v_proj"]["kernel"].astype(np.float32) + 3.0 * (a @ b)
    np.testing.assert_array_equal(
        np.asarray(merged["layers"]["v_proj"]["kernel"]), want.astype(jnp.bfloat16)
    )
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))


def test_merge_rejects_adapter_for_another_model_shape():
    lora = lora_lib.init(CFG, jax.random.key(0), rank=2)
    other = CFG.replace(hidden_size=32, head_dim=8)
    with pytest.raises(lora_lib.LoRAError, match=r"q_proj.A has shape \(2, 64, 2\)"):
        lora_lib.merge(other, init_random(other, jax.random.key(1)), lora)


# --- save_peft / load_peft -------------------------------------------------------------------


def test_save_peft_writes_peft_keys_shapes_and_config(tmp_path):
    lora = _random_b(lora_lib.init(CFG, jax.random.key(0), rank=4, alpha=8,
                                   targets=("v_proj", "down_proj", "q_proj")), jax.random.key(1))
    out = lora_lib.save_peft(tmp_path / "adapter", CFG, lora, base_model_name_or_path="base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert config["base_model_name_or_path"] == "base" and config["inference_mode"] is True
    assert config["bias"] == "none" and config["use_rslora"] is False
    assert config["fan_in_fan_out"] is False and config["lora_dropout"] == 0.0
    tensors = safetensors.numpy.load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 3 * 2 * 2
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, np.asarray(lora.weights["q_proj"]["A"][1]).T)
    np.testing.assert_array_equal(b, np.asarray(lora.weights["down_proj"]["B"][1]).T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dir left


def test_save_then_load_peft_round_trip_is_exact(tmp_path):
    lora = lora_lib.init(CFG, jax.random.key(0), rank=3, alpha=5.5, targets=PROJECTIONS,
                         dropout=0.1)
    lora = _random_b(lora, jax.random.key(1))
    out = lora_lib.save_peft(tmp_path / "a", CFG, lora)
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    loaded = lora_lib.load_peft(out, CFG)
    assert loaded.targets == lora.targets and loaded.alpha == 5.5 and loaded.rank == 3
    assert loaded.dropout == 0.1
    for name in PROJECTIONS:
        for part in ("A", "B"):
            assert loaded.weights[name][part].dtype == jnp.float32
            np.testing.assert_array_equal(loaded.weights[name][part], lora.weights[name][part])


def test_save_peft_into_existing_dir_replaces_files_and_keeps_others(tmp_path):
    target = tmp_path / "adapter"
    first = lora_lib.init(CFG, jax.random.key(0), rank=2)
    second = _random_b(lora_lib.init(CFG, jax.random.key(1), rank=2), jax.random.key(2))
    lora_lib.save_peft(target, CFG, first)
    (target / "README.md").write_text("notes")
    lora_lib.save_peft(target, CFG, second)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]
    loaded = lora_lib.load_peft(target, CFG)
    np.testing.assert_array_equal(loaded.weights["v_proj"]["B"], second.weights["v_proj"]["B"])


def test_save_peft_refuses_a_file_path_and_mismatched_adapter(tmp_path):
    (tmp_path / "file").write_text("x")
    lora = lora_lib.init(CFG, jax.random.key(0), rank=2)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        lora_lib.save_peft(tmp_path / "file", CFG, lora)
    with pytest.raises(lora_lib.LoRAError, match="expected"):
        lora_lib.save_peft(tmp_path / "x", CFG.replace(num_layers=3, layer_windows=(0,) * 3), lora)
    assert not (tmp_path / "x").exists()


def test_load_peft_accepts_default_adapter_keys_and_module_path_targets(tmp_path):
    lora = _random_b(lora_lib.init(CFG, jax.random.key(0), rank=2, targets=("q_proj", "up_proj")),
                     jax.random.key(1))
    src = lora_lib.save_peft(tmp_path / "src", CFG, lora)
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = ["mlp.up_proj", "self_attn.q_proj"]
    tensors = safetensors.numpy.load_file(str(src / "adapter_model.safetensors"))
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    loaded = lora_lib.load_peft(_write_adapter(tmp_path / "variant", config, renamed), CFG)
    assert loaded.targets == ("q_proj", "up_proj")
    np.testing.assert_array_equal(loaded.weights["up_proj"]["B"], lora.weights["up_proj"]["B"])


def test_load_peft_reads_all_linear_target_modules(tmp_path):
    lora = lora_lib.init(CFG, jax.random.key(0), rank=2, targets=PROJECTIONS)
    src = lora_lib.save_peft(tmp_path / "src", CFG, lora)
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = "all-linear"
    (src / "adapter_config.json").write_text(json.dumps(config))
    assert lora_lib.load_peft(src, CFG).targets == PROJECTIONS


def _saved(tmp_path: Path) -> tuple[dict, dict]:
    lora = lora_lib.init(CFG, jax.random.key(0), rank=2, targets=("q_proj", "v_proj"))
    src = lora_lib.save_peft(tmp_path / "src", CFG, lora)
    config = json.loads((src / "adapter_config.json").read_text())
    return config, safetensors.numpy.load_file(str(src / "adapter_model.safetensors"))


_Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, t: c.update(use_rslora=True), "use_rslora=true"),
        (lambda c, t: c.update(use_dora=True), "use_dora=true"),
        (lambda c, t: c.update(bias="lora_only"), "bias='lora_only'"),
        (lambda c, t: c.update(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (lambda c, t: c.update(alpha_pattern={"q_proj": 8}), "alpha_pattern"),
        (lambda c, t: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda c, t: c.update(peft_type="IA3"), "peft_type is 'IA3'"),
        (lambda c, t: c.update(target_modules=".*proj"), "is a regex"),
        (lambda c, t: c.update(target_modules=["q_proj", "lm_head"]), "'lm_head'"),
        (lambda c, t: c.update(target_modules=["q_proj"]), "not in target_modules"),
        (lambda c, t: c.update(layers_to_transform=[0]), "layers_to_transform"),
        (lambda c, t: c.update(r=3), r"expected \(3, 64\)"),
        (lambda c, t: c.pop("lora_alpha"), "no 'lora_alpha'"),
        (lambda c, t: c.update(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\)"),
        (lambda c, t: c.update(lora_dropout="0.05"), "lora_dropout must be a number"),
        (lambda c, t: t.pop(_Q0A), "missing tensor '" + _Q0A.replace(".", r"\.")),
        (lambda c, t: t.update({_Q0A: np.zeros((2, 32), np.float32)}), r"shape \(2, 32\)"),
        (lambda c, t: t.update({"base_model.model.lm_head.lora_A.weight": t[_Q0A]}),
         "cannot map tensor 'base_model.model.lm_head"),
        (lambda c, t: t.update({_Q0A.replace("layers.0", "layers.5"): t[_Q0A]}),
         "layer 5 but the model has 2 layers"),
        (lambda c, t: t.update({_Q0A.replace("self_attn", "mlp"): t[_Q0A]}), "cannot map tensor"),
    ],
)
def test_load_peft_rejects_what_it_cannot_map_with_a_clear_error(tmp_path, change, message):
    config, tensors = _saved(tmp_path)
    change(config, tensors)
    with pytest.raises(lora_lib.LoRAError, match=message):
        lora_lib.load_peft(_write_adapter(tmp_path / "bad", config, tensors), CFG)


def test_load_peft_rejects_an_adapter_for_a_different_model(tmp_path):
    lora_lib.save_peft(tmp_path / "a", CFG, lora_lib.init(CFG, jax.random.key(0), rank=2))
    wider = CFG.replace(hidden_size=128, head_dim=32)
    with pytest.raises(lora_lib.LoRAError, match=r"has shape \(2, 64\), expected \(2, 128\)"):
        lora_lib.load_peft(tmp_path / "a", wider)


def test_load_peft_missing_folder_and_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora_lib.load_peft(tmp_path / "nope", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lora_lib.load_peft(tmp_path / "empty", CFG)
    config, _ = _saved(tmp_path)
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "empty" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors.*adapter_model.bin"):
        lora_lib.load_peft(tmp_path / "empty", CFG)


# --- PEFT parity (golden fixtures) -----------------------------------------------------------


def _fixture_cfg() -> ModelConfig:
    from hfjax.models.config import from_hf_dict

    return from_hf_dict(json.loads((FIXTURES / "base" / "config.json").read_text()))


def _load_base(folder: Path):
    from hfjax.models.hf_io import load_hf

    return load_hf(folder)


def _check_peft_adapter_parity(folder: Path) -> dict[str, float]:
    """hfjax on folder/base + folder/peft_adapter vs PEFT's logits in folder/peft_logits.npz."""
    cfg, params = _load_base(folder / "base")
    golden = np.load(folder / "peft_logits.npz")
    ids, mask = golden["input_ids"], golden["attention_mask"]
    lora = lora_lib.load_peft(folder / "peft_adapter", cfg)
    assert lora.targets == PROJECTIONS and lora.rank == 4 and lora.scale == 2.0
    errors = {
        "base": _valid_max_abs(forward(cfg, params, ids, mask), golden["base_logits"], mask),
        "lora": _valid_max_abs(forward(cfg, params, ids, mask, lora=lora), golden["logits"], mask),
        "merged": _valid_max_abs(
            forward(cfg, lora_lib.merge(cfg, params, lora), ids, mask), golden["logits"], mask
        ),
    }
    assert _valid_max_abs(golden["logits"], golden["base_logits"], mask) > 1.0  # adapter matters
    for what, err in errors.items():
        assert err <= PARITY_TOL, f"{what}: max |Δ| {err:.2e} vs PEFT > {PARITY_TOL}"
    return errors


def _check_hfjax_adapter_parity(folder: Path, adapter: Path) -> float:
    """PEFT's logits with an hfjax-written adapter (folder/hfjax_adapter_logits.npz) vs hfjax."""
    cfg, params = _load_base(folder / "base")
    golden = np.load(folder / "hfjax_adapter_logits.npz")
    ids, mask = golden["input_ids"], golden["attention_mask"]
    lora = lora_lib.load_peft(adapter, cfg)
    err = _valid_max_abs(forward(cfg, params, ids, mask, lora=lora), golden["logits"], mask)
    assert _valid_max_abs(forward(cfg, params, ids, mask), golden["logits"], mask) > 1.0
    assert err <= PARITY_TOL, f"max |Δ| {err:.2e} vs PEFT > {PARITY_TOL}"
    return err


def test_peft_made_adapter_in_hfjax_gives_peft_logits():
    _check_peft_adapter_parity(FIXTURES)


def test_committed_hfjax_adapter_is_what_save_peft_writes_today(tmp_path):
    script = _script()
    cfg = _fixture_cfg()
    out = lora_lib.save_peft(tmp_path / "today", cfg, script.make_hfjax_adapter(cfg))
    committed = FIXTURES / "hfjax_adapter"
    name = lora_lib.ADAPTER_CONFIG
    assert (out / name).read_bytes() == (committed / name).read_bytes(), name
    # Values equal to float32 rounding: XLA's optimization level may move the last ulp of the
    # uniform draws (a different seed would differ by ~0.1).
    today = safetensors.numpy.load_file(str(out / lora_lib.ADAPTER_WEIGHTS))
    stored = safetensors.numpy.load_file(str(committed / lora_lib.ADAPTER_WEIGHTS))
    assert sorted(today) == sorted(stored)
    for key in stored:
        np.testing.assert_allclose(today[key], stored[key], rtol=1e-6, atol=1e-8, err_msg=key)
    assert np.any(np.asarray(script.make_hfjax_adapter(cfg).weights["q_proj"]["B"]))


def test_peft_logits_with_hfjax_written_adapter_match_hfjax():
    _check_hfjax_adapter_parity(FIXTURES, FIXTURES / "hfjax_adapter")


def test_live_peft_parity_both_directions(tmp_path):
    what = "live PEFT comparison"
    run_fixture_script(SCRIPT, tmp_path, what)
    errors = _check_peft_adapter_parity(tmp_path)
    adapter = tmp_path / "hfjax_adapter"
    run_script(sys.executable, SCRIPT, "--out", str(tmp_path), "--write-hfjax-adapter",
               str(adapter))
    run_fixture_script(SCRIPT, tmp_path, what, "--hfjax-adapter", str(adapter))
    errors["hfjax_adapter"] = _check_hfjax_adapter_parity(tmp_path, adapter)
    print("live PEFT parity, max |Δ| logits:", errors)
