"""Checkpoints: checksums after finalization, fallback past corrupt steps, one clear write error."""

import errno
import gc
import json
import logging
import re
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils.epath import backend as epath_backend

from hfjax.train import checkpoint
from hfjax.train import state as state_lib
from hfjax.train.checkpoint import CHECKSUMS, Checkpointer, CheckpointError


def _state(value: float) -> state_lib.TrainState:
    """A small TrainState whose trainable `w` is random (so its data file is the largest) and
    whose `b` is filled with `value`, which tells the saved steps apart."""
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 64))
    return state_lib.create({"w": w, "b": jnp.full((8,), value)}, optax.adamw(1e-3), 0)


def _target(st: state_lib.TrainState):
    """(abstract state, shardings) to restore `st`'s structure onto one device."""
    one = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("d",)),
                                     jax.sharding.PartitionSpec())
    return jax.eval_shape(lambda: st), jax.tree.map(lambda _: one, st)


def _save_steps(directory: Path, values: dict[int, float], async_save: bool = True) -> None:
    ck = Checkpointer(directory, every=1, keep=len(values), async_save=async_save)
    for step, value in values.items():
        ck.save(step, _state(value), {"next_step": step})
    ck.close()


def _restore_latest(directory: Path):
    ck = Checkpointer(directory, every=1, keep=2)
    out = ck.restore_latest(*_target(_state(0.0)))
    return ck, out


def _flip_bytes(path: Path, n: int = 25) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _assert_fell_back(capsys, directory: Path, ck, out, *, reason: str, slug: str,
                      state_word: str = "corrupt"):
    """Step 2 was moved aside with the one-line message and step 1 (b == 1) restored."""
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"checkpoint step 2 under {re.escape(str(directory))} is {state_word} \({reason}\); "
        rf"moved to {re.escape(str(directory / f'corrupt-2-{slug}'))}; falling back to step 1\n",
        err), err
    assert (directory / f"corrupt-2-{slug}").is_dir() and not (directory / "2").exists()
    assert ck.latest_step() == 1
    state, meta = out
    assert meta == {"next_step": 1}
    np.testing.assert_array_equal(state.trainable["b"], np.full((8,), 1.0))


@pytest.mark.parametrize("async_save", [True, False])
def test_a_saved_step_records_the_checksum_of_every_file_and_restores_verified(
        tmp_path, capsys, async_save):
    _save_steps(tmp_path / "ck", {1: 1.0, 2: 2.0}, async_save=async_save)
    step_dir = tmp_path / "ck" / "2"
    recorded = json.loads((step_dir / CHECKSUMS).read_text())["files"]
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
               if p.is_file() and p.name != CHECKSUMS}
    assert set(recorded) == on_disk and "state/_METADATA" in on_disk
    assert not list((step_dir / "state").rglob(CHECKSUMS))  # item folders get none
    assert checkpoint.checksum_problem(step_dir) is None
    ck, out = _restore_latest(tmp_path / "ck")
    state, meta = out
    assert meta == {"next_step": 2} and capsys.readouterr().err == ""
    expected = _state(2.0)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ck.manager.all_steps() == [1, 2]


def test_flipped_bytes_in_the_newest_data_file_fall_back_to_the_previous_step(tmp_path, capsys):
    _save_steps(tmp_path / "ck", {1: 1.0, 2: 2.0})
    data_file = _largest_data_file(tmp_path / "ck" / "2")
    size = data_file.stat().st_size
    _flip_bytes(data_file)
    assert data_file.stat().st_size == size
    rel = data_file.relative_to(tmp_path / "ck" / "2").as_posix()
    ck, out = _restore_latest(tmp_path / "ck")
    _assert_fell_back(capsys, tmp_path / "ck", ck, out, reason=f"checksum mismatch in {rel}",
                      slug="checksum-mismatch")


def test_an_empty_metadata_file_falls_back_to_the_previous_step(tmp_path, capsys):
    _save_steps(tmp_path / "ck", {1: 1.0, 2: 2.0})
    meta_file = tmp_path / "ck" / "2" / "state" / "_METADATA"
    size = meta_file.stat().st_size
    meta_file.write_bytes(b"")
    ck, out = _restore_latest(tmp_path / "ck")
    _assert_fell_back(capsys, tmp_path / "ck", ck, out,
                      reason=f"size mismatch in state/_METADATA: 0 bytes, {size} recorded",
                      slug="checksum-mismatch")


def test_a_step_orbax_cannot_read_falls_back_and_restore_names_its_folder(tmp_path, capsys):
    """Checksums taken of an already broken step match; orbax's failure rejects it."""
    _save_steps(tmp_path / "ck", {1: 1.0, 2: 2.0})
    (tmp_path / "ck" / "2" / "state" / "_METADATA").write_bytes(b"")
    checkpoint.write_checksums(tmp_path / "ck" / "2")
    with pytest.raises(CheckpointError, match=rf"checkpoint step 2 under "
                       rf"{re.escape(str(tmp_path / 'ck'))} is corrupt \(orbax cannot restore "
                       rf"it: JSONDecodeError"):
        Checkpointer(tmp_path / "ck").restore(*_target(_state(0.0)))
    ck, out = _restore_latest(tmp_path / "ck")
    _assert_fell_back(capsys, tmp_path / "ck", ck, out,
                      reason="orbax cannot restore it: JSONDecodeError: .*", slug="unreadable")


def test_a_step_holding_nan_is_rejected(tmp_path, capsys):
    _save_steps(tmp_path / "ck", {1: 1.0, 2: float("nan")})
    ck, out = _restore_latest(tmp_path / "ck")
    _assert_fell_back(capsys, tmp_path / "ck", ck, out,
                      reason=re.escape("non-finite values in .trainable['b']"), slug="non-finite")


def test_a_step_without_checksums_is_unverified_and_skipped(tmp_path, capsys):
    _save_steps(tmp_path / "ck", {1: 1.0, 2: 2.0})
    (tmp_path / "ck" / "2" / CHECKSUMS).unlink()  # as if killed before the checksums
    ck, out = _restore_latest(tmp_path / "ck")
    _assert_fell_back(capsys, tmp_path / "ck", ck, out, state_word="unverified",
                      reason=f"no {CHECKSUMS}: its save did not finish", slug="unverified")


def test_when_every_step_is_bad_restore_latest_returns_none_and_says_training_restarts(
        tmp_path, capsys):
    _save_steps(tmp_path / "ck", {1: float("inf"), 2: 2.0})
    _flip_bytes(_largest_data_file(tmp_path / "ck" / "2"))
    ck, out = _restore_latest(tmp_path / "ck")
    assert out is None and ck.latest_step() is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("corrupt-2-checksum-mismatch; falling back to step 1")
    assert lines[1].endswith(
        "corrupt-1-non-finite; no good checkpoint is left: training restarts from step 0")
    # the moved-aside steps do not block saving those steps again
    ck.save(1, _state(1.0), {"next_step": 1}, force=True)
    ck.close()
    assert Checkpointer(tmp_path / "ck").latest_step() == 1


def test_restore_of_a_step_with_a_mismatching_checksum_raises_a_checkpoint_error(tmp_path):
    _save_steps(tmp_path / "ck", {1: 1.0})
    _flip_bytes(_largest_data_file(tmp_path / "ck" / "1"))
    with pytest.raises(CheckpointError, match="checkpoint step 1 under .* is corrupt "
                                              r"\(checksum mismatch in state/"):
        Checkpointer(tmp_path / "ck").restore(*_target(_state(0.0)))


@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_disk_during_save_raises_one_checkpoint_error_without_tracebacks(
        tmp_path, monkeypatch, capfd, caplog, async_save):
    """Every Python-level file write under the folder (orbax writes its JSON and commit files
    through etils.epath's os backend) fails with ENOSPC, as on a full disk."""
    directory = tmp_path / "ck"
    real_open = epath_backend.os_backend.open

    def full_disk_open(path, mode):
        if str(path).startswith(str(directory)) and any(c in mode for c in "wax"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode)

    monkeypatch.setattr(epath_backend.os_backend, "open", full_disk_open)
    caplog.set_level(logging.INFO)
    ck = Checkpointer(directory, every=1, keep=2, async_save=async_save)
    with pytest.raises(CheckpointError) as info:
        ck.save(1, _state(1.0), {"next_step": 1})
        ck.wait()
    message = str(info.value)
    assert message.startswith(f"could not write checkpoint step 1 under {directory}: "
                              "No space left on device (ENOSPC); ")
    assert re.search(r"[\d.]+ [KMGT]?i?B free of [\d.]+ [KMGT]?i?B on its filesystem", message)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    ck.wait()  # reported once
    ck.close()
    with warnings.catch_warnings(record=True):  # "never awaited": orbax's abandoned writes
        gc.collect()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err + caplog.text
    assert not [r for r in caplog.records if r.exc_info]


def test_tensorstore_write_errors_are_read_as_os_errors():
    """A full disk under tensorstore surfaces as a ValueError carrying the errno in its text."""
    exc = ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database: Failed to '
                     "write 922759 bytes to file 4: No space left on device "
                     "[os_error_code='28']")
    assert checkpoint.os_error_of(exc) == (errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("background save failed")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    assert checkpoint.os_error_of(wrapped) == (errno.EIO, "Input/output error")
    assert checkpoint.os_error_of(ValueError("shape mismatch")) is None


def test_the_unraisable_hook_drops_only_the_echoes_of_a_failed_orbax_write():
    seen = []
    hook = checkpoint._drop_orbax_leftovers(seen.append)

    def coroutine_from(filename):
        return types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=filename))

    closed_loop = types.SimpleNamespace(object=None,
                                        exc_value=RuntimeError("Event loop is closed"))
    orbax_coroutine = types.SimpleNamespace(
        object=coroutine_from(checkpoint._ORBAX_DIR + "/_src/serialization/serialization.py"),
        exc_value=ImportError("sys.meta_path is None, Python is likely shutting down"))
    others = [types.SimpleNamespace(object=None, exc_value=RuntimeError("something else")),
              types.SimpleNamespace(object=coroutine_from("/elsewhere/app.py"),
                                    exc_value=RuntimeError("Event loop is closed"))]
    for u in [closed_loop, orbax_coroutine, *others]:
        hook(u)
    assert seen == others
