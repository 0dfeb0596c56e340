"""Defenses that wrap the optimizer (`hfjax.defenses.compose.around_optimizer`), through hfjax's
builder with clipping, weight decay, warm-up + cosine and accumulation: SaLoRA's B' equals B C of
a B trained directly by optax's AdamW; T-Vaccine's step equals a float64 mirror of torch's AdamW
whose unsampled parameters have no gradient, and leaves those entries bitwise unchanged."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from defense_fixtures import BASE, CFG, LORA, LOSS_FN, compile_fast, fast_jit, named_batches

from hfjax import sharding
from hfjax.defenses.alignment.t_vaccine import ATTENTION, TVaccineState, t_vaccine
from hfjax.defenses.compose import DefenseChoice
from hfjax.defenses.finetune.salora import project_lora, safety_basis
from hfjax.models import lora as lora_lib
from hfjax.train import builder, optim, step

RANK, STEPS = 8, 4  # SaLoRA's safety rank (below the smallest output size, 32); optimizer steps
SAMPLING_SEED = 2  # T-Vaccine samples layer 0, 0, 1, 0 (k = 1), 0, 1, 1, 0 (k = 2): one of two
ZERO_B = lora_lib.LoRA({n: {"A": w["A"], "B": jnp.zeros_like(w["B"])}
                        for n, w in LORA.weights.items()}, alpha=LORA.alpha)  # PEFT's init


def config(accumulation: int, max_grad_norm: float, eps: float = 1e-8) -> optim.OptimizerConfig:
    return optim.OptimizerConfig(learning_rate=1e-2, schedule="cosine", warmup_ratio=0.2,
                                 total_steps=STEPS, weight_decay=0.1, eps=eps,
                                 max_grad_norm=max_grad_norm, accumulation_steps=accumulation)


def built_run(trainable, c: optim.OptimizerConfig, choice: DefenseChoice, primary: str,
              seed: int = 0, mesh_shape: tuple = (1, 1, 1)):
    """hfjax's built step: (compiled step, state, frozen, mesh, batch names)."""
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    t = builder.build_training(CFG, trainable, mesh=mesh, optimizer=c, defenses=[choice],
                               primary=primary, seed=seed)
    frozen = jax.device_put(BASE, t.frozen_shardings)
    first = step.put_batches(micro_batches(0, t.batch_names), mesh)
    return compile_fast(t.step, t.state, frozen, first), t.state, frozen, mesh, t.batch_names


def micro_batches(i: int, names) -> dict:
    return {n: b for n, b in named_batches(i).items() if n in names}


def host(tree):
    return jax.tree.map(np.asarray, tree)


def max_abs_error(got, want) -> float:
    return max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


# --- SaLoRA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulation", [1, 2])
def test_salora_through_the_builder_trains_b_prime_equal_to_b_times_c_of_a_b_trained_by_adamw(
        accumulation):
    """SaLoRA's model: branch x A B C with C fixed from the aligned model's outputs on the first
    "align" batch, A and the raw B trained by clip → optax.adamw (weight decay, warm-up + cosine,
    MultiSteps). hfjax's adapter B' after every micro-step is that B C, A that A.

    Adam's ε is 1e-4: from B₀ = 0, A's first gradients have entries near ε = 1e-8, where
    m/(√v + ε) magnifies float32 rounding (with 1e-8 the two sides differ by up to 2e-6, as
    much as two float32 formulations of the reference, B C by `project_out` or by the matrix C,
    differ from each other)."""
    c = config(accumulation, max_grad_norm=0.05, eps=1e-4)
    fn, st, frozen, mesh, names = built_run(ZERO_B, c, DefenseChoice.named(
        "salora", safety_rank=RANK), "user")
    align = named_batches(0)["align"]
    outputs = LOSS_FN(ZERO_B, align, capture=("proj_outputs",))[1]["captured"]["proj_outputs"]
    bases = {n: safety_basis(outputs[n], align["attention_mask"], RANK) for n in ZERO_B.weights}
    adamw = optax.chain(optax.clip_by_global_norm(c.max_grad_norm),
                        optax.adamw(optim.make_schedule(c), eps=c.eps,
                                    weight_decay=c.weight_decay))
    ref_opt = optax.MultiSteps(adamw, accumulation) if accumulation > 1 else adamw

    @fast_jit
    def ref_step(raw, state, batch):
        g = jax.grad(lambda r: LOSS_FN(project_lora(r, bases), batch)[0])(raw)
        u, state = ref_opt.update(g, state, raw)
        return optax.apply_updates(raw, u), state

    raw, ref_state, errors, norms = ZERO_B, ref_opt.init(ZERO_B), [], []
    for i in range(STEPS * accumulation):
        batches = micro_batches(i, names)
        st, metrics = fn(st, frozen, step.put_batches(batches, mesh))
        raw, ref_state = ref_step(raw, ref_state, batches["user"])
        errors.append(max_abs_error(st.trainable, host(project_lora(raw, bases))))
        norms.append(float(metrics["grad_norm"]))
    assert max(errors) < 5e-7, errors  # weights ~0.1
    assert min(norms) > c.max_grad_norm  # the clip acts on every step
    b = np.asarray(st.trainable.weights["q_proj"]["B"])
    assert np.abs(b).max() > 1e-3
    np.testing.assert_allclose(np.einsum("lkd,ldr->lkr", b, np.asarray(bases["q_proj"])), 0,
                               atol=1e-7)  # B' C = B': no component in the safety subspace


# --- T-Vaccine --------------------------------------------------------------------------------


def hf_cosine_lr(c: optim.OptimizerConfig, t: int) -> float:
    """transformers' get_cosine_schedule_with_warmup at optimizer step t (LambdaLR), warm-up
    steps ⌈total · ratio⌉ as TrainingArguments.get_warmup_steps."""
    warmup = math.ceil(c.total_steps * c.warmup_ratio)
    if t < warmup:
        return c.learning_rate * t / max(1, warmup)
    progress = (t - warmup) / max(1, c.total_steps - warmup)
    return c.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class TorchAdamW:
    """float64 mirror of `clip_grad_norm_` + `torch.optim.AdamW` (amsgrad off) stepped by
    LambdaLR, with one parameter per (module, A/B, layer) as in PEFT: a parameter whose grad is
    None is skipped (no decay, no moments, no step)."""

    def __init__(self, theta, c: optim.OptimizerConfig):
        self.c, self.t = c, 0
        self.p = {k: np.asarray(v, np.float64) for k, v in self.split(theta).items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.steps = dict.fromkeys(self.p, 0)

    @staticmethod
    def split(lora) -> dict:
        return {(n, k, layer): np.asarray(w[layer]) for n, ab in lora.weights.items()
                for k, w in ab.items() for layer in range(w.shape[0])}

    def step(self, grads: dict) -> None:
        """grads: {parameter: float64 array, or None}."""
        c = self.c
        present = {k: g for k, g in grads.items() if g is not None}
        total = math.sqrt(sum(float(np.sum(g * g)) for g in present.values()))
        coef = min(1.0, c.max_grad_norm / (total + 1e-6))
        lr = hf_cosine_lr(c, self.t)
        for k, g in present.items():
            g = g * coef
            self.steps[k] += 1
            self.p[k] *= 1 - lr * c.weight_decay
            self.m[k] = c.b1 * self.m[k] + (1 - c.b1) * g
            self.v[k] = c.b2 * self.v[k] + (1 - c.b2) * g * g
            bc1, bc2 = 1 - c.b1 ** self.steps[k], 1 - c.b2 ** self.steps[k]
            denom = np.sqrt(self.v[k]) / math.sqrt(bc2) + c.eps
            self.p[k] -= lr / bc1 * self.m[k] / denom
        self.t += 1


def official_grad_layers(name: str, active: np.ndarray) -> np.ndarray:
    """[L] bool: which layers' LoRA of `name` get a gradient in the official trainer with the
    sampled layers `active` (attention: the sampled ones; MLP: from the first sampled one on,
    the layers below run checkpointed without gradients; 2 layers, so no i − 1 neighbours)."""
    if name in ATTENTION:
        return active
    return np.cumsum(active) > 0


def adam_states(opt_state) -> list:
    """The per-leaf Adam states of the layerwise AdamW, in the LoRA's leaf order."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    return [s for s in found if isinstance(s, optax.ScaleByAdamState)]


def t_vaccine_state(opt_state) -> TVaccineState:
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TVaccineState))
    (state,) = [s for s in found if isinstance(s, TVaccineState)]
    return state


@pytest.mark.parametrize("accumulation", [1, 2])
def test_t_vaccine_through_the_builder_equals_torch_adamw_skipping_parameters_without_grad(
        accumulation):
    """One layer of two sampled each optimizer step. The reference is fed the defended gradient
    (recomputed at hfjax's θ_t by the transform alone, averaged over the micro-steps) for the
    parameters the official trainer gives a gradient and None for the others; weights, per-
    parameter step counts and Adam moments agree, and unsampled entries keep their weights,
    moments and counts bit for bit."""
    c = config(accumulation, max_grad_norm=0.5)
    hp = dict(rho=3.0, layers=1, sample_every=accumulation, estimate_every=3 * accumulation)
    fn, st, frozen, mesh, names = built_run(LORA, c, DefenseChoice.named("t_vaccine", **hp),
                                            "align", seed=SAMPLING_SEED)
    tx = t_vaccine(**hp)
    defended = fast_jit(lambda s, theta, b, r: tx.update(theta, s, theta, loss_fn=LOSS_FN,
                                                         batches=b, rng=r))
    paths = [tuple(k.key for k in path if hasattr(k, "key"))
             for path, _ in jax.tree_util.tree_flatten_with_path(LORA)[0]]
    ref, tv_state, key = TorchAdamW(LORA, c), tx.init(LORA), jax.random.PRNGKey(SAMPLING_SEED)
    errors, sampled = [], []
    for _ in range(STEPS):
        before, adam_before, window = host(st.trainable), host(adam_states(st.opt_state)), []
        for _ in range(accumulation):
            key, r = jax.random.split(key)
            batches = micro_batches(ref.t * accumulation + len(window), names)
            g, tv_state = defended(tv_state, host(st.trainable), batches, r)
            window.append(TorchAdamW.split(g))
            st, _ = fn(st, frozen, step.put_batches(batches, mesh))
            np.testing.assert_array_equal(t_vaccine_state(st.opt_state).active, tv_state.active)
        active = np.asarray(tv_state.active)
        sampled.append(int(np.argmax(active)))
        mean = {k: np.mean([np.asarray(w[k], np.float64) for w in window], axis=0)
                for k in window[0]}
        ref.step({(n, k, layer): g if official_grad_layers(n, active)[layer] else None
                  for (n, k, layer), g in mean.items()})

        after, adam = host(st.trainable), host(adam_states(st.opt_state))
        errors.append(max(float(np.abs(after.weights[n][k][layer] - ref.p[(n, k, layer)]).max())
                          for (n, k, layer) in ref.p))
        for (n, k), state, old in zip(paths, adam, adam_before, strict=True):
            for layer in range(CFG.num_layers):
                p = (n, k, layer)
                assert int(state.count[layer]) == ref.steps[p], p
                if official_grad_layers(n, active)[layer]:
                    for got, want in ((state.mu, ref.m[p]), (state.nu, ref.v[p])):
                        np.testing.assert_allclose(got[layer], want, rtol=1e-5,
                                                   atol=1e-6 * np.abs(want).max())
                    continue
                np.testing.assert_array_equal(after.weights[n][k][layer],
                                              before.weights[n][k][layer])
                for new_leaf, old_leaf in ((state.mu, old.mu), (state.nu, old.nu),
                                           (state.count, old.count)):
                    np.testing.assert_array_equal(new_leaf[layer], old_leaf[layer])
    assert max(errors) < 1e-6, errors
    assert len(set(sampled)) == 2, sampled  # each layer is trained on some steps, skipped on others
    counts = {ref.steps[("q_proj", "A", layer)] for layer in range(CFG.num_layers)}
    assert counts != {STEPS} and 0 not in counts  # per-parameter counts differ from the global one


def test_t_vaccine_with_its_layerwise_adamw_trains_the_same_on_8_devices_as_on_1():
    """The per-layer Adam state is placed on a (data 2, fsdp 4) mesh and gives the same sampled
    layers, weights and per-parameter counts (ε 1e-4 keeps Adam from magnifying the rounding of
    the sharded reductions, see tests/test_defenses_sharding.py)."""
    c = config(1, max_grad_norm=0.5, eps=1e-4)
    choice = DefenseChoice.named("t_vaccine", layers=1, sample_every=1)
    runs = []
    for shape in ((1, 1, 1), (2, 4, 1)):
        fn, st, frozen, mesh, names = built_run(LORA, c, choice, "align", SAMPLING_SEED, shape)
        for i in range(3):
            st, _ = fn(st, frozen, step.put_batches(micro_batches(i, names), mesh))
        runs.append(host(st))
    single, sharded = runs
    np.testing.assert_array_equal(t_vaccine_state(sharded.opt_state).active,
                                  t_vaccine_state(single.opt_state).active)
    for a, b in zip(adam_states(sharded.opt_state), adam_states(single.opt_state), strict=True):
        np.testing.assert_array_equal(a.count, b.count)
    assert max_abs_error(sharded.trainable, single.trainable) < 1e-6
    assert max_abs_error(single.trainable, LORA) > 1e-3


def test_a_plain_chain_before_adamw_moves_the_unsampled_entries_the_wrapped_one_does_not():
    """`optax.chain(t_vaccine, adamw)` (zero gradients only) against
    `t_vaccine.wrap_optimizer(layerwise_adamw)` over two steps on different sampled layers: the
    first moves the entries of the layer trained before and skipped now (momentum, decay)."""
    hp = dict(layers=1, sample_every=1)
    batches = named_batches(0)
    moved = {}
    for kind in ("chain", "wrapped"):
        tx = t_vaccine(**hp)
        opt = optax.chain(tx, optax.adamw(1e-2, weight_decay=0.1)) if kind == "chain" else \
            tx.wrap_optimizer(optim.layerwise_adamw(1e-2, weight_decay=0.1))
        update = fast_jit(lambda s, theta, r, opt=opt: opt.update(
            theta, s, theta, loss_fn=LOSS_FN, batches=batches, rng=r))
        theta, state, layers, keys = LORA, opt.init(LORA), [], jax.random.split(
            jax.random.key(1), 16)
        for r in keys:  # until two steps train different layers
            u, new = update(state, theta, r)
            layer = int(np.argmax(t_vaccine_state(new).active))
            if not layers or layer != layers[-1]:
                previous, theta, state = theta, optax.apply_updates(theta, u), new
                layers.append(layer)
            if len(layers) == 2:
                break
        assert len(layers) == 2
        skipped = layers[0]
        moved[kind] = float(np.abs(np.asarray(theta.weights["q_proj"]["A"][skipped])
                                   - np.asarray(previous.weights["q_proj"]["A"][skipped])).max())
    assert moved["chain"] > 1e-4
    assert moved["wrapped"] == 0.0
