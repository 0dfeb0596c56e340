"""PyTorch + PEFT reference for `step_throughput.py`: LoRA SFT step time of the same model.

    python benchmarks/torch_reference.py --model PATH [--batch 4] [--seq 128] [--rank 8]
        [--alpha 16] [--targets q_proj,...] [--dtype float32] [--steps 8] [--warmup 2]

Run by a python that has torch, transformers and peft (never by the hfjax test environment).
The model is an HF folder or a .gguf file (transformers dequantizes it, as hfjax does). LoRA as
PEFT's `LoraConfig(r, lora_alpha, target_modules, lora_dropout=0)`; AdamW over the LoRA
parameters (lr 1e-4, weight decay 0, as hfjax's benchmark); loss = mean token CE over all tokens
(labels = input_ids, HF's shift inside the model); the same fixed random batch as hfjax
(numpy default_rng(0)). Torch keeps its default thread count. Warm-up steps are excluded and the
median step time is reported. The last stdout line is JSON {"step_s", "tokens_per_s",
"steps_per_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(path: Path, dtype: torch.dtype):
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(0)
    dtype = _DTYPES[args.dtype]
    model = load_model(args.model, dtype)
    model.config.use_cache = False
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                      target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, vocab, (args.batch, args.seq)).astype(np.int64))
    mask = torch.ones_like(ids)

    def run_one() -> float:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    for _ in range(args.warmup):
        run_one()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = run_one()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({
        "step_s": med, "tokens_per_s": args.batch * args.seq / med, "steps_per_s": 1 / med,
        "step_times_s": times, "loss": loss, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }))


if __name__ == "__main__":
    main()
