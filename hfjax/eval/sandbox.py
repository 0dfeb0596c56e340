"""Run untrusted generated Python in a separate, limited process; never in this one.

`run_program(code)` writes the code into a fresh temporary directory (removed afterwards) and
starts

    [unshare --user --map-current-user --net --]  python -I -S -B sandbox_guard.py ROOT ...

- isolated mode (`-I`: no PYTHON* variables, no user site, script directory not on the path),
  no site-packages (`-S`), no bytecode writes (`-B`); a minimal environment (PATH, LANG,
  HOME = TMPDIR = the work directory, MALLOC_ARENA_MAX = 1 so that the address-space limit
  counts memory rather than per-thread arena reservations); stdin closed;
- its own session (`start_new_session`), so on the wall time limit the whole process group is
  killed (SIGKILL);
- a new, empty network namespace when unprivileged `unshare` works here (detected once:
  `network_namespace_command()`), otherwise without one; in both cases the guard refuses
  every socket connect;
- `hfjax.eval.sandbox_guard` then sets the CPU, address-space and file-size limits, installs
  the audit-hook guard (writes only inside the work directory, no processes, no sockets, no
  ctypes) and runs the code. Its docstring says exactly what is and is not contained: this is
  damage control for generated code, not a security boundary against a determined attacker.

Statuses: "passed" (ran to the end), "failed" (raised, e.g. a failing assert, or exited
early), "timeout" (wall or CPU time limit), "memory" (MemoryError under the address-space
limit), "error" (does not compile, did something the guard refuses, crashed, or left no
verdict).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from hfjax.errors import UserError
from hfjax.eval import sandbox_guard

__all__ = ["SandboxError", "SandboxResult", "network_namespace_command", "run_program"]

Status = Literal["passed", "failed", "timeout", "memory", "error"]

FILE_LIMIT_BYTES = 64 * 2**20
"""Largest file (stdout and stderr included) the program may write."""

_NAMESPACE_FLAGS = (("--user", "--map-current-user", "--net"),
                    ("--user", "--map-root-user", "--net"))


class SandboxError(UserError, ValueError):
    """An impossible sandbox request (a non-positive time or memory limit, code not a str)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What running one program gave: `passed` is `status == "passed"`."""

    passed: bool
    status: Status
    detail: str


@functools.cache
def network_namespace_command() -> tuple[str, ...]:
    """The `unshare ... --` prefix that runs a command in a new, empty network namespace as an
    unprivileged user, or () where no variant works here (detected once, by running Python)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in _NAMESPACE_FLAGS:
        prefix = (unshare, *flags, "--")
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"],
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _check(code: str, timeout_s: float, memory_mb: int) -> None:
    if not isinstance(code, str):
        raise SandboxError(f"the program must be a str, got {type(code).__name__}")
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise SandboxError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not (isinstance(memory_mb, int) and memory_mb > 0):
        raise SandboxError(f"memory_mb must be a positive integer, got {memory_mb!r}")


def _tail(path: Path, limit: int = 2000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - limit))
        return f.read().decode("utf-8", "replace").strip()


def _verdict(root: Path, nonce: str, returncode: int) -> SandboxResult:
    """The result from the guard's verdict file, or from how the process ended without one."""
    verdict = root / "verdict"
    text = verdict.read_text(errors="replace") if verdict.exists() else ""
    head, _, body = text.partition("\n")
    if head == nonce and body:
        status, detail = json.loads(body)
        return SandboxResult(status == "passed", status, detail)
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult(False, "timeout", "CPU time limit")
    how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0
           else f"exited with code {returncode}")
    stderr = _tail(root / "stderr")
    return SandboxResult(False, "error", f"the program left no verdict ({how})"
                         + (f": {stderr}" if stderr else ""))


def run_program(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512,
                network_namespace: bool | None = None) -> SandboxResult:
    """Run the Python program `code` in the sandbox (see the module docstring).

    timeout_s: wall time limit (the CPU limit is its ceiling); memory_mb: address-space limit
    of the process; network_namespace: None uses one where available, False never (the guard
    alone then refuses sockets), True requires one (SandboxError where `unshare` fails).
    """
    _check(code, timeout_s, memory_mb)
    prefix = network_namespace_command() if network_namespace is not False else ()
    if network_namespace and not prefix:
        raise SandboxError("network_namespace=True, but unprivileged `unshare --user --net` "
                           "does not work on this machine")
    with tempfile.TemporaryDirectory(prefix="hfjax-sandbox-", ignore_cleanup_errors=True) as d:
        root = Path(d)
        work = root / "work"
        work.mkdir()
        nonce = secrets.token_hex(16)
        (root / "nonce").write_text(nonce)
        (root / "program.py").write_text(code, encoding="utf-8", errors="replace")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
               "TMPDIR": str(work), "MALLOC_ARENA_MAX": "1"}
        argv = [*prefix, sys.executable, "-I", "-S", "-B", sandbox_guard.__file__, str(root),
                str(math.ceil(timeout_s)), str(memory_mb * 2**20), str(FILE_LIMIT_BYTES)]
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return SandboxResult(False, "timeout", f"wall time limit {timeout_s:g} s")
        return _verdict(root, nonce, returncode)
