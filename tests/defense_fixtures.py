"""Shared tiny setup for the defense tests: a 2-layer width-64 Llama, LoRA, named batches, a
builder for hfjax's sharded train step with a registered defense, and a pass counter."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from jax.extend import core as jcore

from hfjax import sharding
from hfjax.defenses.api import Cost
from hfjax.defenses.compose import DefenseChoice
from hfjax.models import lora as lora_lib
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfig, from_hf_dict
from hfjax.train import builder, optim, step
from hfjax.train.loss import make_loss_fn

CFG = from_hf_dict(dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
BASE = params_lib.init_random(CFG, jax.random.key(0))
# Gemma 2's features in the same size: tied embeddings, both softcaps, a sliding window,
# sandwich norms, (1 + w) norm weights, scaled embeddings, GELU
GEMMA_LIKE = ModelConfig(
    model_type="gemma2", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, layer_windows=(8, 0), tie_word_embeddings=True,
    mlp_activation="gelu_tanh", norm_weight_offset=1.0, scale_embeddings=True,
    sandwich_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
)
_init = lora_lib.init(CFG, jax.random.key(1), rank=4, alpha=8,
                      targets=("q_proj", "v_proj", "o_proj", "down_proj"))
# PEFT initializes B to zero; random B makes every gradient (and every check) non-trivial.
LORA = lora_lib.LoRA(
    {name: {"A": w["A"], "B": 0.1 * jax.random.normal(jax.random.key(i), w["B"].shape)}
     for i, (name, w) in enumerate(_init.weights.items())}, alpha=_init.alpha)
LOSS_FN = make_loss_fn(CFG, BASE)
OPT_CFG = optim.OptimizerConfig(learning_rate=1e-2, total_steps=20, weight_decay=0.1)
# Test programs compile with XLA's CPU backend optimizations off: half the compile time of these
# tiny models (which dominates the tests), same numerics within the tolerances used.
FAST = {"xla_backend_optimization_level": 0}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


def make_batch(seed: int, batch: int = 8, length: int = 12) -> dict:
    """Random tokens, right padding on some rows, the first 3 (prompt) tokens masked."""
    r = np.random.default_rng(seed)
    ids = r.integers(0, CFG.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, length - 1 - seed % 3:] = 0
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def named_batches(seed: int) -> dict:
    """{"user", "align", "harmful"}: different contents and lengths per name."""
    return {"user": make_batch(100 + seed, length=12), "align": make_batch(200 + seed, length=10),
            "harmful": make_batch(300 + seed, length=14)}


def pad_to_one_length(batches: dict, names) -> dict:
    """The batches `names` right-padded to their longest length (token 0, mask 0, label −100),
    as the pipeline pads paired batches; the others as they are."""
    length = max((batches[n]["input_ids"].shape[1] for n in names), default=0)
    pad = lambda k, v: np.pad(v, ((0, 0), (0, length - v.shape[1])),  # noqa: E731
                              constant_values=-100 if k == "labels" else 0)
    return {n: {k: pad(k, v) for k, v in b.items()} if n in names else b
            for n, b in batches.items()}


def loss_at(theta, batch, eps=None):
    """f(θ; batch) with ε added to the attention outputs when given."""
    return LOSS_FN(theta, batch, **({} if eps is None else {"perturb": eps}))[0]


value_at = fast_jit(loss_at)
grad_at = fast_jit(jax.grad(loss_at))  # ∇θ, compiled once per batch shape / perturbation
SGD_LR = 0.1


def build_run(mesh_shape, name: str | None, opt_cfg: optim.OptimizerConfig | None = OPT_CFG,
              **hparams):
    """(mesh, step fn, state, frozen) of `hfjax.train.builder` with defense `name` chained
    before AdamW(opt_cfg), or before plain SGD(SGD_LR) if opt_cfg is None, and the step options
    the registry gives (name None: plain LoRA SFT on "user")."""
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    training = builder.build_training(
        CFG, LORA, mesh=mesh, optimizer=optax.sgd(SGD_LR) if opt_cfg is None else opt_cfg,
        defenses=[DefenseChoice.named(name, **hparams)] if name else [])
    return mesh, training.step, training.state, jax.device_put(BASE, training.frozen_shardings)


def compile_fast(fn: step.CompileCounter, st, frozen, batches):
    """hfjax's jitted step `fn`, lowered as is and compiled with FAST backend options."""
    return fn.fn.lower(st, frozen, batches).compile(FAST)


@functools.cache
def sgd_run(mesh_shape: tuple, name: str, steps: int, hparams: tuple = ()) -> dict:
    """`steps` SGD steps of hfjax's step with defense `name` on named_batches(0..steps-1):
    {"losses", "thetas": host copies of θ before each step and at the end, "state"}. Cached:
    tests that look at the same run share one compilation."""
    mesh, fn, st, frozen = build_run(mesh_shape, name, opt_cfg=None, **dict(hparams))
    batches = [step.put_batches(named_batches(i), mesh) for i in range(steps)]
    compiled = compile_fast(fn, st, frozen, batches[0])
    losses, thetas = [], []
    for b in batches:
        thetas.append(jax.tree.map(np.asarray, st.trainable))
        st, metrics = compiled(st, frozen, b)
        losses.append(float(metrics["loss"]))
    thetas.append(jax.tree.map(np.asarray, st.trainable))
    return {"losses": np.array(losses), "thetas": thetas, "state": st}


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, jcore.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jcore.Jaxpr):
                yield v


def primitives(jaxpr) -> set[str]:
    """Names of every primitive in a jaxpr and all its sub-jaxprs (jit, scan, cond bodies)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in _sub_jaxprs(eqn):
            names |= primitives(sub)
    return names


def count_passes(jaxpr, num_layers: int = CFG.num_layers) -> Cost:
    """Model passes in a jaxpr: forward = layer scans (length num_layers), backward = their
    transposes (reversed scans). Of `cond`/`switch` branches only one runs: the dearest counts."""
    fwd = bwd = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == num_layers:
            fwd, bwd = (fwd, bwd + 1) if eqn.params["reverse"] else (fwd + 1, bwd)
            continue
        subs = [count_passes(j, num_layers) for j in _sub_jaxprs(eqn)]
        if not subs:
            continue
        if eqn.primitive.name == "cond":
            worst = max(subs, key=lambda c: (c.forward + c.backward, c.forward))
            fwd, bwd = fwd + worst.forward, bwd + worst.backward
        else:
            fwd += sum(c.forward for c in subs)
            bwd += sum(c.backward for c in subs)
    return Cost(fwd, bwd)


def assert_8_devices_match_1(name: str, steps: int, hparams: tuple = ()) -> None:
    """The defense's SGD run on mesh data 2 x fsdp 4 gives the losses and weights of the run on
    one device (atol 1e-5), and the weights moved (> 1e-4), so the comparison is not vacuous."""
    single = sgd_run((1, 1, 1), name, steps, hparams)
    sharded = sgd_run((2, 4, 1), name, steps, hparams)
    assert np.all(np.isfinite(single["losses"]))
    np.testing.assert_allclose(sharded["losses"], single["losses"], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(sharded["thetas"][-1]), jax.tree.leaves(single["thetas"][-1]),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(single["thetas"][-1]), jax.tree.leaves(single["thetas"][0]), strict=True))
    assert moved > 1e-4
