"""Load a run's models in transformers + PEFT as a new user would and compare their greedy
generations with hfjax's (the eval folders' generations_*.jsonl).

    /tmp/v311/bin/python scripts/check_adapters_travel.py RUN_DIR [--base PATH] [--limit N]

Every model is loaded from the files the run folder holds, following the adapter cards
(`hfjax.pipeline.portable`):
  aligned            align/aligned_model                        (the merged HF folder)
  aligned (adapter)  the base + align/adapter                   (PeftModel on the raw base)
  final              STAGE/aligned_model + STAGE/adapter        (STAGE: repair, else finetune)
The raw base is `base_model_name_or_path` of align/adapter: a GGUF file or a local folder of
that name is looked up at --base (default: run.json's model_path, where the run read it), a hub
id is passed to `from_pretrained`.
Prompts go through the saved tokenizer's chat template (the run must use --template=chat).
Prints `k of n` identical generations per model; exits 1 unless all are identical.
--logits OUT.npz also writes each model's last-position logits of the first harmful prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

EVALS = {"aligned": "eval_aligned", "aligned (adapter)": "eval_aligned", "final": "eval_final"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_base(adapter: Path, base_path: Path):
    """The raw base the adapter names: a GGUF file or local folder of that name found at
    `base_path` (where the run read it), else a hub id."""
    name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    if name.endswith(".gguf"):
        folder = base_path if base_path.is_dir() else base_path.parent
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    local = base_path if base_path.name == name and base_path.is_dir() else None
    return AutoModelForCausalLM.from_pretrained(local or name, dtype=torch.float32)


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def last_logits(model, tok, prompts: list[str]) -> np.ndarray:
    rows = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        rows.append(model(input_ids=ids).logits[0, -1].float().numpy())
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--base", type=Path, default=None,
                    help="the base's GGUF file, its folder, or the base HF folder")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts of each eval set")
    ap.add_argument("--logits", type=Path, default=None)
    ap.add_argument("--logit-prompts", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = args.run_dir
    manifest = json.loads((run / "run.json").read_text())
    flags = manifest["flags"]
    if flags.get("template", "chat") != "chat":
        raise SystemExit(f"{run} used --template={flags['template']}; this check needs chat")
    base_path = args.base or Path(manifest["model_path"])
    final_stage = run / ("repair" if (run / "repair" / "adapter").is_dir() else "finetune")
    tok = AutoTokenizer.from_pretrained(run / "align" / "adapter")
    loaders = {
        "aligned": lambda: AutoModelForCausalLM.from_pretrained(
            run / "align" / "aligned_model", dtype=torch.float32),
        "aligned (adapter)": lambda: PeftModel.from_pretrained(
            load_base(run / "align" / "adapter", base_path), run / "align" / "adapter"),
        "final": lambda: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(final_stage / "aligned_model",
                                                 dtype=torch.float32),
            final_stage / "adapter"),
    }
    ok, logits = True, {}
    for label, load in loaders.items():
        model = load().eval()
        same = total = 0
        settings = json.loads((run / EVALS[label] / "key.json").read_text())["eval"]
        for kind, budget in (("harmful", settings["max_new_tokens"]),
                             ("task", settings["task_max_new_tokens"])):
            rows = read_jsonl(run / EVALS[label] / f"generations_{kind}.jsonl")[:args.limit]
            answers = generate(model, tok, [r["prompt"] for r in rows], budget)
            same += sum(a == r["response"] for a, r in zip(answers, rows, strict=True))
            total += len(rows)
            if kind == "harmful" and args.logits:
                logits[label] = last_logits(model, tok, [r["prompt"] for r in
                                                         rows[:args.logit_prompts]])
        print(f"{label:18s} {same} of {total} greedy generations identical to hfjax's",
              flush=True)
        ok &= same == total
    if args.logits:
        np.savez(args.logits, **{k.replace(" ", "_").replace("(", "").replace(")", ""): v
                                 for k, v in logits.items()})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
