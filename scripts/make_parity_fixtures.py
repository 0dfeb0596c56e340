"""Golden logits from HF transformers for hfjax's parity tests (run with the torch python).

    /tmp/v311/bin/python scripts/make_parity_fixtures.py --out tests/fixtures/parity
    /tmp/v311/bin/python scripts/make_parity_fixtures.py --out /tmp/x --cases llama gemma2

For every case (a tiny random float32 model of one supported family) it writes

    <out>/<case>/model/            config.json + model.safetensors (HF `save_pretrained`)
    <out>/<case>/golden.npz        input_ids [B, T] int32 (rows left-padded with pad_token_id),
                                   attention_mask [B, T] int32,
                                   logits [B, T, V] float32: transformers run ROW BY ROW on the
                                       unpadded sequences (the truth), zeros at pad positions,
                                   logits_hf_padded [B, T, V] float32: transformers on the padded
                                       batch (position_ids = cumsum(mask) - 1), only stored when
                                       it agrees with the row-by-row logits to 1e-4.
    <out>/<case>/meta.json         what the case exercises, the checks made, transformers version.

Weights are drawn larger than transformers' defaults (normal(0, 0.1..0.2)) and norm weights are
randomized, so every component (norms, biases, rope scaling, windows, soft-caps) moves the logits.
For each family feature the script checks that turning it off changes the logits by far more
than the parity tolerance; otherwise the fixture could not catch a missing feature.
Each case directory is written to a temporary sibling and swapped in with os.replace.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

BATCH, SEQ = 3, 12
PAD_LENGTHS = (0, 3, 7)  # left padding per row
PAD_ID = 0
TOL = 1e-4  # the parity tolerance of tests/test_parity.py
MATTERS = 1e-2  # a feature "matters" when switching it off moves some logit by more than this

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)


def _llama3_rope() -> dict:
    return {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }


CASES: dict[str, dict] = {
    "llama": dict(
        cls=(LlamaConfig, LlamaForCausalLM),
        kw=dict(_COMMON, vocab_size=256, tie_word_embeddings=False, rms_norm_eps=1e-6),
        what="Llama, untied lm_head, GQA 4 query / 2 kv heads",
    ),
    "llama3": dict(
        cls=(LlamaConfig, LlamaForCausalLM),
        kw=dict(
            _COMMON,
            vocab_size=256,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_parameters=_llama3_rope(),
        ),
        what="Llama 3.1 rope scaling (llama3, factor 8, original_max_position_embeddings 64)",
    ),
    "smollm2": dict(
        cls=(LlamaConfig, LlamaForCausalLM),
        kw=dict(
            _COMMON,
            vocab_size=192,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            num_key_value_heads=1,
        ),
        what="SmolLM2-like Llama: tied embeddings, rope_theta 1e5, multi-query (4 / 1 heads)",
    ),
    "mistral": dict(
        cls=(MistralConfig, MistralForCausalLM),
        kw=dict(_COMMON, vocab_size=256, tie_word_embeddings=False, head_dim=16, sliding_window=4),
        what="Mistral with sliding_window 4 on a 12-token sequence",
    ),
    "qwen2": dict(
        cls=(Qwen2Config, Qwen2ForCausalLM),
        kw=dict(
            _COMMON,
            vocab_size=224,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
        ),
        what="Qwen2: q/k/v biases, tied embeddings, GQA 4/2",
    ),
    "gemma2": dict(
        cls=(Gemma2Config, Gemma2ForCausalLM),
        kw=dict(
            _COMMON,
            vocab_size=256,
            num_hidden_layers=3,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
        ),
        what="Gemma 2: sliding window 4 on layers 0 and 2, attention soft-cap 5, final "
        "soft-cap 10, query_pre_attn_scalar 24 != head_dim 32 != hidden/heads 16, "
        "sandwich norms, (1 + w) norms, scaled embeddings, gelu-tanh",
    ),
}


def _check_llama3_bands(kw: dict) -> dict:
    """Assert that the llama3 inverse frequencies fall in all three bands (high, medium, low)."""
    rp = kw["rope_parameters"]
    head_dim = kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
    inv = 1.0 / rp["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    orig = rp["original_max_position_embeddings"]
    high_w, low_w = orig / rp["high_freq_factor"], orig / rp["low_freq_factor"]
    bands = {
        "high (unchanged)": int((wavelen < high_w).sum()),
        "medium (smoothed)": int(((wavelen >= high_w) & (wavelen <= low_w)).sum()),
        "low (divided by factor)": int((wavelen > low_w).sum()),
    }
    assert all(bands.values()), f"llama3 rope: some band is empty: {bands}"
    return bands


def _build(case: str, seed: int, **overrides):
    spec = CASES[case]
    cfg_cls, model_cls = spec["cls"]
    cfg = cfg_cls(**{**spec["kw"], **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model


@torch.no_grad()
def _randomize(model, seed: int, offset_norms: bool) -> None:
    """Embeddings N(0, 0.5²), kernels N(0, 0.15²), biases N(0, 0.1²), norms (1 +) N(0, 0.3²)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            base = 0.0 if offset_norms else 1.0  # Gemma norms scale by (1 + w)
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _inputs(vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    for b, p in enumerate(PAD_LENGTHS):
        ids[b, :p] = PAD_ID
        mask[b, :p] = 0
    return ids, mask


@torch.no_grad()
def _rowwise_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers on each row's unpadded tokens alone; zeros at pad positions."""
    out = np.zeros((*ids.shape, model.config.vocab_size), np.float32)
    for b in range(ids.shape[0]):
        keep = mask[b].astype(bool)
        x = torch.from_numpy(ids[b][keep].astype(np.int64))[None]
        out[b, keep] = model(input_ids=x).logits[0].float().numpy()
    return out


@torch.no_grad()
def _padded_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers on the left-padded batch, positions from the mask as `generate` does."""
    m = torch.from_numpy(mask.astype(np.int64))
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    x = torch.from_numpy(ids.astype(np.int64))
    return model(input_ids=x, attention_mask=m, position_ids=pos).logits.float().numpy()


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.astype(bool)
    return float(np.abs(a[keep] - b[keep]).max())


def _ablations(case: str, model, ids, mask, ref) -> dict:
    """Switch each family feature off; each must move the logits by more than MATTERS."""
    sd = model.state_dict()

    def variant(**overrides):
        m = _build(case, 0, **overrides)
        m.load_state_dict(sd)
        return _max_diff(_rowwise_logits(m, ids, mask), ref, mask)

    kw = CASES[case]["kw"]
    checks: dict[str, float] = {}
    if case == "llama3":
        checks["no rope scaling"] = variant(
            rope_parameters={
                "rope_type": "default",
                "rope_theta": kw["rope_parameters"]["rope_theta"],
            }
        )
    if case in ("mistral", "gemma2"):
        if case == "gemma2":
            full = ["full_attention"] * kw["num_hidden_layers"]
            checks["no sliding window"] = variant(layer_types=full)
        else:
            checks["no sliding window"] = variant(sliding_window=None)
    if case == "gemma2":
        checks["no attention soft-cap"] = variant(attn_logit_softcapping=None)
        checks["no final soft-cap"] = variant(final_logit_softcapping=None)
        checks["query_pre_attn_scalar = head_dim"] = variant(query_pre_attn_scalar=kw["head_dim"])
    if case == "qwen2":
        m = _build(case, 0)
        m.load_state_dict(
            {k: (torch.zeros_like(v) if k.endswith("bias") else v) for k, v in sd.items()}
        )
        checks["zero q/k/v biases"] = _max_diff(_rowwise_logits(m, ids, mask), ref, mask)
    for what, d in checks.items():
        assert d > MATTERS, f"{case}: {what} changes logits by only {d:.2e}; the fixture is blind"
    return checks


@torch.no_grad()
def _softcap_activity(model, ids) -> dict:
    """How hard the Gemma 2 caps bite: the inputs x / c of every c·tanh(x / c) in a forward.

    Gemma 2's soft-caps are the only `torch.tanh` calls in its forward (gelu-tanh goes through
    `F.gelu`), so wrapping `torch.tanh` for one forward pass records them in call order:
    one per layer (attention scores), then the final logits.
    """
    seen: list[np.ndarray] = []
    tanh = torch.tanh

    def recording_tanh(x, *a, **k):
        seen.append(x.detach().abs().numpy())
        return tanh(x, *a, **k)

    torch.tanh = recording_tanh
    try:
        model(input_ids=torch.from_numpy(ids[:1].astype(np.int64)))
    finally:
        torch.tanh = tanh
    assert len(seen) == model.config.num_hidden_layers + 1, len(seen)
    attn, final = np.concatenate([s.ravel() for s in seen[:-1]]), seen[-1]
    activity = {
        "attn_precap_max_over_cap": float(attn.max()),
        "attn_frac_over_half_cap": float((attn > 0.5).mean()),
        "final_precap_max_over_cap": float(final.max()),
        "final_frac_over_half_cap": float((final > 0.5).mean()),
    }
    assert activity["attn_frac_over_half_cap"] > 0.05, activity
    assert activity["final_frac_over_half_cap"] > 0.05, activity
    return activity


def make_case(case: str, out_dir: Path, seed: int = 0) -> dict:
    """Build, check and write one case; returns its meta dict."""
    spec = CASES[case]
    model = _build(case, seed)
    _randomize(model, seed + 1, offset_norms=case == "gemma2")
    ids, mask = _inputs(model.config.vocab_size, seed + 2)
    golden = _rowwise_logits(model, ids, mask)
    padded = _padded_logits(model, ids, mask)
    padded_diff = _max_diff(padded, golden, mask)
    meta = {
        "case": case,
        "what": spec["what"],
        "model_type": model.config.model_type,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "pad_lengths": list(PAD_LENGTHS),
        "logit_std": float(golden[mask.astype(bool)].std()),
        "hf_padded_vs_rowwise_max_abs_diff": padded_diff,
        "hf_padded_stored": padded_diff <= TOL,
        "ablations_max_abs_diff": _ablations(case, model, ids, mask, golden),
    }
    if case == "llama3":
        meta["llama3_rope_bands"] = _check_llama3_bands(spec["kw"])
    if case == "gemma2":
        meta.update(_softcap_activity(model, ids))
    arrays = {"input_ids": ids, "attention_mask": mask, "logits": golden}
    if padded_diff <= TOL:
        arrays["logits_hf_padded"] = np.where(mask[..., None].astype(bool), padded, 0.0).astype(
            np.float32
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the fixture is a normal repo directory
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        np.savez_compressed(tmp / "golden.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{case}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/parity"))
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    transformers.utils.logging.disable_progress_bar()
    for case in args.cases:
        meta = make_case(case, args.out / case, args.seed)
        size = sum(f.stat().st_size for f in (args.out / case).rglob("*") if f.is_file())
        abl = ", ".join(f"{k}: {v:.3g}" for k, v in meta["ablations_max_abs_diff"].items())
        print(
            f"{case:8s} {size / 1024:6.0f} KiB  logit std {meta['logit_std']:.3f}  "
            f"hf padded vs rowwise {meta['hf_padded_vs_rowwise_max_abs_diff']:.2e}"
            + (f"  ablations: {abl}" if abl else ""),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
