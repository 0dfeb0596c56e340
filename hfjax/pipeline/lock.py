"""Exclusive locks on run folders and shared stage folders, so two processes never write one.

A lock is an advisory `fcntl.flock` on a lock file that also records its holder (pid, host,
start time, command line). The kernel drops the lock when the holder exits, however it exits
(Ctrl-C, SIGKILL, a crash), so a lock is never stale. A second process either refuses at once
with a message naming the holder (run folders: two runs writing one folder is a mistake) or
waits for the holder to finish (a sweep's shared stage: the other process is computing exactly
what this one needs).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from hfjax.errors import UserError


class LockedError(UserError, RuntimeError):
    """The folder is locked by another process."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        return "another process"
    command = str(info.get("command", "?"))
    if len(command) > 120:
        command = command[:117] + "..."
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({command})"


@contextlib.contextmanager
def folder_lock(lock_file: str | os.PathLike, what: str, *, wait: bool = False,
                poll_s: float = 1.0) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` for the block.

    `what` names the locked thing in messages ("run folder /r"). With `wait`, block until the
    holder releases it (printing once who holds it); otherwise raise `LockedError` at once.
    """
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise LockedError(f"{what} is in use by {holder}; wait for it to finish, or "
                                      f"use another folder") from None
                if not told:
                    print(f"{what} is in use by {holder}; waiting for it", file=sys.stderr,
                          flush=True)
                    told = True
                time.sleep(poll_s)
        info = {"pid": os.getpid(), "host": platform.node(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
