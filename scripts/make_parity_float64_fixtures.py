"""Float64 golden logits from HF transformers for the parity fixture models (torch python).

    /tmp/v311/bin/python scripts/make_parity_float64_fixtures.py --out tests/fixtures/parity_float64

For every case folder of tests/fixtures/parity/ (made by make_parity_fixtures.py) it loads
<case>/model in float64 and writes

    <out>/<case>.npz    logits [B, T, V] float64: transformers run ROW BY ROW on the unpadded
                        sequences of <case>/golden.npz's batch, zeros at pad positions;
                        model_sha256: the sha256 of the model.safetensors it ran.
    <out>/meta.json     transformers / torch versions and, per case, how many float tensors the
                        forward passes made (all float64).

transformers computes RMSNorm, RoPE (inverse frequencies and cos/sin) and the attention softmax
in float32 whatever the model's dtype. Here the model is built and run under `Float64Mode`, a
torch function mode that turns every request for a narrower float dtype (dtype=torch.float32,
.float(), .to(torch.float32)) into float64, and that fails if a forward pass makes any float
tensor that is not float64: the logits are those of the same formulas in float64 throughout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "fixtures" / "parity"
sys.path.insert(0, str(ROOT))
from hfjax.eval.report import atomic_open  # noqa: E402  (numpy + stdlib only)

CASES = ("llama", "llama3", "smollm2", "mistral", "qwen2", "gemma2")
_NARROW = (torch.float32, torch.float16, torch.bfloat16)


class Float64Mode(TorchFunctionMode):
    """Every narrower float dtype requested becomes float64; with `check` on, a float tensor
    of another dtype coming out of any torch call raises (and `made` counts float tensors)."""

    def __init__(self):
        super().__init__()
        self.check = False
        self.made = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") in _NARROW:
            kwargs["dtype"] = torch.float64
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        if func is torch.Tensor.to:
            args = tuple(torch.float64 if a in _NARROW else a for a in args)
        out = func(*args, **kwargs)
        if self.check:
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    if t.dtype != torch.float64:
                        raise RuntimeError(f"{func} made a {t.dtype} tensor")
                    self.made += 1
        return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def case_logits(folder: Path) -> tuple[np.ndarray, int]:
    """(float64 row-by-row logits of the case's golden batch, float tensors checked)."""
    with np.load(folder / "golden.npz") as z:
        ids, mask = z["input_ids"], z["attention_mask"]
    mode = Float64Mode()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with mode:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder / "model", dtype=torch.float64, attn_implementation="eager").eval()
            out = np.zeros((*ids.shape, model.config.vocab_size), np.float64)
            mode.check = True
            for b in range(ids.shape[0]):
                keep = mask[b].astype(bool)
                x = torch.from_numpy(ids[b][keep].astype(np.int64))[None]
                logits = model(input_ids=x).logits[0]
                out[b, keep] = logits.numpy()
    finally:
        torch.set_default_dtype(default)
    if not all(p.dtype == torch.float64 for p in model.parameters()):
        raise RuntimeError(f"{folder}: the model has parameters that are not float64")
    return out, mode.made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "parity_float64")
    ap.add_argument("--parity", type=Path, default=PARITY, help="the parity fixture folder")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "float64_tensors_checked": {}}
    for case in args.cases:
        folder = args.parity / case
        logits, made = case_logits(folder)
        sha = _sha256(folder / "model" / "model.safetensors")
        with atomic_open(args.out / f"{case}.npz", "wb") as f:
            np.savez_compressed(f, logits=logits, model_sha256=np.array(sha))
        meta["float64_tensors_checked"][case] = made
        print(f"{case:8s} {made} float64 tensors, logit std {logits[logits != 0].std():.3f}",
              flush=True)
    text = json.dumps(meta, indent=2) + "\n"
    with atomic_open(args.out / "meta.json") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
