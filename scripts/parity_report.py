"""Print max |hfjax − transformers| logit differences per family (run with the hfjax python).

    /tmp/v312/bin/python scripts/parity_report.py
    /tmp/v312/bin/python scripts/parity_report.py --torch-python /tmp/v311/bin/python  # live

Reads the fixtures of scripts/make_parity_fixtures.py (default tests/fixtures/parity); with
--torch-python it first regenerates them with that python's transformers into a temp folder.
Columns: max |Δ| over non-pad positions of hfjax's logits on the left-padded batch against
transformers run row by row on the unpadded sequences, and against transformers' own padded-batch
logits; then the logit std (the scale the errors compare to). Exits 1 if any |Δ| > --tol.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from hfjax.models import decoder
from hfjax.models.hf_io import load_hf

ROOT = Path(__file__).resolve().parents[1]


def case_report(folder: Path) -> dict:
    """max |Δ| of one fixture case (see the module docstring)."""
    cfg, params = load_hf(folder / "model")
    with np.load(folder / "golden.npz") as z:
        golden = dict(z)
    keep = golden["attention_mask"].astype(bool)
    logits = np.asarray(decoder.forward(cfg, params, golden["input_ids"], golden["attention_mask"]))
    row = {"unpadded": float(np.abs(logits[keep] - golden["logits"][keep]).max())}
    if "logits_hf_padded" in golden:
        row["padded"] = float(np.abs(logits[keep] - golden["logits_hf_padded"][keep]).max())
    row["std"] = float(golden["logits"][keep].std())
    meta = json.loads((folder / "meta.json").read_text())
    row["transformers"] = meta.get("transformers_version", "?")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "fixtures" / "parity")
    ap.add_argument("--torch-python", help="regenerate the fixtures live with this python first")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hfjax_parity_") as tmp:
        root = args.fixtures
        if args.torch_python:
            root = Path(tmp)
            script = ROOT / "scripts" / "make_parity_fixtures.py"
            subprocess.run([args.torch_python, str(script), "--out", str(root)], check=True)
        cases = sorted(p.name for p in root.iterdir() if (p / "golden.npz").is_file())
        if not cases:
            raise FileNotFoundError(f"no parity fixtures (<case>/golden.npz) under {root}")
        print(f"{'case':10s}{'vs HF unpadded':>16s}{'vs HF padded':>14s}{'logit std':>11s}"
              f"  transformers")
        worst = 0.0
        for case in cases:
            r = case_report(root / case)
            padded = f"{r['padded']:>14.2e}" if "padded" in r else f"{'-':>14s}"
            print(f"{case:10s}{r['unpadded']:>16.2e}{padded}{r['std']:>11.3f}  {r['transformers']}")
            worst = max(worst, r["unpadded"], r.get("padded", 0.0))
    print(f"worst max |Δ| {worst:.2e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
