"""LoRA SFT train-step throughput of hfjax (and, with --torch_python, PyTorch + PEFT).

    python benchmarks/step_throughput.py [--model PATH] [--batch 4] [--seq 128] [--json]

Same model, LoRA config (r, alpha, targets), batch, sequence length and precision on both stacks;
warm-up steps excluded; the median over the timed steps. Every figure is printed with the
hardware, precision and sizes that produced it.

--repeats N alternates the two stacks N times in one run (hfjax, torch, hfjax, torch, ...) so
that both see the same machine load; each stack's figure is then the median over all its timed
steps, and the per-repeat ratios show how noisy the machine was. --keep_freed_memory (default on)
applies `hfjax.host.keep_freed_memory()` to the hfjax process; the torch subprocess keeps glibc's
defaults, which measured faster for it (2.59 vs 2.91 s/step), unless --torch_malloc_env gives it
the same settings (`hfjax.host.MALLOC_ENV`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hfjax import host, models, sharding
from hfjax.models import lora as lora_lib
from hfjax.train import optim, state, step

_MODEL = flags.DEFINE_string("model", None, "HF folder or .gguf (default: embedded SmolLM2)")
_BATCH = flags.DEFINE_integer("batch", 4, "global batch size")
_SEQ = flags.DEFINE_integer("seq", 128, "sequence length (every token is a response token)")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank")
_ALPHA = flags.DEFINE_float("alpha", 16.0, "LoRA alpha")
_TARGETS = flags.DEFINE_list("targets", list(models.PROJECTIONS), "LoRA target projections")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute precision")
_STEPS = flags.DEFINE_integer("steps", 8, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed warm-up steps (compilation)")
_REMAT = flags.DEFINE_bool("remat", False, "rematerialize each layer in the backward pass")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python",
    os.environ.get("HFJAX_TORCH_PYTHON"),
    "a python with torch, transformers and peft: runs the PyTorch + PEFT reference",
)
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")
_REPEATS = flags.DEFINE_integer("repeats", 1, "alternate the two stacks this many times")
_KEEP_FREED = flags.DEFINE_bool(
    "keep_freed_memory", True,
    "glibc keeps freed memory mapped (hfjax.host.keep_freed_memory) in the hfjax process",
)
_TORCH_MALLOC_ENV = flags.DEFINE_bool(
    "torch_malloc_env", False, "run the torch reference with hfjax.host.MALLOC_ENV as well"
)


def hardware() -> dict:
    cpu = host.cpu_model()
    dev = jax.devices()[0]
    return {
        "jax_backend": jax.default_backend(),
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
    }


def fixed_batch(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (_BATCH.value, _SEQ.value)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def time_steps(run_one) -> list[float]:
    for _ in range(_WARMUP.value):
        run_one()
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t0)
    return times


def hfjax_lora_sft(path):
    """(block, step fn): block() times one block of steps (warm-up, then timed steps)."""
    dtype = jnp.dtype(_DTYPE.value)
    cfg, params = models.load_pretrained(path, dtype=dtype)
    cfg = cfg.replace(dtype=_DTYPE.value, remat=_REMAT.value)
    mesh = sharding.make_mesh(1, -1, 1)
    lora = lora_lib.init(
        cfg, jax.random.key(0), rank=_RANK.value, alpha=_ALPHA.value, targets=tuple(_TARGETS.value)
    )
    opt_cfg = optim.OptimizerConfig(learning_rate=1e-4, total_steps=1000)
    opt = optim.make_optimizer(opt_cfg)
    frozen_sh = state.params_shardings(cfg, mesh)
    frozen = jax.device_put(params, frozen_sh)
    st, st_sh = step.init_state(cfg, lora, opt, mesh=mesh, seed=0)
    fn = step.make_train_step(
        cfg, opt, mesh=mesh, state_shardings=st_sh, frozen_shardings=frozen_sh
    )
    batches = {"user": fixed_batch(cfg.vocab_size)}
    holder = {"state": st}

    def run_one():
        holder["state"], m = fn(holder["state"], frozen, step.put_batches(batches, mesh))
        jax.block_until_ready(m["loss"])

    def block() -> list[float]:
        return time_steps(run_one)

    return block, fn


def summarize(times: list[float]) -> dict:
    """Median step time and throughput, with the spread of the timed steps."""
    med = statistics.median(times)
    return {
        "step_s": med,
        "tokens_per_s": _BATCH.value * _SEQ.value / med,
        "steps_per_s": 1 / med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "timed_steps": len(times),
    }


def torch_lora_sft(path) -> dict | None:
    """One run of the PyTorch + PEFT reference (a subprocess): its JSON, with step_times_s."""
    if not _TORCH_PYTHON.value:
        return None
    script = Path(__file__).with_name("torch_reference.py")
    env = {**os.environ, **(host.MALLOC_ENV if _TORCH_MALLOC_ENV.value else {})}
    out = subprocess.run(
        [
            _TORCH_PYTHON.value,
            str(script),
            "--model",
            str(path),
            "--batch",
            str(_BATCH.value),
            "--seq",
            str(_SEQ.value),
            "--rank",
            str(_RANK.value),
            "--alpha",
            str(_ALPHA.value),
            "--targets",
            ",".join(_TARGETS.value),
            "--dtype",
            _DTYPE.value,
            "--steps",
            str(_STEPS.value),
            "--warmup",
            str(_WARMUP.value),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    # before JAX starts its threads: a thread takes its malloc arena when it first allocates
    kept = host.keep_freed_memory() if _KEEP_FREED.value else False
    path = _MODEL.value or models.default_model_path()
    result = {
        "hardware": hardware(),
        "precision": _DTYPE.value,
        "sizes": {
            "model": str(path),
            "batch": _BATCH.value,
            "seq": _SEQ.value,
            "lora_rank": _RANK.value,
            "lora_alpha": _ALPHA.value,
            "targets": _TARGETS.value,
            "timed_steps": _STEPS.value,
            "repeats": _REPEATS.value,
        },
        "keep_freed_memory": kept,
        "torch_malloc_env": _TORCH_MALLOC_ENV.value,
        "methods": {},
    }
    block, fn = hfjax_lora_sft(path)
    hf_times, torch_times, ratios = [], [], []
    for _ in range(_REPEATS.value):
        times = block()
        hf_times += times
        ref = torch_lora_sft(path)
        if ref is not None:
            torch_times += ref["step_times_s"]
            ratios.append(statistics.median(ref["step_times_s"]) / statistics.median(times))
    entry = {"hfjax": {**summarize(hf_times), "compiles": fn.compiles}}
    if torch_times:
        entry["torch_peft"] = summarize(torch_times)
        entry["ratio"] = entry["hfjax"]["tokens_per_s"] / entry["torch_peft"]["tokens_per_s"]
        entry["ratio_per_repeat"] = ratios
    result["methods"]["lora_sft"] = entry
    if _JSON.value:
        print(json.dumps(result))
        return
    hw = result["hardware"]
    print(
        f"# {hw['cpu']} ({hw['cpu_cores']} cores), jax {jax.__version__} on "
        f"{hw['jax_backend']}:{hw['device']} x{hw['devices']}, {_DTYPE.value}, "
        f"batch {_BATCH.value} x {_SEQ.value}, LoRA r={_RANK.value} on {','.join(_TARGETS.value)}"
    )
    for name, e in result["methods"].items():
        hf = e["hfjax"]
        line = f"{name:12s} hfjax {hf['tokens_per_s']:8.1f} tok/s ({hf['step_s']:.3f} s/step)"
        if "torch_peft" in e:
            line += (
                f" | torch+peft {e['torch_peft']['tokens_per_s']:8.1f} tok/s"
                f" ({e['torch_peft']['step_s']:.3f} s/step) | ratio {e['ratio']:.2f}x"
            )
            if len(e["ratio_per_repeat"]) > 1:
                per = ", ".join(f"{r:.2f}" for r in e["ratio_per_repeat"])
                line += f" (per repeat: {per})"
        print(line)


if __name__ == "__main__":
    sys.exit(app.run(main))
