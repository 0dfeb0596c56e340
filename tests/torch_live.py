"""Run fixture scripts under the PyTorch Python named by HFJAX_TORCH_PYTHON (live checks)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torch_python(what: str) -> str:
    """The PyTorch Python's path, or skip the test saying how to enable `what`."""
    python = os.environ.get("HFJAX_TORCH_PYTHON")
    if not python:
        pytest.skip(f"{what}: set HFJAX_TORCH_PYTHON to a python with torch, transformers and "
                    "peft (e.g. /tmp/v311/bin/python)")
    return python


def run_script(python: str, script: Path, *args: str, env: dict | None = None,
               timeout: int = 600) -> None:
    """Run `python script args...` from the repository root; fail the test on a non-zero exit."""
    proc = subprocess.run([python, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"


def run_fixture_script(script: Path, out: Path, what: str, *args: str) -> Path:
    """Regenerate fixtures into `out` with the torch Python, or skip saying how to enable it."""
    run_script(torch_python(what), script, *args, "--out", str(out))
    return out
