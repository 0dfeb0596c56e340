"""Lazy, slice-wise reading of safetensors files (single file or sharded HF index).

A safetensors file is

    [8 bytes: little-endian u64 n][n bytes: JSON header][data]

where the header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the start of the data block) plus an optional "__metadata__" entry.
We parse the header ourselves and view the data through `numpy.memmap`, so reading
`tensor[index]` touches only the pages that hold the requested elements; nothing is loaded
until it is sliced.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from hfjax.errors import UserError

# Readable dtypes (safetensors data is little-endian).
READ_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# Item sizes of every dtype the format defines, to validate headers of tensors we never read.
_ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
    "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(UserError, ValueError):
    """A safetensors file or index that is corrupt, truncated or not readable by hfjax."""


class MissingWeightError(SafetensorsError):
    """A tensor the model needs is absent from the checkpoint."""


class WeightShapeError(SafetensorsError):
    """A tensor in the checkpoint has a different shape from what the config implies."""


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, data memory-mapped lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file {self.path} does not exist")
        size = self.path.stat().st_size
        if size < 8:
            raise SafetensorsError(
                f"{self.path}: {size} bytes is too small to be a safetensors file (no header)"
            )
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise SafetensorsError(
                    f"{self.path}: corrupt safetensors header (declared header length {n} "
                    f"bytes, file has {size} bytes)"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = str(e["dtype"])
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(
                    f"{self.path}: corrupt safetensors header entry for tensor {name!r}: {e!r}"
                ) from None
            if not 0 <= begin <= end <= data_size or any(s < 0 for s in shape):
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has data offsets [{begin}, {end}] outside "
                    f"the {data_size}-byte data block (truncated or corrupt file)"
                )
            item = _ITEM_SIZES.get(dtype)
            if item is not None and (end - begin) != item * math.prod(shape):
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ({dtype}, shape {list(shape)}) should take "
                    f"{item * math.prod(shape)} bytes but its offsets span {end - begin}"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> str:
        """The safetensors dtype string ("F32", "BF16", ...)."""
        return self._entry(name)[0]

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise MissingWeightError(f"tensor {name!r} is not in {self.path}") from None

    def array(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the whole tensor (no data is read yet)."""
        dtype, shape, begin, end = self._entry(name)
        if dtype not in READ_DTYPES:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has dtype {dtype}; hfjax reads "
                f"{', '.join(READ_DTYPES)} weights"
            )
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        flat = self._mmap[start : self._data_start + end]
        return flat.view(READ_DTYPES[dtype]).reshape(shape)

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """A copy of `tensor[index]`, reading only the bytes that hold it."""
        return np.array(self.array(name)[index])


class Checkpoint:
    """All tensors of an HF folder: `model.safetensors`, else `model.safetensors.index.json`
    (the order transformers uses)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        self._files: dict[str, SafetensorsFile] = {}
        if single.is_file():
            f = self._file(SINGLE_FILE)
            self._where = dict.fromkeys(f.keys(), SINGLE_FILE)
            self.source = str(single)
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{index}: corrupt safetensors index ({e})") from None
            self._where = {str(k): str(v) for k, v in weight_map.items()}
            for shard in sorted(set(self._where.values())):
                if not (self.folder / shard).is_file():
                    raise FileNotFoundError(f"{index} lists shard {shard!r}, which does not exist")
            self.source = str(index)
        else:
            raise FileNotFoundError(
                f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}"
            )

    def _file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.folder / shard)
        return self._files[shard]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise MissingWeightError(f"weight {name!r} is missing from {self.source}")
        f = self._file(self._where[name])
        if name not in f:
            raise MissingWeightError(
                f"{self.source} maps weight {name!r} to {f.path.name}, which does not contain it"
            )
        return f

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_of(name).shape(name)

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """A copy of `tensor[index]`, reading only the bytes that hold it."""
        return self.file_of(name).read(name, index)
