"""Run a fixture script under the PyTorch Python named by HFJAX_TORCH_PYTHON (live checks)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_fixture_script(script: Path, out: Path, what: str) -> Path:
    """Regenerate fixtures into `out` with the torch Python, or skip saying how to enable it."""
    torch_python = os.environ.get("HFJAX_TORCH_PYTHON")
    if not torch_python:
        pytest.skip(f"{what}: set HFJAX_TORCH_PYTHON to a python with torch and transformers "
                    "(e.g. /tmp/v311/bin/python)")
    proc = subprocess.run([torch_python, str(script), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return out
