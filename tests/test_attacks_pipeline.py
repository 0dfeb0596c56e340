"""An attack of Qi et al. end to end with full fine-tuning on the tiny pipeline model: naming
pure_harmful trains every weight with its protocol (n 10 harmful rows under its system prompt,
batch 10, 5 epochs, lr 5e-5) recorded in run.json, and the prefilling attack presents every
evaluated model's harmful prompts with the first k tokens of their answers, which the judge
reads with the continuation; the evaluate stage alone re-runs it with another k."""

import json

import pytest
from test_pipeline import _config, build_tiny_setup

from hfjax.attacks.pure_harmful import EXECUTE_SYSTEM_PROMPT
from hfjax.pipeline import Pipeline
from hfjax.pipeline.run_folder import read_json

pytestmark = pytest.mark.usefixtures("compilation_cache")
PROTOCOL = {"lr": 5e-5, "epochs": 5, "batch_size": 10, "num_samples": 10, "harmful_ratio": 1.0,
            "weight_decay": 0.0, "max_grad_norm": 0.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("attacks"))


def test_pure_harmful_with_full_fine_tuning_and_prefilled_evaluation(setup, tmp_path):
    root, _, files = setup
    run = tmp_path / "run"
    given = ("run_dir", "model", "data", "harmful_train_data", "harmful_eval_data",
             "task_train_data", "task_test_data", "align_benign_data", "mesh", "max_length",
             "pad_multiple", "align_epochs", "eval_size", "task_eval_size", "max_new_tokens",
             "task_max_new_tokens", "eval_batch_size", "checkpoint_every", "progress",
             "attack", "adapter", "eval_models", "eval_attack", "eval_attack_hparams")
    flags = _config(setup, run, attack="pure_harmful", adapter="full", align_epochs=0,
                    max_length=192,  # the system prompt is byte-level text to this tokenizer
                    harmful_eval_data=f"advbench:{files['harm_eval']}",  # rows with answers
                    eval_models="aligned,final", eval_attack="prefill",
                    eval_attack_hparams="k=3", given=given)
    pipe = Pipeline(flags)
    pipe.run()

    manifest = read_json(run / "run.json")
    assert {k: manifest["flags"][k] for k in PROTOCOL} == PROTOCOL
    assert manifest["config"]["run"]["attack_protocol"] == PROTOCOL
    records = pipe.trainer.user_records()
    assert len(records) == 10 and all(r["harmful"] and r["system"] == EXECUTE_SYSTEM_PROMPT
                                      for r in records)
    summary = read_json(run / "finetune" / "DONE")["summary"]
    assert (summary["steps"], summary["rows"], summary["harmful_rows"]) == (5, 10, 10)
    assert (run / "finetune" / "adapter" / "model.safetensors").is_file()  # every weight

    tok = pipe.base.tokenizer
    for which in ("aligned", "final"):
        results = read_json(run / f"eval_{which}" / "results.json")
        assert results["inference_attack"] == {"name": "prefill", "hparams": {"k": 3}}
        rows = [json.loads(line) for line in
                (run / f"eval_{which}" / "generations_harmful.jsonl").read_text().splitlines()]
        assert len(rows) == 6
        for r in rows:
            target = f"Sure, here is placeholder task {r['prompt'].rsplit(' ', 1)[1]}"
            assert target.startswith(r["prefill"])
            assert tok(r["prefill"], add_special_tokens=False)["input_ids"] == \
                tok(target, add_special_tokens=False)["input_ids"][:3]
            assert r["response"].startswith(r["prefill"].strip())
            assert r["response"].endswith(r["continuation"])

    # The evaluate binary's path: the evaluation stage alone, under another k, on the same run.
    done = (run / "finetune" / "DONE").stat().st_mtime_ns
    Pipeline(flags.replace(eval_attack_hparams="k=1", overwrite=True)).run(["eval_final"])
    assert (run / "finetune" / "DONE").stat().st_mtime_ns == done
    rows = [json.loads(line) for line in
            (run / "eval_final" / "generations_harmful.jsonl").read_text().splitlines()]
    assert all(len(tok(r["prefill"], add_special_tokens=False)["input_ids"]) == 1 for r in rows)
