"""Time loading the embedded SmolLM2 GGUF and one jitted forward pass (float32).

    python benchmarks/gguf_smollm2.py [--batch 4] [--length 128] [--repeats 5]

Prints: GGUF load + dequantize time (load_gguf, until params are on device), tokenizer build
time, compile time, and the median forward time over `repeats` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from hfjax.models import decoder
    from hfjax.models.embedded import default_model_path
    from hfjax.models.gguf_io import load_gguf
    from hfjax.models.tokenizer import load_tokenizer

    path = default_model_path()
    jax.block_until_ready(jax.numpy.zeros(1))
    t = time.perf_counter()
    cfg, params = load_gguf(path)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    load_tokenizer(path)
    tok_s = time.perf_counter() - t

    fwd = jax.jit(functools.partial(decoder.forward, cfg))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.length))
    ids = jax.numpy.asarray(ids, jax.numpy.int32)
    t = time.perf_counter()
    jax.block_until_ready(fwd(params, ids))
    first_s = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(fwd(params, ids))
        times.append(time.perf_counter() - t)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"load_gguf: {load_s:.2f} s   tokenizer: {tok_s:.2f} s")
    med, best = statistics.median(times) * 1e3, min(times) * 1e3
    print(f"forward [{args.batch}x{args.length}] float32: first call (compile+run) "
          f"{first_s:.2f} s, median {med:.0f} ms (min {best:.0f} ms, {args.repeats} runs)")


if __name__ == "__main__":
    main()
