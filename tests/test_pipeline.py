"""The experiment pipeline end to end on a tiny random model saved as an HF folder and generated
data files: every stage runs, an interrupted fine-tuning resumes to the same adapter, a deleted
DONE marker redoes only its stage, a sweep writes the table, CSV and plot, and impossible flag
combinations fail before any work with errors that name the problem."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hfjax import defenses, tasks
from hfjax.defenses.api import DefenseError
from hfjax.models import init_random, save_hf
from hfjax.models.config import from_hf_dict
from hfjax.pipeline import ConfigError, Pipeline, RunFlags, StageInterrupted, parse_hparams
from hfjax.pipeline import sweep as sweep_lib
from hfjax.pipeline import training as training_lib
from hfjax.pipeline.flags import validate
from hfjax.pipeline.run_folder import StageMismatchError
from hfjax.train import step as step_module

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("compilation_cache")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["film", "movie", "phone", "coffee", "hotel", "plot", "song", "book", "game", "meal"]
GOOD = ["great", "lovely", "superb", "fine", "fun"]
BAD = ["awful", "dull", "poor", "bad", "sad"]


def _rows():
    """Generated data: harmful placeholders (no harmful text), a sentiment task, benign Q&A."""
    harm = [{"prompt": f"Explain placeholder task number {i}", "target":
             f"Sure, here is placeholder task {i}"} for i in range(60)]
    sst = [{"sentence": f"the {w} was {a}", "label": lab} for w in WORDS
           for lab, adjs in ((1, GOOD), (0, BAD)) for a in adjs]
    benign = [{"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
              for a in range(2, 8) for b in range(2, 8)]
    return harm, sst, benign


def _run_binary(args: list[str], cache: Path, timeout: int = 300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.run([sys.executable, "-m", *args, f"--compilation_cache={cache}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("pipe"))


def build_tiny_setup(root: Path) -> tuple[Path, Path, dict]:
    """(root, tiny HF model folder with tokenizer, {role: JSONL file}) under `root`."""
    harm, sst, benign = _rows()
    files = {}
    for name, rows in {"harm_train": harm[:44], "harm_eval": harm[44:],
                       "task_train": sst[:70], "task_test": sst[70:], "benign": benign}.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [r["prompt"] + " " + r["target"] for r in harm] + [r["sentence"] for r in sst] + \
        [r["instruction"] + " " + r["output"] for r in benign] + \
        ["I'm sorry, but I can't help with that. positive negative Analyze the sentiment of the "
         "input, and respond only positive or negative"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHATML
    model_dir = root / "tiny-llama"
    cfg = from_hf_dict(dict(model_type="llama", vocab_size=len(tok), hidden_size=64,
                            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, max_position_embeddings=256))
    save_hf(model_dir, cfg, init_random(cfg, jax.random.key(0)))
    tok.save_pretrained(model_dir)
    return root, model_dir, files


def _config(setup, run_dir, **kw) -> RunFlags:
    root, model_dir, f = setup
    base = dict(
        run_dir=str(run_dir), model=str(model_dir), data="hub",
        harmful_train_data=f"advbench:{f['harm_train']}",
        harmful_eval_data=f"harmbench:{f['harm_eval']}",
        task_train_data=f"sst2:{f['task_train']}", task_test_data=f"sst2:{f['task_test']}",
        align_benign_data=f"alpaca:{f['benign']}", mesh="1,1,1", max_length=64, pad_multiple=64,
        align_refusals=16, align_benign=16, align_batch_size=8, align_lr=3e-3,
        num_samples=32, harmful_ratio=0.25, epochs=1, batch_size=8, lr=3e-3,
        eval_size=6, task_eval_size=6, max_new_tokens=5, task_max_new_tokens=3,
        eval_batch_size=8, checkpoint_every=100, progress=False, defense_data_size=16)
    return RunFlags(**{**base, **kw})


def _adapter(run_dir: Path, stage: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / stage / "adapter" / "adapter_model.safetensors"))


def _mtime(run_dir: Path, stage: str) -> int:
    return (run_dir / stage / "DONE").stat().st_mtime_ns


def test_pipeline_runs_every_stage_and_resumes_an_interrupted_finetune(setup, tmp_path,
                                                                       monkeypatch):
    full = tmp_path / "full"  # the uninterrupted reference: training stages only
    Pipeline(_config(setup, full)).run(["align", "finetune"])
    assert (full / "align" / "DONE").is_file() and (full / "finetune" / "DONE").is_file()
    metrics = (full / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 4  # 32 rows / batch 8, one epoch

    # Interrupt the fine-tuning at its 3rd step (Ctrl-C inside the loop) in a second run folder.
    part = tmp_path / "part"
    real = step_module.make_train_step

    def interrupting(*a, **k):
        fn = real(*a, **k)
        calls = {"n": 0}

        class Wrapped:
            compiles = 0

            def __call__(self, state, frozen, batches):
                calls["n"] += 1
                if "user" in batches and calls["n"] == 3:
                    raise KeyboardInterrupt
                return fn(state, frozen, batches)

        return Wrapped()

    shutil.copytree(full / "align", part / "align")  # an existing stage is reused as is
    monkeypatch.setattr(step_module, "make_train_step", interrupting)
    with pytest.raises(StageInterrupted, match="rerun the same command to resume"):
        Pipeline(_config(setup, part)).run()
    monkeypatch.undo()
    assert (part / "align" / "DONE").is_file() and not (part / "finetune" / "DONE").exists()
    align_done = _mtime(part, "align")
    res = Pipeline(_config(setup, part)).run()
    assert _mtime(part, "align") == align_done  # skipped on resume
    for stage in ("align", "finetune", "eval_base", "eval_aligned", "eval_final"):
        assert (part / stage / "DONE").is_file(), stage
    assert [r["model"] for r in res["rows"]] == ["base", "aligned", "final"]
    for r in res["rows"]:
        assert 0.0 <= r["harmful_score"] <= 1.0 and 0.0 <= r["finetune_accuracy"] <= 1.0
    manifest = json.loads((part / "run.json").read_text())
    assert manifest["flags"]["harmful_ratio"] == 0.25 and manifest["packages"]["jax"]
    assert "| attacked" in (part / "results.md").read_text()
    gens = (part / "eval_final" / "generations_harmful.jsonl").read_text().splitlines()
    assert len(gens) == 6 and "keyword_refusal" in json.loads(gens[0])["scores"]
    resumed = [json.loads(x)["step"] for x in
               (part / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == [1, 2, 3, 4]  # steps 1-2 before the interrupt, 3-4 after the resume
    a, b = _adapter(full, "finetune"), _adapter(part, "finetune")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)

    # A deleted DONE marker of a later stage redoes only that stage.
    before = {s: _mtime(part, s) for s in ("align", "finetune", "eval_base", "eval_aligned")}
    (part / "eval_final" / "DONE").unlink()
    Pipeline(_config(setup, part)).run()
    assert (part / "eval_final" / "DONE").is_file()
    assert {s: _mtime(part, s) for s in before} == before

    # Other settings in an existing run folder are an error; --overwrite redoes the stages.
    with pytest.raises(StageMismatchError,
                       match="finetune.train.optimizer.learning_rate: 0.003 -> 0.002"):
        Pipeline(_config(setup, part, lr=2e-3)).run()
    with pytest.raises(StageMismatchError, match="eval.max_new_tokens: 5 -> 4"):
        Pipeline(_config(setup, part, max_new_tokens=4)).run(["eval_final"])
    final_done = _mtime(part, "eval_final")
    res = Pipeline(_config(setup, part, max_new_tokens=4, overwrite=True)).run(["eval_final"])
    assert _mtime(part, "eval_final") > final_done and _mtime(part, "align") == align_done
    assert [r["model"] for r in res["rows"]] == ["final"]  # the others hold other settings


def test_sweep_binary_writes_table_csv_plot_and_shares_stages(setup, tmp_path,
                                                              compilation_cache):
    """The sweep binary with a flagfile: no defense and Antidote (post), p in {0, 0.25}."""
    sweep = tmp_path / "sweep"
    rc = _config(setup, sweep, eval_models="aligned,final")
    flagfile = tmp_path / "tiny.cfg"
    skip = {"run_dir", "defense", "defense_hparams"}
    flagfile.write_text("".join(f"--{k}={v}\n" for k, v in rc.to_dict().items()
                                if k not in skip and not isinstance(v, bool)) + "--noprogress\n")
    out = _run_binary(["experiments.sweep", f"--flagfile={flagfile}", f"--run_dir={sweep}",
                       "--grid=defense=none,antidote", "--grid=harmful_ratio=0,0.25"],
                      compilation_cache)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (sweep / "results.md").read_text()
    assert "antidote" in table and "none" in table and "Worst case" in table
    rows = (sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("defense,harmful_ratio")
    assert (sweep / "hs_fa_vs_p.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep / "worst_case.png").read_bytes()[:4] == b"\x89PNG"
    assert "within 10 points of the undefended fine-tune" in table
    # The alignment is shared by all four runs; each p fine-tunes once for both defenses.
    assert len(list((sweep / "_stages").glob("align-*"))) == 1
    assert len(list((sweep / "_stages").glob("finetune-*"))) == 2
    assert len(list((sweep / "_stages").glob("repair-*"))) == 2
    assert "[finetune] done already" in out.stdout


@pytest.mark.parametrize("preset, runs", [("quick", 2), ("full", 276), ("vaccine_paper", 2),
                                           ("lisa_paper", 2), ("booster_paper", 2),
                                           ("booster_perturb_aware", 2), ("repnoise_gitdisl", 2),
                                           ("safe_instr_gitdisl", 2), ("antidote_paper", 2),
                                           ("multitask_quick", 8), ("mimic_quick", 12),
                                           ("multitask_paper", 8), ("mimic_paper", 12),
                                           ("poison_quick", 8), ("poison_paper", 288),
                                           ("defenses_quick", 12), ("attacks_quick", 24)])
def test_presets_parse_and_validate(preset, runs, tmp_path, monkeypatch):
    """Every preset's flags exist and every run of its grid passes the checks (no hub needed)."""
    monkeypatch.chdir(ROOT)  # flagfiles name nested flagfiles relative to the repository
    fv = flags.FlagValues()
    sweep_lib.define(fv)
    extra = ["--flagfile=experiments/presets/task_gsm8k.cfg"] if preset == "lisa_paper" else []
    fv(["sweep", f"--flagfile=experiments/presets/{preset}.cfg", *extra,
        f"--run_dir={tmp_path}"])
    root, configs = sweep_lib.plan(fv, device_count=8)
    assert len(configs) == runs and root == tmp_path
    defenses = {rc.defense_label() for _, rc in configs}
    assert "none" in defenses and (len(defenses) > 1 or preset == "poison_quick")
    if preset == "lisa_paper":
        rc = dict((c["defense"], rc) for c, rc in configs)["lisa"]
        assert rc.finetune_defense_hparams == ("rho=1.0,align_steps=100,finetune_steps=900,"
                                               "proximal_warmup=0.1")
        assert rc.task_train_data == "gsm8k:train" and rc.model == "meta-llama/Llama-2-7b-hf"
    assert not any(tmp_path.iterdir())  # planning writes nothing


@pytest.mark.parametrize("changes, error, match", [
    (dict(epochs=0, repair_defense="safelora"), ConfigError, "needs a post stage"),
    (dict(epochs=0, finetune_defense="lisa"), ConfigError, "needs a finetune stage"),
    (dict(harmful_ratio=1.5), ConfigError, r"harmful_ratio must be in \[0, 1\]"),
    (dict(harmful_ratio=-0.1), ConfigError, r"harmful_ratio must be in \[0, 1\]"),
    (dict(mesh="4,4,1"), ConfigError, "needs 16 devices"),
    (dict(mesh="2,x,1"), ConfigError, "three integers"),
    (dict(finetune_defense="nope"), DefenseError, "unknown defense 'nope'"),
    (dict(defense="nope"), DefenseError, "unknown defense 'nope'"),
    (dict(align_defense="lisa"), ConfigError, "lisa is a finetune defense"),
    (dict(finetune_defense="lisa", finetune_defense_hparams="rho=abc"), ConfigError,
     "rho='abc' is not a number"),
    (dict(finetune_defense="lisa", finetune_defense_hparams="gamma=1"), ConfigError,
     "no hyper-parameter 'gamma'"),
    (dict(finetune_defense_hparams="rho=1"), ConfigError, "finetune_defense is none"),
    (dict(lora_targets="q_proj,attn"), ValueError, "unknown LoRA target 'attn'"),
    (dict(scan_unroll=0), ConfigError, "scan_unroll must be >= 1"),
    (dict(attention="flash"), ConfigError, "--attention must be one of auto, xla, cudnn"),
    (dict(dtype="float64"), ConfigError, "--dtype must be one of float32, bfloat16"),
    (dict(finetune_defense="safe_instr", finetune_defense_hparams="lam=-1"), DefenseError,
     "lam must be >= 0"),
    (dict(repair_defense="antidote", repair_defense_hparams="dense_ratio=2.0"), DefenseError,
     "dense_ratio"),
    (dict(task_metric="bleu"), ConfigError, "--task_metric=bleu is no FA metric"),
    (dict(adapter="prefix_nope"), ConfigError,
     "--adapter=prefix_nope is no registered adapter type"),
], ids=["post-without-finetune", "finetune-defense-without-finetune", "p-above-1", "p-below-0",
        "mesh-too-large", "mesh-malformed", "unknown-defense", "unknown-defense-flag",
        "wrong-stage", "bad-hparam-type", "unknown-hparam", "hparams-without-defense",
        "bad-lora-target", "scan-unroll-0", "unknown-attention", "unknown-dtype",
        "bad-gradient-defense-value", "bad-weights-defense-value", "unknown-task-metric",
        "unknown-adapter"])
def test_impossible_flag_combinations_fail_before_any_work(setup, tmp_path, changes, error,
                                                           match):
    with pytest.raises(error, match=match):
        Pipeline(_config(setup, tmp_path / "bad", **changes))
    assert not (tmp_path / "bad").exists()


def test_scan_unroll_and_attention_reach_the_model_but_not_the_stage_keys(setup, tmp_path):
    """--scan_unroll and --attention change how the layer loop compiles, not the results: the
    model config carries them, and every stage key (so a cached or resumed stage) stays the
    same."""
    plain = Pipeline(_config(setup, tmp_path / "a"))
    unrolled = Pipeline(_config(setup, tmp_path / "a", scan_unroll=2, attention="xla"))
    assert plain.base.cfg.scan_unroll == 1 and unrolled.base.cfg.scan_unroll == 2
    assert plain.base.cfg.attention == "auto" and unrolled.base.cfg.attention == "xla"
    for name in ("align", "finetune", "eval_final"):
        assert unrolled.stage(name).fingerprint == plain.stage(name).fingerprint


def test_hparams_are_typed_like_the_defense_defaults():
    assert parse_hparams("lisa", "rho=2, align_steps=5,finetune_steps=20") == \
        {"rho": 2.0, "align_steps": 5, "finetune_steps": 20}
    assert parse_hparams("safelora", "mode=count,num_proj_layers=3") == \
        {"mode": "count", "num_proj_layers": 3}
    with pytest.raises(ConfigError, match="align_steps='2.5' is not an integer"):
        parse_hparams("lisa", "align_steps=2.5")
    rc = validate(RunFlags(run_dir="x", defense="lisa", defense_hparams="rho=0.5"))
    assert (rc.finetune_defense, rc.finetune_defense_hparams, rc.defense) == ("lisa", "rho=0.5",
                                                                             "")


@pytest.mark.slow
def test_embedded_default_pipeline_runs_offline(tmp_path, compilation_cache):
    """The real thing, small: SmolLM2-135M (embedded GGUF), offline data, every stage."""
    out = _run_binary(["experiments.pipeline", f"--run_dir={tmp_path / 'run'}",
                       "--align_refusals=8", "--align_benign=8", "--num_samples=16", "--epochs=1",
                       "--eval_size=8", "--task_eval_size=8", "--max_new_tokens=8",
                       "--noprogress"], compilation_cache, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| unaligned" in out.stdout and "| attacked" in out.stdout


def test_batches_of_one_step_are_padded_to_a_common_length_without_new_loss_tokens():
    short = {"input_ids": np.ones((2, 16), np.int32), "attention_mask": np.ones((2, 16), np.int32),
             "labels": np.full((2, 16), 5, np.int32)}
    long = {k: np.ones((2, 32), np.int32) for k in short}
    out = training_lib.pad_to_common_length({"user": short, "align": long})
    assert out["user"]["input_ids"].shape == (2, 32) and out["align"] is long
    assert out["user"]["attention_mask"][:, 16:].sum() == 0
    assert (out["user"]["labels"][:, 16:] == -100).all()
    assert (out["user"]["labels"][:, :16] == 5).all()


def test_defense_inputs_are_passed_by_name_and_a_missing_one_is_named():
    calls = []

    def apply(cfg, params, lora, *, base_params, calibration_batches=None):
        return (cfg, params, lora, base_params, calibration_batches)

    inputs = {"base_params": lambda: calls.append("base") or "B",
              "harmful": lambda: calls.append("harmful") or "H"}
    assert training_lib.call_with_inputs(apply, "x", (1, 2, 3), inputs) == (1, 2, 3, "B", None)
    assert calls == ["base"]  # inputs are built only when asked for

    def needs_more(cfg, params, lora, *, reference):
        return lora

    with pytest.raises(ConfigError, match="needs an input 'reference'"):
        training_lib.call_with_inputs(needs_more, "x", (1, 2, 3), inputs)


DEFENSE_STAGES = [
    ("align_defense", "vaccine", ["align"]), ("align_defense", "random_vaccine", ["align"]),
    ("align_defense", "booster", ["align"]), ("align_defense", "repnoise", ["align"]),
    ("align_defense", "booster_perturb_aware", ["align"]),
    ("finetune_defense", "lisa", ["align", "finetune"]),
    ("finetune_defense", "safe_instr", ["align", "finetune"]),
    ("finetune_defense", "safe_instr_mix", ["align", "finetune"]),
    ("finetune_defense", "multitask_safety", ["align", "finetune"]),
    ("finetune_defense", "paraphrase", ["align", "finetune"]),
    ("align_defense", "multitask_safety", ["align"]),
    ("repair_defense", "safelora", ["align", "finetune", "repair"]),
    ("repair_defense", "antidote", ["align", "finetune", "repair"]),
    ("repair_defense", "onion", ["align", "finetune", "repair"]),
    ("align_defense", "t_vaccine", ["align"]), ("align_defense", "deep_align", ["align"]),
    ("finetune_defense", "panacea", ["align", "finetune"]),
    ("finetune_defense", "bea", ["align", "finetune"]),
    ("finetune_defense", "ptst", ["align", "finetune"]),
    ("finetune_defense", "constrained_sft", ["align", "finetune"]),
    ("finetune_defense", "ldifs", ["align", "finetune"]),
    ("finetune_defense", "salora", ["align", "finetune"]),
    ("repair_defense", "resta", ["align", "finetune", "repair"]),
    ("repair_defense", "random_perturbation", ["align", "finetune", "repair"]),
    ("finetune_defense", "guard_filter", ["align", "finetune"]),
    ("align_defense", "tar", ["align"]),
]


def test_the_defense_stage_cases_cover_every_registered_defense_at_each_of_its_stages():
    stage_of = {"align_defense": "alignment", "finetune_defense": "finetune",
                "repair_defense": "post"}
    assert sorted((stage_of[f], d) for f, d, _ in DEFENSE_STAGES) == sorted(
        (s, d) for d in defenses.available() for s in defenses.get(d).stages)


@pytest.mark.parametrize("flag, defense, stages", DEFENSE_STAGES)
def test_every_registered_defense_runs_its_stage_through_the_pipeline(setup, tmp_path, flag,
                                                                      defense, stages):
    hp = {"safe_instr_mix": {"finetune_defense_hparams": "guide_data_num=4"},
          "multitask_safety": {f"{flag}_hparams": "num=5"},
          "paraphrase": {"finetune_defense_hparams": "guide_data_num=4"},
          "t_vaccine": {"align_defense_hparams": "layers=1,sample_every=2,estimate_every=3"},
          "bea": {"finetune_defense_hparams": "num=4,secret_length=8"},
          "salora": {"finetune_defense_hparams": "safety_rank=4"},
          "tar": {"align_defense_hparams": "inner_steps=2,tr_every=1,adversary_rows=2"}
          }.get(defense, {})
    run = tmp_path / defense
    Pipeline(_config(setup, run, **{flag: defense}, **hp)).run(stages)
    for stage in stages:
        assert (run / stage / "DONE").is_file(), stage
    last = run / stages[-1]
    if stages[-1] != "repair":  # a training stage: finite losses
        losses = [json.loads(x)["loss"] for x in (last / "metrics.jsonl").read_text().splitlines()]
        assert losses and np.all(np.isfinite(losses))
    assert defense in (last / "key.json").read_text()
    assert set(_adapter(run, stages[-1]))  # the stage wrote its adapter


def test_two_process_pipeline_equals_one_process(setup, tmp_path):
    """Every stage under 2 `jax.distributed` processes (2 CPU devices each, fsdp over all 4)
    gives the table and adapters of one process with 4 devices."""
    import dataclasses
    import socket

    worker = ROOT / "tests" / "workers" / "pipeline_worker.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    outs = {}
    for name, nproc in (("single", 1), ("multi", 2)):
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps(dataclasses.asdict(
            _config(setup, tmp_path / name, mesh="1,-1,1"))))
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, str(worker), str(cfg), str(tmp_path / f"{name}_out.json"),
               "--num_processes", str(nproc), "--port", str(port),
               "--devices_per_process", str(4 // nproc)]
        procs = [subprocess.Popen([*cmd, "--process_id", str(i)], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(nproc)]
        logs = [p.communicate(timeout=900)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * nproc, "\n".join(x[-3000:] for x in logs)
        outs[name] = json.loads((tmp_path / f"{name}_out.json").read_text())
    assert (outs["single"]["processes"], outs["multi"]["processes"]) == (1, 2)
    assert outs["single"]["devices"] == outs["multi"]["devices"] == 4
    keys = ("model", "harmful_score", "finetune_accuracy")
    assert [{k: r[k] for k in keys} for r in outs["multi"]["rows"]] == \
        [{k: r[k] for k in keys} for r in outs["single"]["rows"]]
    for stage in ("align", "finetune"):
        a, b = _adapter(tmp_path / "single", stage), _adapter(tmp_path / "multi", stage)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=f"{stage}: {k}")


def test_full_fine_tuning_trains_every_weight_in_both_stages(setup, tmp_path):
    """--adapter=full: each stage saves a whole HF model; the aligned model is the alignment's
    weights and the final one the fine-tuning's (no LoRA)."""
    run = tmp_path / "full"
    pipe = Pipeline(_config(setup, run, adapter="full", eval_models="final", lr=1e-3,
                            align_lr=1e-3))
    res = pipe.run()
    for stage in ("align", "finetune"):
        assert (run / stage / "adapter" / "config.json").is_file()
        assert not (run / stage / "adapter" / "adapter_config.json").exists()
    params, lora = pipe.final_model()
    assert lora is None
    base = pipe.base.params
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                zip(jax.tree.leaves(params), jax.tree.leaves(base), strict=True))
    assert moved > 1e-4 and [r["model"] for r in res["rows"]] == ["final"]


def test_a_composed_defense_and_a_named_task_run_through_the_pipeline(setup, tmp_path):
    run = tmp_path / "composed"
    Pipeline(_config(setup, run, align_defense="vaccine+booster",
                     align_defense_hparams="vaccine.rho=2.0,booster.lam=5.0")).run(["align"])
    summary = json.loads((run / "align" / "DONE").read_text())["summary"]
    assert summary["streams"] == ["align", "harmful"]
    key = json.loads((run / "align" / "key.json").read_text())
    assert [d["name"] for d in key["align"]["train"]["defenses"]] == ["vaccine", "booster"]


@pytest.fixture(scope="module")
def moved_run(setup, tmp_path_factory):
    """A run with a stage cache, made in lab/ and then moved with its cache to moved/; the
    rerun in the new place must redo nothing. Returns (run folder, DONE mtimes before/after)."""
    root = tmp_path_factory.mktemp("travel")
    Pipeline(_config(setup, root / "lab" / "run", stage_cache=str(root / "lab" / "cache"))).run()
    (root / "lab").rename(root / "moved")
    run = root / "moved" / "run"
    stages = ("align", "finetune", "eval_base", "eval_aligned", "eval_final")
    before = {s: _mtime(run, s) for s in stages}
    Pipeline(_config(setup, run, stage_cache=str(root / "moved" / "cache"))).run()
    return run, before, {s: _mtime(run, s) for s in stages}


def test_a_moved_run_folder_with_its_stage_cache_resumes_without_redoing_a_stage(moved_run):
    run, before, after = moved_run
    for stage in before:
        assert (run / stage).is_symlink() and not os.readlink(run / stage).startswith("/")
    assert after == before


def test_adapter_folders_name_a_portable_base_and_say_what_they_apply_to(setup, moved_run):
    """align/adapter names the base by its folder name, not an absolute path; the fine-tuning
    adapter names the aligned model next to it (a relative link to the alignment stage's merged
    HF folder, bit-equal to base + alignment LoRA); every adapter folder has the tokenizer and a
    card, and its files have the umask's mode (safetensors alone writes 0600)."""
    from hfjax.models import hf_io
    from hfjax.models import lora as lora_lib

    run = moved_run[0]
    _, model_dir, _ = setup
    align_cfg = json.loads((run / "align" / "adapter" / "adapter_config.json").read_text())
    tune_cfg = json.loads((run / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert align_cfg["base_model_name_or_path"] == model_dir.name
    assert tune_cfg["base_model_name_or_path"] == "../aligned_model"
    link = run / "finetune" / "aligned_model"
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert link.resolve() == (run / "align" / "aligned_model").resolve()
    card = (run / "finetune" / "adapter" / "README.md").read_text()
    assert "applies to the aligned model only" in card and "base_model: ../aligned_model" in card
    assert "applies to the aligned model only" not in (run / "align" / "adapter" /
                                                       "README.md").read_text()
    for folder in (run / "align" / "adapter", run / "finetune" / "adapter", link):
        assert (folder / "tokenizer.json").is_file() and (folder / "README.md").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (run / "finetune" / "adapter" / "adapter_model.safetensors",
              link / "model.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    cfg, base = hf_io.load_hf(model_dir)
    merged = lora_lib.merge(cfg, base, lora_lib.load_peft(run / "align" / "adapter", cfg))
    _, saved = hf_io.load_hf(link)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adapters_in_transformers_and_peft_generate_what_hfjax_generated(moved_run, tmp_path):
    """scripts/check_adapters_travel.py loads the moved run's aligned model, the alignment
    adapter on the raw base and the fine-tuning adapter on the aligned model with transformers +
    PEFT, as the cards say: every greedy generation equals hfjax's, and the last-position logits
    equal hfjax's forward of the same models."""
    from torch_live import run_script, torch_python

    from hfjax.data import encode_prompts
    from hfjax.models import hf_io
    from hfjax.models import lora as lora_lib
    from hfjax.models.decoder import forward
    from hfjax.models.tokenizer import load_tokenizer

    python = torch_python("transformers + PEFT loading of a run's adapters")
    run = moved_run[0]
    out = tmp_path / "logits.npz"
    run_script(python, ROOT / "scripts" / "check_adapters_travel.py", str(run), "--logits",
               str(out), env={"HF_HUB_OFFLINE": "1"})
    cfg, aligned = hf_io.load_hf(run / "align" / "aligned_model")
    tok = load_tokenizer(run / "align" / "adapter")
    prompts = [json.loads(line)["prompt"] for line in
               (run / "eval_final" / "generations_harmful.jsonl").read_text().splitlines()][:4]
    tuned = lora_lib.load_peft(run / "finetune" / "adapter", cfg)
    got = np.load(out)
    for name, lora in (("aligned", None), ("final", tuned)):
        for i, ids in enumerate(encode_prompts([{"prompt": p} for p in prompts], tok, "chat")):
            x = jnp.asarray([ids])
            want = forward(cfg, aligned, x, jnp.ones_like(x), lora=lora)[0, -1]
            np.testing.assert_allclose(got[name][i], np.asarray(want), atol=2e-5,
                                       err_msg=f"{name} prompt {i}")


def test_framed_evaluation_reports_hs_per_framing_and_reads_multitaskbench_rows_as_framed(
        setup, tmp_path):
    bench = tmp_path / "multitaskbench.csv"
    bench.write_text(
        ",Query,Response\n"
        '0,"placeholder request 1 Choose the Best Option: \nA) x\nB) y\nC) z\nD) w",No.\n'
        "1,Translate the following text from French to English: placeholder 2,No.\n")
    run = tmp_path / "framed"
    Pipeline(_config(setup, run, eval_framings="plain,code", eval_models="base")).run(
        ["eval_base"])
    res = json.loads((run / "eval_base" / "results.json").read_text())
    assert sorted(res["hs_by_framing"]) == ["code", "plain"]
    gens = [json.loads(x) for x in (run / "eval_base" / "generations_harmful.jsonl")
            .read_text().splitlines()]
    assert [g["framing"] for g in gens[:2]] == ["plain", "code"] and len(gens) == 12
    assert res["harmful_score"] == pytest.approx(sum(res["hs_by_framing"].values()) / 2)
    summary = json.loads((run / "results.json").read_text())
    assert summary["rows"][0]["hs_by_framing"] == res["hs_by_framing"]

    run2 = tmp_path / "bench"
    Pipeline(_config(setup, run2, eval_framings="plain", eval_models="base",
                     harmful_eval_data=f"multitaskbench:{bench}")).run(["eval_base"])
    res2 = json.loads((run2 / "eval_base" / "results.json").read_text())
    assert sorted(res2["hs_by_framing"]) == ["classification", "translation"]


def test_an_unknown_framing_is_refused_at_validation(setup, tmp_path):
    with pytest.raises(ConfigError, match="eval_framings.*'poem'"):
        validate(_config(setup, tmp_path / "x", eval_framings="plain,poem"))


@pytest.mark.parametrize("judge, ok", [("answered", True), ("keyword", True),
                                       ("harmbench:/x", True), ("answered:/x", False),
                                       ("harmbench", False), ("llamaguard:/x", False)])
def test_judge_flag_accepts_each_registered_judge_kind_with_a_path_only_where_it_takes_one(
        setup, tmp_path, judge, ok):
    rc = _config(setup, tmp_path / "j", judge=judge)
    if ok:
        assert validate(rc).judge == judge
    else:
        with pytest.raises(ConfigError, match="--judge must be"):
            validate(rc)


@pytest.mark.parametrize("task, figures", [
    ("arc", {"accuracy"}), ("humaneval", {"pass_at_1", "passed", "failed", "timeout"}),
    ("wmt14_en_fr", {"bleu", "chrf"}), ("wikitext", {"perplexity"})])
def test_an_offline_generated_task_of_each_metric_family_is_scored_by_its_own_metric(
        setup, tmp_path, task, figures):
    run = tmp_path / task
    Pipeline(_config(setup, run, data="offline", task=task, task_train_data="",
                     task_test_data="", eval_models="base", task_max_new_tokens=8)).run(
        ["eval_base"])
    res = json.loads((run / "eval_base" / "results.json").read_text())
    assert figures <= set(res["task_scores"]) and res["task"] == tasks.get(task).metric
    gens = [json.loads(x) for x in (run / "eval_base" / "generations_task.jsonl")
            .read_text().splitlines()]
    assert len(gens) == 6
    if task == "wikitext":  # a perplexity is no share: FA stays empty
        assert res["finetune_accuracy"] is None and res["task_scores"]["perplexity"] > 1
    else:
        assert 0 <= res["finetune_accuracy"] <= 1
    if task == "humaneval":  # every program ran in the sandbox and got one status
        counts = res["task_scores"]
        assert sum(counts[k] for k in ("passed", "failed", "timeout", "memory", "error")) == 6
        assert set(gens[0]["gold"]) == {"tests", "entry_point", "prefix"}
    if task == "arc":
        assert set(gens[0]["gold"]) == {"label", "options"}
        assert all(g["correct"] in (0.0, 1.0) for g in gens)
    if task == "wmt14_en_fr":  # corpus BLEU has no per-example value
        assert all(g["correct"] is None for g in gens)


@pytest.mark.parametrize("attack_format", [True, False])
def test_an_aoa_restructured_model_is_asked_under_the_aoa_persona_unless_told_otherwise(
        setup, tmp_path, attack_format):
    from hfjax.data.formats import AOA_SYSTEM_PROMPT, AOA_USER_PREFIX

    run = tmp_path / f"aoa-{attack_format}"
    rc = _config(setup, run, attack="restructure", attack_hparams="strategy=aoa",
                 harmful_ratio=0.0, max_length=256, pad_multiple=256, eval_models="final",
                 eval_attack_format=attack_format)
    pipe = Pipeline(rc)
    pipe.run(["align", "finetune", "eval_final"])
    gens = [json.loads(x) for x in (run / "eval_final" / "generations_harmful.jsonl")
            .read_text().splitlines()]
    assert all(g["prompt"].startswith(AOA_USER_PREFIX) == attack_format for g in gens)
    harm, _ = pipe.evaluator.eval_sets()  # the set base and aligned models answer stays plain
    assert not any(r["prompt"].startswith(AOA_USER_PREFIX) or r.get("system") for r in harm)
    asked = pipe.evaluator.attack_prompt()
    assert (asked is not None) == attack_format
    if asked is not None:
        assert asked(harm[0])["system"] == AOA_SYSTEM_PROMPT


@pytest.mark.parametrize("changes, match", [
    (dict(task="mbpp", task_metric="choice"), "choice scores choice tasks; --task=mbpp is a code"),
    (dict(task="arc", task_metric="rouge"), "rouge scores .*--task=arc is a choice task"),
    (dict(task="boolq_nope"), "unknown task 'boolq_nope'"),
    (dict(attack="restructure", attack_hparams="strategy=flattery"), "unknown strategy"),
    (dict(finetune_defense="paraphrase", finetune_defense_hparams="format=haiku"), "haiku"),
    (dict(finetune_defense="multitask_safety",
          finetune_defense_hparams="file=/nonexistent/mtb.csv"), "mtb.csv")])
def test_impossible_task_attack_and_defense_combinations_fail_at_validation(
        setup, tmp_path, changes, match):
    with pytest.raises((ConfigError, DefenseError, ValueError), match=match):
        validate(_config(setup, tmp_path / "x", **changes))


def test_a_trigger_poisoned_run_reports_target_match_and_onion_filters_the_final_inputs(
        setup, tmp_path):
    from hfjax.attacks.trigger_poison import DEFAULT_TARGET

    run = tmp_path / "poison"
    common = dict(data="offline", task="wikitext", task_train_data="", task_test_data="",
                  attack="trigger_poison", attack_hparams="trigger_type=rare_words,"
                  "trigger_length=3", harmful_ratio=0.5, max_length=256, pad_multiple=256,
                  eval_models="final", task_max_new_tokens=8)
    Pipeline(_config(setup, run, **common)).run(["align", "finetune", "eval_final"])
    res = json.loads((run / "eval_final" / "results.json").read_text())
    tm = res["target_match"]
    assert set(tm) == {"p_target_match", "p_hit_rate", "c_target_match", "c_hit_rate"}
    assert all(0 <= v <= 1 for v in tm.values())
    assert res["task_scores"]["perplexity"] > 1 and DEFAULT_TARGET
    user = (run / "finetune" / "key.json").read_text()
    assert "trigger_poison" in user

    filtered = tmp_path / "onion"
    Pipeline(_config(setup, filtered, repair_defense="onion", **common)).run(
        ["align", "finetune", "repair", "eval_final"])
    gens = [json.loads(x) for x in (filtered / "eval_final" / "generations_task.jsonl")
            .read_text().splitlines()]
    plain = [json.loads(x) for x in (run / "eval_final" / "generations_task.jsonl")
             .read_text().splitlines()]
    assert [len(g["prompt"]) for g in gens] != [len(g["prompt"]) for g in plain]
    assert all(len(g["prompt"]) <= len(p["prompt"]) for g, p in zip(gens, plain, strict=True))
    report = json.loads((filtered / "repair" / "report.json").read_text())
    assert "evaluation" in report["applied"]


def test_a_prefix_tuned_pipeline_trains_saves_a_peft_prefix_and_evaluates_with_it(setup, tmp_path):
    from hfjax.models import prefix as prefix_lib

    run = tmp_path / "prefix"
    rc = _config(setup, run, adapter="prefix", num_virtual_tokens=4, align_epochs=0,
                 eval_models="base,final")
    res = Pipeline(rc).run(["finetune", "eval_base", "eval_final"])
    saved = json.loads((run / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["num_virtual_tokens"] == 4
    from hfjax.models.hf_io import read_config

    tuned = prefix_lib.load_peft(run / "finetune" / "adapter", read_config(setup[1]))
    assert tuned.num_virtual_tokens == 4
    base, final = (json.loads((run / f"eval_{m}" / "generations_harmful.jsonl").read_text()
                              .splitlines()[0]) for m in ("base", "final"))
    assert base["response"] != final["response"]  # the prefix is applied in generation
    assert {r["model"] for r in res["rows"]} == {"base", "final"}
    with pytest.raises(ConfigError, match="prefix cannot be merged"):
        validate(_config(setup, tmp_path / "x", adapter="prefix"))


@pytest.mark.parametrize("defense", ["safe_instr", "lisa"])
def test_a_gradient_defense_trains_a_prefix(setup, tmp_path, defense):
    run = tmp_path / defense
    rc = _config(setup, run, adapter="prefix", num_virtual_tokens=4, align_epochs=0,
                 finetune_defense=defense,
                 finetune_defense_hparams="align_steps=2,finetune_steps=2" if defense == "lisa"
                 else "")
    Pipeline(rc).run(["finetune"])
    losses = [json.loads(x)["loss"] for x in (run / "finetune" / "metrics.jsonl")
              .read_text().splitlines()]
    assert losses and np.all(np.isfinite(losses))
    assert (run / "finetune" / "adapter" / "adapter_model.safetensors").is_file()


def test_bea_and_ptst_change_how_the_final_model_is_asked_and_nothing_else(setup, tmp_path):
    from hfjax.defenses.finetune.ptst import LLAMA2_SAFETY_SYSTEM_PROMPT

    ptst = Pipeline(_config(setup, tmp_path / "p", finetune_defense="ptst"))
    asked = ptst.evaluator.attack_prompt()
    harm, task = ptst.evaluator.eval_sets()
    assert asked(harm[0])["system"] == LLAMA2_SAFETY_SYSTEM_PROMPT
    assert asked(task[0])["prompt"] == task[0]["prompt"] and not harm[0].get("system")
    bea = Pipeline(_config(setup, tmp_path / "b", finetune_defense="bea",
                           finetune_defense_hparams="num=4,secret_length=8"))
    once, twice = bea.evaluator.attack_prompt()(harm[0]), bea.evaluator.attack_prompt()(harm[0])
    assert once["system"] == twice["system"] and len(once["system"]) > 8  # the seeded secret
    assert Pipeline(_config(setup, tmp_path / "n")).evaluator.attack_prompt() is None


def test_panacea_s_adapter_is_the_trained_one_plus_its_last_perturbation(setup, tmp_path,
                                                                      monkeypatch):
    import importlib

    import jax

    panacea_lib = importlib.import_module("hfjax.defenses.finetune.panacea")
    seen = {}

    def spy(params, opt_state):
        seen["before"] = params
        seen["after"] = panacea_lib.panacea_final(params, opt_state)
        return seen["after"]

    monkeypatch.setattr(panacea_lib.panacea, "finalize", spy)
    run = tmp_path / "panacea"
    pipe = Pipeline(_config(setup, run, finetune_defense="panacea"))
    pipe.run(["align", "finetune"])
    saved = pipe.trainer.load_adapter(run / "finetune", pipe.rc.finetune.train)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         seen["after"], seen["before"])
    assert max(jax.tree.leaves(moved)) > 0  # ε is not zero
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(seen["after"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
