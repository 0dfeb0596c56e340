"""Train-state checkpoints with orbax `CheckpointManager`, verified by checksums.

Each checkpoint holds the TrainState (step, trainable, optimizer state, rng) and a JSON item
with what the data pipeline needs to resume (the step it continues from). Restoring into the
abstract state with its shardings puts every array back where the step expects it.

Orbax and tensorstore keep no checksums of the array data, so a step folder whose bytes changed
on disk would restore silently. hfjax therefore writes `STEP/hfjax_checksums.json` (sha256 and
size of every file of the step) once orbax has finalized the step: orbax's post-finalization
callback runs before orbax itself writes `commit_success.txt`, stamps `_CHECKPOINT_METADATA` and
renames the temporary folder, so the hook is the finalization of orbax's temporary path (the
same for synchronous and asynchronous saves), right after that rename. A step without the file
did not finish (e.g. the process was killed in between) and is unverified.

`Checkpointer.restore_latest` tries the steps newest first and takes the first good one: its
checksums match, orbax restores it, and every floating leaf is finite. A bad step is renamed to
`DIR/corrupt-STEP-<reason>` (kept for inspection; it never blocks a later save of that step)
with one printed line. Multi-host: the folder is shared; process 0 writes the checksums, prints
and renames, every process reads.

A failed write (a full disk, any OSError, also as tensorstore reports it: an error whose message
carries `os_error_code`) becomes one `CheckpointError` naming the folder, the errno text and the
free space. Orbax also reports such a failure from each of its background threads as a logged
traceback before raising it in the caller; tensorstore's late write completions then hit
orbax's closed event loop (`RuntimeError: Event loop is closed`) and orbax's abandoned write
coroutines fail when collected, both printed as unraisable exceptions, and asyncio logs the
failures of orbax's futures nobody retrieved. Once a Checkpointer
exists, these echoes are dropped (`_quiet_orbax`): the error itself reaches the caller.
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from hfjax.errors import UserError
from hfjax.eval.report import atomic_open
from hfjax.train.state import TrainState

CHECKSUMS = "hfjax_checksums.json"
_ORBAX_DIR = str(Path(ocp.__file__).parent)
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class CheckpointError(UserError, OSError):
    """A checkpoint could not be written or read; the message names the folder and the cause."""


class CorruptCheckpointError(CheckpointError):
    """A step on disk is not a usable checkpoint; `slug` names the reason in one word."""

    def __init__(self, message: str, slug: str):
        super().__init__(message)
        self.slug = slug


def file_checksums(step_dir: Path) -> dict[str, dict]:
    """{path relative to `step_dir`: {"sha256", "size"}} of every file under it but CHECKSUMS."""
    out = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(step_dir).as_posix()
        if rel != CHECKSUMS:
            with path.open("rb") as f:
                out[rel] = {"sha256": hashlib.file_digest(f, "sha256").hexdigest(),
                            "size": os.fstat(f.fileno()).st_size}
    return out


def write_checksums(step_dir: Path) -> None:
    """Record `file_checksums(step_dir)` in `step_dir/CHECKSUMS` (temp file + rename)."""
    files = file_checksums(step_dir)
    with atomic_open(step_dir / CHECKSUMS) as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1)


def checksum_problem(step_dir: Path) -> str | None:
    """None when `step_dir/CHECKSUMS` exists and matches its files; else what is wrong.

    Sizes are compared before hashes, so a truncated file is named without reading the rest."""
    try:
        recorded = json.loads((step_dir / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        return f"no {CHECKSUMS}: its save did not finish"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {CHECKSUMS} ({type(e).__name__}: {e})"
    present = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                     if p.is_file() and p.name != CHECKSUMS)
    if missing := sorted(set(recorded) - set(present)):
        return f"missing file {missing[0]}"
    if extra := sorted(set(present) - set(recorded)):
        return f"unexpected file {extra[0]}"
    for rel in present:
        size = (step_dir / rel).stat().st_size
        if size != recorded[rel]["size"]:
            return f"size mismatch in {rel}: {size} bytes, {recorded[rel]['size']} recorded"
    actual = file_checksums(step_dir)
    for rel in present:
        if actual[rel]["sha256"] != recorded[rel]["sha256"]:
            return f"checksum mismatch in {rel}"
    return None


def first_nonfinite_leaf(tree) -> str | None:
    """The key path of the first floating leaf holding a NaN or an infinity; None if all finite."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.isfinite(leaf).all()):
            return jax.tree_util.keystr(path)
    return None


def os_error_of(exc: BaseException) -> tuple[int, str] | None:
    """(errno, its text) of the OSError behind `exc` (following its causes and contexts), also
    when tensorstore reports it inside a ValueError's message as `os_error_code='28'`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno, exc.strerror or os.strerror(exc.errno)
        if m := _OS_ERROR_CODE.search(str(exc)):
            return int(m.group(1)), os.strerror(int(m.group(1)))
        exc = exc.__cause__ or exc.__context__
    return None


def _human(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}"


def free_space(path: Path) -> str:
    """'F free of T' on the filesystem holding `path` (its nearest existing ancestor)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return f"{_human(usage.free)} free of {_human(usage.total)}"


class _DropOrbaxExceptionReports(logging.Filter):
    """Drops logged exceptions raised in orbax's code (orbax's own reports, and asyncio's
    "exception was never retrieved" for orbax's futures): orbax raises them in the caller."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        files = [record.pathname, *(f.filename for f in traceback.extract_tb(record.exc_info[2]))]
        return not any(f.startswith(_ORBAX_DIR) for f in files)


def _is_orbax_leftover(unraisable) -> bool:
    """Whether an unraisable exception is an echo of a failed orbax write: tensorstore's late
    completions hitting orbax's closed event loop, or orbax's abandoned write coroutines."""
    obj, exc = unraisable.object, unraisable.exc_value
    if obj is None:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    code = getattr(obj, "cr_code", None)
    return code is not None and code.co_filename.startswith(_ORBAX_DIR)


def _drop_orbax_leftovers(hook: Callable) -> Callable:
    """`hook` (a `sys.unraisablehook`) that ignores `_is_orbax_leftover` exceptions."""

    def quiet(unraisable) -> None:
        if not _is_orbax_leftover(unraisable):
            hook(unraisable)

    quiet.hfjax_quiet = True
    return quiet


def _quiet_orbax() -> None:
    """Install (once) the log filter and the unraisable-exception filter described above."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropOrbaxExceptionReports) for f in logger.filters):
            logger.addFilter(_DropOrbaxExceptionReports())
    if not getattr(sys.unraisablehook, "hfjax_quiet", False):
        sys.unraisablehook = _drop_orbax_leftovers(sys.unraisablehook)


def _checksumming_temporary_path(directory: Path) -> type:
    """Orbax's atomic-rename temporary path that, once a step folder of `directory` is renamed
    into place, writes its checksums (process 0; item subfolders are left alone)."""

    class ChecksummedTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self) -> None:
            await super().finalize()
            final = Path(self.get_final())
            if final.parent == directory and jax.process_index() == 0:
                write_checksums(final)

    return ChecksummedTemporaryPath


class Checkpointer:
    """Save every `every` steps, keep the last `keep`, asynchronously, under an absolute path."""

    def __init__(self, directory: str | os.PathLike, *, every: int = 100, keep: int = 2,
                 async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every={every} and keep={keep} must be >= 1")
        _quiet_orbax()
        self.directory = Path(directory).absolute()
        self._pending: int | None = None  # the last step handed to orbax
        self._options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=async_save,
            temporary_path_class=_checksumming_temporary_path(self.directory))
        self.manager = ocp.CheckpointManager(self.directory, options=self._options,
                                             item_names=("state", "meta"))

    def _restart_manager(self) -> None:
        """After a failed write: close orbax's manager, dropping the further reports of that
        failure it raises from its other threads, and open a fresh one on the same folder."""
        with contextlib.suppress(Exception):
            self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options,
                                             item_names=("state", "meta"))

    @contextlib.contextmanager
    def _write_errors(self, step: int | None) -> Iterator[None]:
        """OSErrors (and tensorstore's I/O errors) inside become one CheckpointError."""
        try:
            yield
        except Exception as e:
            found = os_error_of(e)
            if found is None:
                raise
            self._restart_manager()
            code, text = found
            what = "a checkpoint" if step is None else f"checkpoint step {step}"
            err = CheckpointError(
                f"could not write {what} under {self.directory}: {text} "
                f"({errno_lib.errorcode.get(code, code)}); {free_space(self.directory)} on its "
                f"filesystem\n  cause: {type(e).__name__}: {e}")
            err.errno = code
            raise err from None

    def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> bool:
        """Write (state, meta) as `step` if due (or `force`); asynchronous unless configured
        otherwise. Raises CheckpointError for a failed write, of this step or the previous one."""
        self.wait()
        with self._write_errors(step):
            saved = self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)),
                force=force)
        if saved:
            self._pending = step
        return saved

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would write a checkpoint (interval, first save, preemption)."""
        return self.manager.should_save(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _corrupt(self, step: int, reason: str, slug: str) -> CorruptCheckpointError:
        state = "unverified" if slug == "unverified" else "corrupt"
        return CorruptCheckpointError(
            f"checkpoint step {step} under {self.directory} is {state} ({reason})", slug)

    def _verify(self, step: int, *, required: bool) -> None:
        """Raise CorruptCheckpointError unless the step's recorded checksums match its files
        (a step without checksums passes unless `required`)."""
        step_dir = self._step_dir(step)
        recorded = (step_dir / CHECKSUMS).exists()
        if not recorded and not required:
            return
        if (problem := checksum_problem(step_dir)) is not None:
            raise self._corrupt(step, problem, "checksum-mismatch" if recorded else "unverified")

    def _read(self, step: int, abstract_state: TrainState,
              shardings: TrainState) -> tuple[TrainState, dict]:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, shardings)
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                              meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise self._corrupt(step, f"orbax cannot restore it: {type(e).__name__}: {e}",
                                "unreadable") from e
        return out["state"], out["meta"]

    def restore(self, abstract_state: TrainState, shardings: TrainState,
                step: int | None = None) -> tuple[TrainState, dict]:
        """(state, meta) of `step` (default: latest), placed with `shardings`; its checksums are
        checked when recorded. Raises CheckpointError naming the step folder if it is bad."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        self._verify(step, required=False)
        return self._read(step, abstract_state, shardings)

    def _move_aside(self, step: int, slug: str) -> Path:
        """Rename the step folder to `corrupt-STEP-slug` (numbered if taken); process 0 only."""
        target = self.directory / f"corrupt-{step}-{slug}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"corrupt-{step}-{slug}-{n}"
        if jax.process_index() == 0:
            os.replace(self._step_dir(step), target)
        return target

    def restore_latest(self, abstract_state: TrainState,
                       shardings: TrainState) -> tuple[TrainState, dict] | None:
        """(state, meta) of the newest good step, or None (restart from step 0) if none is.

        Good: its checksum file exists and matches, orbax restores it, every floating leaf is
        finite. Each bad step is moved aside with one printed line, and the next older tried."""
        self.wait()
        steps = sorted(self.manager.all_steps(), reverse=True)
        restored, rejected = None, False
        for i, step in enumerate(steps):
            try:
                restored = self._restore_good(step, abstract_state, shardings)
                break
            except CorruptCheckpointError as e:
                rejected = True
                moved = self._move_aside(step, e.slug)
                then = (f"falling back to step {steps[i + 1]}" if i + 1 < len(steps)
                        else "no good checkpoint is left: training restarts from step 0")
                if jax.process_index() == 0:
                    print(f"{e}; moved to {moved}; {then}", file=sys.stderr, flush=True)
        if rejected:
            ocp.multihost.sync_global_processes("hfjax_checkpoint_fallback")
            self.manager.reload()
        return restored

    def _restore_good(self, step: int, abstract_state: TrainState,
                      shardings: TrainState) -> tuple[TrainState, dict]:
        """(state, meta) of `step` if it is good, else CorruptCheckpointError."""
        self._verify(step, required=True)
        state, meta = self._read(step, abstract_state, shardings)
        if (leaf := first_nonfinite_leaf(state)) is not None:
            raise self._corrupt(step, f"non-finite values in {leaf}", "non-finite")
        return state, meta

    def wait(self) -> None:
        """Block until the pending save is on disk; a failed write raises CheckpointError."""
        with self._write_errors(self._pending):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()
