"""benchmarks/step_throughput.py on a tiny HF folder: the JSON it prints, --prompt_fraction on
both stacks, and its bad-flag error (the PyTorch + PEFT side only with HFJAX_TORCH_PYTHON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from defense_fixtures import BASE, CFG
from torch_live import torch_python

from hfjax.models.hf_io import save_hf

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_throughput.py"
METHODS = "lora_sft,vaccine"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_hf(tmp_path_factory.mktemp("tiny") / "model", CFG, BASE)


def _run(model_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model_dir), "--methods", METHODS,
         "--batch", "2", "--seq", "16", "--rank", "4", "--steps", "2", "--warmup", "1",
         "--json", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600)


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_json_reports_sizes_prompt_tokens_and_each_method(model_dir):
    res = _json(_run(model_dir, "--prompt_fraction", "0.5", "--torch_python="))
    sizes = res["sizes"]
    assert (sizes["batch"], sizes["seq"], sizes["lora_rank"]) == (2, 16, 4)
    assert sizes["prompt_fraction"] == 0.5 and sizes["prompt_tokens_per_row"] == 8
    assert res["hardware"]["jax_backend"] == "cpu" and res["precision"] == "float32"
    assert (sizes["attention"], sizes["attention_kernel"]) == ("auto", "xla")
    assert set(res["methods"]) == {"lora_sft", "vaccine"}
    for entry in res["methods"].values():
        hf = entry["hfjax"]
        assert hf["timed_steps"] == 2 and hf["compiles"] == 1
        assert hf["tokens_per_s"] == pytest.approx(2 * 16 / hf["step_s"])
        assert "torch_peft" not in entry
    assert res["methods"]["vaccine"]["declared_cost"] == "2F+2B"


@pytest.mark.parametrize("fraction", ["1.0", "-0.1", "0.99"])  # 0.99 · 16 rounds to all 16
def test_a_prompt_fraction_that_leaves_no_response_token_is_refused(model_dir, fraction):
    proc = _run(model_dir, "--prompt_fraction", fraction, "--torch_python=")
    assert proc.returncode != 0
    assert (f"--prompt_fraction must be in [0, 1) and leave a response token in each row of "
            f"--seq 16, got {float(fraction)}") in proc.stderr


def test_both_stacks_side_by_side_with_prompt_tokens(model_dir):
    python = torch_python("step_throughput.py against PyTorch + PEFT")
    res = _json(_run(model_dir, "--prompt_fraction", "0.25", "--torch_python", python))
    assert res["sizes"]["prompt_tokens_per_row"] == 4
    for entry in res["methods"].values():
        torch_side = entry["torch_peft"]
        assert torch_side["timed_steps"] == 2
        assert entry["ratio"] == pytest.approx(
            entry["hfjax"]["tokens_per_s"] / torch_side["tokens_per_s"])
