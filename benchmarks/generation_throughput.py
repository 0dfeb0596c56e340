"""Batched greedy generation throughput of hfjax: new tokens/s with the KV cache and without.

    python benchmarks/generation_throughput.py [--model PATH] [--batch 32] [--max_new_tokens 48]
        [--nocache_max_new_tokens N] [--prompt_len 0] [--dtype float32] [--json]

Prompts are real chat prompts: benign templated questions (capitals, opposites, unit
conversions, arithmetic) and the offline sentiment / topic classification prompts
(hfjax.data.synthetic), rendered with the model's chat template (SmolLM2's ChatML by default) and
tokenized with its tokenizer, so prompt lengths vary and the batch is left-padded.

Both modes run `hfjax.eval.generate.greedy_generate` (one jitted loop):
  cache     one prefill pass over the prompts, then one single-token pass per new token;
  nocache   every step recomputes the forward pass over the whole [B, P + N] buffer.
Each mode is run `--warmup` times untimed first (the first call compiles; its compile time,
trace + lowering + XLA compile as reported by jax.monitoring, is printed separately), then timed
`--repeats` times (median and best reported; on a shared machine the best is the least
disturbed). The loop always runs all N steps (rows that hit EOS keep decoding padding), so
"new tokens/s" is B * N / seconds; the tokens rows emitted up to and including their EOS are
reported as well. Recomputation costs about N full forward passes over B * (P + N) tokens, which
on a 2-core CPU is tens of minutes at 32 x 48; `--nocache_max_new_tokens` measures it with fewer
new tokens (say so when quoting it), and its output is checked against the cached run's prefix.
Every figure is printed with the hardware, load average, precision and sizes that produced it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hfjax import host, models
from hfjax.data import synthetic, templates
from hfjax.eval.generate import greedy_generate

_MODEL = flags.DEFINE_string("model", None, "HF folder or .gguf (default: embedded SmolLM2)")
_BATCH = flags.DEFINE_integer("batch", 32, "prompts per batch")
_PROMPT_LEN = flags.DEFINE_integer(
    "prompt_len", 0, "longest prompt (tokens) to draw; 0: no limit (SmolLM2: 37 to ~90 tokens)"
)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "new tokens per row (cached mode)")
_NOCACHE_NEW = flags.DEFINE_integer(
    "nocache_max_new_tokens", 0, "new tokens per row without the cache (0: --max_new_tokens)"
)
_MODES = flags.DEFINE_list("modes", ["cache", "nocache"], "which of cache,nocache to run")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute precision")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed runs per mode (the first one compiles)")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed runs per mode (cached)")
_NOCACHE_REPEATS = flags.DEFINE_integer("nocache_repeats", 1, "timed runs without the cache")
_SEED = flags.DEFINE_integer("seed", 0, "which prompts are drawn")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_s = [0.0]


def _on_event(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_s[0] += duration


def hardware() -> dict:
    cpu = host.cpu_model()
    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "jax_version": jax.__version__,
    }


def chat_prompts(tokenizer, n: int, max_len: int, seed: int) -> list[list[int]]:
    """`n` templated benign prompts (questions and classification tasks), token ids."""
    rows = (
        synthetic.benign_instruction_rows(seed)
        + synthetic.sentiment_rows()
        + synthetic.topic_rows()
    )
    template = templates.get_template("chat" if tokenizer.chat_template else "alpaca")
    order = np.random.default_rng(seed).permutation(len(rows))
    prompts = []
    for i in order:
        text = template.prompt(rows[i], tokenizer)
        ids = tokenizer(text, add_special_tokens=template.add_special_tokens)["input_ids"]
        if max_len <= 0 or len(ids) <= max_len:
            prompts.append(ids)
        if len(prompts) == n:
            return prompts
    raise ValueError(f"only {len(prompts)} prompts of at most {max_len} tokens; need {n}")


def run_mode(cfg, params, prompts, new_tokens: int, use_cache: bool, repeats: int) -> dict:
    def once():
        t0 = time.perf_counter()
        out = greedy_generate(cfg, params, prompts, max_new_tokens=new_tokens, use_cache=use_cache)
        return time.perf_counter() - t0, out

    _compile_s[0] = 0.0
    warm = [once() for _ in range(_WARMUP.value)]
    compile_s = _compile_s[0]
    _compile_s[0] = 0.0
    timed = [once() for _ in range(repeats)]
    if _compile_s[0] > 0:
        raise RuntimeError(f"timed runs recompiled ({_compile_s[0]:.1f} s); raise --warmup")
    times = [t for t, _ in timed]
    out = timed[-1][1]
    med = statistics.median(times)
    b = len(prompts)
    emitted = sum(len(r) for r in out)
    return {
        "max_new_tokens": new_tokens,
        "first_call_s": warm[0][0] if warm else None,
        "compile_s": compile_s,
        "times_s": times,
        "median_s": med,
        "spread": (max(times) - min(times)) / med,
        "new_tokens_per_s": b * new_tokens / med,
        "best_new_tokens_per_s": b * new_tokens / min(times),  # least disturbed by other load
        "emitted_tokens": emitted,
        "emitted_tokens_per_s": emitted / med,
        "s_per_step": med / new_tokens,  # prefill included in cached mode
        "outputs": out,
    }


def main(argv):
    del argv
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    path = _MODEL.value or models.default_model_path()
    dtype = jnp.dtype(_DTYPE.value)
    cfg, params = models.load_pretrained(path, dtype=dtype)
    cfg = cfg.replace(dtype=_DTYPE.value)
    tokenizer = models.load_tokenizer(path)
    prompts = chat_prompts(tokenizer, _BATCH.value, _PROMPT_LEN.value, _SEED.value)
    lengths = [len(p) for p in prompts]
    nocache_new = _NOCACHE_NEW.value or _MAX_NEW.value
    result = {
        "hardware": hardware(),
        "load_average_start": list(os.getloadavg()),
        "precision": _DTYPE.value,
        "sizes": {
            "model": str(path),
            "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "batch": _BATCH.value,
            "prompt_tokens_min_mean_max": [min(lengths), float(np.mean(lengths)), max(lengths)],
            "padded_prompt_width": max(lengths),
            "max_new_tokens": {"cache": _MAX_NEW.value, "nocache": nocache_new},
        },
        "modes": {},
    }
    for mode in _MODES.value:
        if mode not in ("cache", "nocache"):
            raise ValueError(f"unknown mode {mode!r} (cache, nocache)")
        cached = mode == "cache"
        result["modes"][mode] = run_mode(
            cfg, params, prompts,
            _MAX_NEW.value if cached else nocache_new,
            cached,
            _REPEATS.value if cached else _NOCACHE_REPEATS.value,
        )
    result["load_average_end"] = list(os.getloadavg())
    modes = result["modes"]
    if "cache" in modes and "nocache" in modes:
        k = min(modes["cache"]["max_new_tokens"], modes["nocache"]["max_new_tokens"])
        result["nocache_equals_cache"] = [r[:k] for r in modes["cache"]["outputs"]] == [
            r[:k] for r in modes["nocache"]["outputs"]
        ]
        result["cache_speedup_per_step"] = (
            modes["nocache"]["s_per_step"] / modes["cache"]["s_per_step"]
        )
    sample = tokenizer.decode(modes[next(iter(modes))]["outputs"][0]) if modes else ""
    for m in modes.values():
        m.pop("outputs")
    if _JSON.value:
        print(json.dumps(result))
        return
    hw, sz = result["hardware"], result["sizes"]
    lo, mean, hi = sz["prompt_tokens_min_mean_max"]
    print(
        f"# {hw['cpu']} ({hw['cpu_cores']} cores), jax {hw['jax_version']} on "
        f"{hw['jax_backend']}:{hw['device']} x{hw['devices']}, {result['precision']}, "
        f"load avg {result['load_average_start'][0]:.1f} -> {result['load_average_end'][0]:.1f}"
    )
    print(
        f"# {Path(sz['model']).name} ({sz['params'] / 1e6:.0f}M params), batch {sz['batch']}, "
        f"prompts {lo}..{hi} tokens (mean {mean:.1f}) left-padded to {sz['padded_prompt_width']}"
    )
    for name, m in modes.items():
        times = ", ".join(f"{t:.1f}" for t in m["times_s"])
        print(
            f"{name:8s} {sz['batch']} x {m['max_new_tokens']:3d} new: "
            f"{m['new_tokens_per_s']:7.1f} new tok/s (best {m['best_new_tokens_per_s']:.1f})  "
            f"({m['median_s']:.1f} s, runs [{times}] s, "
            f"{m['s_per_step']:.3f} s/step; emitted {m['emitted_tokens']} tok up to EOS "
            f"= {m['emitted_tokens_per_s']:.1f}/s); compile {m['compile_s']:.1f} s, "
            f"first call {m['first_call_s']:.1f} s"
        )
    if "nocache_equals_cache" in result:
        print(
            f"cache vs recompute: same tokens {result['nocache_equals_cache']}, "
            f"{result['cache_speedup_per_step']:.1f}x faster per step"
        )
    print(f"sample (row 0): {sample!r}")


if __name__ == "__main__":
    sys.exit(app.run(main))
