"""Post-fine-tuning defenses: SafeLoRA's projection and selection against numpy in HF's
[out, in] convention; Antidote's Wanda scores, per-row mask ratio and forward-only scoring."""

from __future__ import annotations

import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from defense_fixtures import count_passes

from hfjax.defenses import api
from hfjax.models import lora as lora_lib
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import forward

# the modules themselves: the packages re-export functions of the same names
ad = importlib.import_module("hfjax.defenses.post.antidote")
sl = importlib.import_module("hfjax.defenses.post.safelora")

CFG = ModelConfig(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, layer_windows=(0, 0),
)
TARGETS = ("q_proj", "v_proj", "down_proj")
RANK = 4
BASE = params_lib.init_random(CFG, jax.random.key(0), std=0.1)


def hf_setup(seed=0, v_rank=6):
    """Random HF-convention matrices per (module, layer) and their hfjax-layout counterparts.

    V = W_aligned − W_base has rank v_rank; lora_B mixes a part inside span(V) with a random
    part in random proportions, so the cosines spread over (0, 1).
    """
    r = np.random.default_rng(seed)
    dims = params_lib.projection_dims(CFG)
    hf = {}
    aligned_layers = dict(BASE["layers"])
    weights = {}
    for name in TARGETS:
        fin, fout = dims[name]
        vs, a_hf, b_hf = [], [], []
        for _ in range(CFG.num_layers):
            v = r.normal(size=(fout, v_rank)) @ r.normal(size=(v_rank, fin)) * 0.05
            u = np.linalg.svd(v)[0][:, :v_rank]
            w = r.uniform(0.0, 1.0)
            b = w * u @ r.normal(size=(v_rank, RANK)) + (1 - w) * r.normal(size=(fout, RANK))
            vs.append(v)
            a_hf.append(r.normal(size=(RANK, fin)) * 0.1)
            b_hf.append(b * 0.1)
        hf[name] = {"V": np.stack(vs), "A": np.stack(a_hf), "B": np.stack(b_hf)}
        kernel = BASE["layers"][name]["kernel"]
        aligned_layers[name] = {"kernel": kernel + jnp.asarray(np.swapaxes(hf[name]["V"], 1, 2),
                                                               jnp.float32)}
        weights[name] = {"A": jnp.asarray(np.swapaxes(hf[name]["A"], 1, 2), jnp.float32),
                         "B": jnp.asarray(np.swapaxes(hf[name]["B"], 1, 2), jnp.float32)}
    aligned = {**BASE, "layers": aligned_layers}
    return hf, aligned, lora_lib.LoRA(weights=weights, alpha=8.0)


def np_safelora(v, a, b):
    """(cos, C B) for one module in HF's convention: C = V Vᵀ / ‖V‖_F."""
    c = v @ v.T / np.linalg.norm(v)
    proj, orig = (c @ b @ a).ravel(), (b @ a).ravel()
    return proj @ orig / (np.linalg.norm(proj) * np.linalg.norm(orig)), c @ b


HF, ALIGNED, LORA = hf_setup()
WANT = {(layer, name): np_safelora(HF[name]["V"][layer], HF[name]["A"][layer],
                                   HF[name]["B"][layer])
        for name in TARGETS for layer in range(CFG.num_layers)}


def _cos_table(report):
    return {(m["layer"], m["module"]): m for m in report["modules"]}


# --------------------------------------------------------------------------------------------
# SafeLoRA


def test_safelora_cos_and_projection_match_numpy_in_hf_convention():
    new, report = sl.safelora(CFG, BASE, ALIGNED, LORA, mode="threshold", threshold=1.5)
    table = _cos_table(report)
    assert len(table) == len(WANT) == report["num_projected"]
    cos_values = []
    for (layer, name), (cos, cb) in WANT.items():
        assert table[(layer, name)]["cos"] == pytest.approx(cos, abs=2e-5)
        np.testing.assert_allclose(np.asarray(new.weights[name]["B"][layer]).T, cb, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_array_equal(new.weights[name]["A"], LORA.weights[name]["A"])
        cos_values.append(cos)
    assert min(cos_values) < 0.5 < max(cos_values)  # both sides of the default threshold


def test_safelora_projected_update_equals_c_times_the_lora_update():
    new, _ = sl.safelora(CFG, BASE, ALIGNED, LORA, mode="threshold", threshold=1.5)
    for name in TARGETS:
        for layer in range(CFG.num_layers):
            v = HF[name]["V"][layer]
            c = v @ v.T / np.linalg.norm(v)
            a, b = np.asarray(new.weights[name]["A"][layer]), np.asarray(
                new.weights[name]["B"][layer])
            delta_new = (a @ b).T                                       # B'A in [out, in]
            delta_old = HF[name]["B"][layer] @ HF[name]["A"][layer]
            np.testing.assert_allclose(delta_new, c @ delta_old, rtol=1e-4, atol=1e-6)


def test_safelora_threshold_mode_projects_exactly_the_modules_at_or_below_tau():
    cosines = sorted(cos for cos, _ in WANT.values())
    tau = (cosines[2] + cosines[3]) / 2
    new, report = sl.safelora(CFG, BASE, ALIGNED, LORA, mode="threshold", threshold=tau)
    table = _cos_table(report)
    assert report["num_projected"] == 3 and report["threshold"] == tau
    for (layer, name), (cos, cb) in WANT.items():
        assert table[(layer, name)]["projected"] == (cos <= tau)
        got = np.asarray(new.weights[name]["B"][layer])
        if cos <= tau:
            np.testing.assert_allclose(got.T, cb, rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, LORA.weights[name]["B"][layer])


@pytest.mark.parametrize("k", [1, 4, 100])
def test_safelora_count_mode_projects_the_k_lowest_cosines(k):
    order = sorted(WANT, key=lambda key: WANT[key][0])
    new, report = sl.safelora(CFG, BASE, ALIGNED, LORA, mode="count", num_proj_layers=k)
    chosen = {key for key, m in _cos_table(report).items() if m["projected"]}
    assert chosen == set(order[:k])
    assert report["num_projected"] == min(k, len(order))
    for layer, name in set(order) - chosen:
        np.testing.assert_array_equal(new.weights[name]["B"][layer],
                                      LORA.weights[name]["B"][layer])


def test_safelora_leaves_a_lora_inside_span_v_and_zeroes_one_orthogonal_to_it():
    r = np.random.default_rng(7)
    fin, fout = params_lib.projection_dims(CFG)["q_proj"]
    u = np.linalg.qr(r.normal(size=(fout, 8)))[0]                       # span(V), 8 of 64 dims
    w = np.linalg.qr(r.normal(size=(fin, 8)))[0]
    v = 0.3 * u @ w.T                                                   # equal singular values
    inside = u @ r.normal(size=(8, RANK))                               # B A ∈ span(V): C B = B‖·‖
    outside = (np.eye(fout) - u @ u.T) @ r.normal(size=(fout, RANK))    # C B = 0
    a = r.normal(size=(RANK, fin))
    kernel = BASE["layers"]["q_proj"]["kernel"]
    aligned = {**BASE, "layers": {**BASE["layers"], "q_proj": {
        "kernel": kernel + jnp.asarray(np.stack([v.T, v.T]), jnp.float32)}}}
    lora = lora_lib.LoRA(weights={"q_proj": {
        "A": jnp.asarray(np.stack([a.T, a.T]), jnp.float32),
        "B": jnp.asarray(np.stack([inside.T, outside.T]), jnp.float32)}}, alpha=4.0)
    new, report = sl.safelora(CFG, BASE, aligned, lora, mode="threshold")
    inside_row, outside_row = report["modules"]
    assert inside_row["cos"] == pytest.approx(1.0, abs=1e-5) and not inside_row["projected"]
    assert outside_row["cos"] == pytest.approx(0.0, abs=1e-5) and outside_row["projected"]
    np.testing.assert_array_equal(new.weights["q_proj"]["B"][0], lora.weights["q_proj"]["B"][0])
    np.testing.assert_allclose(new.weights["q_proj"]["B"][1], 0.0, atol=1e-6)


def test_safelora_never_projects_modules_the_alignment_left_unchanged():
    aligned = {**ALIGNED, "layers": {**ALIGNED["layers"], "v_proj": BASE["layers"]["v_proj"]}}
    new, report = sl.safelora(CFG, BASE, aligned, LORA, mode="count", num_proj_layers=100)
    for m in report["modules"]:
        assert np.isnan(m["cos"]) == (m["module"] == "v_proj")
        assert m["projected"] == (m["module"] != "v_proj")
    np.testing.assert_array_equal(new.weights["v_proj"]["B"], LORA.weights["v_proj"]["B"])


def test_safelora_is_registered_and_rejects_bad_inputs():
    spec = api.get("safelora")
    assert (spec.stage, spec.level, spec.cost) == ("post", "weights", None)
    # the official default: count ("number") mode, the 10 lowest-cos modules
    assert spec.hyperparameters == {"mode": "count", "threshold": 0.5, "num_proj_layers": 10}
    apply = spec.build(mode="count", num_proj_layers=2)
    new, report = apply(CFG, ALIGNED, LORA, base_params=BASE)
    direct, _ = sl.safelora(CFG, BASE, ALIGNED, LORA, mode="count", num_proj_layers=2)
    assert report["num_projected"] == 2
    assert json.loads(json.dumps(report))["modules"][0].keys() == {"layer", "module", "cos",
                                                                   "projected"}
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(api.DefenseError, match="mode"):
        spec.build(mode="number")
    with pytest.raises(api.DefenseError, match="num_proj_layers"):
        sl.safelora(CFG, BASE, ALIGNED, LORA, mode="count", num_proj_layers=0)
    missing = {**BASE, "layers": {k: v for k, v in BASE["layers"].items() if k != "down_proj"}}
    with pytest.raises(api.DefenseError, match="down_proj"):
        sl.safelora(CFG, missing, ALIGNED, LORA)


# --------------------------------------------------------------------------------------------
# Antidote


def calibration_batches(n=3, batch=3, length=10, seed=0, pad_id=0):
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = r.integers(1, CFG.vocab_size, (batch, length)).astype(np.int32)
        mask = np.ones_like(ids)
        for i in range(batch):
            mask[i, length - 1 - i * 2:] = 0
        ids = np.where(mask == 1, ids, pad_id).astype(np.int32)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": np.where(mask == 1, ids, -100).astype(np.int32)})
    return out


CALIB = calibration_batches()


@functools.cache
def np_wanda(padding: str = "official"):
    """Scores from captured inputs, in numpy: S_A = |A_h| ‖X_in‖, S_B = |B_h| ‖X_in A_h‖, over
    every position ("official": the reference's unmasked forward) or the real tokens only."""
    lora = LORA
    sq_in = {n: 0.0 for n in TARGETS}
    sq_mid = {n: 0.0 for n in TARGETS}
    capture = jax.jit(lambda ids, mask: forward(CFG, ALIGNED, ids, mask, lora=lora,
                                                capture=("proj_inputs",))[1])
    for b in CALIB:
        mask = b["attention_mask"] if padding == "masked" else np.ones_like(b["attention_mask"])
        cap = capture(b["input_ids"], mask)
        m = mask.astype(bool)
        for n in TARGETS:
            x = np.asarray(cap["proj_inputs"][n], np.float64)[:, m]          # [L, tokens, in]
            z = np.einsum("lti,lir->ltr", x, np.asarray(lora.weights[n]["A"], np.float64))
            sq_in[n] = sq_in[n] + (x * x).sum(1)
            sq_mid[n] = sq_mid[n] + (z * z).sum(1)
    return {n: {"A": np.abs(np.asarray(lora.weights[n]["A"])) * np.sqrt(sq_in[n])[:, :, None],
                "B": np.abs(np.asarray(lora.weights[n]["B"])) * np.sqrt(sq_mid[n])[:, :, None]}
            for n in TARGETS}


@pytest.mark.parametrize("padding", ["official", "masked"])
def test_wanda_scores_equal_an_independent_numpy_computation(padding):
    scores, tokens = ad.wanda_scores(CFG, ALIGNED, LORA, CALIB, padding)
    count = (lambda b: b["attention_mask"].sum()) if padding == "masked" else \
        (lambda b: b["attention_mask"].size)
    assert tokens == sum(int(count(b)) for b in CALIB)
    want = np_wanda(padding)
    for n in TARGETS:
        for p in ("A", "B"):
            np.testing.assert_allclose(scores[n][p], want[n][p], rtol=1e-4, atol=1e-7)


def test_masked_wanda_scores_ignore_padding_and_official_ones_read_it():
    other_pad = calibration_batches(pad_id=17)
    a, _ = ad.wanda_scores(CFG, ALIGNED, LORA, CALIB, "masked")
    b, _ = ad.wanda_scores(CFG, ALIGNED, LORA, other_pad, "masked")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    a, _ = ad.wanda_scores(CFG, ALIGNED, LORA, CALIB)
    b, _ = ad.wanda_scores(CFG, ALIGNED, LORA, other_pad)
    assert max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)) > 1e-3


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_antidote_zeroes_exactly_the_top_scoring_entries_of_every_row(ratio):
    new, report = ad.antidote(CFG, ALIGNED, LORA, CALIB, dense_ratio=ratio)
    want = np_wanda()
    for n in TARGETS:
        for p in ("A", "B"):
            s = want[n][p]                                   # [L, row length, rows]
            length = s.shape[1]
            k = length - int(length * (1 - ratio))           # pruned per HF row
            zeroed = np.asarray(new.weights[n][p]) == 0
            old = np.asarray(LORA.weights[n][p])
            np.testing.assert_array_equal(zeroed, np.asarray(report["masks"][n][p]))
            assert np.all(zeroed.sum(axis=1) == k), (n, p, k)
            assert report["pruned"][n][p] == k * s.shape[0] * s.shape[2]
            lowest_pruned = np.where(zeroed, s, np.inf).min(axis=1)
            highest_kept = np.where(zeroed, -np.inf, s).max(axis=1)
            assert np.all(lowest_pruned > highest_kept), (n, p)
            np.testing.assert_array_equal(np.asarray(new.weights[n][p])[~zeroed], old[~zeroed])
    assert report["dense_ratio"] == ratio


def test_antidote_row_counts_follow_the_reference_rounding():
    scores = jnp.asarray(np.random.default_rng(0).random((1, 64, 3)))
    for ratio, n_pruned in ((0.1, 7), (0.0, 0), (1.0, 64), (0.5, 32)):
        assert np.all(np.asarray(ad.top_score_mask(scores, ratio)).sum(1) == n_pruned)
    ties = jnp.ones((1, 10, 1))
    mask = np.asarray(ad.top_score_mask(ties, 0.2))[0, :, 0]      # stable sort: last ones go
    np.testing.assert_array_equal(mask, [False] * 8 + [True] * 2)


def test_antidote_scores_with_one_forward_pass_per_batch_and_no_backward(monkeypatch):
    calls = []
    scoring = ad._sum_squares_jit
    monkeypatch.setattr(ad, "_sum_squares_jit", lambda *a: calls.append(1) or scoring(*a))
    ad.antidote(CFG, ALIGNED, LORA, CALIB)
    assert len(calls) == len(CALIB)
    b = CALIB[0]
    jaxpr = jax.make_jaxpr(functools.partial(ad._sum_squares, CFG))(
        ALIGNED, LORA, b["input_ids"], b["attention_mask"])
    assert count_passes(jaxpr.jaxpr, CFG.num_layers) == api.Cost(1, 0)


def test_antidote_without_calibration_data_prunes_by_magnitude():
    new, report = ad.antidote(CFG, ALIGNED, LORA, None, dense_ratio=0.25)
    assert report["tokens"] == 0
    for n in TARGETS:
        a = np.abs(np.asarray(LORA.weights[n]["A"]))
        np.testing.assert_array_equal(np.asarray(report["masks"][n]["A"]),
                                      np.asarray(ad.top_score_mask(jnp.asarray(a), 0.25)))


def test_antidote_is_registered_and_rejects_bad_inputs():
    spec = api.get("antidote")
    assert (spec.stage, spec.level, str(spec.cost)) == ("post", "weights", "1F+0B")
    assert spec.hyperparameters == {"dense_ratio": 0.1, "padding": "official"}
    with pytest.raises(api.DefenseError, match="padding"):
        spec.build(padding="none")
    new, _ = spec.build(dense_ratio=0.2)(CFG, ALIGNED, LORA, calibration_batches=CALIB[:1])
    direct, _ = ad.antidote(CFG, ALIGNED, LORA, CALIB[:1], dense_ratio=0.2)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(api.DefenseError, match="dense_ratio"):
        spec.build(dense_ratio=1.5)
    with pytest.raises(api.DefenseError, match="calibration tokens"):
        ad.antidote(CFG, ALIGNED, LORA, [])
    with pytest.raises(api.DefenseError, match=r"\[batch, time\]"):
        ad.antidote(CFG, ALIGNED, LORA, [{"input_ids": np.zeros((3,), np.int32)}])
