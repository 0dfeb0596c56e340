"""benchmarks/gpu_mfu.py: its FLOP accounting against a hand count, its peak table, and a CPU
smoke run of the script (hfjax only; with HFJAX_TORCH_PYTHON set, also the PyTorch + PEFT
reference through `torch_reference.py --config_json`)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from torch_live import torch_python

from hfjax.models import lora as lora_lib
from hfjax.models.config import from_hf_dict
from hfjax.models.params import PROJECTIONS, param_shapes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_mfu.py"
TINY = ["--config", "tiny", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1",
        "--json"]


def _load():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # the script's `import _hfjax_methods`
    spec = importlib.util.spec_from_file_location("gpu_mfu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_mfu = _load()  # once: it defines absl flags

MISTRAL = {  # sliding window shorter than the sequence: S_l = window
    "model_type": "mistral", "vocab_size": 300, "hidden_size": 48, "intermediate_size": 80,
    "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
    "head_dim": 12, "sliding_window": 24, "tie_word_embeddings": False,
}


def _hand_count(hf: dict, seq: int, rank: int, targets: tuple[str, ...]) -> dict:
    """N, N_lora and A from the parameter and adapter shapes, not from `projection_dims`."""
    cfg = from_hf_dict(hf)
    shapes = param_shapes(cfg)
    n = sum(math.prod(shapes["layers"][p]["kernel"].shape) for p in PROJECTIONS)
    n += cfg.hidden_size * cfg.vocab_size  # LM head (tied or not)
    lora = jax.eval_shape(lambda: lora_lib.init(cfg, jax.random.key(0), rank=rank, alpha=1.0,
                                                targets=targets))
    n_lora = sum(math.prod(x.shape) for x in jax.tree.leaves(lora.weights))
    window = hf.get("sliding_window") or seq
    a = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * min(seq, window)
    return {"n_matmul": n, "n_lora": n_lora, "attention": a,
            "lora_sft": 4 * n + 6 * n_lora + a, "full_ft": 6 * n + a}


@pytest.mark.parametrize("name,seq,rank,targets", [
    ("tiny", 32, 16, PROJECTIONS),
    ("llama-3.2-1b", 2048, 16, PROJECTIONS),
    ("smollm2-1.7b", 512, 8, ("q_proj", "v_proj")),
    ("mistral", 64, 4, ("o_proj", "down_proj")),
])
def test_flops_per_token_matches_hand_count(name, seq, rank, targets):
    hf = MISTRAL if name == "mistral" else gpu_mfu.CONFIGS[name]
    got = gpu_mfu.flops_per_token(from_hf_dict(hf), seq=seq, rank=rank, targets=targets)
    assert got == _hand_count(hf, seq, rank, targets)


def test_flops_of_llama_3_2_1b():
    """N of Llama-3.2-1B is its published 1.236 B parameters less the norms (tied head)."""
    cfg = from_hf_dict(gpu_mfu.CONFIGS["llama-3.2-1b"])
    f = gpu_mfu.flops_per_token(cfg, seq=2048, rank=16, targets=PROJECTIONS)
    assert f["n_matmul"] == 1_235_814_400 - (2 * 16 + 1) * 2048
    assert f["n_lora"] == 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192))
    assert f["attention"] == 12 * 16 * 32 * 64 * 2048
    assert f["lora_sft"] / 1e9 == pytest.approx(5.8, abs=0.1)  # 4.94 + 0.07 + 0.81 GFLOP


def test_peak_table():
    assert gpu_mfu.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", None) == 989.0
    assert gpu_mfu.peak_tflops("NVIDIA H100 PCIe", "bfloat16", None) == 756.0
    assert gpu_mfu.peak_tflops("NVIDIA H200", "bfloat16", None) == 989.0
    assert gpu_mfu.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16", None) == 312.0
    assert gpu_mfu.peak_tflops("cpu", "bfloat16", None) is None
    assert gpu_mfu.peak_tflops("NVIDIA H100 80GB HBM3", "float32", None) is None
    assert gpu_mfu.peak_tflops("cpu", "float32", 2.5) == 2.5


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_stack(r: dict, step_flops: int, peak: float | None) -> None:
    assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["timed_steps"] == 2
    assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"])
    assert r["tflops"] == pytest.approx(step_flops / r["step_s"] / 1e12)
    assert r["mfu"] == (None if peak is None else pytest.approx(r["tflops"] / peak))
    assert "peak_memory_bytes" in r


def test_script_cpu_hfjax_only():
    res = _run("--torch_python=")
    assert res["precision"] == "bfloat16" and res["config"] == "tiny"
    assert res["sizes"] == {"batch": 2, "seq": 32, "lora_rank": 16, "lora_alpha": 32.0,
                            "targets": list(PROJECTIONS), "timed_steps": 2, "warmup_steps": 1,
                            "remat": False, "scan_unroll": 1, "attention": "auto",
                            "attention_kernel": "xla"}
    want = _hand_count(gpu_mfu.CONFIGS["tiny"], 32, 16, PROJECTIONS)
    assert res["flops_per_token"] == want
    assert res["step_flops"] == want["lora_sft"] * 2 * 32
    assert "4N + 6*N_lora + A" in res["flop_accounting"]
    assert res["model"]["n_params"] == sum(
        np.prod(x.shape) for x in jax.tree.leaves(param_shapes(from_hf_dict(
            gpu_mfu.CONFIGS["tiny"]))))
    assert res["hardware"]["jax_backend"] == "cpu" and res["peak_tflops"] is None
    _check_stack(res["hfjax"], res["step_flops"], None)
    assert res["hfjax"]["compiles"] == 1
    assert res["torch_peft"] is None and "hfjax only" in res["torch_note"]


def test_an_explicit_cudnn_attention_is_refused_on_this_cpu_before_any_step():
    if jax.default_backend() == "gpu":
        pytest.skip("this check is about a machine without a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--torch_python=",
                           "--attention", "cudnn"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert "attention='cudnn' cannot run here: the backend is 'cpu'" in proc.stderr
    assert "tokens/s" not in proc.stdout


def test_script_cpu_with_torch_reference():
    python = torch_python("gpu_mfu.py against PyTorch + PEFT")
    res = _run("--torch_python", python, "--peak_tflops", "0.5")
    assert res["peak_tflops"] == 0.5
    for stack in ("hfjax", "torch_peft"):
        _check_stack(res[stack], res["step_flops"], 0.5)
    t = res["torch_peft"]
    assert t["device"] == "cpu" and t["peak_memory_bytes"] is None and len(t["step_times_s"]) == 2
    assert res["ratio"] == pytest.approx(res["hfjax"]["tokens_per_s"] / t["tokens_per_s"])
