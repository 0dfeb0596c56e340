"""Training core: loss, optimizer, sharded step, checkpoint resume, distributed, full FT."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from hfjax import sharding
from hfjax.models import forward
from hfjax.models import lora as lora_lib
from hfjax.models import params as params_lib
from hfjax.models.config import from_hf_dict
from hfjax.train import builder, checkpoint, loop, optim, step
from hfjax.train.loss import token_cross_entropy

CFG = from_hf_dict(dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
BASE = params_lib.init_random(CFG, jax.random.key(0))
LORA = lora_lib.init(CFG, jax.random.key(1), rank=4, alpha=8,
                     targets=("q_proj", "v_proj", "down_proj"))
OPT_CFG = optim.OptimizerConfig(learning_rate=1e-2, total_steps=20, weight_decay=0.1,
                                schedule="cosine", warmup_ratio=0.1)
WORKER = Path(__file__).parent / "workers" / "train_worker.py"


def synthetic_batches(start_step: int, batch: int = 8, length: int = 16):
    """Deterministic {user: batch} per step: right padding, prompt tokens masked in labels."""
    i = start_step
    while True:
        r = np.random.default_rng(i)
        ids = r.integers(0, CFG.vocab_size, (batch, length)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[:, length - 1 - i % 4:] = 0
        labels = np.where(mask == 1, ids, -100).astype(np.int32)
        labels[:, :4] = -100
        yield {"user": {"input_ids": ids, "attention_mask": mask, "labels": labels}}
        i += 1


def make_run(mesh_shape, *, full_finetune=False, opt_cfg=OPT_CFG):
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    t = builder.build_training(CFG, BASE if full_finetune else LORA, mesh=mesh,
                               optimizer=opt_cfg, full_finetune=full_finetune)
    return mesh, t.step, t.state, t.state_shardings, jax.device_put(BASE, t.frozen_shardings)


def run_losses(mesh_shape, steps=20, **kw):
    mesh, fn, st, _, frozen = make_run(mesh_shape, **kw)
    data = synthetic_batches(0)
    losses = []
    for _ in range(steps):
        st, m = fn(st, frozen, step.put_batches(next(data), mesh))
        losses.append(float(m["loss"]))
    return np.array(losses), st


def test_token_cross_entropy_matches_hand_computed_mean_over_response_tokens():
    logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    labels = jnp.array([[-100, -100, 1, 2]])  # predict token 1 at t=1 and token 2 at t=2
    loss, aux = token_cross_entropy(logits, labels)
    lp = lambda row, k: row[k] - np.log(np.exp(row).sum())  # noqa: E731
    expected = -(lp(np.array([0.0, 1.0, 0.0]), 1) + lp(np.array([0.0, 0.0, 3.0]), 2)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert int(aux["tokens"]) == 2
    assert float(aux["accuracy"]) == 1.0


def test_token_accuracy_equals_the_argmax_accuracy_over_response_tokens():
    r = np.random.default_rng(0)
    logits = jnp.asarray(r.normal(size=(3, 9, 11)), jnp.float32)
    labels = r.integers(0, 11, (3, 9)).astype(np.int32)
    labels[:, :2] = -100
    labels[1, :] = np.roll(np.asarray(jnp.argmax(logits[1], -1)), 1)  # row 1: all predicted
    _, aux = token_cross_entropy(logits, jnp.asarray(labels))
    pred, target = np.asarray(jnp.argmax(logits, -1))[:, :-1], labels[:, 1:]
    mask = target != -100
    assert float(aux["accuracy"]) == pytest.approx((pred == target)[mask].mean(), rel=1e-6)
    assert 0.3 < float(aux["accuracy"]) < 1.0


def test_adamw_step_equals_hand_derived_update():
    c = optim.OptimizerConfig(learning_rate=0.1, weight_decay=0.5, total_steps=10)
    opt = optim.make_optimizer(c)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    u, _ = opt.update(g, opt.init(p), p)
    m, v = 0.1 * g["w"] / (1 - 0.9), 0.001 * g["w"] ** 2 / (1 - 0.999)
    expected = -0.1 * (m / (jnp.sqrt(v) + 1e-8) + 0.5 * p["w"])
    np.testing.assert_allclose(u["w"], expected, rtol=1e-5, atol=1e-6)


def test_warmup_cosine_schedule_starts_at_zero_and_peaks_after_warmup():
    s = optim.make_schedule(optim.OptimizerConfig(learning_rate=1.0, schedule="cosine",
                                                  warmup_ratio=0.1, total_steps=100))
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-6)


def test_bad_optimizer_flags_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.OptimizerConfig(schedule="exp")
    with pytest.raises(ValueError, match="warmup_ratio"):
        optim.OptimizerConfig(warmup_ratio=1.5)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 4, 2)], ids=["data_fsdp", "fsdp_tensor"])
def test_lora_training_on_8_devices_matches_1_device_for_20_steps(mesh_shape):
    single, _ = run_losses((1, 1, 1))
    sharded, _ = run_losses(mesh_shape)
    assert np.all(np.isfinite(single))
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)


def test_lora_training_lowers_loss_on_a_repeated_batch():
    mesh, fn, st, _, frozen = make_run(
        (1, 1, 1), opt_cfg=optim.OptimizerConfig(learning_rate=5e-2, total_steps=30))
    batch = step.put_batches(next(synthetic_batches(0)), mesh)
    losses = []
    for _ in range(30):
        st, m = fn(st, frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5


def test_full_finetune_shards_weights_and_optimizer_state_and_matches_1_device():
    single, _ = run_losses((1, 1, 1), steps=6, full_finetune=True)
    sharded, st = run_losses((1, 4, 2), steps=6, full_finetune=True)
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)
    kernel = st.trainable["layers"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    adam = st.opt_state[-1][0]  # chain(adamw) -> (ScaleByAdamState, ...)
    assert adam.mu["layers"]["gate_proj"]["kernel"].sharding.spec == kernel.sharding.spec
    assert adam.nu["embed_tokens"].sharding.spec == st.trainable["embed_tokens"].sharding.spec
    assert len(adam.mu["embed_tokens"].addressable_shards[0].data) < CFG.vocab_size


def test_gradient_accumulation_of_two_half_batches_equals_one_full_batch():
    c1 = optim.OptimizerConfig(learning_rate=1e-2, total_steps=4)
    c2 = optim.OptimizerConfig(learning_rate=1e-2, total_steps=4, accumulation_steps=2)
    _, fn1, s1, _, frozen = make_run((1, 1, 1), opt_cfg=c1)
    mesh, fn2, s2, _, _ = make_run((1, 1, 1), opt_cfg=c2)
    full = next(synthetic_batches(3))["user"]
    full["attention_mask"][:] = 1
    full["labels"] = np.where(full["labels"] == -100, full["input_ids"], full["labels"])
    halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    s1, _ = fn1(s1, frozen, step.put_batches({"user": full}, mesh))
    for h in halves:
        s2, _ = fn2(s2, frozen, step.put_batches({"user": h}, mesh))
    for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("overlap", [True, False])
def test_resume_after_interrupt_at_step_10_equals_uninterrupted_20_steps(tmp_path, overlap):
    mesh, fn, st0, st_sh, frozen = make_run((2, 4, 1))
    full, hist_full = loop.train(fn, st0, frozen, synthetic_batches, mesh=mesh, num_steps=20,
                                 progress=False, overlap=overlap)

    mesh, fn, st0, st_sh, frozen = make_run((2, 4, 1))
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", every=5, keep=2)
    _, first = loop.train(fn, st0, frozen, synthetic_batches, mesh=mesh, num_steps=10,
                          state_shardings=st_sh, checkpointer=ck, progress=False, overlap=overlap,
                          metrics_path=tmp_path / "m.jsonl")
    assert ck.manager.all_steps() == [5, 10]  # the periodic save at 5 (Checkpointer.due), kept
    ck.close()
    assert first[-1]["step"] == 10

    mesh, fn, fresh, st_sh, frozen = make_run((2, 4, 1))
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", every=5, keep=2)
    resumed, second = loop.train(fn, fresh, frozen, synthetic_batches, mesh=mesh, num_steps=20,
                                 state_shardings=st_sh, checkpointer=ck, progress=False,
                                 overlap=overlap, metrics_path=tmp_path / "m.jsonl")
    ck.close()
    assert [r["step"] for r in second] == list(range(11, 21))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in hist_full]
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(loop.read_metrics(tmp_path / "m.jsonl")) == 20


def _rows_written_when_each_batch_is_requested(tmp_path, **loop_kw):
    """(rows in the metrics file when each batch was requested, history, final state)."""
    metrics = tmp_path / "m.jsonl"
    metrics.unlink(missing_ok=True)
    seen = []

    def watched(start):
        for b in synthetic_batches(start):
            seen.append(len(loop.read_metrics(metrics)) if metrics.exists() else 0)
            yield b

    mesh, fn, st, _, frozen = make_run((1, 1, 1))
    final, hist = loop.train(fn, st, frozen, watched, mesh=mesh, num_steps=6,
                             metrics_path=metrics, progress=False, **loop_kw)
    assert [r["step"] for r in hist] == list(range(1, 7)) == [
        r["step"] for r in loop.read_metrics(metrics)]
    assert all(r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in hist)
    return seen, hist, final


def test_overlapped_loop_dispatches_step_k_plus_1_before_writing_step_k_with_equal_results(
        tmp_path):
    seen, hist, final = _rows_written_when_each_batch_is_requested(tmp_path, overlap=True)
    # batch j (for step j + 1) is requested while steps 1..j are dispatched and rows 1..j-1
    # are written; a loop that waits for each step shows [0, 1, 2, ...]
    assert seen == [0, 0, 1, 2, 3, 4]
    plain, plain_state = run_losses((1, 1, 1), steps=6)
    assert [r["loss"] for r in hist] == [float(x) for x in plain]
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(plain_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loop_on_cpu_waits_for_each_step_by_default(tmp_path):
    assert _rows_written_when_each_batch_is_requested(tmp_path)[0] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("overlap", [True, False])
def test_loop_evaluates_the_state_after_its_step_and_logs_it_in_that_row(tmp_path, overlap):
    def eval_fn(st, k):
        norm = sum(float(jnp.sum(x.astype(jnp.float32) ** 2))
                   for x in jax.tree.leaves(st.trainable))
        return {"state_step": int(st.step), "called_at": k, "sq_norm": norm}

    mesh, fn, st, _, frozen = make_run((1, 1, 1))
    _, hist = loop.train(fn, st, frozen, synthetic_batches, mesh=mesh, num_steps=7,
                         eval_fn=eval_fn, eval_every=3, metrics_path=tmp_path / "m.jsonl",
                         progress=False, overlap=overlap)
    evaluated = [r for r in hist if "eval/state_step" in r]
    assert [(r["step"], r["eval/called_at"], r["eval/state_step"]) for r in evaluated] == [
        (3, 3, 3), (6, 6, 6)]
    assert loop.read_metrics(tmp_path / "m.jsonl")[2]["eval/state_step"] == 3
    mesh, fn, st, _, frozen = make_run((1, 1, 1))
    data = synthetic_batches(0)
    for _ in range(6):
        st, _ = fn(st, frozen, step.put_batches(next(data), mesh))
    assert evaluated[1]["eval/sq_norm"] == pytest.approx(eval_fn(st, 6)["sq_norm"], rel=1e-6)


@pytest.mark.parametrize("overlap", [True, False])
def test_ctrl_c_stops_cleanly_with_a_final_checkpoint(tmp_path, overlap):
    def interrupting(start):
        for i, b in enumerate(synthetic_batches(start)):
            if start + i == 3:
                raise KeyboardInterrupt
            yield b

    for every in (100, 1):  # 1: the interrupted step was already saved periodically
        mesh, fn, st0, st_sh, frozen = make_run((1, 1, 1))
        ck = checkpoint.Checkpointer(tmp_path / f"ckpt{every}", every=every, keep=1)
        _, hist = loop.train(fn, st0, frozen, interrupting, mesh=mesh, num_steps=10,
                             state_shardings=st_sh, checkpointer=ck, progress=False,
                             overlap=overlap)
        ck.close()
        assert len(hist) == 3
        assert checkpoint.Checkpointer(tmp_path / f"ckpt{every}").latest_step() == 3


def test_length_buckets_compile_once_per_shape():
    mesh, fn, st, _, frozen = make_run((1, 1, 1))
    for length in (16, 32, 16, 32, 16):
        b = next(synthetic_batches(0, length=length))
        st, _ = fn(st, frozen, step.put_batches(b, mesh))
    assert fn.compiles == 2


def test_frozen_base_is_an_argument_not_a_compiled_constant():
    mesh, fn, st, _, frozen = make_run((1, 1, 1))
    b = step.put_batches(next(synthetic_batches(0)), mesh)
    args_info = fn.fn.lower(st, frozen, b).args_info[0]
    assert len(jax.tree.leaves(args_info[1])) == len(jax.tree.leaves(frozen))
    doubled = jax.tree.map(lambda x: x * 2, frozen)
    _, m1 = fn(jax.tree.map(jnp.copy, st), frozen, b)
    _, m2 = fn(jax.tree.map(jnp.copy, st), doubled, b)
    assert float(m1["loss"]) != float(m2["loss"])
    assert fn.compiles == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_run_matches_one_process_and_saves_the_same_peft_adapter(tmp_path):
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(WORKER), str(single), "--devices_per_process", "4",
                    "--adapter", str(tmp_path / "single_adapter")], check=True, timeout=300)
    port = _free_port()
    multi = tmp_path / "multi.json"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(multi), "--process_id", str(i),
                               "--num_processes", "2", "--port", str(port),
                               "--adapter", str(tmp_path / "multi_adapter")])
             for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["devices"] == b["devices"] == 4
    np.testing.assert_allclose(b["losses"], a["losses"], atol=1e-5, rtol=0)
    # the LoRA weights were sharded across the two processes, and save_peft gathered them
    assert b["lora_spans_processes"] and not a["lora_spans_processes"]
    one = load_file(tmp_path / "single_adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "multi_adapter" / "adapter_model.safetensors")
    assert sorted(one) == sorted(two) and len(one) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=1e-5, rtol=0)
    assert not list(tmp_path.glob(".multi_adapter.tmp-*"))


def test_optimizer_receives_the_gradient_oracle_and_all_batches_as_extra_args():
    """The oracle a chained transformation gets evaluates the real loss on the batch it names:
    its value on the "harmful" batch equals an independent forward + CE at the same weights
    (and differs from the loss on the "user" batch)."""
    seen = {}

    def record(name, value):
        seen[name] = float(value)

    def spy() -> optax.GradientTransformationExtraArgs:
        def update(updates, st, params=None, *, loss_fn, batches, rng, **_):
            jax.debug.callback(record, "harmful", loss_fn(params, batches["harmful"])[0])
            jax.debug.callback(record, "user", loss_fn(params, batches["user"])[0])
            return updates, st
        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    t = builder.build_training(CFG, LORA, mesh=mesh, optimizer=OPT_CFG, pre=[spy()])
    b = next(synthetic_batches(0))
    b["harmful"] = next(synthetic_batches(5))["user"]
    _, metrics = t.step(t.state, jax.device_put(BASE, t.frozen_shardings),
                        step.put_batches(b, mesh))
    jax.effects_barrier()
    harmful = b["harmful"]
    logits = forward(CFG, BASE, jnp.asarray(harmful["input_ids"]),
                     jnp.asarray(harmful["attention_mask"]), lora=LORA)
    expected, _ = token_cross_entropy(logits, jnp.asarray(harmful["labels"]))
    assert seen["harmful"] == pytest.approx(float(expected), rel=1e-5)
    assert seen["user"] == pytest.approx(float(metrics["loss"]), rel=1e-5)
    assert abs(seen["harmful"] - seen["user"]) > 1e-3


def test_a_diverged_step_stops_the_loop_naming_it_and_no_checkpoint_holds_its_state(tmp_path):
    """Step 2 runs on base weights holding a NaN (as after an overflow): its loss is NaN; the
    loop raises at step 2 and the last checkpoint is step 1's."""
    mesh, fn, st, st_sh, frozen = make_run((1, 1, 1))
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), frozen)
    calls = []

    def diverging(state_, frozen_, batches):
        calls.append(1)
        return fn(state_, poisoned if len(calls) == 2 else frozen_, batches)

    ck = checkpoint.Checkpointer(tmp_path / "ckpt", every=1, keep=3)
    with pytest.raises(loop.NonFiniteError, match=r"training step 2: loss nan.*last checkpoint "
                                                  r"is step 1"):
        loop.train(diverging, st, frozen, synthetic_batches, mesh=mesh, num_steps=10,
                   state_shardings=st_sh, checkpointer=ck, progress=False,
                   metrics_path=tmp_path / "m.jsonl")
    ck.close()
    assert checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == 1
    assert [r["step"] for r in loop.read_metrics(tmp_path / "m.jsonl")] == [1]


def test_skip_nonfinite_leaves_weights_and_optimizer_state_and_too_many_skips_stop(tmp_path):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    broken = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), LORA)
    t = builder.build_training(CFG, broken, mesh=mesh, optimizer=OPT_CFG, skip_nonfinite=True)
    fn, st, opt = t.step, t.state, t.optimizer
    frozen = jax.device_put(BASE, t.frozen_shardings)
    before = jax.device_get((st.trainable, st.opt_state))
    after, metrics = fn(st, frozen, step.put_batches(next(synthetic_batches(0)), mesh))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(
            (after.trainable, after.opt_state))), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    st, _ = step.init_state(CFG, broken, opt, mesh=mesh, seed=0)
    with pytest.raises(loop.NonFiniteError, match="training step 3: 3 steps in a row"):
        loop.train(fn, st, frozen, synthetic_batches, mesh=mesh, num_steps=10, progress=False,
                   max_consecutive_skips=2)
    fine, _ = step.init_state(CFG, LORA, opt, mesh=mesh, seed=0)
    _, metrics = fn(fine, frozen, step.put_batches(next(synthetic_batches(0)), mesh))
    assert float(metrics["skipped"]) == 0.0


def test_resume_after_a_crash_cuts_the_metrics_file_back_to_the_checkpoint(tmp_path):
    """A crash (not Ctrl-C: no final checkpoint) after step 3 with checkpoints every 2 steps:
    rows 1-3 are written, the resume restarts from step 2 and the file ends with steps 1-6 once
    each."""
    def crashing(start):
        for i, b in enumerate(synthetic_batches(start)):
            if start + i == 3:
                raise RuntimeError("simulated crash")
            yield b

    mesh, fn, st0, st_sh, frozen = make_run((1, 1, 1))
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", every=2, keep=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(fn, st0, frozen, crashing, mesh=mesh, num_steps=6, state_shardings=st_sh,
                   checkpointer=ck, progress=False, metrics_path=tmp_path / "m.jsonl")
    ck.close()
    assert [r["step"] for r in loop.read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]
    mesh, fn, st0, st_sh, frozen = make_run((1, 1, 1))
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", every=2, keep=2)
    _, rows = loop.train(fn, st0, frozen, synthetic_batches, mesh=mesh, num_steps=6,
                         state_shardings=st_sh, checkpointer=ck, progress=False,
                         metrics_path=tmp_path / "m.jsonl")
    ck.close()
    assert [r["step"] for r in rows] == [3, 4, 5, 6]
    assert [r["step"] for r in loop.read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_sigterm_stops_training_with_a_final_checkpoint_like_ctrl_c(tmp_path):
    def terminated_at_step_3(start):
        for i, b in enumerate(synthetic_batches(start)):
            if start + i == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield b

    mesh, fn, st0, st_sh, frozen = make_run((1, 1, 1))
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", every=100, keep=1)
    previous = signal.getsignal(signal.SIGTERM)
    _, hist = loop.train(fn, st0, frozen, terminated_at_step_3, mesh=mesh, num_steps=10,
                         state_shardings=st_sh, checkpointer=ck, progress=False)
    ck.close()
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back
    assert len(hist) in (3, 4)  # the signal lands while batch 4 is built or step 4 runs
    assert checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == len(hist)


def test_a_second_interrupt_during_the_final_checkpoint_is_reported_and_the_save_completes(
        tmp_path, capsys):
    class InterruptedAgain(checkpoint.Checkpointer):
        def save(self, step_, state_, meta, *, force=False):
            if force:  # the final save after Ctrl-C: the user presses Ctrl-C again
                os.kill(os.getpid(), signal.SIGINT)
            return super().save(step_, state_, meta, force=force)

    def interrupting(start):
        for i, b in enumerate(synthetic_batches(start)):
            if start + i == 2:
                raise KeyboardInterrupt
            yield b

    mesh, fn, st0, st_sh, frozen = make_run((1, 1, 1))
    ck = InterruptedAgain(tmp_path / "ckpt", every=100, keep=1)
    _, hist = loop.train(fn, st0, frozen, interrupting, mesh=mesh, num_steps=10,
                         state_shardings=st_sh, checkpointer=ck, progress=False)
    ck.close()
    assert len(hist) == 2 and checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == 2
    assert "a final checkpoint is being written" in capsys.readouterr().err


def _dropout_step(dropout: float):
    """(jitted step, state, frozen, batches) for LoRA with dropout p on one device."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    lora = LORA.replace(weights={n: {"A": w["A"], "B": w["B"] + 0.1} for n, w in
                                 LORA.weights.items()}, dropout=dropout)
    t = builder.build_training(CFG, lora, mesh=mesh, optimizer=OPT_CFG)
    return t.step, t.state, jax.device_put(BASE, t.frozen_shardings), step.put_batches(
        next(synthetic_batches(0)), mesh)


def test_lora_dropout_in_the_train_step_uses_the_step_key_and_p_0_traces_no_dropout():
    """With p > 0 the step's loss is the loss under dropout_rng = fold_in(state.rng, 2), so
    every step (a new state.rng) draws new masks; with p = 0 no random bits are drawn at all
    and the rng does not change the step."""
    from defense_fixtures import primitives

    from hfjax.train.loss import make_loss_fn

    for p in (0.0, 0.2):
        fn, st, frozen, batches = _dropout_step(p)
        jaxpr = jax.make_jaxpr(fn.fn)(st, frozen, batches).jaxpr
        assert ("random_bits" in primitives(jaxpr)) == (p > 0)
        trainable = jax.tree.map(jnp.copy, st.trainable)  # the step donates st
        _, first = fn(st, frozen, batches)
        st2 = step.init_state(CFG, trainable, optim.make_optimizer(OPT_CFG),
                              mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                              seed=1)[0]
        _, second = fn(st2, frozen, batches)  # same weights and batch, another step key
        if p == 0:
            assert float(first["loss"]) == float(second["loss"])
            continue
        assert abs(float(first["loss"]) - float(second["loss"])) > 1e-4
        expected, _ = make_loss_fn(CFG, BASE)(trainable, batches["user"],
                                              dropout_rng=jax.random.fold_in(
                                                  jax.random.PRNGKey(0), 2))
        assert float(first["loss"]) == pytest.approx(float(expected), rel=1e-5)
        assert float(first["grad_norm"]) > 0
