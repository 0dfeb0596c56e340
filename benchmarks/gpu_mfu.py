"""LoRA SFT throughput, MFU and peak memory of a 1B-class model: hfjax against PyTorch + PEFT.

    python benchmarks/gpu_mfu.py [--config llama-3.2-1b|smollm2-1.7b|tiny | --config_json PATH]
        [--batch 8] [--seq 2048] [--rank 16] [--alpha 32] [--dtype bfloat16]
        [--steps 10] [--warmup 3] [--peak_tflops X] [--torch_python PY] [--json]
        [--attention auto|xla|cudnn] [--scan_unroll N] [--remat]

Meant for a GPU; runs anywhere (CPU smoke test: `--config tiny --batch 2 --seq 32`).
The model is a real configuration with random weights (no hub access): the HF config.json of
Llama-3.2-1B or SmolLM2-1.7B written below, `tiny` (a 2-layer llama for smoke tests) or any
config.json (--config_json). hfjax: `models.init_random` (normal(0, 0.02)) created sharded on
one mesh over all devices, the LoRA SFT step of `_hfjax_methods.make_method` (AdamW lr 1e-4,
response-token CE with every token a response token). PyTorch + PEFT: `torch_reference.py
--method lora_sft --config_json` (transformers' random init, same config, LoRA, batch, sequence
length, precision, step counts; `--device cuda` when JAX's backend is gpu), in a subprocess of
--torch_python (default: $HFJAX_TORCH_PYTHON; empty: hfjax only). The weights differ between the
stacks, the FLOPs do not.

Defaults (this script's, not the shared flags' CPU defaults of batch 4 x 128, r 8, alpha 16,
float32): bfloat16, batch 8 x 2048 (16k tokens per step: fills an H100 with a 1B model), LoRA
r 16, alpha 32 on all 7 projections, 3 warm-up steps (compilation; excluded) and the median of
10 timed steps.

Model FLOPs per token (`flops_per_token`; a multiply-add is 2 FLOPs; T = --seq; L layers,
hidden D, vocab V, H query heads of size hd; per projection p its (d_in, d_out)):
  N      = L · Σ_p d_in·d_out over the 7 projections + D·V (the LM head, also when it is tied to
           the embeddings: the logits matmul runs either way). Not counted: the embedding lookup,
           norms, biases, RoPE, softmax, the CE, the optimizer.
  N_lora = L · Σ_{p in targets} r · (d_in + d_out)
  A      = 12 · H·hd · Σ_l S_l, with S_l = T (min(T, window) on a sliding-window layer): the
           Q·Kᵀ and P·V matmuls are 2 · 2·H·hd·S_l per token forward and twice that backward
           (both operands are activations, so both get gradients). The full T×S score matrix
           is counted, without halving for causality (PaLM's convention, appendix B; hfjax's
           XLA kernel computes the full masked matrix, as counted; cuDNN flash attention, the
           default on a GPU in bf16 (--attention auto), and torch's SDPA skip the masked
           upper triangle).
  LoRA SFT   = 4·N + 6·N_lora + A: a frozen kernel W costs its forward x·W (2N) and the
               activation gradient ∂y·Wᵀ (2N) but no weight gradient; the LoRA factors cost
               forward, activation gradient and weight gradient (3 · 2·N_lora). (The first
               layer's input gradient is not needed in principle; it is counted: < 1/L.)
  full FT    = 6·N + A (the usual 6N, printed for reference; not what the step does).
Step FLOPs = LoRA SFT per token × batch · seq; achieved TFLOP/s = step FLOPs / median step
time; MFU = achieved / peak. Model FLOPs only: recomputation (hfjax's remat of act(g)⊙u and,
on the XLA kernel, of the attention scores, --remat, or torch's) is not counted, so this is MFU,
not HFU.
Peak: bf16 dense tensor-core peak by device kind (`PEAK_BF16_TFLOPS`: H100 SXM 989, H100 PCIe
756, H100 NVL 835, H200/GH200 989, A100 312 TFLOP/s) or --peak_tflops; MFU is n/a on a CPU or
with --dtype float32 unless --peak_tflops is given. Both stacks run on the same device, so they
share the peak (per device; with several devices hfjax shards over all of them and its MFU is
against peak x device count, while torch uses one).

Peak memory: hfjax `jax.devices()[0].memory_stats()["peak_bytes_in_use"]` (n/a on CPU),
torch `torch.cuda.max_memory_allocated()`; each covers the whole run (weights, LoRA, optimizer
state, activations). The torch reference runs first, while JAX holds no GPU memory: this script
sets XLA_PYTHON_CLIENT_PREALLOCATE=false (unless already set) so that JAX's allocator grows
during the untimed warm-up instead of taking 75% of the GPU up front.
"""

from __future__ import annotations

import os

# before JAX creates its GPU client (see the docstring); a value set by the caller wins
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import _hfjax_methods as common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from hfjax.models.config import ModelConfig, from_hf_dict  # noqa: E402
from hfjax.models.params import projection_dims  # noqa: E402

# HF config.json of the built-in configurations (values of the hub's config files)
CONFIGS = {
    "llama-3.2-1b": {  # meta-llama/Llama-3.2-1B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
        "eos_token_id": 128001, "torch_dtype": "bfloat16",
    },
    "smollm2-1.7b": {  # HuggingFaceTB/SmolLM2-1.7B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 130000.0,
        "rope_scaling": None, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
    "tiny": {  # smoke tests: 2 layers, grouped-query attention, untied LM head
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
    },
}

# bf16 dense (no sparsity) tensor-core peak, TFLOP/s, by a substring of the device kind; the
# first match wins (so the PCIe and NVL H100s before the SXM one).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),  # also GH200
    ("A100", 312.0),
)

# this benchmark's defaults for the shared flags (theirs are sized for a 2-core CPU)
for _flag, _value in ((common.BATCH, 8), (common.SEQ, 2048), (common.RANK, 16),
                      (common.ALPHA, 32.0), (common.DTYPE, "bfloat16")):
    flags.set_default(_flag, _value)

_CONFIG = flags.DEFINE_enum("config", "llama-3.2-1b", sorted(CONFIGS),
                            "built-in model configuration (random weights)")
_CONFIG_JSON = flags.DEFINE_string("config_json", None,
                                   "an HF config.json instead of --config (random weights)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps (the median is reported)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed warm-up steps (compilation)")
_REMAT = flags.DEFINE_bool("remat", False, "hfjax: rematerialize each layer in the backward")
_UNROLL = flags.DEFINE_integer("scan_unroll", 1, "hfjax: layers per scan iteration (the layer "
                               "count unrolls fully: no per-layer weight slices, longer compile)")
_PEAK = flags.DEFINE_float("peak_tflops", None,
                           "peak TFLOP/s for MFU (default: PEAK_BF16_TFLOPS by device kind)")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", os.environ.get("HFJAX_TORCH_PYTHON"),
    "python with torch, transformers and peft for the PyTorch + PEFT reference (empty: skip)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of text")


def flops_per_token(cfg: ModelConfig, *, seq: int, rank: int, targets) -> dict:
    """Model FLOPs per token of a LoRA SFT step and of full fine-tuning (module docstring).

    Returns {"n_matmul": N, "n_lora": N_lora, "attention": A, "lora_sft": 4N + 6 N_lora + A,
    "full_ft": 6N + A}; pure Python on the config.
    """
    dims = projection_dims(cfg)
    n_matmul = cfg.num_layers * sum(i * o for i, o in dims.values())
    n_matmul += cfg.hidden_size * cfg.vocab_size
    n_lora = cfg.num_layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)
    spans = sum(min(seq, w) if w else seq for w in cfg.layer_windows)
    attention = 12 * cfg.num_heads * cfg.head_dim * spans
    return {"n_matmul": n_matmul, "n_lora": n_lora, "attention": attention,
            "lora_sft": 4 * n_matmul + 6 * n_lora + attention,
            "full_ft": 6 * n_matmul + attention}


def peak_tflops(device_kind: str, dtype: str, override: float | None) -> float | None:
    """--peak_tflops, else the bf16 table's entry for the device kind (None: unknown, float32)."""
    if override:
        return override
    if dtype != "bfloat16":
        return None
    kind = device_kind.lower()
    return next((v for k, v in PEAK_BF16_TFLOPS if k.lower() in kind), None)


def config_dict() -> tuple[str, dict]:
    """(name, HF config dict) from --config_json or --config."""
    if _CONFIG_JSON.value:
        return _CONFIG_JSON.value, json.loads(Path(_CONFIG_JSON.value).read_text())
    return _CONFIG.value, CONFIGS[_CONFIG.value]


def with_rates(summary: dict, step_flops: float, peak: float | None) -> dict:
    """A stack's step summary plus achieved TFLOP/s and MFU (None without a peak)."""
    tflops = step_flops / summary["step_s"] / 1e12
    return {**summary, "tflops": tflops, "mfu": tflops / peak if peak else None}


def hfjax_peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def run_hfjax(cfg: ModelConfig) -> tuple[dict, int]:
    """(step summary with peak_memory_bytes and compiles, parameter count)."""
    setup = common.lora_setup(cfg)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup[1]))
    run_one, fn = common.make_method(*setup, common.LORA_SFT, batch=common.BATCH.value,
                                     seq=common.SEQ.value)
    times = common.timed_steps(run_one, warmup=_WARMUP.value, steps=_STEPS.value)
    summary = common.step_summary(times, common.BATCH.value * common.SEQ.value)
    return {**summary, "step_times_s": times, "compiles": fn.compiles,
            "peak_memory_bytes": hfjax_peak_memory()}, n_params


def run_torch(hf_config: dict, backend: str) -> dict | None:
    """The PyTorch + PEFT reference on the same config (its JSON), or None without a python."""
    if not _TORCH_PYTHON.value:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(hf_config))
        args = ["--method", common.LORA_SFT, "--config_json", str(path),
                "--device", "cuda" if backend == "gpu" else "cpu", "--seed", "0",
                *common.torch_reference_flags(steps=_STEPS.value, warmup=_WARMUP.value)]
        ref = common.run_torch_reference(_TORCH_PYTHON.value, args)
    return {**common.step_summary(ref["step_times_s"], common.BATCH.value * common.SEQ.value),
            **{k: ref.get(k) for k in ("step_times_s", "peak_memory_bytes", "torch", "threads",
                                       "attn_implementation", "device", "device_name")}}


def _si(x: float, unit: str) -> str:
    """x in `unit` with an SI prefix (k, M, G, T) and 4 significant digits."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {prefix}{unit}"
    return f"{x:.4g} {unit}"


def _count(n: int) -> str:
    """A parameter count in millions or billions."""
    return f"{n / 1e9:.4g} B" if n >= 1e9 else f"{n / 1e6:.4g} M"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _line(name: str, r: dict) -> str:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"{name:11s} {r['tokens_per_s']:10.1f} tokens/s  {r['step_s']:.4f} s/step "
            f"(min {r['step_s_min']:.4f}, max {r['step_s_max']:.4f})  "
            f"{_si(r['tflops'] * 1e12, 'FLOP/s')}  MFU {mfu}  "
            f"peak memory {_gib(r['peak_memory_bytes'])}")


def print_text(res: dict) -> None:
    hw, m, f = res["hardware"], res["model"], res["flops_per_token"]
    peak = res["peak_tflops"]
    print(f"# jax {jax.__version__} on {hw['jax_backend']}:{hw['device']} x{hw['devices']} "
          f"(host {hw['cpu']}, {hw['cpu_cores']} cores)")
    print(f"# {res['config']} (random weights), {common.sizes_text()}; {_WARMUP.value} warm-up "
          f"steps excluded, median of {_STEPS.value} timed steps")
    print(f"model: {_count(m['n_params'])} parameters; N = {_count(f['n_matmul'])} in matmuls "
          f"(7 projections x {m['layers']} layers + LM head); N_lora = {_count(f['n_lora'])}")
    print(f"FLOPs per token: LoRA SFT 4N + 6N_lora + A = {_si(f['lora_sft'], 'FLOP')} "
          f"(attention A = 12·H·hd·Σ_l S_l = {_si(f['attention'], 'FLOP')}); full FT 6N + A = "
          f"{_si(f['full_ft'], 'FLOP')} (reference); per step {_si(res['step_flops'], 'FLOP')}")
    print("peak: " + (f"{peak:g} TFLOP/s" if peak else
                      "n/a (not a known bf16 GPU: pass --peak_tflops for MFU)"))
    print(_line("hfjax", res["hfjax"]) + f"  ({res['sizes']['attention_kernel']} attention)")
    if res["torch_peft"] is None:
        print("torch+peft  skipped: no --torch_python (or HFJAX_TORCH_PYTHON): hfjax only")
        return
    t = res["torch_peft"]
    print(_line("torch+peft", t) + f"  (torch {t['torch']}, {t['device']}, "
          f"{t['attn_implementation']} attention)")
    print(f"hfjax / torch+peft tokens/s: {res['ratio']:.2f}x")


def main(argv):
    del argv
    if common.MODEL.value:
        raise app.UsageError("--model: this benchmark uses random weights; pass --config or "
                             "--config_json")
    if common.PROMPT_FRACTION.value:
        raise app.UsageError("--prompt_fraction: the MFU accounting counts the LM head at "
                             "every token, so every token must be a response token")
    name, hf_config = config_dict()
    dtype = common.DTYPE.value
    cfg = from_hf_dict(hf_config, dtype=dtype).replace(
        remat=_REMAT.value, attention=common.ATTENTION.value, scan_unroll=_UNROLL.value)
    try:
        kernel = common.attention_kernel(cfg)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    targets = tuple(common.TARGETS.value)
    flops = flops_per_token(cfg, seq=common.SEQ.value, rank=common.RANK.value, targets=targets)
    tokens = common.BATCH.value * common.SEQ.value
    hw = common.device_hardware()
    peak = peak_tflops(hw["device"], dtype, _PEAK.value)
    step_flops = flops["lora_sft"] * tokens
    torch_ref = run_torch(hf_config, hw["jax_backend"])  # first: JAX holds no GPU memory yet
    hf, n_params = run_hfjax(cfg)
    res = {
        "hardware": hw, "precision": dtype, "config": name,
        "model": {"model_type": cfg.model_type, "layers": cfg.num_layers,
                  "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                  "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                  "head_dim": cfg.head_dim, "vocab": cfg.vocab_size,
                  "tied_embeddings": cfg.tie_word_embeddings, "n_params": n_params},
        "sizes": {"batch": common.BATCH.value, "seq": common.SEQ.value,
                  "lora_rank": common.RANK.value, "lora_alpha": common.ALPHA.value,
                  "targets": list(targets), "timed_steps": _STEPS.value,
                  "warmup_steps": _WARMUP.value, "remat": _REMAT.value,
                  "scan_unroll": _UNROLL.value,
                  "attention": common.ATTENTION.value, "attention_kernel": kernel},
        "flops_per_token": flops,
        "flop_accounting": ("per token: LoRA SFT = 4N + 6*N_lora + A, full FT = 6N + A; "
                            "N = matmul params of the 7 projections x layers + LM head (no "
                            "embedding lookup); N_lora = layers * sum r*(d_in+d_out) over "
                            "targets; A = 12*H*hd*sum_l S_l (S_l = seq or the sliding window; "
                            "no causal halving); recompute not counted"),
        "step_flops": step_flops,
        "peak_tflops": peak,
        "hfjax": with_rates(hf, step_flops, peak and peak * hw["devices"]),
        "torch_peft": None if torch_ref is None else with_rates(torch_ref, step_flops, peak),
        "torch_note": None if torch_ref else "no --torch_python: hfjax only",
    }
    if torch_ref is not None:
        res["ratio"] = res["hfjax"]["tokens_per_s"] / res["torch_peft"]["tokens_per_s"]
    if _JSON.value:
        print(json.dumps(res))
    else:
        print_text(res)


if __name__ == "__main__":
    sys.exit(app.run(main))
