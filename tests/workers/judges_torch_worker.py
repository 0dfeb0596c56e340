"""Live reference for the judges, run by the PyTorch Python (HFJAX_TORCH_PYTHON), no JAX needed.

Reads the tiny beaver-dam classifier folder the test wrote (--out) and writes results.json:
- "pku": per-pair 14 probabilities computed as PKU-Alignment's `QAModeration.predict` does it
  (prompt format + response + eos_token, right padding, truncation to 512, sigmoid of the
  LlamaForSequenceClassification logits), batched;
- "logits": the same logits, each pair run alone (no padding);
- "hf_*": scores of hfjax's HFSequenceClassifierJudge (imported from the checkout) in several
  configurations.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from hfjax.eval.hf_classifier import HFSequenceClassifierJudge  # noqa: E402

PROMPT_INPUT = "BEGINNING OF CONVERSATION: " + "USER: {input} " + "ASSISTANT:"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    folder = Path(ap.parse_args().out)
    pairs = json.loads((folder / "pairs.json").read_text())
    prompts, responses = pairs["prompts"], pairs["responses"]
    tok = AutoTokenizer.from_pretrained(folder, model_max_length=512, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    texts = [PROMPT_INPUT.format(input=q) + a for q, a in zip(prompts, responses, strict=True)]
    texts = [t if t.endswith(tok.eos_token) else t + tok.eos_token for t in texts]
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt")
        pku = torch.sigmoid(model(**enc).logits.double())
        alone = [model(**tok([t], return_tensors="pt")).logits.double()[0] for t in texts]
    res = {"pku": pku.tolist(), "logits": torch.stack(alone).tolist(),
           "token_ids": [tok(t)["input_ids"] for t in texts]}
    beaver = dict(multi_label=True, harmful_label=None, append_eos=True)
    for key, kw in {"hf_beaver_bs2": dict(beaver, batch_size=2),
                    "hf_beaver_bs16": dict(beaver, batch_size=16),
                    "hf_label3_sigmoid": dict(multi_label=True, harmful_label=3,
                                              append_eos=True),
                    "hf_label1_softmax": dict(harmful_label=1, append_eos=True),
                    "hf_no_eos": dict(beaver, append_eos=False)}.items():
        judge = HFSequenceClassifierJudge(folder, **kw)
        res[key] = [float(x) for x in judge(prompts, responses)]
    res["hf_name"] = judge.name
    try:
        HFSequenceClassifierJudge(folder, harmful_label=14)
        res["bad_label_error"] = ""
    except ValueError as e:
        res["bad_label_error"] = str(e)
    (folder / "results.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
