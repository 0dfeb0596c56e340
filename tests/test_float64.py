"""float64 end to end: HF float64 logits, LoRA AdamW steps against an independent float64
reference, and no float narrower than float64 anywhere in the traced programs.

Float64 golden logits (tests/fixtures/parity_float64/, scripts/make_parity_float64_fixtures.py)
come from transformers run in float64 throughout on the parity fixture models. The reference
train step is `reference_decoder.loss` differentiated by `jax.grad` with a hand-written AdamW.
jax_enable_x64 is process-global: this module turns it on for its own tests only (the
autouse fixture restores it), and builds every float64 array inside them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_decoder as ref
from defense_fixtures import GEMMA_LIKE, primitives
from jax.extend import core as jcore
from torch_live import run_fixture_script

from hfjax import sharding
from hfjax.defenses.compose import DefenseChoice
from hfjax.defenses.post import antidote, safelora
from hfjax.defenses.post.antidote import _sum_squares
from hfjax.defenses.post.safelora import _module_projection
from hfjax.models import PROJECTIONS, forward, load_pretrained
from hfjax.models import lora as lora_lib
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfigError, from_hf_dict
from hfjax.train import builder, optim, step
from hfjax.train.loss import make_loss_fn

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "fixtures" / "parity"
FIXTURES = ROOT / "tests" / "fixtures" / "parity_float64"
SCRIPT = ROOT / "scripts" / "make_parity_float64_fixtures.py"
CASES = ("llama", "llama3", "smollm2", "mistral", "qwen2", "gemma2")
TOL = 1e-10
NARROW = {jnp.dtype(d) for d in ("float32", "bfloat16", "float16")}
OPT = optim.OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, total_steps=3)


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _llama():
    return from_hf_dict(dict(model_type="llama", vocab_size=128, hidden_size=64,
                             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2), dtype="float64")


@functools.cache
def _setup(family: str):
    """(cfg, params, LoRA on all seven projections with random B), all float64."""
    cfg = _llama() if family == "llama" else GEMMA_LIKE.replace(dtype="float64")
    params = params_lib.init_random(cfg, jax.random.key(0), dtype=jnp.float64, std=0.1)
    lora = lora_lib.init(cfg, jax.random.key(1), rank=4, alpha=8, targets=PROJECTIONS)
    keys = jax.random.split(jax.random.key(2), len(PROJECTIONS))
    lora = lora.replace(weights={
        n: {"A": w["A"], "B": 0.1 * jax.random.normal(k, w["B"].shape, jnp.float64)}
        for (n, w), k in zip(lora.weights.items(), keys, strict=True)})
    return cfg, params, lora


def _batch(seed: int, vocab: int = 128, b: int = 8, t: int = 12) -> dict:
    """Right padding on every other row, the first 3 labels masked."""
    r = np.random.default_rng(seed)
    ids = r.integers(0, vocab, (b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, t - 2 - seed % 3:] = 0
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _max_rel(a, b) -> float:
    """max |a − b| over the leaves, relative to max |b|."""
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))), a, b)
    return max(jax.tree.leaves(diffs))


# --- HF transformers in float64 -------------------------------------------------------------


def _hf_case(fixtures: Path, case: str):
    """(float64 logits of hfjax, of transformers, attention mask) for one parity case."""
    model = PARITY / case / "model"
    with np.load(fixtures / f"{case}.npz") as z:
        golden, sha = z["logits"], str(z["model_sha256"])
    if hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest() != sha:
        raise AssertionError(f"{fixtures / case}.npz was made from another {model}; regenerate "
                             f"it with `<torch python> {SCRIPT.relative_to(ROOT)}`")
    with np.load(PARITY / case / "golden.npz") as z:
        ids, mask = z["input_ids"], z["attention_mask"]
    cfg, params = load_pretrained(model, dtype=jnp.float64)
    assert cfg.dtype == "float64"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
    return np.asarray(forward(cfg, params, ids, mask)), golden, mask.astype(bool)


@pytest.mark.parametrize("case", CASES)
def test_float64_logits_equal_transformers_in_float64_to_1e_10(case):
    logits, golden, keep = _hf_case(FIXTURES, case)
    assert logits.dtype == np.float64
    diff = float(np.abs(logits[keep] - golden[keep]).max())
    assert diff <= TOL, f"{case}: max |Δ| {diff:.2e} > {TOL}"


def test_float64_fixtures_checked_every_torch_tensor_was_float64():
    meta = json.loads((FIXTURES / "meta.json").read_text())
    assert sorted(meta["float64_tensors_checked"]) == sorted(CASES)
    assert all(n > 100 for n in meta["float64_tensors_checked"].values())


@pytest.fixture(scope="module")
def live_fixtures(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity_float64_live")
    return run_fixture_script(SCRIPT, out, "live float64 transformers comparison")


@pytest.mark.parametrize("case", CASES)
def test_float64_logits_equal_the_installed_transformers_live(case, live_fixtures):
    logits, golden, keep = _hf_case(live_fixtures, case)
    assert float(np.abs(logits[keep] - golden[keep]).max()) <= TOL


def test_float64_gguf_loads_as_float64_with_the_float32_values(tmp_path):
    from test_gguf import _tiny_cfg, _write_gguf

    cfg = _tiny_cfg("llama")
    path = _write_gguf(tmp_path / "m.gguf", cfg, params_lib.init_random(cfg, jax.random.key(0)))
    cfg64, params64 = load_pretrained(path, dtype=jnp.float64)
    cfg32, params32 = load_pretrained(path)
    assert cfg64 == cfg32.replace(dtype="float64")
    assert {x.dtype for x in jax.tree.leaves(params64)} == {jnp.dtype(jnp.float64)}
    jax.tree.map(np.testing.assert_array_equal, params64, params32)


def test_float64_model_without_64_bit_jax_is_a_clear_error():
    with jax.enable_x64(False), pytest.raises(ModelConfigError, match="jax_enable_x64"):
        load_pretrained(PARITY / "llama" / "model", dtype=jnp.float64)


# --- training against a plain float64 reference ---------------------------------------------


def _reference_adamw(cfg, params, lora, batches):
    """(losses, final A/B weights) of AdamW steps on `reference_decoder.loss`, by hand."""
    c = OPT
    grad = jax.jit(jax.value_and_grad(
        lambda w, b: ref.loss(cfg, params, lora.replace(weights=w), b)))
    theta = lora.weights
    m = v = jax.tree.map(jnp.zeros_like, theta)
    losses = []
    for t, batch in enumerate(batches, start=1):
        loss, g = grad(theta, batch)
        losses.append(float(loss))
        m = jax.tree.map(lambda m, g: c.b1 * m + (1 - c.b1) * g, m, g)
        v = jax.tree.map(lambda v, g: c.b2 * v + (1 - c.b2) * g * g, v, g)
        m_hat = jax.tree.map(lambda m, t=t: m / (1 - c.b1**t), m)
        v_hat = jax.tree.map(lambda v, t=t: v / (1 - c.b2**t), v)
        theta = jax.tree.map(
            lambda p, m, v: p - c.learning_rate * (m / (jnp.sqrt(v) + c.eps) + c.weight_decay * p),
            theta, m_hat, v_hat)
    return np.array(losses), theta


def _hfjax_steps(cfg, params, lora, batches, name=None, **hparams):
    """(losses, final LoRA weights, jitted step, state, frozen) of hfjax's sharded train step
    on 8 devices, with AdamW(OPT) and the gradient defense `name` if given."""
    mesh = sharding.make_mesh(2, 4, 1, devices=jax.devices()[:8])
    t = builder.build_training(cfg, lora, mesh=mesh, optimizer=OPT,
                               defenses=[DefenseChoice.named(name, **hparams)] if name else [])
    fn, st = t.step, t.state
    frozen = jax.device_put(params, t.frozen_shardings)
    put = [step.put_batches(b, mesh) for b in batches]
    losses = []
    for b in put:
        st, metrics = fn(st, frozen, b)
        losses.append(float(metrics["loss"]))
    return np.array(losses), st.trainable.weights, fn, st, frozen, put[0]


@pytest.mark.parametrize("family", ["llama", "gemma2-like"])
def test_float64_lora_gradient_equals_autodiff_of_a_plain_float64_reference(family):
    """The custom LoRA VJP and the fused head CE, in float64, against jax.grad of a plain
    forward: relative error <= 1e-10 (float32 anywhere would leave ~1e-7)."""
    cfg, params, lora = _setup("llama" if family == "llama" else "gemma")
    batch = _batch(0)
    (loss, _), g = jax.value_and_grad(make_loss_fn(cfg, params), has_aux=True)(lora, batch)
    ref_loss, ref_g = jax.value_and_grad(
        lambda w: ref.loss(cfg, params, lora.replace(weights=w), batch))(lora.weights)
    assert loss.dtype == jnp.float64
    assert abs(float(loss) - float(ref_loss)) <= TOL * abs(float(ref_loss))
    assert _max_rel(g.weights, ref_g) <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma2-like"])
def test_float64_lora_adamw_steps_equal_the_float64_reference(family):
    """Three sharded AdamW steps of hfjax's train step (LoRA on all seven projections) against
    the same steps on the plain reference: losses and weights agree to 1e-10."""
    cfg, params, lora = _setup("llama" if family == "llama" else "gemma")
    batches = [{"user": _batch(i)} for i in range(3)]
    losses, weights, *_ = _hfjax_steps(cfg, params, lora, batches)
    ref_losses, ref_weights = _reference_adamw(cfg, params, lora,
                                               [b["user"] for b in batches])
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=0)
    assert _max_rel(weights, ref_weights) <= TOL
    assert _max_rel(weights, lora.weights) > 1e-3  # the steps moved the weights


# --- no narrow float anywhere ---------------------------------------------------------------


def _narrow(jaxpr) -> set[tuple[str, str]]:
    """(primitive, dtype) of every equation, sub-jaxprs included, that makes a float narrower
    than float64."""
    found = set()
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            dtype = getattr(var.aval, "dtype", None)
            if dtype in NARROW:
                found.add((eqn.primitive.name, jnp.dtype(dtype).name))
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    found |= _narrow(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    found |= _narrow(sub)
    return found


@pytest.mark.parametrize("name, hparams", [
    (None, {}), ("vaccine", {}), ("booster", {}),
    ("lisa", {"align_steps": 1, "finetune_steps": 1}), ("safe_instr", {}),
])
def test_float64_train_step_with_each_gradient_defense_makes_no_float32(name, hparams):
    """Every value the jitted step computes (forward, custom VJPs, fused head, Vaccine's G and
    ε, Booster's shifted gradient, Lisa's proximal term, AdamW) is float64.
    (random_vaccine draws its noise in float32, `hfjax.gaussian`; it is cast where it is added.)
    """
    cfg, params, lora = _setup("llama")
    batches = {"user": _batch(0), "align": _batch(1, t=10), "harmful": _batch(2, t=14)}
    *_, fn, st, frozen, put = _hfjax_steps(cfg, params, lora, [batches], name, **hparams)
    jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, put).jaxpr
    assert "dot_general" in primitives(jaxpr)
    assert _narrow(jaxpr) == set()


@pytest.mark.parametrize("family", ["llama", "gemma2-like"])
@pytest.mark.parametrize("mode", ["custom_vjp", "forward_mode_ad", "full_finetune"])
def test_float64_loss_gradients_make_no_float32(family, mode):
    cfg, params, lora = _setup("llama" if family == "llama" else "gemma")
    batch = _batch(0)
    if mode == "full_finetune":
        fn, theta = make_loss_fn(cfg, None, full_finetune=True), params
    else:
        fn, theta = make_loss_fn(cfg, params, forward_mode_ad=mode == "forward_mode_ad"), lora
    eps = jnp.zeros((cfg.num_layers, *batch["input_ids"].shape, cfg.hidden_size))
    jaxpr = jax.make_jaxpr(jax.grad(lambda t, e: fn(t, batch, perturb=e)[0], argnums=(0, 1)))(
        theta, eps).jaxpr
    assert _narrow(jaxpr) == set()


def test_float64_post_defenses_and_merge_make_no_float32():
    """SafeLoRA's projection, Antidote's activation norms and `merge` in float64; both repairs
    return float64 adapters."""
    cfg, params, lora = _setup("llama")
    aligned = jax.tree.map(lambda x: x + 0.01 * jnp.sin(x), params)
    batch = _batch(3)
    layers, (name, w) = params["layers"], next(iter(lora.weights.items()))
    programs = {
        "safelora": jax.make_jaxpr(_module_projection)(
            layers[name]["kernel"], aligned["layers"][name]["kernel"], w["A"], w["B"]),
        "antidote": jax.make_jaxpr(_sum_squares, static_argnums=0)(
            cfg, params, lora, batch["input_ids"], batch["attention_mask"]),
        "merge": jax.make_jaxpr(lambda: lora_lib.merge(cfg, params, lora))(),
    }
    for what, closed in programs.items():
        assert _narrow(closed.jaxpr) == set(), what
    repaired = [safelora(cfg, params, aligned, lora)[0], antidote(cfg, params, lora, [batch])[0]]
    for adapter in (*repaired, lora_lib.merge(cfg, params, lora)):
        assert {x.dtype for x in jax.tree.leaves(adapter)} == {jnp.dtype(jnp.float64)}


def test_float64_lora_init_and_peft_load_keep_float64_with_the_float32_draws(tmp_path):
    cfg = _llama()
    lora64 = lora_lib.init(cfg, jax.random.key(4), rank=2, targets=("q_proj", "down_proj"))
    lora32 = lora_lib.init(cfg.replace(dtype="float32"), jax.random.key(4), rank=2,
                           targets=("q_proj", "down_proj"))
    assert {x.dtype for x in jax.tree.leaves(lora64)} == {jnp.dtype(jnp.float64)}
    jax.tree.map(np.testing.assert_array_equal, lora64.weights, lora32.weights)
    lora64 = lora64.replace(weights=jax.tree.map(lambda x: x + 1e-12, lora64.weights))
    lora_lib.save_peft(tmp_path / "adapter", cfg, lora64)
    back = lora_lib.load_peft(tmp_path / "adapter", cfg)
    jax.tree.map(np.testing.assert_array_equal, back.weights, lora64.weights)
