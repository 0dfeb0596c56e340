"""The child side of `hfjax.eval.sandbox`: limits, a guard, then the untrusted program.

Run as `python -I -S -B sandbox_guard.py ROOT CPU_S MEMORY_BYTES FILE_BYTES` in a fresh process
(standard library only: isolated mode puts no site-packages on the path). ROOT holds
`program.py`, a one-time `nonce` and the `work/` directory. In order, before the program runs:

1. read and delete the nonce, open `ROOT/verdict`, read the program;
2. make `work/` the current directory, close stdin;
3. `resource.setrlimit`: RLIMIT_CPU (soft CPU_S, hard CPU_S + 1), RLIMIT_AS (address space,
   MEMORY_BYTES), RLIMIT_FSIZE (largest file written, FILE_BYTES), RLIMIT_CORE 0;
4. install an audit hook (PEP 578; it cannot be removed) that raises `SandboxRefusal` on
   - opening for writing (any of O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND) a path whose
     real path (symlinks resolved) lies outside `work/` (os.devnull excepted), and opening
     a directory as a descriptor (a descriptor-relative `dir_fd` path would escape the check;
     so `shutil.rmtree` is refused too);
   - creating, removing, renaming, linking, chmod/chown/utime/truncate/xattr of such paths,
     or of a descriptor, or relative to a `dir_fd`;
   - every socket connect / sendto / sendmsg / bind and name lookup (so the `socket` module
     refuses connections, whatever the namespace);
   - fork, exec, posix_spawn, os.system, pty, kill, setrlimit, importing ctypes or
     subprocess (their C modules), and the gc introspection that would reach the hook.

The program then runs as module "__sandbox__" (so `if __name__ == "__main__":` blocks do not
run), and the verdict `NONCE\\n["passed"|"failed"|"error"|"memory", detail]` is written only
after it returns or raises. A program that exits early (`os._exit`) leaves no verdict, and one
that writes its own does not know the nonce, so neither reads as passed.

What is NOT contained: reading files (any file the user may read); os.mkfifo / os.mknod
outside `work/`; writes through a descriptor opened before the guard (stdout, stderr, the
verdict file); a race that swaps a symlink between the check and the open; code that digs the
nonce out of the guard's frame (`sys._getframe`) to forge a pass; a program that reaches raw
system calls through C-level objects. The parent adds the OS-level parts (a network namespace where
`unshare` allows it, the process group kill). This is damage control for generated code, not a
security boundary against a determined attacker.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import traceback
import types

__all__ = ["SandboxRefusal", "guard", "main", "run"]


class SandboxRefusal(PermissionError):
    """An operation the sandbox does not allow."""


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

_PATH_EVENTS = {
    # event -> positions of its path arguments and of its dir_fd arguments (-1: none given)
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.chflags": ((0,), ()),
    "os.lchflags": ((0,), ()), "os.link": ((0, 1), (2, 3)), "os.mkdir": ((0,), (2,)),
    "os.remove": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)), "os.rmdir": ((0,), (1,)),
    "os.symlink": ((1,), (2,)), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)),
}

_REFUSED_EVENTS = frozenset({
    "socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.system", "subprocess.Popen",
    "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
    "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})

_REFUSED_IMPORTS = frozenset({"_ctypes", "ctypes", "_posixsubprocess"})


def guard(work: str):
    """The audit hook confining writes to directory `work` (see the module docstring)."""
    root = os.path.realpath(work)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def refuse(what: str):
        raise SandboxRefusal(f"sandbox: {what} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            if flags & _WRITE_FLAGS and not inside(path):
                refuse(f"writing {os.fsdecode(os.fspath(path))!r} outside the work directory")
            if mode is None and os.path.isdir(path):
                refuse(f"opening directory {os.fsdecode(os.fspath(path))!r} as a descriptor")
        elif event in _PATH_EVENTS:
            paths, dir_fds = _PATH_EVENTS[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in dir_fds):
                refuse(f"{event} relative to a directory descriptor")
            for i in paths:
                if not inside(args[i]):
                    refuse(f"{event} on {args[i]!r} outside the work directory")
        elif event in _REFUSED_EVENTS or event.startswith("ctypes."):
            refuse(event)
        elif event == "import" and args[0] in _REFUSED_IMPORTS:
            refuse(f"importing {args[0]}")

    return hook


def run(source: str) -> tuple[str, str]:
    """Compile and run `source` as module "__sandbox__": (status, detail)."""
    try:
        code = compile(source, "program.py", "exec")
    except MemoryError:
        return "memory", "MemoryError while compiling"
    except (SyntaxError, ValueError) as e:
        return "error", f"does not compile: {traceback.format_exception_only(e)[-1].strip()}"
    module = types.ModuleType("__sandbox__")
    sys.modules["__sandbox__"] = module
    try:
        exec(code, module.__dict__)
    except MemoryError:
        return "memory", "MemoryError"
    except SandboxRefusal as e:
        return "error", str(e)
    except SystemExit as e:
        return "failed", f"the program exited (code {e.code}) before finishing"
    except BaseException as e:  # whatever the program raises is its failure
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if f.filename == "program.py"]
        where = f" at line {lines[-1]}" if lines else ""
        return "failed", traceback.format_exception_only(e)[-1].strip() + where
    return "passed", ""


def main(argv: list[str]) -> None:
    root, cpu_s, memory_bytes, file_bytes = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    nonce_path = os.path.join(root, "nonce")
    with open(nonce_path) as f:
        nonce = f.read()
    os.remove(nonce_path)
    verdict = open(os.path.join(root, "verdict"), "w")  # written after the program, at the end
    with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
        source = f.read()
    work = os.path.join(root, "work")
    os.chdir(work)
    sys.argv = ["program.py"]
    sys.stdin.close()
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.addaudithook(guard(work))
    status, detail = run(source)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # the program may have closed or filled it
            stream.flush()
    verdict.write(nonce + "\n" + json.dumps([status, detail[:2000]]))
    verdict.close()
    os._exit(0)  # threads the program left running must not keep the process alive


if __name__ == "__main__":
    main(sys.argv)
