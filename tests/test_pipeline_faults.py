"""Faults that must never end in a results table: each test reproduces one (a diverged training,
a corrupted checkpoint, inputs changed in place, two processes on one folder, a refused or
failed start, a subset rerun, rows cut to nothing, an overlong prompt, a binary's user error,
SIGTERM) and shows the clear error or the correct result. Then the tests that make a wrong table
fail the suite: every defense level changes what the pipeline computes exactly as the defense
does on its own, and HS / FA from scripted generations come out at their exact values."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_pipeline import ROOT, build_tiny_setup
from test_pipeline import _config as pipeline_config

from hfjax import data as data_lib
from hfjax import defenses, models
from hfjax.models import init_random, save_hf
from hfjax.models.config import ModelConfigError
from hfjax.pipeline import ConfigError, Pipeline, RunFlags, StageInterrupted
from hfjax.pipeline import evaluation as evaluation_lib
from hfjax.pipeline import training as training_lib
from hfjax.pipeline.inputs import file_digest, model_digest
from hfjax.pipeline.lock import LockedError, folder_lock
from hfjax.pipeline.run_folder import StageMismatchError
from hfjax.train import step as step_module
from hfjax.train.loop import NonFiniteError
from hfjax.train.loss import make_loss_fn

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def own(tiny, tmp_path):
    """A private copy of the tiny model folder and data files (tests change them in place)."""
    root, model_dir, files = tiny
    shutil.copytree(model_dir, tmp_path / "model")
    copies = {k: Path(shutil.copy(f, tmp_path / f.name)) for k, f in files.items()}
    return tmp_path, tmp_path / "model", copies


def _config(setup, run_dir, **kw) -> RunFlags:
    """test_pipeline's tiny run, without the alignment stage and evaluating the base model only
    unless a test says otherwise."""
    return pipeline_config(setup, run_dir, **{"align_epochs": 0, "eval_models": "base", **kw})


def _adapter(run_dir: Path, stage: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / stage / "adapter" / "adapter_model.safetensors"))


def _interrupt_third_step(monkeypatch):
    """make_train_step returns a step that raises KeyboardInterrupt at its 3rd call."""
    real = step_module.make_train_step

    def interrupting(*a, **k):
        fn, calls = real(*a, **k), {"n": 0}

        def step(state, frozen, batches):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return fn(state, frozen, batches)

        step.compiles = 0
        return step

    monkeypatch.setattr(step_module, "make_train_step", interrupting)


# ------------------------------------------------------------------ silent wrong results

def test_a_diverged_training_stops_its_stage_unmarked_and_writes_no_table(tiny, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"training step \d+: loss nan"):
        Pipeline(_config(tiny, run, lr=1e30, eval_models="base,final")).run()
    assert not (run / "finetune" / "DONE").exists()
    assert not (run / "results.json").exists() and not (run / "eval_final").exists()


def test_a_corrupted_checkpoint_falls_back_and_the_resume_equals_an_uninterrupted_run(
        tiny, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    Pipeline(_config(tiny, full)).run(["finetune"])
    part = tmp_path / "part"
    _interrupt_third_step(monkeypatch)
    with pytest.raises(StageInterrupted):
        Pipeline(_config(tiny, part, checkpoint_every=1)).run(["finetune"])
    monkeypatch.undo()
    ckpt = part / "finetune" / "ckpt"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [1, 2]
    target = max((p for p in (ckpt / "2").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2:len(data) // 2 + 25] = bytes(b ^ 0xFF for b in
                                                      data[len(data) // 2:len(data) // 2 + 25])
    target.write_bytes(bytes(data))
    Pipeline(_config(tiny, part, checkpoint_every=1)).run(["finetune"])
    printed = capsys.readouterr()
    assert "falling back to step 1" in printed.out + printed.err
    a, b = _adapter(full, "finetune"), _adapter(part, "finetune")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    steps = [json.loads(x)["step"] for x in
             (part / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_data_file_or_the_weights_changed_in_place_make_a_rerun_refuse(own, tmp_path):
    run = tmp_path / "run"
    rc = _config(own, run, epochs=0)
    Pipeline(rc).run()
    task_test = own[2]["task_test"]
    original = task_test.read_bytes()
    rows = [json.loads(x) for x in original.decode().splitlines()]
    rows[0]["label"] = 1 - rows[0]["label"]
    task_test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(StageMismatchError, match=r"data\.content\.task_test"):
        Pipeline(rc).run()
    task_test.write_bytes(original)  # the same bytes again (a new mtime): the stage is reused
    out = Pipeline(rc).run()
    assert [r["model"] for r in out["rows"]] == ["base"]
    cfg, _ = models.load_pretrained(own[1])
    save_hf(own[1], cfg, init_random(cfg, jax.random.key(7)))
    with pytest.raises(StageMismatchError, match=r"model\.sha256"):
        Pipeline(rc).run()


def test_content_digests_follow_the_bytes_not_the_path_or_mtime(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"x": 1}\n')
    first = file_digest(f)
    os.utime(f, (1, 1))
    assert file_digest(f) == first
    f.write_text('{"x": 2}\n')
    assert file_digest(f) != first
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    before = model_digest(folder)
    (folder / "model.safetensors").write_bytes(b"\1" * 64)
    assert model_digest(folder) != before


def _hold_lock(lock_file: Path, seconds: float) -> subprocess.Popen:
    code = ("import sys, time\nfrom hfjax.pipeline.lock import folder_lock\n"
            "with folder_lock(sys.argv[1], 'test holder'):\n"
            "    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_file), str(seconds)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(tiny, tmp_path):
    run = tmp_path / "run"
    Pipeline(_config(tiny, run, epochs=0)).run()
    done = (run / "eval_base" / "DONE").stat().st_mtime_ns
    holder = _hold_lock(run / ".lock", 60)
    try:
        for overwrite in (False, True):
            with pytest.raises(LockedError, match=rf"run folder {run} is in use by pid "
                                                  rf"{holder.pid}"):
                Pipeline(_config(tiny, run, epochs=0, overwrite=overwrite)).run()
        assert (run / "eval_base" / "DONE").stat().st_mtime_ns == done  # nothing deleted
    finally:
        holder.kill()
        holder.wait()
    Pipeline(_config(tiny, run, epochs=0)).run()  # the kernel dropped the dead holder's lock


def test_a_shared_stage_in_use_is_waited_for(tiny, tmp_path, capsys):
    rc = _config(tiny, tmp_path / "run", epochs=0, stage_cache=str(tmp_path / "cache"))
    sd = Pipeline(rc).stage("eval_base")
    holder = _hold_lock(sd.path.parent / f".{sd.path.name}.lock", 2)
    start = time.perf_counter()
    Pipeline(rc).run()
    holder.wait()
    assert time.perf_counter() - start > 1.0
    assert "is in use by" in capsys.readouterr().err and (sd.path / "DONE").is_file()


def test_a_refused_rerun_keeps_run_json_and_a_failed_start_writes_nothing(tiny, tmp_path):
    bad = tmp_path / "bad"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pipeline(_config(tiny, bad, epochs=0, model=str(tmp_path / "nope"))).run()
    assert not bad.exists()
    Pipeline(_config(tiny, bad, epochs=0)).run()  # the corrected command is not blocked
    manifest = (bad / "run.json").read_bytes()
    with pytest.raises(StageMismatchError, match="eval.max_new_tokens: 5 -> 4"):
        Pipeline(_config(tiny, bad, epochs=0, max_new_tokens=4)).run()
    assert (bad / "run.json").read_bytes() == manifest


def test_an_unfinished_stage_of_other_settings_is_discarded_not_blocking(tiny, tmp_path,
                                                                         monkeypatch):
    run = tmp_path / "run"
    _interrupt_third_step(monkeypatch)
    with pytest.raises(StageInterrupted):
        Pipeline(_config(tiny, run, checkpoint_every=1)).run(["finetune"])
    monkeypatch.undo()
    Pipeline(_config(tiny, run, lr=2e-3)).run(["finetune"])  # other settings: starts over
    steps = [json.loads(x)["step"] for x in
             (run / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (run / "finetune" / "DONE").is_file()


def test_a_subset_rerun_keeps_the_other_models_rows_in_the_summary(tiny, tmp_path):
    run = tmp_path / "run"
    Pipeline(_config(tiny, run, epochs=0, eval_models="base,aligned")).run()
    res = Pipeline(_config(tiny, run, epochs=0, eval_models="base")).run()
    assert [r["model"] for r in res["rows"]] == ["base", "aligned"]
    saved = json.loads((run / "results.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["base", "aligned"]


def test_rows_cut_to_nothing_are_counted_and_a_stage_without_loss_tokens_is_an_error(
        tiny, tmp_path):
    with pytest.raises(data_lib.DataError, match="have no response token left to train on"):
        Pipeline(_config(tiny, tmp_path / "cut", max_length=16, pad_multiple=16)).run(
            ["finetune"])
    run = tmp_path / "odd"
    Pipeline(_config(tiny, run, num_samples=30)).run(["finetune"])  # 30 rows, batch 8
    summary = json.loads((run / "finetune" / "DONE").read_text())["summary"]
    assert summary["rows"] == 30 and summary["steps"] == summary["steps_per_epoch"] == 4
    assert summary["rows_without_loss_tokens"] == 0 and summary["loss_tokens"] > 30
    assert summary["harmful_rows"] == data_lib.harmful_count(30, 0.25)


def test_census_counts_rows_that_keep_no_response_token():
    recs = [{"harmful": True}, {"harmful": False}, {"harmful": True}]
    ex = [data_lib.Example(np.arange(4), np.array([-100, -100, 5, 6])),
          data_lib.Example(np.arange(4), np.array([-100, -100, -100, -100])),
          data_lib.Example(np.arange(2), np.array([7, -100]))]  # a label at t = 0 is no target
    census = training_lib.loss_token_census(recs, ex, "rows")
    assert census == {"rows": 3, "loss_tokens": 2, "rows_without_loss_tokens": 2,
                      "harmful_rows": 2, "harmful_rows_without_loss_tokens": 1}


# ------------------------------------------------------------------ unclear errors

def test_an_eval_prompt_longer_than_the_context_is_refused_before_any_work(own, tmp_path):
    harm_eval = own[2]["harm_eval"]
    with harm_eval.open("a") as f:
        f.write(json.dumps({"prompt": "Explain placeholder " * 400}) + "\n")
    run = tmp_path / "run"
    with pytest.raises(data_lib.DataError, match=r"1 of \d+ harmful evaluation prompts do not "
                                                 r"fit the model's context of 256 tokens"):
        Pipeline(_config(own, run, epochs=0, eval_size=50)).run()
    assert not run.exists()


def test_max_length_beyond_the_context_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="exceeds the model's context of 256"):
        Pipeline(_config(tiny, tmp_path / "r", max_length=512)).run()


def test_a_model_file_that_is_not_gguf_is_named_as_such(tiny, tmp_path):
    with pytest.raises(ModelConfigError, match=r"is a file but not a \.gguf"):
        Pipeline(_config(tiny, tmp_path / "r", model=str(tiny[1] / "config.json"))).run()


def _binary(args: list[str], cache: Path, env: dict | None = None, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", *args, f"--compilation_cache={cache}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _flags(rc: RunFlags) -> list[str]:
    return [f"--{k}={v}" for k, v in rc.to_dict().items()
            if not isinstance(v, bool) and v != "" and k not in ("defense", "defense_hparams")]


def test_binaries_print_user_errors_in_one_line_and_exit_1(tiny, tmp_path, compilation_cache):
    flags = _flags(_config(tiny, tmp_path / "r", epochs=0)) + ["--noprogress"]
    cases = [(["--harmful_ratio=2"], {}, "error: --harmful_ratio must be in [0, 1], got 2.0"),
             ([f"--model={tiny[1] / 'config.json'}"], {}, "is a file but not a .gguf")]
    for extra, env, message in cases:
        out, err = _binary(["experiments.pipeline", *flags, *extra], compilation_cache,
                           env).communicate(timeout=300)
        assert message in err and "Traceback" not in err, err[-2000:]
    proc = _binary(["experiments.pipeline", *flags, "--harmful_ratio=2"], compilation_cache,
                   {"HFJAX_TRACEBACK": "1"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" in err and "ConfigError" in err


def test_sigterm_to_a_training_binary_writes_a_final_checkpoint_and_exits_130(
        tiny, tmp_path, compilation_cache):
    run = tmp_path / "r"
    flags = _flags(_config(tiny, run, epochs=2000, checkpoint_every=100000)) + ["--noprogress"]
    proc = _binary(["experiments.finetune", *flags], compilation_cache)
    metrics = run / "finetune" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "rerun the same command to resume" in err
    saved = sorted(int(p.name) for p in (run / "finetune" / "ckpt").iterdir()
                   if p.name.isdigit())
    rows = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert saved and saved[-1] == rows[-1] >= 3 and not (run / "finetune" / "DONE").exists()


def test_folder_lock_refuses_or_waits_and_records_its_holder(tmp_path):
    lock = tmp_path / ".lock"
    holder = _hold_lock(lock, 1.5)
    with pytest.raises(LockedError, match=rf"thing is in use by pid {holder.pid} on "):
        with folder_lock(lock, "thing"):
            pass
    start = time.perf_counter()
    with folder_lock(lock, "thing", wait=True, poll_s=0.1):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.perf_counter() - start > 0.5
    holder.wait()


# ------------------------------------------------------------------ tests that catch a wrong table

def _captured_first_step(monkeypatch) -> dict:
    """Patch make_train_step to record the first call's state and host batches."""
    real, seen = step_module.make_train_step, {}

    def recording(*a, **k):
        fn = real(*a, **k)

        def step(state, frozen, batches):
            if "batches" not in seen:
                seen["trainable"] = jax.device_get(state.trainable)
                seen["batches"] = jax.device_get(batches)
            return fn(state, frozen, batches)

        step.compiles = 0
        return step

    monkeypatch.setattr(step_module, "make_train_step", recording)
    return seen


def test_a_gradient_defense_s_first_pipeline_step_equals_its_own_update(tiny, tmp_path,
                                                                       monkeypatch):
    """safe_instr through the fine-tuning stage (one step) moves the adapter exactly as
    chain(safe_instr(lam), adamw(lr)) computed directly on the same batches; plain SFT on those
    batches would move it differently."""
    lr, lam = 3e-3, 1.0
    seen = _captured_first_step(monkeypatch)
    run = tmp_path / "run"
    pipe = Pipeline(_config(tiny, run, num_samples=8, finetune_defense="safe_instr",
                            finetune_defense_hparams=f"lam={lam}", max_grad_norm=0.0))
    pipe.run(["finetune"])
    assert set(seen["batches"]) == {"user", "align"}
    assert seen["batches"]["align"]["input_ids"].shape[0] == 4  # the official alignment batch
    cfg, params = pipe.base.cfg, pipe.base.params
    loss_fn = make_loss_fn(cfg, params)
    lora = seen["trainable"]
    batches = {k: jax.tree.map(jnp.asarray, v) for k, v in seen["batches"].items()}
    grads = jax.grad(lambda t: loss_fn(t, batches["user"])[0])(lora)

    def first_step(tx):
        upd, _ = tx.update(grads, tx.init(lora), lora, loss_fn=loss_fn, batches=batches)
        return optax.apply_updates(lora, upd)

    defended = first_step(optax.chain(defenses.get("safe_instr").build(lam=lam),
                                      optax.adamw(lr, weight_decay=0.0)))
    plain = first_step(optax.chain(optax.adamw(lr, weight_decay=0.0)))
    saved = models.lora.load_peft(run / "finetune" / "adapter", cfg)
    moved_differently = 0
    for name, w in saved.weights.items():
        for m in ("A", "B"):
            got, want = np.asarray(w[m]), np.asarray(defended.weights[name][m])
            np.testing.assert_allclose(got, want, atol=0.05 * lr, err_msg=f"{name}.{m}")
            moved_differently += int(np.sum(np.abs(want - np.asarray(
                plain.weights[name][m])) > lr))
    assert moved_differently > 10


def test_a_repair_saves_exactly_what_the_weight_function_returns(tiny, tmp_path):
    run = tmp_path / "run"
    pipe = Pipeline(_config(tiny, run, align_epochs=1, align_refusals=16, align_benign=16,
                            align_lr=3e-3, repair_defense="safelora",
                            repair_defense_hparams="threshold=1.0"))
    pipe.run(["align", "finetune", "repair"])
    cfg = pipe.base.cfg
    tuned = models.lora.load_peft(run / "finetune" / "adapter", cfg)
    out = defenses.get("safelora").build(threshold=1.0)(cfg, pipe.aligned_params(), tuned,
                                                         base_params=pipe.base.params)
    expected = out[0] if isinstance(out, tuple) else out
    repaired = models.lora.load_peft(run / "repair" / "adapter", cfg)
    changed = 0
    for name, w in repaired.weights.items():
        for m in ("A", "B"):
            np.testing.assert_allclose(np.asarray(w[m]), np.asarray(expected.weights[name][m]),
                                       atol=1e-6, err_msg=f"{name}.{m}")
            changed += int(not np.allclose(w[m], tuned.weights[name][m], atol=1e-6))
    assert changed > 0  # the repair did change the adapter


def test_a_data_defense_trains_on_exactly_the_rows_it_returns(tiny, tmp_path):
    run = tmp_path / "run"
    pipe = Pipeline(_config(tiny, run, finetune_defense="safe_instr_mix",
                            finetune_defense_hparams="guide_data_num=6"))
    pipe.run(["finetune"])
    rows = defenses.get("safe_instr_mix").build(guide_data_num=6)(
        pipe.trainer.user_records(), pipe.trainer.stream_records("align", "finetune"))
    census = training_lib.loss_token_census(rows, pipe.trainer.tokenize(rows), "rows")
    plain = training_lib.loss_token_census(pipe.trainer.user_records(),
                                         pipe.trainer.tokenize(pipe.trainer.user_records()), "rows")
    summary = json.loads((run / "finetune" / "DONE").read_text())["summary"]
    assert {k: summary[k] for k in census} == census != plain


def _scripted_files(own) -> tuple[list[dict], list[dict]]:
    """Harmful eval prompts of clearly different lengths, and the task test rows."""
    harm = [{"prompt": f"Describe placeholder step {i}" + " in more detail" * (i % 4)}
            for i in range(10)]
    own[2]["harm_eval"].write_text("".join(json.dumps(r) + "\n" for r in harm))
    task = [json.loads(x) for x in own[2]["task_test"].read_text().splitlines()]
    return harm, task


def test_hs_fa_and_the_degenerate_share_from_scripted_generations_are_exact(own, tmp_path,
                                                                           monkeypatch):
    """Generation replaced by a script that answers each prompt by its content: harmful prompt
    i gets a compliant answer (i % 3 == 0), an empty one (i % 3 == 1) or a refusal; a task row
    gets "positive" for the adjectives in SAYS_POSITIVE (every positive one and "awful", so 3
    of the 30 test rows are wrong). HS, FA and the degenerate share must be exactly the
    script's, with every answer filed under its own prompt (the prompts differ in length, so
    generation order differs from file order)."""
    harm, task = _scripted_files(own)
    says_positive = {"great", "lovely", "superb", "fine", "fun", "awful"}
    run = tmp_path / "run"
    pipe = Pipeline(_config(own, run, epochs=0, eval_size=len(harm), task_eval_size=len(task)))
    tok = pipe.base.tokenizer

    def answer(text: str) -> str:
        if m := re.search(r"placeholder step (\d+)", text):
            i = int(m.group(1))
            return ["Sure, here is placeholder task", "", "I cannot help with that."][i % 3]
        adjective = re.search(r"the \w+ was (\w+)", text).group(1)
        return "positive" if adjective in says_positive else "negative"

    def scripted(cfg, params, prompts, max_new_tokens, lora=None):
        return [tok(answer(tok.decode(p)), add_special_tokens=False)["input_ids"]
                for p in prompts]

    monkeypatch.setattr(evaluation_lib, "greedy_generate", scripted)
    res = pipe.run()
    (row,) = res["rows"]
    n = len(harm)
    assert row["harmful_score"] == sum(i % 3 == 0 for i in range(n)) / n == 0.4
    assert row["degenerate_share"] == sum(i % 3 == 1 for i in range(n)) / n == 0.3
    expected_fa = np.mean([answer(r["sentence"]) == ("negative", "positive")[r["label"]]
                           for r in task])
    assert expected_fa == pytest.approx(0.9, abs=1e-12)
    assert row["finetune_accuracy"] == pytest.approx(expected_fa, abs=1e-12)
    gens = [json.loads(x) for x in
            (run / "eval_base" / "generations_harmful.jsonl").read_text().splitlines()]
    assert len(gens) == n
    for g in gens:
        assert g["response"] == answer(g["prompt"]).strip()
        assert g["degenerate"] == (g["response"] == "")
    table = (run / "results.md").read_text()
    assert "empty/degenerate (%)" in table and "| 40.0 " in table and "| 30.0 " in table


def test_the_attack_s_prompts_reach_no_other_role_and_run_json_records_each_role(tiny, tmp_path):
    """Lisa's alignment-state data reuses the alignment's prompts (as the official code); the
    attack's harmful rows share a prompt with neither."""
    run = tmp_path / "run"
    pipe = Pipeline(_config(tiny, run, align_epochs=1, align_refusals=16, align_benign=8,
                            finetune_defense="lisa", defense_data_size=12))
    keys = {
        "alignment": {data_lib.prompt_key(r) for r in pipe.trainer.alignment_records()
                      if r["source"] == "advbench"},
        "attack": {data_lib.prompt_key(r) for r in pipe.trainer.user_records() if r["harmful"]},
        "lisa": {data_lib.prompt_key(r) for r in pipe.trainer.stream_records("align", "finetune")}}
    assert [len(v) for v in keys.values()] == [16, 8, 12]
    assert keys["lisa"] < keys["alignment"]
    assert not keys["attack"] & (keys["alignment"] | keys["lisa"])
    pipe.write_manifest()
    roles = json.loads((run / "run.json").read_text())["harmful_roles"]
    assert {k: v["count"] for k, v in roles.items()} == {"alignment": 16, "attack": 8,
                                                          "finetune:align": 12}
    assert len(set(roles["attack"]["indices"]) | set(roles["alignment"]["indices"])) == 24


def test_alignment_settings_of_their_own_and_a_continued_adapter_reach_the_stages(
        tiny, tmp_path, monkeypatch):
    """--align_lora_rank / --align_lora_targets shape LoRA #1 (the fine-tuning LoRA keeps
    --lora_rank); --finetune_adapter=continue starts the fine-tuning from LoRA #1 on the base
    weights, and the final model is base + that adapter."""
    seen = _captured_first_step(monkeypatch)
    run = tmp_path / "run"
    rc = _config(tiny, run, align_epochs=1, align_refusals=8, align_benign=8, align_lr=3e-3,
                 align_lora_rank=4, align_lora_targets="q_proj,v_proj", lora_rank=2,
                 finetune_adapter="continue", eval_models="final", align_schedule="linear",
                 align_warmup_ratio=0.5)
    pipe = Pipeline(rc)
    align_opt, ft_opt = pipe.rc.align.train.optimizer, pipe.rc.finetune.train.optimizer
    assert (align_opt.schedule, align_opt.warmup_ratio, ft_opt.schedule) == ("linear", 0.5,
                                                                            "constant")
    pipe.run(["align"])
    aligned = models.lora.load_peft(run / "align" / "adapter", pipe.base.cfg)
    assert aligned.rank == 4 and sorted(aligned.weights) == ["q_proj", "v_proj"]
    lr0 = json.loads((run / "align" / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    assert lr0 == 0.0  # linear warm-up from 0 over half the alignment steps
    seen.clear()
    pipe.run(["finetune"])
    for name, w in aligned.weights.items():  # step 1 starts from the alignment's LoRA
        for m in ("A", "B"):
            np.testing.assert_array_equal(np.asarray(seen["trainable"].weights[name][m]),
                                          np.asarray(w[m]))
    params, lora = pipe.final_model()
    assert params is pipe.base.params and lora.rank == 4
    with pytest.raises(ConfigError, match="needs both an alignment and a fine-tuning stage"):
        Pipeline(_config(tiny, tmp_path / "bad", finetune_adapter="continue"))


def test_hs_prompts_from_all_rows_and_in_file_order_when_asked(own, tmp_path):
    rows = [{"prompt": f"Describe placeholder case {i}", "response": "placeholder",
             "is_safe": i % 2 == 0, "category": {}} for i in range(12)]
    path = tmp_path / "bt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = dict(harmful_eval_data=f"beavertails:{path}", eval_size=4, epochs=0)
    harmful = Pipeline(_config(own, tmp_path / "a", **rc)).evaluator.eval_sets()[0]
    assert len(harmful) == 4 and all("case" in r["prompt"] and int(r["prompt"].split()[-1]) % 2
                                     for r in harmful)  # only the unsafe rows
    first = Pipeline(_config(own, tmp_path / "b", harmful_eval_rows="all", row_order="file",
                             **rc)).evaluator.eval_sets()[0]
    assert [r["prompt"] for r in first] == [f"Describe placeholder case {i}" for i in range(4)]


def test_repnoise_gets_paired_batches_of_the_alignment_prompts(tiny, tmp_path, monkeypatch):
    """Paired (the authors' RepNoise): each row of the "align" batch is a harmful prompt with
    its refusal and the same row of the "harmful" batch the same prompt with its harmful
    answer, at one padded length; the alignment's benign rows are not used."""
    seen = _captured_first_step(monkeypatch)
    run = tmp_path / "run"
    pipe = Pipeline(_config(tiny, run, align_epochs=1, align_refusals=16, align_benign=8,
                            align_lr=3e-3, align_defense="repnoise"))
    pipe.run(["align"])
    align, harmful = seen["batches"]["align"], seen["batches"]["harmful"]
    assert align["input_ids"].shape == harmful["input_ids"].shape
    for i in range(align["input_ids"].shape[0]):
        prompt = align["input_ids"][i][(align["labels"][i] == -100) &
                                       (align["attention_mask"][i] == 1)]
        n = len(prompt)
        np.testing.assert_array_equal(harmful["input_ids"][i][:n], prompt)
        assert (harmful["labels"][i][:n] == -100).all() and (harmful["labels"][i][n] != -100)
        assert not np.array_equal(align["input_ids"][i], harmful["input_ids"][i])
    summary = json.loads((run / "align" / "DONE").read_text())["summary"]
    assert summary["rows"] == 16 and summary["steps"] == 2  # 16 pairs, no benign rows


def test_a_data_defense_draws_with_the_run_s_seed_and_lisa_gets_the_run_s_step_count(
        tiny, tmp_path):
    def guide(seed, **kw):
        pipe = Pipeline(_config(tiny, tmp_path / f"s{seed}", seed=seed,
                                finetune_defense="safe_instr_mix", **kw))
        rows = pipe.trainer.data_defenses(pipe.rc.finetune.train.defenses,
                                          pipe.trainer.user_records(), "finetune")
        return [r["prompt"] for r in rows]

    assert guide(0, finetune_defense_hparams="guide_data_num=4") != \
        guide(1, finetune_defense_hparams="guide_data_num=4")
    assert guide(1, finetune_defense_hparams="guide_data_num=4,seed=1") == \
        guide(1, finetune_defense_hparams="guide_data_num=4")
    run = tmp_path / "lisa"
    Pipeline(_config(tiny, run, finetune_defense="lisa",
                     finetune_defense_hparams="align_steps=1,finetune_steps=1,"
                                              "proximal_warmup=0.5")).run(["finetune"])
    assert (run / "finetune" / "DONE").is_file()
