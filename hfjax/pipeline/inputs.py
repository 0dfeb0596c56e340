"""Content fingerprints of a run's inputs, so stage keys change when a file changes in place.

A stage key that named its inputs by path alone would let a rerun skip every stage after the
weights or a data file were replaced at the same path, and print the old table. Stage keys
therefore hold digests of what was read:

    file_digest(path)      sha256 of the bytes (cached on disk by path, size, mtime and inode,
                           so a 14 GB checkpoint is hashed once, not at every start)
    model_digest(path)     a .gguf file's digest, or a folder's: the digests of its top-level
                           files (config, weights, tokenizer; symlinks of a hub snapshot followed)
    records_digest(rows)   sha256 of the canonical JSON of loaded records (any source: a local
                           file, a hub split at whatever revision the cache holds, the offline
                           generator)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hfjax.eval.report import atomic_open

CACHE_ENV = "HFJAX_DIGEST_CACHE"
_CHUNK = 1 << 22
_memory: dict[tuple, str] = {}


def _cache_file() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hfjax" / \
        "file_digests.json"
    return Path(os.environ.get(CACHE_ENV, default))


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _store(key: str, digest: str) -> None:
    cache = _load_cache()
    cache[key] = digest
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            json.dump(cache, f)
    except OSError:  # a read-only home: the in-memory cache still serves this process
        pass


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes; recomputed only when its size, mtime or inode changed."""
    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _memory:
        return _memory[key]
    text_key = json.dumps(key)
    digest = _load_cache().get(text_key)
    if digest is None:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        _store(text_key, digest)
    _memory[key] = digest
    return digest


def model_digest(path: str | os.PathLike) -> str:
    """A model's content digest: the file's for a .gguf, else over the folder's top-level files
    (names and digests; hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} does not exist")
    entries = sorted((p.name, file_digest(p)) for p in path.iterdir()
                     if not p.name.startswith(".") and p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def records_digest(rows: Sequence[Any]) -> str:
    """sha256 of the canonical JSON of `rows` (records or anything JSON-serializable)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()
