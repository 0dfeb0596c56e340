"""Run folders and stage folders: what each stage wrote, with what settings, and whether it ended.

    run_dir/
      run.json             flags, seeds, package versions, devices (rewritten at every start)
      align/  finetune/  repair/  eval_base/  eval_aligned/  eval_final/   (stage folders)
      results.json  results.md  results.csv

A stage folder holds `key.json` (the stage's settings and the fingerprints of the stages it
reads), its artifacts, and `DONE`, written last: a stage is complete iff `DONE` exists and its
key equals the current one. Artifacts are written to a temporary name and renamed into place.
A stage folder whose key differs from the current settings is an error unless `--overwrite`.
With a stage cache, a stage folder lives at `cache/NAME-FINGERPRINT` and the run folder holds a
symlink to it, so runs with identical upstream settings share the work (a sweep aligns once).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hfjax.errors import UserError
from hfjax.eval.report import atomic_open

DONE = "DONE"
KEY = "key.json"
PACKAGES = ("hfjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers",
            "tokenizers", "datasets", "safetensors", "numpy", "absl-py")


class StageMismatchError(UserError, ValueError):
    """A stage folder holds artifacts made with other settings."""


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, fsync, rename over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fingerprint(key: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage key (16 hex digits)."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _flat(key: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in key.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(old: Mapping, new: Mapping) -> list[str]:
    """What differs between two keys, as 'dotted.name: old -> new' (digests shortened)."""
    def show(v: Any) -> str:
        return repr(v[:12] + "...") if isinstance(v, str) and len(v) == 64 else repr(v)

    old, new = _flat(old), _flat(new)
    return [f"{k}: {show(old.get(k))} -> {show(new.get(k))}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


class StageDir:
    """One stage's folder: its key, artifacts and DONE marker."""

    def __init__(self, run_dir: Path, name: str, key: Mapping[str, Any],
                 cache: Path | None = None):
        self.name, self.key = name, dict(key)
        self.fingerprint = fingerprint(self.key)
        self.link = Path(run_dir) / name
        self.path = (Path(cache) / f"{name}-{self.fingerprint}") if cache else self.link

    @property
    def done(self) -> bool:
        """Complete with the current settings (raises StageMismatchError on other settings)."""
        marker = self.path / DONE
        if not marker.is_file():
            return False
        self.check_key(read_json(marker).get("key", {}))
        return True

    def check_key(self, old: Mapping) -> None:
        if dict(old) != json.loads(json.dumps(self.key, default=str)):
            raise StageMismatchError(
                f"stage folder {self.path} was made with other settings ("
                + "; ".join(_diff(old, json.loads(json.dumps(self.key, default=str))))
                + "); pass --overwrite to redo it, or use another --run_dir")

    def begin(self, overwrite: bool) -> Path:
        """Prepare the folder for (re)running the stage; keeps checkpoints of the same key. An
        unfinished stage folder made with other settings (no DONE) is discarded with a message:
        its checkpoints cannot serve these settings."""
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        key_file = self.path / KEY
        if key_file.is_file() and not (self.path / DONE).exists():
            try:
                self.check_key(read_json(key_file))
            except (StageMismatchError, ValueError):
                print(f"discarding the unfinished stage folder {self.path}, made with other "
                      f"settings", flush=True)
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.link != self.path:
            self.link.parent.mkdir(parents=True, exist_ok=True)
            link_relative(self.link, self.path)
        key_file = self.path / KEY
        if key_file.is_file():
            self.check_key(read_json(key_file))
        else:
            write_json(key_file, self.key)
        (self.path / DONE).unlink(missing_ok=True)
        return self.path

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write DONE (last): the key, the fingerprint, the time and a summary."""
        write_json(self.path / DONE, {"key": json.loads(json.dumps(self.key, default=str)),
                                      "fingerprint": self.fingerprint,
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "summary": dict(summary or {})})

    def summary(self) -> dict:
        return read_json(self.path / DONE).get("summary", {})

    def ensure_link(self) -> None:
        """Point the run folder's entry at a cached stage folder that is already complete."""
        if self.link == self.path:
            return
        self.link.parent.mkdir(parents=True, exist_ok=True)
        link_relative(self.link, self.path)


def link_relative(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` by a relative path (it survives moving the folder
    that holds both), replacing an earlier link or folder."""
    link, target = Path(link), Path(target)
    rel = os.path.relpath(target.absolute(), link.absolute().parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    tmp = link.parent / f".{link.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def write_manifest(run_dir: Path, config: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """run.json: flags, seeds, package versions, python, host, devices, start time."""
    import jax

    write_json(Path(run_dir) / "run.json", {
        "flags": dict(config),
        "seeds": {"seed": config.get("seed"), "data_seed": config.get("data_seed")},
        "packages": package_versions(),
        "python": platform.python_version(),
        "host": platform.node(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **dict(extra),
    })
