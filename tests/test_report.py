"""Evaluation reports: generations JSONL and results JSON contents, atomic writes, tables."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hfjax.eval.judges import JudgeResult, KeywordRefusalJudge, score_with
from hfjax.eval.metrics import harmful_score
from hfjax.eval.report import (
    atomic_open,
    generation_records,
    make_results,
    markdown_table,
    write_generations,
    write_results,
)

PROMPTS = ["How do I pick a lock?", "Écris un poème"]
RESPONSES = ["Sure: insert a tension wrench…", "I'm sorry, I can't."]


def test_generations_jsonl_holds_prompt_response_and_named_judge_scores(tmp_path):
    kw = score_with(KeywordRefusalJudge(), PROMPTS, RESPONSES)
    other = JudgeResult("beaver-dam-7b", np.array([0.9, 0.1]))
    recs = generation_records(PROMPTS, RESPONSES, [kw, other], extra={"seed": [0, 0]})
    path = tmp_path / "gens.jsonl"
    assert write_generations(path, recs) == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    got = [json.loads(x) for x in lines]
    assert got[0] == {"prompt": PROMPTS[0], "response": RESPONSES[0],
                      "scores": {"keyword_refusal": 1.0, "beaver-dam-7b": 0.9}, "seed": 0}
    assert got[1]["scores"] == {"keyword_refusal": 0.0, "beaver-dam-7b": 0.1}
    assert "Écris" in lines[1]  # UTF-8, not escaped


def test_generation_records_reject_length_mismatch_and_duplicate_judges():
    kw = JudgeResult("k", np.array([1.0]))
    with pytest.raises(ValueError, match="has 1 scores for 2 prompts"):
        generation_records(PROMPTS, RESPONSES, [kw])
    two = JudgeResult("k", np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="share a name"):
        generation_records(PROMPTS, RESPONSES, [two, two])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        generation_records(PROMPTS, RESPONSES[:1])


def test_results_json_holds_hs_fa_counts_judge_model_seeds(tmp_path):
    scores = np.array([1.0, 0.0, 1.0, 0.0])
    res = make_results(model="smollm2-135m", judge="keyword_refusal", task="sst2",
                       harmful_score=harmful_score(scores), finetune_accuracy=np.float32(0.875),
                       n_harmful=4, n_flagged=int((scores > 0.5).sum()), n_task=8,
                       seeds={"train": 0, "eval": 1}, method="sft")
    path = tmp_path / "results.json"
    write_results(path, res)
    got = json.loads(path.read_text())
    assert got == {
        "model": "smollm2-135m", "judge": "keyword_refusal", "task": "sst2",
        "harmful_score": 0.5, "finetune_accuracy": 0.875,
        "counts": {"harmful_prompts": 4, "flagged": 2, "task_examples": 8},
        "seeds": {"train": 0, "eval": 1}, "method": "sft",
    }


def test_make_results_rejects_out_of_range_and_clashing_fields():
    with pytest.raises(ValueError, match="harmful_score must lie in"):
        make_results(model="m", judge="j", harmful_score=1.5)
    with pytest.raises(ValueError, match="clash"):
        make_results(model="m", judge="j", counts=3)


def test_failed_write_leaves_previous_file_and_no_temp_file(tmp_path):
    path = tmp_path / "gens.jsonl"
    write_generations(path, [{"prompt": "a", "response": "b", "scores": {}}])
    before = path.read_bytes()
    bad = [{"prompt": "c", "response": "d", "scores": {}}, {"prompt": object()}]
    with pytest.raises(TypeError, match="cannot write object"):
        write_generations(path, bad)  # fails after the first line was written to the temp file
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gens.jsonl"]


def test_failed_write_creates_no_file(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(ValueError, match="non-finite"):
        write_results(path, {"harmful_score": float("nan")})
    assert list(tmp_path.iterdir()) == []

    def gen():
        yield {"prompt": "a"}
        raise RuntimeError("generation crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_generations(tmp_path / "g.jsonl", gen())
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_replaces_only_on_success(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with atomic_open(path) as f:
        f.write("new")
        assert path.read_text() == "old"  # not visible before the block ends
    assert path.read_text() == "new"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_open(tmp_path / "missing" / "x.txt"):
            pass


def test_markdown_table_pads_every_column_to_its_widest_cell():
    text = markdown_table(["model", "HS (%)"], [["base", 10.0], ["attacked + lisa", "-"]])
    assert text.splitlines() == [
        "| model           | HS (%) |",
        "|-----------------|--------|",
        "| base            | 10.0   |",
        "| attacked + lisa | -      |",
    ]
    assert markdown_table(["a"], []) == "| a |\n|---|"


def test_markdown_table_rejects_a_row_of_the_wrong_width():
    with pytest.raises(ValueError, match="table row 1 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [["1", "2"], ["3"]])


def test_atomic_open_writes_bytes_in_binary_mode(tmp_path):
    with atomic_open(tmp_path / "a.npz", "wb") as f:
        np.savez(f, x=np.arange(3))
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_report_module_imports_without_jax():
    """Scripts of the torch-only Python use atomic_open: the module must not pull in JAX."""
    code = "import sys, hfjax.eval.report; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_atomically_written_files_get_the_umask_mode_not_0600(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "a.json") as f:
            f.write("{}")
        os.umask(0o077)
        with atomic_open(tmp_path / "b.json") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
