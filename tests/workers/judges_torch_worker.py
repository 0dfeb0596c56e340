"""hfjax's HFSequenceClassifierJudge run by the PyTorch Python (HFJAX_TORCH_PYTHON), no JAX needed.

Scores the pairs of scripts/make_judge_fixtures.py with the judge in every configuration of its
JUDGE_CASES, on the classifier folder --model, and writes OUT/judge_scores.json:
{"scores": {case: [N]}, "name": the judge's name, "bad_label_error": the message for
harmful_label 14 of 14 labels}. The test compares the scores with the committed reference.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from hfjax.eval.hf_classifier import HFSequenceClassifierJudge  # noqa: E402


def _fixture_script():
    spec = importlib.util.spec_from_file_location(
        "make_judge_fixtures", ROOT / "scripts" / "make_judge_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="classifier folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for judge_scores.json")
    args = ap.parse_args()
    ref = _fixture_script()
    prompts, responses = list(ref.PROMPTS), list(ref.RESPONSES)
    res: dict = {"scores": {}}
    for case, (kwargs, _) in ref.JUDGE_CASES.items():
        judge = HFSequenceClassifierJudge(args.model, **kwargs)
        res["scores"][case] = [float(x) for x in judge(prompts, responses)]
    res["name"] = judge.name
    try:
        HFSequenceClassifierJudge(args.model, harmful_label=ref.NUM_LABELS)
        res["bad_label_error"] = ""
    except ValueError as e:
        res["bad_label_error"] = str(e)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "judge_scores.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
