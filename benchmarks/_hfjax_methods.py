"""One hfjax train step per method (plain LoRA SFT or a gradient defense), for the benchmarks.

Shared by `defense_step_time.py`, `step_throughput.py` and `gpu_mfu.py`. Every method runs
hfjax's jitted train step with the step options its registry entry gives
(`defenses.step_options`) and the registry's default hyper-parameters; every named batch it
reads ("user", and the defense's `spec.batches`) is a [batch, seq] block of numpy
`default_rng(seed)` random ids whose first `prompt_tokens(seq)` positions of each row are prompt
tokens (label −100, --prompt_fraction, default none) and the rest response tokens. Seeds:
`batch_seeds` (the PyTorch reference, `torch_reference.py`, builds the same batches from the
same seeds and --prompt_fraction).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from hfjax import defenses, host, models, sharding
from hfjax.defenses.compose import DefenseChoice
from hfjax.models import attention as attention_lib
from hfjax.models import lora as lora_lib
from hfjax.train import builder, optim, state, step

# Model, LoRA, batch and precision flags shared by the benchmarks that import this module.
MODEL = flags.DEFINE_string("model", None, "HF folder or .gguf (default: embedded SmolLM2)")
BATCH = flags.DEFINE_integer("batch", 4, "rows of every named batch")
SEQ = flags.DEFINE_integer("seq", 128, "sequence length")
PROMPT_FRACTION = flags.DEFINE_float(
    "prompt_fraction", 0.0,
    "leading fraction of each row that is prompt (label -100, no loss); the rest is response. "
    "0: every token is a response token")
RANK = flags.DEFINE_integer("rank", 8, "LoRA rank")
ALPHA = flags.DEFINE_float("alpha", 16.0, "LoRA alpha")
TARGETS = flags.DEFINE_list("targets", list(models.PROJECTIONS), "LoRA target projections")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute precision")
ATTENTION = flags.DEFINE_enum(
    "attention", "auto", list(models.ATTENTION_IMPLEMENTATIONS),
    "hfjax's attention kernel (ModelConfig.attention): auto = cuDNN flash attention on a GPU in "
    "bf16, else XLA")


def sizes_text() -> str:
    """Precision, batch and LoRA of a run, for the header line of a benchmark's table."""
    prompt = (f" ({prompt_tokens(SEQ.value)} prompt tokens per row)"
              if PROMPT_FRACTION.value else "")
    return (f"{DTYPE.value}, batch {BATCH.value} x {SEQ.value}{prompt}, LoRA r={RANK.value} "
            f"alpha={ALPHA.value:g} on {','.join(TARGETS.value)}")


def prompt_tokens(seq: int) -> int:
    """Leading prompt tokens per row: round(--prompt_fraction · seq), which must leave at least
    one response token (ValueError otherwise)."""
    fraction = PROMPT_FRACTION.value
    tokens = round(fraction * seq) if 0.0 <= fraction < 1.0 else -1
    if not 0 <= tokens < seq:
        raise ValueError(f"--prompt_fraction must be in [0, 1) and leave a response token in "
                         f"each row of --seq {seq}, got {fraction}")
    return tokens


def attention_kernel(cfg) -> str:
    """The kernel ("xla" or "cudnn") --attention gives cfg's training step at --seq; ValueError
    when an explicit "cudnn" cannot run here."""
    return attention_lib.choose_kernel(cfg.replace(attention=ATTENTION.value), dtype=cfg.dtype,
                                       t=SEQ.value, s=SEQ.value, cached=False)


LORA_SFT = "lora_sft"


def gradient_defenses() -> list[str]:
    """The registry's gradient-level defenses, sorted."""
    return [n for n in defenses.available() if defenses.get(n).level == "gradient"]


def batch_seeds(name: str | None) -> dict[str, int]:
    """{batch name: numpy seed} of a method (None or "lora_sft": plain LoRA SFT).

    names = ("user", *spec.batches), seeds their positions; a name listed twice keeps its last
    position (e.g. Lisa's batches ("align", "user") give {"user": 2, "align": 1}).
    """
    spec = defenses.get(name) if name and name != LORA_SFT else None
    names = ("user", *(spec.batches if spec else ()))
    return {n: i for i, n in enumerate(names)}


def random_batch(vocab: int, seed: int, batch: int, seq: int, prompt: int = 0) -> dict:
    """[batch, seq] ids from default_rng(seed); the first `prompt` positions of each row are
    prompt tokens (label −100), the others response tokens."""
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)
    labels = ids.copy()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


# Where the PyTorch reference (torch_reference.py) implements another form of a method than the
# registry's default, the benchmark runs that form on both stacks: RepNoise's label-masked
# objective on unpaired batches (the official paired objective has no torch step here yet).
BENCHMARK_HPARAMS = {"repnoise": {"variant": "labels", "pairing": "unpaired"}}


def benchmark_hparams(name: str | None) -> dict:
    """The hyper-parameters a benchmark runs `name` with: the registry's defaults, with
    `BENCHMARK_HPARAMS`' forms."""
    if not name or name == LORA_SFT:
        return {}
    return {**defenses.get(name).hyperparameters, **BENCHMARK_HPARAMS.get(name, {})}


def make_method(cfg, frozen, frozen_sh, lora, mesh, name: str | None, *, batch: int, seq: int):
    """(run_one, fn): run_one() runs one step of `name` (None or "lora_sft": plain LoRA SFT)
    and returns its wall time in seconds; fn is the jitted step (`fn.compiles`).

    AdamW lr 1e-4 constant, weight decay 0, no clipping (the PyTorch reference's optimizer),
    with the defense's transform (`benchmark_hparams`) chained before it.
    """
    del frozen_sh  # the builder places the state; `frozen` is already placed
    chosen = [DefenseChoice.named(name, **benchmark_hparams(name))] \
        if name and name != LORA_SFT else []
    training = builder.build_training(
        cfg, lora, mesh=mesh, defenses=chosen,
        optimizer=optim.OptimizerConfig(learning_rate=1e-4, total_steps=1000))
    fn, st = training.step, training.state
    placed = step.put_batches(
        {n: random_batch(cfg.vocab_size, s, batch, seq, prompt_tokens(seq))
         for n, s in batch_seeds(name).items()},
        mesh)
    holder = {"state": st}

    def run_one() -> float:
        t0 = time.perf_counter()
        holder["state"], metrics = fn(holder["state"], frozen, placed)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0

    return run_one, fn


# --- helpers for a benchmark script: set-up, timing, hardware, the torch subprocess ------------


def lora_setup(cfg, params=None, *, seed: int = 0):
    """(cfg, frozen params, their shardings, LoRA init, mesh): `make_method`'s first arguments.

    One mesh over every device (FSDP axis); the frozen params placed with their shardings, or,
    with params None, random ones (`models.init_random` in cfg.dtype, key `seed`) created
    sharded by one jitted call. LoRA from the shared flags (RANK, ALPHA, TARGETS), key 0.
    """
    mesh = sharding.make_mesh(1, -1, 1)
    frozen_sh = state.params_shardings(cfg, mesh)
    if params is None:
        init = jax.jit(lambda k: models.init_random(cfg, k, jnp.dtype(cfg.dtype)),
                       out_shardings=frozen_sh)
        frozen = init(jax.random.key(seed))
    else:
        frozen = jax.device_put(params, frozen_sh)
    lora = lora_lib.init(cfg, jax.random.key(0), rank=RANK.value, alpha=ALPHA.value,
                         targets=tuple(TARGETS.value))
    return cfg, frozen, frozen_sh, lora, mesh


def device_hardware() -> dict:
    """JAX backend, device kind and count, host CPU model and cores of this process."""
    return {"jax_backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "cpu": host.cpu_model(), "cpu_cores": os.cpu_count()}


def timed_steps(run_one, *, warmup: int, steps: int) -> list[float]:
    """`warmup` untimed calls of run_one (compilation), then the wall times of `steps` calls."""
    for _ in range(warmup):
        run_one()
    return [run_one() for _ in range(steps)]


def step_summary(times: list[float], tokens_per_step: int) -> dict:
    """Median step time and tokens/s over the timed steps, with their spread."""
    med = statistics.median(times)
    return {"step_s": med, "tokens_per_s": tokens_per_step / med, "steps_per_s": 1 / med,
            "step_s_min": min(times), "step_s_max": max(times), "timed_steps": len(times)}


def torch_reference_flags(*, steps: int, warmup: int) -> list[str]:
    """The shared batch/LoRA/precision flags and the step counts as `torch_reference.py` flags."""
    values = {"batch": BATCH.value, "seq": SEQ.value, "rank": RANK.value, "alpha": ALPHA.value,
              "targets": ",".join(TARGETS.value), "dtype": DTYPE.value, "steps": steps,
              "warmup": warmup, "prompt_tokens": prompt_tokens(SEQ.value)}
    return [a for name, v in values.items() for a in (f"--{name}", str(v))]


def run_torch_reference(python: str, args: list[str], env: dict | None = None) -> dict:
    """`python torch_reference.py args...` in a subprocess: the JSON of its last stdout line."""
    script = Path(__file__).with_name("torch_reference.py")
    out = subprocess.run([python, str(script), *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"torch_reference.py {' '.join(args)} failed ({out.returncode}):\n"
                           f"{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
