"""Load llama.cpp GGUF checkpoints into hfjax's config + params layout.

A GGUF holds the model's hyper-parameters as metadata (`{arch}.block_count`, ...) and its weights
as (possibly block-quantized) tensors named `token_embd`, `blk.N.attn_q`, ... . `load_gguf` reads
the metadata into a `ModelConfig` and dequantizes the tensors one at a time (`gguf.quants`) into
the stacked params pytree of `hfjax.models.params` (kernels [in, out]).

GGUF tensors are [out, in] in numpy order (ggml lists dimensions fastest-first; `GGUFFile`
reverses them, and checks every dequantized array against that shape). For the "llama" architecture
llama.cpp's converter permutes the rows of W_q and W_k so that its RoPE can rotate adjacent pairs
(x_{2i}, x_{2i+1}) instead of HF's halves (x_i, x_{i+hd/2}):

    permute(W, n) = W.reshape(n, 2, hd/2, in).swapaxes(1, 2).reshape(n*hd, in)

with n = n_head for q and n_head_kv for k; `unpermute_qk` is its inverse.
Supported architectures: llama (also Mistral and SmolLM2, which llama.cpp writes as llama),
qwen2, gemma2.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.errors import UserError
from hfjax.models.config import ModelConfig, ModelConfigError
from hfjax.models.params import param_shapes

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma2")


class GGUFError(UserError, ValueError):
    """A GGUF file that hfjax cannot read or convert."""


class UnsupportedArchitectureError(GGUFError):
    """The GGUF's `general.architecture` is not one hfjax can load."""


class MissingTensorError(GGUFError):
    """A tensor the architecture needs is not in the GGUF file."""


_MISSING = object()

# GGUF metadata value types (gguf.GGUFValueType) -> struct format of the fixed-size ones.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_FORMATS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                  10: "<u8", 11: "<i8", 12: "<f8"}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor's table entry: numpy-order shape [..., rows, cols], ggml type, byte range."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` (dict), `tensors` (name -> GGUFTensor), `read()`.

    A small header parser instead of `gguf.GGUFReader`: the reader decodes every metadata string
    into numpy views (~50k vocabulary strings and ~50k merges), which takes 2-7 s on a small CPU;
    this takes a fraction of a second. Tensors are dequantized with `gguf.quants.dequantize`.
    """

    def __init__(self, path: str | os.PathLike):
        p = pathlib.Path(path)
        if not p.exists():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        if not p.is_file():
            raise GGUFError(f"{p} is not a file (expected a .gguf model file)")
        self.path = p
        with open(p, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # an empty file cannot be mapped
                raise GGUFError(f"{p} is not a GGUF file: {e}") from e
        try:
            self._parse()
        except GGUFError:
            raise
        except (struct.error, ValueError, OverflowError, MemoryError) as e:
            # a truncated or corrupt header: short reads, bad UTF-8, absurd counts
            raise GGUFError(
                f"{p} is not a readable GGUF file (truncated or corrupt header: {e})"
            ) from e

    def _parse(self) -> None:
        m = self._map
        if m[:4] != b"GGUF":
            raise GGUFError(f"{self.path} is not a GGUF file (magic bytes {bytes(m[:4])!r})")
        (version,) = struct.unpack_from("<I", m, 4)
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (need 2 or 3; "
                            "big-endian files are not supported either)")
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("<I")
            self.metadata[key] = self._value(kind)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(x) for x in reversed(dims)), int(kind), int(offset)))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, kind, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            nbytes = _byte_count(name, shape, kind)
            start = data_start + offset
            if start + nbytes > len(m):
                raise GGUFError(f"{self.path} is truncated: tensor {name!r} ends past the file end")
            self.tensors[name] = GGUFTensor(name, shape, kind, start, nbytes)

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        s = self._map[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, kind: int) -> Any:
        if kind == _FLOAT32:  # shortest decimal that round-trips (1e-05, not 9.9999997e-06)
            return float(str(np.float32(self._unpack("<f")[0])))
        if kind in _SCALAR_FORMATS:
            return self._unpack(_SCALAR_FORMATS[kind])[0]
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            sub, n = self._unpack("<IQ")
            if sub in _NUMPY_FORMATS:
                arr = np.frombuffer(self._map, _NUMPY_FORMATS[sub], n, self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(sub) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown GGUF metadata value type {kind}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Metadata value `key`; raises GGUFError naming the key when absent and no default."""
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise GGUFError(f"{self.path}: GGUF metadata has no field {key!r}")
        return default

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor `name` dequantized to float32 [numpy order], checked against `shape`."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise MissingTensorError(f"{self.path}: GGUF file has no tensor {name!r}")
        kind = GGMLQuantizationType(t.ggml_type)
        block, type_size = GGML_QUANT_SIZES[kind]
        raw = np.frombuffer(self._map, np.uint8, t.nbytes, t.offset)
        raw = raw.reshape(*t.shape[:-1], t.shape[-1] // block * type_size)
        try:
            arr = np.asarray(dequantize(raw, kind), dtype=np.float32)
        except NotImplementedError as e:
            raise GGUFError(f"cannot dequantize tensor {name!r} of type {kind.name}: {e}") from e
        if arr.shape != t.shape:
            raise GGUFError(
                f"tensor {name!r} dequantized to {arr.shape}, its header says {t.shape}"
            )
        if shape is not None and arr.shape != tuple(shape):
            raise GGUFError(
                f"tensor {name!r} has shape {arr.shape}, the model config implies {tuple(shape)}"
            )
        return arr


def _byte_count(name: str, shape: tuple[int, ...], kind: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(kind)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFError(f"tensor {name!r} has unknown ggml type {kind}") from None
    if shape and shape[-1] % block:
        raise GGUFError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                        f"{qtype.name} block size {block}")
    return int(np.prod(shape, dtype=np.int64)) // block * type_size


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed header of a GGUF file, with clear errors for bad paths and non-GGUF files."""
    return GGUFFile(path)


def field_value(reader: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    """Metadata value `key` of an opened GGUF (see `GGUFFile.get`)."""
    return reader.get(key, default)


def architecture(reader: GGUFFile) -> str:
    """`general.architecture`, checked against the supported list."""
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; hfjax loads {SUPPORTED_ARCHITECTURES}"
        )
    return arch


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row permutation of an HF q/k weight [n_head*hd, ...] (convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: GGUF q/k rows back to HF's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def _rope_scaling(
    reader: GGUFFile, arch: str, tensors: dict, theta: float, head_dim: int, ctx: int
):
    """hfjax rope_scaling tuple from `{arch}.rope.scaling.*` or a Llama 3 `rope_freqs` tensor."""
    kind = field_value(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        factor = float(field_value(reader, f"{arch}.rope.scaling.factor"))
        return (("factor", factor), ("rope_type", "linear"))
    if kind not in ("none", None, ""):
        raise GGUFError(
            f"unsupported RoPE scaling {kind!r} (supported: linear, Llama 3 rope_freqs)"
        )
    if "rope_freqs.weight" not in tensors:
        return None
    return _fit_llama3_rope(reader.read("rope_freqs.weight"), theta, head_dim, ctx)


def _fit_llama3_rope(freq_factors: np.ndarray, theta: float, head_dim: int, ctx: int):
    """Recover HF's llama3 rope parameters from llama.cpp's per-frequency divisors.

    llama.cpp stores f_i = inv_freq_i / inv_freq_scaled_i; we try the published Llama 3.x settings
    (low 1, high 4, original context 8192, factor = max f) and accept them only on an exact match.
    """
    from hfjax.models.decoder import rope_inv_freq

    factor = float(np.max(freq_factors))
    probe = ModelConfig(
        model_type="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
        num_heads=1, num_kv_heads=1, head_dim=head_dim, layer_windows=(0,), rope_theta=theta,
    )
    base = rope_inv_freq(probe)
    for orig in (8192, 4096, 16384, 32768, ctx):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            scaling = (
                ("factor", factor), ("high_freq_factor", high), ("low_freq_factor", low),
                ("original_max_position_embeddings", int(orig)), ("rope_type", "llama3"),
            )
            scaled = rope_inv_freq(probe.replace(rope_scaling=scaling))
            if scaled.shape == freq_factors.shape and np.allclose(
                base / scaled, freq_factors, rtol=1e-4
            ):
                return scaling
    raise GGUFError("the GGUF's rope_freqs tensor matches no Llama 3 RoPE scaling hfjax knows")


def config_from_gguf(reader: GGUFFile, dtype: Any = jnp.float32) -> ModelConfig:
    """A `ModelConfig` from a GGUF's metadata (and the shapes of its embedding/output tensors)."""
    arch = architecture(reader)
    tensors = reader.tensors
    key = lambda name, default=_MISSING: field_value(reader, f"{arch}.{name}", default)  # noqa: E731
    try:
        hidden = int(key("embedding_length"))
        num_layers = int(key("block_count"))
        num_heads = int(key("attention.head_count"))
        num_kv = key("attention.head_count_kv", num_heads)
        if isinstance(num_kv, list):  # per-layer counts; hfjax needs them uniform
            if len(set(num_kv)) != 1:
                raise GGUFError(f"per-layer KV head counts {sorted(set(num_kv))} are not supported")
            num_kv = num_kv[0]
        head_dim = int(key("attention.key_length", hidden // num_heads))
        rope_dims = int(key("rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise GGUFError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
        ctx = int(key("context_length", 2048))
        theta = float(key("rope.freq_base", 10000.0))
        if "token_embd.weight" not in tensors:
            raise MissingTensorError("GGUF file has no tensor 'token_embd.weight'")
        vocab_size = tensors["token_embd.weight"].shape[0]
        eos = []
        for name in ("eos_token_id", "eot_token_id", "eom_token_id"):
            token = field_value(reader, f"tokenizer.ggml.{name}", None)
            if token is not None and int(token) not in eos:
                eos.append(int(token))
        bos = field_value(reader, "tokenizer.ggml.bos_token_id", None)
        pad = field_value(reader, "tokenizer.ggml.padding_token_id", None)
        common = dict(
            model_type=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(num_kv),
            head_dim=head_dim,
            layer_windows=(0,) * num_layers,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=theta,
            rope_scaling=_rope_scaling(reader, arch, tensors, theta, head_dim, ctx),
            max_position_embeddings=ctx,
            tie_word_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(eos),
            pad_token_id=None if pad is None else int(pad),
            dtype=jnp.dtype(dtype).name,
        )
        if arch == "gemma2":
            window = int(key("attention.sliding_window", 4096))
            # llama.cpp scales queries by (D / H)^-1/2 for the 27B model, hd^-1/2 otherwise.
            scalar = hidden / num_heads if num_layers == 46 else head_dim
            common.update(
                layer_windows=tuple(window if i % 2 == 0 else 0 for i in range(num_layers)),
                mlp_activation="gelu_tanh",
                norm_weight_offset=1.0,
                scale_embeddings=True,
                sandwich_norms=True,
                attn_logit_softcap=key("attn_logit_softcapping", None),
                final_logit_softcap=key("final_logit_softcapping", None),
                query_pre_attn_scalar=float(scalar),
            )
        return ModelConfig(**common)
    except ModelConfigError as e:
        raise GGUFError(f"GGUF metadata describes a model hfjax cannot represent: {e}") from e


# hfjax layer param name -> GGUF tensor stem inside blk.N
_PROJ_TENSORS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_NORM_TENSORS = {
    "attn_norm": "attn_norm",
    "attn_post_norm": "post_attention_norm",
    "mlp_norm": "ffn_norm",
    "mlp_post_norm": "post_ffw_norm",
}


def load_gguf(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[ModelConfig, dict]:
    """(config, params) of a GGUF model, dequantized to `dtype`.

    Tensors are read and dequantized one at a time into stacked numpy buffers, then moved to JAX.
    llama q/k rows are un-permuted (see module docstring); Gemma 2 norms, which llama.cpp stores
    as 1 + w, are stored back as w (the forward pass applies the offset).
    """
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, dtype)
    shapes = param_shapes(cfg)
    n, d = cfg.num_layers, cfg.hidden_size
    to_jax = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731

    params: dict = {"embed_tokens": to_jax(reader.read("token_embd.weight", (cfg.vocab_size, d)))}
    layers: dict = {}
    norm_offset = 1.0 if cfg.model_type == "gemma2" else 0.0
    for name in shapes["layers"]:
        if name in _NORM_TENSORS:
            buf = np.empty((n, d), np.float32)
            for i in range(n):
                buf[i] = reader.read(f"blk.{i}.{_NORM_TENSORS[name]}.weight", (d,)) - norm_offset
            layers[name] = to_jax(buf)
            continue
        spec = shapes["layers"][name]
        _, fin, fout = spec["kernel"].shape
        kernel = np.empty((n, fin, fout), np.float32)
        bias = np.empty((n, fout), np.float32) if "bias" in spec else None
        heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name)
        unpermute = cfg.model_type == "llama" and heads is not None
        for i in range(n):
            stem = f"blk.{i}.{_PROJ_TENSORS[name]}"
            w = reader.read(f"{stem}.weight", (fout, fin))  # HF nn.Linear order [out, in]
            if unpermute:
                w = unpermute_qk(w, heads)
            kernel[i] = w.T
            if bias is not None:
                b = reader.read(f"{stem}.bias", (fout,))
                bias[i] = unpermute_qk(b, heads) if unpermute else b
        layers[name] = {"kernel": to_jax(kernel)}
        if bias is not None:
            layers[name]["bias"] = to_jax(bias)
    params["layers"] = layers
    params["final_norm"] = to_jax(reader.read("output_norm.weight", (d,)) - norm_offset)
    if not cfg.tie_word_embeddings:
        params["lm_head"] = to_jax(reader.read("output.weight", (cfg.vocab_size, d)).T)

    got = jax.tree.map(lambda x: x.shape, params)
    want = jax.tree.map(lambda s: s.shape, shapes)
    if got != want:  # a bug guard: the layout above must match params.py exactly
        raise GGUFError(f"converted params do not match the hfjax layout: {got} != {want}")
    return cfg, params
