"""hfjax.host: glibc keeps the heap's freed memory mapped (no mmap'd blocks, no trimming)."""

import json
import platform
import subprocess
import sys

import pytest

# A child process: mallopt settings are process-wide. A 3 GiB block is never touched, so it
# costs address space only.
CHILD = r"""
import ctypes, json
from hfjax import host
ok = host.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
before = libc.sbrk(0)
block = libc.malloc(3 << 30)
grown = libc.sbrk(0)
libc.free(block)
print(json.dumps({"ok": ok, "before": before, "block": block, "grown": grown,
                  "after": libc.sbrk(0)}))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_serves_a_3_gib_block_from_the_heap_and_never_trims_it():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout)
    assert r["ok"]
    # from the heap (brk), not a separate mmap that free() would unmap
    assert r["block"] + (3 << 30) <= r["grown"] and r["grown"] - r["before"] >= 3 << 30
    # freed but kept: a trim threshold of 2 GiB (mallopt's int maximum) would give it back
    assert r["after"] == r["grown"]
