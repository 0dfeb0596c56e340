"""Greedy generation parity with HF transformers `generate` for every supported family.

Fixtures (tests/fixtures/generate/<case>.json, made by scripts/make_generate_fixtures.py with the
torch python): transformers' greedy `generate` (eager attention, float32, max_new_tokens 16) on a
left-padded batch of 3 prompts (lengths 7, 3, 10) of the parity models, with an EOS id chosen so
that one row stops midway and another runs all 16 steps. hfjax's `greedy_generate` (KV cache, and
the recompute-everything mode) on the same prompts must return exactly the same tokens: each row
cut after its first EOS (EOS included), transformers' trailing pad positions dropped.

With HFJAX_TORCH_PYTHON pointing at a python with torch + transformers, the live test reruns the
script with the installed transformers into a temp folder and compares against that.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from torch_live import run_fixture_script

from hfjax.eval.generate import greedy_generate, left_pad
from hfjax.models.hf_io import load_hf

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "generate"
SCRIPT = ROOT / "scripts" / "make_generate_fixtures.py"
CASES = ("llama", "llama3", "smollm2", "mistral", "qwen2", "gemma2")


def _fixture(folder: Path, case: str) -> dict:
    path = folder / f"{case}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"generation fixture {path} is missing; regenerate with "
            f"`<torch python> {SCRIPT.relative_to(ROOT)}`"
        )
    return json.loads(path.read_text())


@functools.cache
def _model(model_dir: Path):
    return load_hf(model_dir)


def _model_dir(folder: Path, fx: dict) -> Path:
    m = fx["model"]
    return ROOT / m["path"] if m["source"] == "parity" else folder / m["path"]


def _hfjax(folder: Path, case: str, **kw) -> tuple[dict, list[list[int]]]:
    fx = _fixture(folder, case)
    cfg, params = _model(_model_dir(folder, fx))
    if "windows" in kw:
        cfg = cfg.replace(layer_windows=kw.pop("windows"))
    out = greedy_generate(
        cfg, params, fx["prompts"], max_new_tokens=fx["max_new_tokens"],
        eos_ids=(fx["eos_id"],), pad_id=fx["pad_id"], **kw,
    )
    return fx, out


def _strip(hf_rows: list[list[int]], eos: int, pad: int) -> list[list[int]]:
    """transformers' [B, n] new tokens -> per row, cut after the first EOS; the rest must be pad."""
    rows = []
    for row in hf_rows:
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert all(t == pad for t in row[cut:]), f"non-pad token after EOS in {row}"
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("case", CASES)
def test_fixture_has_an_early_stopping_row_and_a_full_length_row(case):
    fx = _fixture(FIXTURES, case)
    n, eos = fx["max_new_tokens"], fx["eos_id"]
    gen = fx["generated"]
    assert gen == _strip(fx["hf_new_tokens"], eos, fx["pad_id"])
    assert any(len(g) < n and g[-1] == eos for g in gen)  # a row stops midway at EOS
    assert any(len(g) == n and eos not in g for g in gen)  # another row never emits EOS
    ids, mask = left_pad(fx["prompts"], fx["pad_id"])
    assert ids.tolist() == fx["input_ids"] and mask.tolist() == fx["attention_mask"]
    assert len({len(p) for p in fx["prompts"]}) == 3 and mask.min() == 0  # really left-padded
    assert fx["min_top2_margin"] > 1e-3  # float32 noise between stacks cannot flip a token
    if case in ("mistral", "gemma2"):  # the prompt + generation outgrows the sliding window
        assert fx["ablations"]["no sliding window"]["tokens"] != gen


@pytest.mark.parametrize("case", CASES)
def test_cached_greedy_generate_equals_transformers_generate(case):
    fx, out = _hfjax(FIXTURES, case)
    assert out == fx["generated"]


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_recompute_mode_equals_transformers_generate(case):
    fx, out = _hfjax(FIXTURES, case, use_cache=False)
    assert out == fx["generated"]


@pytest.mark.parametrize("case", ["mistral", "gemma2"])
def test_window_off_in_hfjax_reproduces_transformers_window_off_tokens(case):
    """The window matters in the cached decode, and turning it off matches transformers too."""
    fx = _fixture(FIXTURES, case)
    cfg, _ = _model(_model_dir(FIXTURES, fx))
    _, out = _hfjax(FIXTURES, case, windows=(0,) * cfg.num_layers)
    assert out == fx["ablations"]["no sliding window"]["tokens"]
    assert out != fx["generated"]


@pytest.fixture(scope="module")
def live_fixtures(tmp_path_factory):
    out = tmp_path_factory.mktemp("generate_live")
    return run_fixture_script(SCRIPT, out, "live transformers generate comparison")


@pytest.mark.parametrize("case", CASES)
def test_live_against_installed_transformers_generate(case, live_fixtures):
    fx, out = _hfjax(live_fixtures, case)
    assert out == fx["generated"]
    assert len(np.unique([len(g) for g in out])) > 1  # the EOS really cut one row short
