"""The code sandbox contains what it claims: time, memory, file writes outside its directory,
network connections, processes; asserts give passed / failed; the verdict cannot be faked by
exiting early; the work directory is removed. Sockets only ever address 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfjax.eval import sandbox
from hfjax.eval.sandbox import SandboxError, network_namespace_command, run_program


@pytest.fixture
def listener():
    """A listening TCP socket on 127.0.0.1 that reports whether anything connected."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)

    def connected() -> bool:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    yield server.getsockname()[1], connected
    server.close()


def _connect_program(port: int) -> str:
    return (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            f"s.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n")


def test_passing_and_failing_asserts_give_passed_and_failed():
    ok = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n")
    bad = run_program("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n")
    assert (ok.passed, ok.status) == (True, "passed")
    assert (bad.passed, bad.status) == (False, "failed")
    assert "AssertionError at line 4" in bad.detail


def test_code_that_does_not_compile_is_an_error():
    result = run_program("def broken(:\n")
    assert (result.passed, result.status) == (False, "error")
    assert "SyntaxError" in result.detail


def test_an_endless_loop_is_stopped_at_the_wall_time_limit():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.perf_counter() - start < 10


def test_allocating_far_beyond_the_memory_limit_is_stopped():
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(2**24))\n",
                         memory_mb=256, timeout_s=20.0)
    assert (result.passed, result.status) == (False, "memory")


def test_writing_outside_the_work_directory_creates_nothing(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_program(f"with open({str(target)!r}, 'w') as f:\n    f.write('x')\n")
    assert not result.passed and "outside the work directory" in result.detail
    assert not target.exists()


def test_a_symlink_out_of_the_work_directory_does_not_let_writes_escape(tmp_path):
    result = run_program(f"import os\nos.symlink({str(tmp_path)!r}, 'link')\n"
                         f"open('link/escaped.txt', 'w').write('x')\n")
    assert not result.passed
    assert list(tmp_path.iterdir()) == []


def test_files_inside_the_work_directory_are_fine_and_it_is_removed_afterwards():
    result = run_program("import os\nopen('notes.txt', 'w').write('x')\n"
                         "assert open('notes.txt').read() == 'x'\n"
                         "raise RuntimeError(os.getcwd())\n")
    assert result.status == "failed"
    work = result.detail.removeprefix("RuntimeError: ").rsplit(" at line", 1)[0]
    assert work.endswith("work")
    assert not Path(work).exists()


def test_a_connection_to_a_local_listening_socket_fails(listener):
    port, connected = listener
    result = run_program(_connect_program(port))
    assert not result.passed
    assert not connected()


def test_the_guard_alone_refuses_the_connection_without_a_namespace(listener):
    port, connected = listener
    result = run_program(_connect_program(port), network_namespace=False)
    assert (result.status, result.detail) == ("error",
                                              "sandbox: socket.connect is not allowed")
    assert not connected()


def test_the_network_namespace_alone_cannot_reach_the_local_listener(listener):
    prefix = network_namespace_command()
    if not prefix:
        pytest.skip("unprivileged `unshare --user --net` does not work on this machine")
    port, connected = listener
    raw = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", _connect_program(port)],
                         capture_output=True, timeout=30)
    assert raw.returncode != 0
    assert not connected()


def test_without_unshare_it_falls_back_unless_a_namespace_is_required(monkeypatch):
    monkeypatch.setattr(sandbox, "network_namespace_command", lambda: ())
    assert run_program("assert 1 + 1 == 2\n").passed
    with pytest.raises(SandboxError, match="unshare"):
        run_program("pass\n", network_namespace=True)


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['true'])\n",
    "import os\nos.system('true')\n",
    "import os\nos.fork()\n",
    "import os\nos.kill(os.getppid(), 0)\n",
    "import ctypes\n",
])
def test_starting_processes_signalling_and_ctypes_are_refused(code):
    result = run_program(code)
    assert (result.passed, result.status) == (False, "error")
    assert result.detail.startswith("sandbox:")


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_exiting_early_with_status_zero_does_not_read_as_passed(code):
    assert not run_program(code).passed


def test_stdin_is_closed_and_the_environment_is_minimal():
    result = run_program(
        "import os, sys\nassert sys.stdin.closed\n"
        "assert set(os.environ) == {'PATH', 'LANG', 'HOME', 'TMPDIR', 'MALLOC_ARENA_MAX'}, "
        "sorted(os.environ)\nassert sys.flags.isolated and sys.flags.no_site\n")
    assert result.passed, result.detail


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("inf")}, "timeout_s"),
    ({"memory_mb": -1}, "memory_mb"), ({"memory_mb": 1.5}, "memory_mb")])
def test_impossible_limits_are_rejected_by_name(kwargs, problem):
    with pytest.raises(SandboxError, match=problem):
        run_program("pass\n", **kwargs)
