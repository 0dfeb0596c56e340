"""Size and cost of the offline default data: row counts, and the time to build it and to
tokenize it with the embedded SmolLM2 tokenizer (CPU only; prints the machine it ran on).

    python benchmarks/data_offline.py [--seed 0] [--max_length 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from hfjax import data, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_length", type=int, default=256)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")

    per_list = {name: len(data.harmful_prompts(name)) for name in ("harmbench", "advbench")}
    t = time.perf_counter()
    d = data.default_data(args.seed)
    build_s = time.perf_counter() - t
    print(f"harmful requests per list {per_list}, after dedupe "
          f"{len(d.harmful_train) + len(d.harmful_eval)}; refusal templates "
          f"{len(data.REFUSALS)}")
    print(f"splits {d.counts()}; built in {build_s:.3f} s")

    t = time.perf_counter()
    tok = models.load_tokenizer(models.default_model_path())
    print(f"SmolLM2 tokenizer loaded in {time.perf_counter() - t:.2f} s")
    sets = {
        "attack rows (harmful_train)": d.harmful_train,
        "refusal rows (harmful_train)": [data.refusal_row(r, args.seed) for r in d.harmful_train],
        "task_train": d.task_train,
        "task_test": d.task_test,
        "benign_train": d.benign_train,
    }
    for template in data.TEMPLATES:
        total_t, total_n = 0.0, 0
        for name, recs in sets.items():
            t = time.perf_counter()
            ex = data.tokenize_records(recs, tok, template, args.max_length)
            dt = time.perf_counter() - t
            total_t, total_n = total_t + dt, total_n + len(ex)
            lengths = np.array([len(e.input_ids) for e in ex])
            resp = np.array([int((e.labels != data.IGNORE_INDEX).sum()) for e in ex])
            print(f"  {template:6s} {name:30s} {len(ex):5d} rows {dt:6.3f} s  tokens mean "
                  f"{lengths.mean():5.1f} max {lengths.max():4d}  response mean {resp.mean():4.1f}")
        print(f"  {template}: {total_n} rows tokenized in {total_t:.2f} s")


if __name__ == "__main__":
    main()
