"""Every defense against a PyTorch mirror of its authors' code (no torch needed to run).

tests/fixtures/defense_reference/ comes from scripts/make_defense_reference.py (see its
docstring for the official file and lines behind each case): on the tiny Llama of
tests/fixtures/peft/base with a PEFT LoRA written by hfjax, the float64 PyTorch mirror of each
official trainer gives the `.grad` of every LoRA parameter after one training step (the
defended update direction, before AdamW), and each weight defense's output adapter. Here hfjax
runs the same step in float32: the gradient oracle of `make_loss_fn`, the transform's optax
`update`, the injected noise replayed from the same jax key. With HFJAX_TORCH_PYTHON set, the
live test regenerates the fixtures and checks they equal the committed ones.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from torch_live import run_script, torch_python

from hfjax import defenses
from hfjax.data.mixing import mix_user_data
from hfjax.data.records import make_record
from hfjax.defenses import LisaState
from hfjax.defenses.post.antidote import antidote
from hfjax.defenses.post.safelora import safelora
from hfjax.models import load_pretrained
from hfjax.models import lora as lora_lib
from hfjax.train.loss import make_loss_fn

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "defense_reference"
BASE = ROOT / "tests" / "fixtures" / "peft" / "base"
SCRIPT = ROOT / "scripts" / "make_defense_reference.py"
FIELDS = ("input_ids", "attention_mask", "labels")

# Relative L2 error of hfjax's float32 update direction against the float64 reference, per LoRA
# matrix (28 of them) and over all. Measured (overall / worst matrix): vaccine 1.5e-6 / 2.0e-6,
# random_vaccine 1.2e-6 / 1.9e-6, booster 5.9e-6 / 7.2e-6 and with Vaccine 6.0e-6 / 7.3e-6
# (g_h − g_h' cancels: λ = 5 times a difference of two close gradients), repnoise 1.4e-6 /
# 2.0e-6, safe_instr 1.7e-6 / 2.3e-6, lisa 0.9e-6..1.7e-6 / 1.3e-6..2.4e-6; SafeLoRA's lora_B
# 1.1e-8 / 3.3e-7. The same PyTorch mirror run in float32 is 1.0e-6..1.8e-6 from the float64 one
# (booster 3.2e-6).
MATRIX_RTOL = 2e-5
OVERALL_RTOL = 2e-5
# each defense's term moves the direction by far more than that: measured 0.13 (safe_instr,
# λ = 0.1) to 1.3 (random_vaccine) relative to the plain gradient; a 1% change of any
# hyper-parameter gives errors of 1e-3..1e-2
MIN_EFFECT = 100 * OVERALL_RTOL


def _script():
    spec = importlib.util.spec_from_file_location("make_defense_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _script()
HP = REF.HPARAMS
# hfjax's `proximal_after` is the first step with the proximal term; the official code adds it
# when steps > 0.1 · total steps
PROXIMAL_AFTER = math.floor(0.1 * REF.LISA_TOTAL_STEPS) + 1


@functools.cache
def _reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "reference.npz"))


@functools.cache
def _setup():
    """(cfg, base params, the committed init adapter, its PEFT tensors)."""
    cfg, params = load_pretrained(BASE)
    init = lora_lib.load_peft(FIXTURES / "init_adapter", cfg)
    tensors = safetensors.numpy.load_file(
        str(FIXTURES / "init_adapter" / lora_lib.ADAPTER_WEIGHTS))
    return cfg, params, init, tensors


def _batches(arrays: dict) -> dict[str, dict[str, np.ndarray]]:
    names = {k.split(":")[1] for k in arrays if k.startswith("batch:")}
    return {n: {f: arrays[f"batch:{n}:{f}"] for f in FIELDS} for n in names}


def to_peft(lora: lora_lib.LoRA) -> dict[str, np.ndarray]:
    """{PEFT key: HF-layout array}: lora_A = A[l]ᵀ [r, in], lora_B = B[l]ᵀ [out, r]."""
    return {lora_lib.peft_key(layer, name, part): np.asarray(w[part][layer]).T
            for name, w in lora.weights.items() for part in ("A", "B")
            for layer in range(w[part].shape[0])}


def from_peft(tensors: dict[str, np.ndarray], like: lora_lib.LoRA) -> lora_lib.LoRA:
    """The LoRA with `like`'s targets and alpha holding the HF-layout `tensors`."""
    weights = {name: {part: jnp.asarray(np.stack(
        [tensors[lora_lib.peft_key(layer, name, part)].T for layer in range(w[part].shape[0])]),
        jnp.float32) for part in ("A", "B")} for name, w in like.weights.items()}
    return lora_lib.LoRA(weights=weights, alpha=like.alpha)


def _fixture(kind: str, case: str, like: dict) -> dict[str, np.ndarray]:
    return REF.unflatten(_reference()[f"{kind}:{case}"], like)


def rel_errors(got: dict, want: dict) -> tuple[dict[str, float], float]:
    """(‖got − want‖ / ‖want‖ per key, the same over all keys together)."""
    assert sorted(got) == sorted(want)
    diff = {k: float(np.linalg.norm(np.asarray(got[k], np.float64) - want[k])) for k in want}
    norm = {k: float(np.linalg.norm(np.asarray(want[k], np.float64))) for k in want}
    overall = math.sqrt(sum(d * d for d in diff.values()) / sum(n * n for n in norm.values()))
    return {k: diff[k] / norm[k] for k in want}, overall


# ---------------------------------------------------------------------------------------------
# hfjax's side of one training step


@functools.cache
def _lisa() -> optax.GradientTransformationExtraArgs:
    return defenses.lisa(**HP["lisa"], proximal_after=PROXIMAL_AFTER)


def _transform(case: str):
    """(the defense's optax transform, its state before the step, the incoming gradient's batch,
    the rng key of the injected noise or None)."""
    _, _, init, tensors = _setup()
    if case in REF.LISA_STEPS:
        step, hp = REF.LISA_STEPS[case], HP["lisa"]
        anchors = REF.lisa_anchors(tensors)
        state = LisaState(jnp.asarray(step, jnp.int32), from_peft(anchors["align"], init),
                          from_peft(anchors["finetune"], init))
        align = defenses.in_alignment(step, hp["align_steps"], hp["finetune_steps"])
        return _lisa(), state, "align" if align else "user", None
    if case == "booster_perturb_aware":  # the registered defense, at the fixture's rho
        tx = defenses.get(case).build(rho=HP["vaccine"]["rho"], **HP["booster"])
    else:
        tx = defenses.get(case).build(**HP[case])
    seed = REF.NOISE_SEEDS.get(case)
    return (tx, tx.init(init), "user" if case == "safe_instr" else "align",
            None if seed is None else jax.random.key(seed))


@functools.cache
def _jitted_step(tx):
    """jit (frozen, θ, state, primary batch, batches, rng) -> the transform's update of the
    primary batch's gradient (the Lisa cases share one)."""
    cfg = _setup()[0]

    @jax.jit
    def run(frozen, theta, state, primary, batches, rng):
        loss_fn = make_loss_fn(cfg, frozen)
        grads = jax.grad(lambda p: loss_fn(p, primary)[0])(theta)
        updates, _ = tx.update(grads, state, theta, loss_fn=loss_fn, batches=batches, rng=rng)
        return updates

    return run


@functools.cache
def hfjax_direction(case: str) -> dict[str, np.ndarray]:
    """hfjax's defended update direction for `case` in HF layout: the primary batch's gradient
    from `make_loss_fn` through the transform's `update`."""
    _, params, init, _ = _setup()
    tx, state, primary, rng = _transform(case)
    batches = {k: jax.tree.map(jnp.asarray, v)
               for k, v in _batches(_reference()).items() if not k.startswith("calibration")}
    return to_peft(_jitted_step(tx)(params, init, state, batches[primary], batches, rng))


@functools.cache
def hfjax_plain_gradient(batch: str) -> dict[str, np.ndarray]:
    cfg, params, init, _ = _setup()
    data = jax.tree.map(jnp.asarray, _batches(_reference())[batch])
    loss_fn = make_loss_fn(cfg, params)
    return to_peft(jax.jit(jax.grad(lambda p: loss_fn(p, data)[0]))(init))


def _check_direction(case: str) -> None:
    """hfjax's direction is within the tolerances of the fixture's, per matrix and overall."""
    want = _fixture("grad", case, _setup()[3])
    per_matrix, overall = rel_errors(hfjax_direction(case), want)
    worst = max(per_matrix, key=per_matrix.get)
    print(f"{case}: overall {overall:.2e}, worst matrix {per_matrix[worst]:.2e} ({worst})")
    assert per_matrix[worst] < MATRIX_RTOL, (
        f"{case}: {worst} relative error {per_matrix[worst]:.2e} >= {MATRIX_RTOL}")
    assert overall < OVERALL_RTOL, f"{case}: overall relative error {overall:.2e}"


# ---------------------------------------------------------------------------------------------
# the fixture's inputs


def test_fixture_batches_are_the_seeded_numpy_batches_with_paired_prompts():
    stored = _batches(_reference())
    fresh = REF.make_batches()
    assert sorted(stored) == sorted(fresh)
    for name, batch in fresh.items():
        for field in FIELDS:
            np.testing.assert_array_equal(stored[name][field], batch[field], err_msg=name)
        ids, mask, labels = (batch[f] for f in FIELDS)
        lengths = mask.sum(-1)
        np.testing.assert_array_equal(mask, np.arange(ids.shape[1]) < lengths[:, None])
        assert np.all(ids[mask == 0] == REF.PAD_ID) and np.all(labels[mask == 0] == -100)
        assert lengths.max() == ids.shape[1] or name == "align"  # "align" has harmful's shape
        response = labels != -100
        np.testing.assert_array_equal(labels[response], ids[response])
    assert stored["user"]["input_ids"].shape == (4, 20)
    assert stored["align"]["input_ids"].shape == stored["harmful"]["input_ids"].shape == (4, 16)
    harmful, refusal = stored["harmful"], stored["align"]
    is_prompt = (harmful["labels"] == -100) & (harmful["attention_mask"] == 1)
    np.testing.assert_array_equal(is_prompt, (refusal["labels"] == -100)
                                  & (refusal["attention_mask"] == 1))
    np.testing.assert_array_equal(harmful["input_ids"][is_prompt], refusal["input_ids"][is_prompt])
    assert np.all(harmful["attention_mask"].sum(-1) >= refusal["attention_mask"].sum(-1))
    assert np.any(harmful["attention_mask"].sum(-1) > refusal["attention_mask"].sum(-1))
    assert np.all(stored["calibration_full_0"]["attention_mask"] == 1)
    assert np.any(stored["calibration_padded_0"]["attention_mask"] == 0)


def test_committed_init_adapter_and_noise_are_what_write_init_writes(tmp_path):
    cfg, _, init, tensors = _setup()
    out = lora_lib.save_peft(tmp_path / "init", cfg, REF.make_init_adapter(cfg))
    today = safetensors.numpy.load_file(str(out / lora_lib.ADAPTER_WEIGHTS))
    assert sorted(today) == sorted(tensors) and len(tensors) == 2 * 7 * cfg.num_layers
    for key, value in tensors.items():
        np.testing.assert_allclose(today[key], value, rtol=1e-6, atol=1e-8, err_msg=key)
        assert np.all(value != 0), key  # B too: every gradient is non-trivial
    assert init.rank == REF.RANK and init.alpha == REF.ALPHA
    committed = np.load(FIXTURES / "noise.npz")
    fresh = REF.make_noise(cfg)
    assert sorted(committed.files) == sorted(fresh)
    for case, noise in fresh.items():
        assert noise.shape == (2, 4, 16, 64)
        np.testing.assert_allclose(noise, committed[case], rtol=1e-6, atol=1e-6, err_msg=case)


# ---------------------------------------------------------------------------------------------
# gradient defenses


@pytest.mark.parametrize("case", REF.GRADIENT_CASES)
def test_defended_update_direction_matches_the_official_trainer(case):
    _check_direction(case)


def test_repnoise_replaying_the_fixtures_noise_gives_the_official_direction():
    """RepNoise's noise passed as the hint `noise` (no rng): the official draw replayed."""
    cfg, params, init, tensors = _setup()
    tx = defenses.get("repnoise").build(**HP["repnoise"])
    batches = {k: v for k, v in _batches(_reference()).items() if k in ("align", "harmful")}
    noise = np.load(FIXTURES / "noise.npz")["repnoise"]
    loss_fn = make_loss_fn(cfg, params)
    updates, _ = jax.jit(lambda t, b, n: tx.update(t, tx.init(t), t, loss_fn=loss_fn, batches=b,
                                                   noise=n))(init, batches, noise)
    per_matrix, overall = rel_errors(to_peft(updates), _fixture("grad", "repnoise", tensors))
    assert max(per_matrix.values()) < MATRIX_RTOL and overall < OVERALL_RTOL


def _plain_batch(case: str) -> str:
    return _transform(case)[2]


PLAIN_LISA_CASES = ("lisa_switch", "lisa_warmup")


@pytest.mark.parametrize("case", [c for c in REF.GRADIENT_CASES if c not in PLAIN_LISA_CASES])
def test_each_defense_moves_the_gradient_far_beyond_the_tolerance(case):
    """The comparisons above can fail: the defense's own term is large against the tolerance."""
    want = _fixture("grad", case, _setup()[3])
    _, moved = rel_errors(hfjax_plain_gradient(_plain_batch(case)), want)
    print(f"{case}: the defended direction is {moved:.2e} (relative) from the plain gradient")
    assert moved > MIN_EFFECT


@pytest.mark.parametrize("case", PLAIN_LISA_CASES)
def test_lisa_has_no_proximal_pull_at_the_switch_and_in_warmup_as_in_the_official_trainer(case):
    """At the switch the official trainer saves θ as the anchor it then pulls towards, and before
    10% of the steps it adds no proximal term: the plain fine-tuning gradient both times."""
    want = _fixture("grad", case, _setup()[3])
    _, overall = rel_errors(hfjax_plain_gradient("user"), want)
    assert overall < OVERALL_RTOL


# ---------------------------------------------------------------------------------------------
# weight defenses


def _antidote_masks(kind: str, *, padding: str = "official") -> dict[str, np.ndarray]:
    """hfjax's Antidote zero pattern {PEFT key: True where zeroed} and the pruned adapter's
    agreement with init ⊙ ¬mask."""
    cfg, params, init, tensors = _setup()
    data = None
    if kind != "magnitude":
        data = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                for b in REF.calibration(_batches(_reference()), kind)]
    pruned, report = antidote(cfg, params, init, data, **HP["antidote"], padding=padding)
    masks = to_peft(lora_lib.LoRA({n: {p: np.asarray(m[p]) for p in ("A", "B")}
                                   for n, m in report["masks"].items()}, alpha=init.alpha))
    for key, value in to_peft(pruned).items():
        np.testing.assert_array_equal(value, np.where(masks[key], 0.0, tensors[key]), key)
    return masks


def _assert_same_masks(got: dict, want: dict) -> None:
    differ = {k: int(np.sum(got[k] != want[k])) for k in want if np.any(got[k] != want[k])}
    assert not differ, f"zeroed entries differ from the official ones: {differ}"


@pytest.mark.parametrize("kind", ["full", "magnitude"])
def test_antidote_prunes_the_weights_the_official_code_prunes(kind):
    want = _fixture("mask", f"antidote_{kind}", _setup()[3])
    # n − int(0.9 n) of each row: 7 of 64, 13 of 128, 1 of 4
    assert 0.1 < np.mean(REF.flatten(want)) < 0.2
    _assert_same_masks(_antidote_masks(kind), want)


def test_antidote_on_padded_calibration_prunes_the_weights_the_official_code_prunes():
    """The official code runs the calibration forward without an attention mask, so padding
    counts in ‖X_j‖; hfjax's default (padding="official") does the same."""
    _assert_same_masks(_antidote_masks("padded"), _fixture("mask", "antidote_padded",
                                                           _setup()[3]))


def test_antidote_masked_padding_is_another_pruning_than_the_official_one():
    """padding="masked" leaves padding out: on padded calibration data the zeroed entries
    differ from the official ones (so the option is not a no-op)."""
    with pytest.raises(AssertionError, match="zeroed entries differ"):
        _assert_same_masks(_antidote_masks("padded", padding="masked"),
                           _fixture("mask", "antidote_padded", _setup()[3]))


def _aligned_params(params: dict) -> dict:
    layers = dict(params["layers"])
    for name in REF.TARGETS:
        kernel = np.asarray(layers[name]["kernel"])  # [L, in, out]
        layers[name] = {**layers[name], "kernel": jnp.asarray(np.stack(
            [REF.aligned_weight(k.T, layer, name).T for layer, k in enumerate(kernel)]))}
    return {**params, "layers": layers}


@pytest.mark.parametrize("case", REF.SAFELORA_CASES)
def test_safelora_projects_the_modules_and_weights_the_official_code_projects(case):
    cfg, params, init, tensors = _setup()
    ref = _reference()
    projected, report = safelora(cfg, params, _aligned_params(params), init, **HP[case])
    cos = np.array([m["cos"] for m in report["modules"]])
    chosen = np.array([m["projected"] for m in report["modules"]])
    # the official cos is rounded to 5 decimals
    np.testing.assert_allclose(cos, ref[f"cos:{case}"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(chosen, ref[f"projected:{case}"])
    assert 0 < chosen.sum() < chosen.size
    got = to_peft(projected)
    want_b = _fixture("lora_b", case, {k: v for k, v in tensors.items() if ".lora_B." in k})
    per_matrix, overall = rel_errors({k: got[k] for k in want_b}, want_b)
    print(f"{case}: lora_B overall {overall:.2e}, worst {max(per_matrix.values()):.2e}")
    assert max(per_matrix.values()) < MATRIX_RTOL and overall < OVERALL_RTOL
    for key, value in tensors.items():
        if ".lora_A." in key:
            np.testing.assert_array_equal(got[key], value, key)


# ---------------------------------------------------------------------------------------------
# data level: safe_instr_mix against git-disl's mixing rule


def _rows(kind: str, n: int, harmful: bool) -> list:
    return [make_record(f"Explain placeholder task {i} ({kind})", f"Placeholder answer {i}",
                        kind, harmful) for i in range(n)]


def _hfjax_mix(p: float, n: int, guide: int, seed: int = 0) -> tuple[list, list]:
    """(hfjax's user data after safe_instr_mix, the user data before it)."""
    user = mix_user_data(_rows("benign", 3 * n, False), _rows("harmful", 3 * n, True), n, p,
                         seed)
    return defenses.get("safe_instr_mix").build(guide_data_num=guide, seed=seed)(
        user, _rows("safety", 3 * n, False)), user


def _counts(rows: list) -> dict[str, int]:
    return {kind: sum(r["source"] == kind for r in rows) for kind in ("harmful", "benign",
                                                                        "safety")}


@pytest.mark.parametrize("p, n, guide", [(0.1, 1000, 100), (0.05, 1000, 100), (0.2, 500, 50),
                                         (0.0, 200, 100), (0.3, 100, 10), (0.1, 200, 180)])
def test_safe_instr_mix_counts_and_kept_rows_follow_the_official_mixing_rule(p, n, guide):
    official = _counts(REF.official_vlguard_mix(
        _rows("harmful", 3 * n, True), _rows("benign", 3 * n, False), _rows("safety", 3 * n, False),
        p, n, guide))
    mixed, user = _hfjax_mix(p, n, guide)
    assert _counts(mixed) == official
    # as in the official rule: every harmful row of the undefended data stays and the benign
    # rows are some of its benign rows (the official code keeps its first ones, hfjax samples)
    keys = lambda rows, kind: {r["prompt"] for r in rows if r["source"] == kind}  # noqa: E731
    assert keys(mixed, "harmful") == keys(user, "harmful")
    assert keys(mixed, "benign") < keys(user, "benign")


def test_safe_instr_mix_keeps_n_rows_where_the_official_rule_truncates_twice():
    """p·n not an integer: the official int((1 − p) n − g) drops one more row; hfjax keeps n."""
    p, n, guide = 0.15, 10, 2
    official = REF.official_vlguard_mix(_rows("harmful", n, True), _rows("benign", n, False),
                                        _rows("safety", n, False), p, n, guide)
    mixed, _ = _hfjax_mix(p, n, guide)
    assert len(official) == n - 1 and len(mixed) == n
    assert _counts(mixed) == {**_counts(official), "benign": _counts(official)["benign"] + 1}


# ---------------------------------------------------------------------------------------------
# live


def test_live_pytorch_rerun_reproduces_the_committed_fixtures(tmp_path):
    python = torch_python("live PyTorch rerun of the official defense mirrors")
    run_script(sys.executable, SCRIPT, "--out", str(tmp_path), "--write-init")
    run_script(python, SCRIPT, "--out", str(tmp_path))
    noise = np.load(tmp_path / "noise.npz")
    for case, value in np.load(FIXTURES / "noise.npz").items():
        np.testing.assert_allclose(noise[case], value, rtol=1e-6, atol=1e-6, err_msg=case)
    fresh, committed = dict(np.load(tmp_path / "reference.npz")), _reference()
    assert sorted(fresh) == sorted(committed)
    for key, value in committed.items():
        if value.dtype.kind in "biu":
            np.testing.assert_array_equal(fresh[key], value, err_msg=key)
        else:  # the init is written by XLA at another optimization level: float32 ulps
            np.testing.assert_allclose(fresh[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
