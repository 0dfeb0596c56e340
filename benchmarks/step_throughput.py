"""Train-step throughput of hfjax (and, with --torch_python, PyTorch + PEFT) per method.

    python benchmarks/step_throughput.py [--model PATH] [--batch 4] [--seq 128]
        [--prompt_fraction 0] [--methods lora_sft,booster,...] [--json]

--methods: plain LoRA SFT ("lora_sft") and gradient defenses (default: lora_sft and every
gradient defense in hfjax's registry, with the registry's default hyper-parameters). The hfjax
step of a method is `_hfjax_methods.make_method` (shared with `defense_step_time.py`); the torch
step is `torch_reference.py --method NAME`, which implements each defense the way the public
PyTorch code does (hooks, plain autograd, torch.optim.AdamW) with the same hyper-parameters and
the same named batches ("user", "align", "harmful": numpy seeds from `batch_seeds`, checked
against the torch side's). Tokens per second = batch·seq of the "user" batch / step time on both
stacks, whatever batches the method reads.

--prompt_fraction F makes the first round(F·seq) tokens of every row prompt tokens (label −100)
on both stacks, as in instruction data; hfjax runs the LM head only over the chunks of tokens that
carry a loss (`train.loss.head_cross_entropy`), HF computes the logits at every position. The
default, 0, makes every token a response token, so both stacks do the same head work.

Same model, LoRA config (r, alpha, targets), batch, sequence length and precision on both stacks;
warm-up steps excluded; the median over the timed steps. Every figure is printed with the
hardware, precision and sizes that produced it.

--repeats N alternates the two stacks N times per method (hfjax, torch, hfjax, torch, ...) so
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
import sys

import _hfjax_methods as common
import jax
import jax.numpy as jnp
from _hfjax_methods import LORA_SFT, batch_seeds, gradient_defenses, make_method
from absl import app, flags

from hfjax import defenses, host, models

_STEPS = flags.DEFINE_integer("steps", 8, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed warm-up steps (compilation)")
_REMAT = flags.DEFINE_bool("remat", False, "rematerialize each layer in the backward pass")
_UNROLL = flags.DEFINE_integer("scan_unroll", 1, "layers per scan iteration (ModelConfig."
                               "scan_unroll; the layer count unrolls fully)")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python",
    os.environ.get("HFJAX_TORCH_PYTHON"),
    "a python with torch, transformers and peft: runs the PyTorch + PEFT reference",
)
_METHODS = flags.DEFINE_list(
    "methods", [LORA_SFT, *gradient_defenses()],
    "lora_sft and/or gradient defenses of hfjax's registry (each timed on both stacks)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")
_REPEATS = flags.DEFINE_integer("repeats", 1, "alternate the two stacks this many times")
_KEEP_FREED = flags.DEFINE_bool(
    "keep_freed_memory", True,
    "glibc keeps freed memory mapped (hfjax.host.keep_freed_memory) in the hfjax process",
)
_TORCH_MALLOC_ENV = flags.DEFINE_bool(
    "torch_malloc_env", False, "run the torch reference with hfjax.host.MALLOC_ENV as well"
)


def hfjax_setup(path):
    """(cfg, frozen params, their shardings, LoRA init, mesh): shared by every method."""
    cfg, params = models.load_pretrained(path, dtype=jnp.dtype(common.DTYPE.value))
    cfg = cfg.replace(dtype=common.DTYPE.value, remat=_REMAT.value, scan_unroll=_UNROLL.value,
                      attention=common.ATTENTION.value)
    return common.lora_setup(cfg, params)


def summarize(times: list[float]) -> dict:
    """Median step time and throughput, with the spread of the timed steps."""
    return common.step_summary(times, common.BATCH.value * common.SEQ.value)


# hfjax hyper-parameter -> torch_reference.py flag, where the names differ (or None: not a flag)
_TORCH_FLAGS = {("booster", "alpha"): "alpha_booster", ("booster_perturb_aware", "alpha"):
                "alpha_booster", ("repnoise", "alpha"): "alpha_repnoise",
                ("repnoise", "harmful"): None, ("repnoise", "variant"): None,
                ("repnoise", "pairing"): None, ("lisa", "proximal_warmup"): None,
                ("safe_instr", "align_batch_size"): None}


def hyperparameters(method: str) -> dict:
    """The hyper-parameters both stacks run `method` with (`common.benchmark_hparams`)."""
    return common.benchmark_hparams(method)


def torch_hparam_flags(method: str) -> list[str]:
    """hfjax's default hyper-parameters of `method` as torch_reference.py flags, so that both
    stacks run the same values even if the registry's defaults change."""
    out = []
    for name, value in hyperparameters(method).items():
        flag = _TORCH_FLAGS.get((method, name), name)
        if flag is None:
            continue
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out += [f"--{flag}", str(value)]
    return out


def torch_step(path, method: str) -> dict | None:
    """One run of the PyTorch + PEFT reference for `method` (a subprocess): its JSON, with
    step_times_s. Its named batches must be seeded as hfjax's (`batch_seeds`)."""
    if not _TORCH_PYTHON.value:
        return None
    env = host.MALLOC_ENV if _TORCH_MALLOC_ENV.value else None
    ref = common.run_torch_reference(
        _TORCH_PYTHON.value,
        ["--method", method, *torch_hparam_flags(method), "--model", str(path),
         *common.torch_reference_flags(steps=_STEPS.value, warmup=_WARMUP.value)],
        env)
    want = batch_seeds(method)
    if ref.get("batch_seeds") != want:
        raise RuntimeError(f"{method}: torch batch seeds {ref.get('batch_seeds')} != hfjax's "
                           f"{want}")
    prompt = common.prompt_tokens(common.SEQ.value)
    if ref.get("prompt_tokens") != prompt:
        raise RuntimeError(f"{method}: torch prompt tokens per row {ref.get('prompt_tokens')} "
                           f"!= hfjax's {prompt}")
    return ref


def time_method(setup, path, method: str) -> dict:
    """One method on both stacks, alternating per repeat: its "methods" entry."""
    run_one, fn = make_method(*setup, method, batch=common.BATCH.value, seq=common.SEQ.value)
    hf_times, torch_times, ratios = [], [], []
    for _ in range(_REPEATS.value):
        times = common.timed_steps(run_one, warmup=_WARMUP.value, steps=_STEPS.value)
        hf_times += times
        ref = torch_step(path, method)
        if ref is not None:
            torch_times += ref["step_times_s"]
            ratios.append(statistics.median(ref["step_times_s"]) / statistics.median(times))
    declared = "1F+1B" if method == LORA_SFT else str(defenses.get(method).cost)
    entry = {"declared_cost": declared, "hyperparameters": hyperparameters(method),
             "batch_seeds": batch_seeds(method),
             "hfjax": {**summarize(hf_times), "compiles": fn.compiles}}
    if torch_times:
        entry["torch_peft"] = summarize(torch_times)
        entry["ratio"] = entry["hfjax"]["tokens_per_s"] / entry["torch_peft"]["tokens_per_s"]
        entry["ratio_per_repeat"] = ratios
    return entry


def main(argv):
    del argv
    # before JAX starts its threads: a thread takes its malloc arena when it first allocates
    kept = host.keep_freed_memory() if _KEEP_FREED.value else False
    try:  # before the model loads
        prompt = common.prompt_tokens(common.SEQ.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    path = common.MODEL.value or models.default_model_path()
    result = {
        "hardware": common.device_hardware(),
        "precision": common.DTYPE.value,
        "sizes": {
            "model": str(path),
            "batch": common.BATCH.value,
            "seq": common.SEQ.value,
            "prompt_fraction": common.PROMPT_FRACTION.value,
            "prompt_tokens_per_row": prompt,
            "lora_rank": common.RANK.value,
            "lora_alpha": common.ALPHA.value,
            "targets": common.TARGETS.value,
            "timed_steps": _STEPS.value,
            "repeats": _REPEATS.value,
            "warmup_steps": _WARMUP.value,
            "remat": _REMAT.value,
            "scan_unroll": _UNROLL.value,
            "attention": common.ATTENTION.value,
        },
        "keep_freed_memory": kept,
        "torch_malloc_env": _TORCH_MALLOC_ENV.value,
        "methods": {},
    }
    unknown = [m for m in _METHODS.value if m != LORA_SFT and m not in gradient_defenses()]
    if unknown:
        raise app.UsageError(f"--methods {unknown}: not lora_sft or a gradient defense "
                             f"({gradient_defenses()})")
    setup = hfjax_setup(path)
    try:
        result["sizes"]["attention_kernel"] = common.attention_kernel(setup[0])
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    for method in _METHODS.value:
        result["methods"][method] = time_method(setup, path, method)
    if _JSON.value:
        print(json.dumps(result))
        return
    hw = result["hardware"]
    print(
        f"# {hw['cpu']} ({hw['cpu_cores']} cores), jax {jax.__version__} on "
        f"{hw['jax_backend']}:{hw['device']} x{hw['devices']}, {common.sizes_text()}"
    )
    for name, e in result["methods"].items():
        hf = e["hfjax"]
        line = (f"{name:14s} {e['declared_cost']:5s} hfjax {hf['tokens_per_s']:8.1f} tok/s "
                f"({hf['step_s']:.3f} s/step)")
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
