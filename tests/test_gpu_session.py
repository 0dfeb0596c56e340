"""benchmarks/gpu_session.sh, the prepared GPU measurements, in its CPU smoke mode: it must
work on CPU before it is run on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "GPU_SESSION_SMOKE": "1",
                                            "PY": sys.executable, "OUT": str(out), **env})


def test_smoke_run_writes_every_result_as_json(tmp_path):
    proc = _run(tmp_path, TORCH_PY="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== done: 0 failed" in proc.stdout
    auto = json.loads((tmp_path / "gpu_mfu_auto.json").read_text())
    xla = json.loads((tmp_path / "gpu_mfu_xla.json").read_text())
    assert (auto["sizes"]["attention"], xla["sizes"]["attention"]) == ("auto", "xla")
    assert auto["sizes"]["attention_kernel"] == xla["sizes"]["attention_kernel"] == "xla"  # CPU
    assert auto["config"] == "tiny" and auto["hfjax"]["tokens_per_s"] > 0
    assert auto["torch_peft"] is None
    overlap = json.loads((tmp_path / "loop_overlap.json").read_text())
    assert set(overlap["step_s"]) == {"waiting", "overlapped", "step alone"}
    assert "jax" in (tmp_path / "device.txt").read_text()
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool returns at most 8 files


def test_a_failed_step_is_reported_and_does_not_stop_the_others(tmp_path):
    proc = _run(tmp_path, TORCH_PY=str(tmp_path / "no-such-python"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "== gpu_mfu_auto" in proc.stdout and "FAILED" in proc.stdout
    assert "no-such-python" in proc.stdout  # the log's tail names the cause
    assert not (tmp_path / "gpu_mfu_auto.json").exists()
    assert (tmp_path / "gpu_mfu_xla.json").exists() and (tmp_path / "loop_overlap.json").exists()
    assert "== done: 1 failed" in proc.stdout
