"""Check hfjax's HF weight IO against transformers, both ways (run with the hfjax python).

    python scripts/check_hf_roundtrip.py --torch-python /tmp/v311/bin/python [--cases llama gemma2]

For every case (a tiny random model of one family, built by transformers in a subprocess that
runs the torch python):
  1. transformers `save_pretrained` -> hfjax `load_hf` -> `forward`; compare with the logits
     transformers computed on the same tokens;
  2. hfjax `save_hf` (single file and sharded) -> transformers `from_pretrained` -> logits;
     compare with hfjax's.
Prints max |Δ| per case and direction; exits 1 if any exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Runs under the torch python. argv: mode ("make" | "logits"), case, model dir, ids .npy, out .npy
_TORCH_SIDE = r"""
import json, sys
import numpy as np, torch, transformers
mode, case, folder, ids_path, out_path = sys.argv[1:6]
common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
cases = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=16,
                                               sliding_window=4)),
}
torch.manual_seed(0)
if mode == "make":
    cls, extra = cases[case]
    cfg = cls(**common, **extra)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # larger than default init so all parts matter
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p) + (0.0 if case == "gemma2" else 1.0))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
ids = torch.from_numpy(np.load(ids_path)).long()
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().numpy()
np.save(out_path, logits)
"""

CASES = ("llama", "llama_tied", "mistral", "qwen2", "gemma2")


def _torch(python: str, mode: str, case: str, folder: Path, ids: np.ndarray, work: Path):
    ids_path, out_path = work / "ids.npy", work / f"logits_{mode}.npy"
    np.save(ids_path, ids)
    subprocess.run(
        [python, "-c", _TORCH_SIDE, mode, case, str(folder), str(ids_path), str(out_path)],
        check=True,
    )
    return np.load(out_path)


def check_case(case: str, torch_python: str, work: Path) -> dict[str, float]:
    import jax.numpy as jnp

    from hfjax.models.decoder import forward
    from hfjax.models.hf_io import load_hf, save_hf

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 10)).astype(np.int64)
    hf_dir = work / "hf"
    want = _torch(torch_python, "make", case, hf_dir, ids, work)
    cfg, params = load_hf(hf_dir)
    ours = np.asarray(forward(cfg, params, jnp.asarray(ids, jnp.int32)))
    result = {"hf->hfjax": float(np.max(np.abs(ours - want)))}
    for label, shard in (("hfjax->hf", None), ("hfjax->hf sharded", 40_000)):
        out = work / f"ours_{shard}"
        save_hf(out, cfg, params, shard_size_bytes=shard)
        if shard is not None:
            assert (out / "model.safetensors.index.json").is_file()
            assert len(json.loads((out / "model.safetensors.index.json").read_text())
                       ["weight_map"]) > 0
        got = _torch(torch_python, "logits", case, out, ids, work)
        result[label] = float(np.max(np.abs(got - ours)))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", required=True, help="a python with torch + transformers")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    worst = 0.0
    for case in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            res = check_case(case, args.torch_python, Path(tmp))
        worst = max(worst, *res.values())
        print(f"{case:12s} " + "  ".join(f"{k}: max|Δ|={v:.2e}" for k, v in res.items()))
    print(f"worst max|Δ| = {worst:.2e} (tol {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
