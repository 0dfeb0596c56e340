"""Wall time per step of the training loop (`hfjax.train.loop.train`) against a loop that waits.

    python benchmarks/loop_overlap.py [--model PATH | --tiny] [--batch 4] [--seq 128]
        [--steps 12] [--rounds 3] [--dtype float32] [--json]

Both loops run the same jitted LoRA SFT step on the same batches: a `data.Batcher` over
random-length rows (prompt tokens label-masked, length buckets), so the host's per-step work is
the library's own (pick and pad the rows, place them, dispatch, read the metrics, write a
JSONL row).

- "waiting": `loop.train(overlap=False)` (the CPU default): build batch k, dispatch step k, wait
  for its metrics, write its row, then batch k + 1; the device idles while the host works.
- "overlapped": `loop.train(overlap=True)` (the accelerator default): step k + 1 is dispatched
  before step k's metrics are read.
- "step alone": the step on the first batch, placed once, each call waited: the device's
  time per step plus one dispatch, with no host work (a floor for both loops).

The figure per loop is the wall time of `--steps` steps (after one untimed run that compiles),
divided by the steps; rounds alternate the two loops and the median is reported. `--tiny` uses
a 2-layer, hidden-64 Llama with random weights, whose step takes milliseconds: the regime of a
small model on a fast accelerator, where the host's work is a visible part of a step.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _hfjax_methods as common
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hfjax import data, host, models
from hfjax.models.config import from_hf_dict
from hfjax.train import builder, loop, optim, step

_STEPS = flags.DEFINE_integer("steps", 12, "steps per timed run")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "timed runs of each loop, alternated")
_TINY = flags.DEFINE_bool("tiny", False, "a 2-layer hidden-64 Llama with random weights")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")

TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def main(argv):
    del argv
    host.keep_freed_memory()
    dtype = jnp.dtype(common.DTYPE.value)
    if _TINY.value:
        cfg = from_hf_dict(TINY).replace(dtype=common.DTYPE.value)
        model = "tiny random Llama (2 layers, hidden 64)"
        cfg, frozen, frozen_sh, lora, mesh = common.lora_setup(cfg)
    else:
        path = common.MODEL.value or models.default_model_path()
        cfg, params = models.load_pretrained(path, dtype=dtype)
        cfg = cfg.replace(dtype=common.DTYPE.value)
        model = str(path)
        cfg, frozen, frozen_sh, lora, mesh = common.lora_setup(cfg, params)

    rng = np.random.default_rng(0)
    seq, batch = common.SEQ.value, common.BATCH.value
    rows = []
    for _ in range(64 * batch):
        n = int(rng.integers(seq // 2, seq + 1))
        ids = rng.integers(0, cfg.vocab_size, n).astype(np.int32)
        labels = ids.copy()
        labels[: n // 3] = -100  # the prompt
        rows.append(data.Example(ids, labels))
    batcher = data.Batcher(rows, batch, seed=0, buckets=(seq // 2, seq))

    def batches(start):
        for b in batcher.batches(start):
            yield {"user": b}

    opt_cfg = optim.OptimizerConfig(learning_rate=1e-4, total_steps=10_000)
    fn = builder.build_training(cfg, lora, mesh=mesh, optimizer=opt_cfg).step

    def fresh():
        return builder.build_training(cfg, lora, mesh=mesh, optimizer=opt_cfg).state
    n = _STEPS.value

    def train(overlap: bool):
        return lambda st, p: loop.train(fn, st, frozen, batches, mesh=mesh, num_steps=n,
                                        metrics_path=p, progress=False, overlap=overlap)[0]

    placed = step.put_batches(next(batches(0)), mesh)

    def step_alone(st, p):
        """The step on one placed batch, each call waited: no host work but dispatch."""
        for _ in range(n):
            st, metrics = fn(st, frozen, placed)
            jax.block_until_ready(metrics)
        return st

    loops = {"waiting": train(False), "overlapped": train(True), "step alone": step_alone}
    times: dict[str, list[float]] = {k: [] for k in loops}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(_ROUNDS.value + 1):  # round 0 compiles every bucket: untimed
            for name, run in loops.items():
                st = fresh()
                t0 = time.perf_counter()
                jax.block_until_ready(run(st, Path(tmp) / f"{name}{r}.jsonl"))
                if r:
                    times[name].append((time.perf_counter() - t0) / n)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "hardware": common.device_hardware(), "precision": common.DTYPE.value,
        "sizes": {"model": model, "batch": batch, "seq": seq, "buckets": list(batcher.buckets),
                  "steps": n, "rounds": _ROUNDS.value, "lora_rank": common.RANK.value},
        "compiles": fn.compiles,
        "step_s": med, "all_step_s": times,
        "speedup": med["waiting"] / med["overlapped"],
    }
    if _JSON.value:
        print(json.dumps(result))
        return
    hw = result["hardware"]
    print(f"# {hw['device']} ({hw['jax_backend']}, {hw['cpu']}, {hw['cpu_cores']} cores), "
          f"{common.DTYPE.value}, {model}, batch {batch} x <= {seq}, {n} steps, "
          f"median of {_ROUNDS.value} rounds")
    for name, s in med.items():
        print(f"{name:>11}: {s * 1e3:9.2f} ms/step   (all: "
              f"{', '.join(f'{x * 1e3:.2f}' for x in times[name])})")
    print(f"    speedup: {result['speedup']:.3f}x")


if __name__ == "__main__":
    sys.exit(app.run(main))
