"""Golden outputs of the embedded SmolLM2 GGUF from HF transformers (PyTorch), for parity tests.

Run with the torch environment (never imported by hfjax or its tests):

    /tmp/v311/bin/python scripts/make_smollm2_fixture.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--out tests/fixtures/smollm2]

transformers loads the GGUF (dequantized to float32, q/k rows un-permuted by its own loader),
tokenizes one benign chat prompt through the GGUF's chat template and records:

  golden.json   prompt, chat text, token ids, the 20 greedy tokens (`generate`, do_sample=False),
                the ids of a few tokenizer test strings, versions, the GGUF's size and sha256;
  logits.npz    float32: top-k (k=16) indices and values of the logits at every position, the full
                logits at the last position, and a strided vocabulary slice (every 97th id) at
                every position, which is enough to compare all positions at < 1 MB.

Files are written to a temp name and moved into place with os.replace.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from hfjax.eval.report import atomic_open  # noqa: E402  (numpy + stdlib only)

PROMPT = "Name three facts about Paris, the capital of France."
NEW_TOKENS = 20
TOP_K = 16
VOCAB_STRIDE = 97
# Benign strings that exercise the tokenizer: digits, whitespace runs, unicode, special tokens.
TOKENIZER_TEXTS = [
    "x 2024 hello  world\n\nok <|im_end|>",
    "h\u00e9llo w\u00f6rld \u65e5\u672c \U0001f642",
    "I'm   here\t\ttabs\r\n",
    "12345.678 + 99 = ?",
    "<|im_start|>user\nHi<|im_end|>",
    "  leading spaces",
    "def f(x):\n    return x**2  # comment",
    "\u00c0\u00c9\u00ce\u00f5\u00fc \u00df \u2211 \u222b \u2260",
    "don't WON'T they'll",
    "<repo_name>a<file_sep>",
]


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=pathlib.Path, help="path of the SmolLM2 GGUF file")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/fixtures/smollm2"))
    args = parser.parse_args()
    gguf_path = args.gguf.resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()

    messages = [{"role": "user", "content": PROMPT}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().numpy()  # [T, V]
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id,
        )
    new_tokens = out[0, ids.shape[1]:].tolist()

    top_idx = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_K].astype(np.int32)
    top_val = np.take_along_axis(logits, top_idx, axis=-1).astype(np.float32)
    golden = {
        "prompt": PROMPT,
        "chat_text": text,
        "input_ids": ids[0].tolist(),
        "greedy_new_tokens": new_tokens,
        "greedy_text": tok.decode(new_tokens),
        "tokenizer_texts": TOKENIZER_TEXTS,
        "tokenizer_ids": [tok(t, add_special_tokens=True)["input_ids"] for t in TOKENIZER_TEXTS],
        "top_k": TOP_K,
        "vocab_stride": VOCAB_STRIDE,
        "gguf_file": name,
        "gguf_size": gguf_path.stat().st_size,
        "gguf_sha256": sha256(gguf_path),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "top_indices": top_idx,
        "top_values": top_val,
        "last_logits": logits[-1].astype(np.float32),
        "strided_logits": logits[:, ::VOCAB_STRIDE].astype(np.float32),
    }

    with atomic_open(args.out / "logits.npz", "wb") as f:
        np.savez_compressed(f, **arrays)
    with atomic_open(args.out / "golden.json") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}/golden.json and logits.npz: {len(golden['input_ids'])} prompt tokens, "
          f"greedy {golden['greedy_text']!r}")


if __name__ == "__main__":
    main()
