"""Slice-wise reading of HF safetensors checkpoints (one file or a sharded index).

The `safetensors` library does the format: `safe_open(path, framework="np")` parses and
validates the header (JSON, dtypes, data offsets against shapes and file size) and memory-maps
the data; `get_slice(name)[index]` copies out only the elements of `tensor[index]` (bfloat16 as
`ml_dtypes.bfloat16`). `Checkpoint` adds the folder layout transformers uses and hfjax's
errors, which name the file and the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from hfjax.errors import UserError

# Readable dtypes (safetensors names -> numpy).
READ_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(UserError, ValueError):
    """A safetensors file or index that is corrupt, truncated or not readable by hfjax."""


class MissingWeightError(SafetensorsError):
    """A tensor the model needs is absent from the checkpoint."""


class WeightShapeError(SafetensorsError):
    """A tensor in the checkpoint has a different shape from what the config implies."""


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) per axis of `tensor[index]`, clipped as numpy clips; steps must be 1."""
    if len(index) > len(shape):
        raise IndexError(f"{len(index)} indices for a tensor of shape {list(shape)}")
    out = []
    for s, n in zip(index + (slice(None),) * (len(shape) - len(index)), shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise IndexError(f"slice {s} has step {step}; only contiguous slices are read")
        out.append((start, max(start, stop)))
    return out


class Checkpoint:
    """All tensors of an HF folder: `model.safetensors`, else `model.safetensors.index.json`
    (the order transformers uses). Files are opened on first use and stay memory-mapped."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        self._files: dict[str, tuple[safe_open, dict[str, None]]] = {}
        if single.is_file():
            self._where = dict.fromkeys(self._open(SINGLE_FILE)[1], SINGLE_FILE)
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

    def _open(self, fname: str) -> tuple[safe_open, dict[str, None]]:
        """(the library's handle of file `fname`, the tensor names it holds)."""
        if fname not in self._files:
            path = self.folder / fname
            try:
                handle = safe_open(str(path), framework="np")
            except SafetensorError as e:
                raise SafetensorsError(f"{path} is not a readable safetensors file: {e}") from None
            self._files[fname] = handle, dict.fromkeys(handle.keys())
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def path_of(self, name: str) -> Path:
        """The file that holds tensor `name`."""
        if name not in self._where:
            raise MissingWeightError(f"weight {name!r} is missing from {self.source}")
        return self.folder / self._where[name]

    def _slice(self, name: str):
        handle, names = self._open(self.path_of(name).name)
        if name not in names:
            raise MissingWeightError(f"{self.source} maps weight {name!r} to "
                                     f"{self._where[name]}, which does not contain it")
        return handle.get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype string ("F32", "BF16", ...)."""
        return self._slice(name).get_dtype()

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """A copy of `tensor[index]` (one step-1 slice per leading axis), reading only its
        elements."""
        view = self._slice(name)
        dtype = view.get_dtype()
        if dtype not in READ_DTYPES:
            raise SafetensorsError(
                f"{self.path_of(name)}: tensor {name!r} has dtype {dtype}; hfjax reads "
                f"{', '.join(READ_DTYPES)} weights"
            )
        bounds = _bounds(tuple(index), tuple(view.get_shape()))
        if any(start == stop for start, stop in bounds):  # the library rejects empty ranges
            return np.empty([stop - start for start, stop in bounds], READ_DTYPES[dtype])
        return view[tuple(slice(start, stop) for start, stop in bounds)]
