"""HF checkpoint folders (config.json + safetensors) in and out of the hfjax params layout.

`weight_mappings(cfg)` is the single table between hfjax parameter paths and HF tensor names.
HF's nn.Linear stores W as [out, in] and computes x Wᵀ; hfjax kernels are [in, out] for x @ W,
so kernels (and lm_head) are transposed, and per-layer tensors are stacked on a leading axis L:

    params["layers"][proj]["kernel"][i] = HF["model.layers.{i}.<module>.<proj>.weight"]ᵀ

`load_hf` reads tensor by tensor through the `safetensors` library's slices; with a mesh, every
device's shard is built by `jax.make_array_from_callback` and reads only its slice of the HF
tensors. With `num_labels` it loads a transformers `*ForSequenceClassification` folder instead:
the head `score.weight` [C, D] takes the place of lm_head (params["lm_head"] = score.weightᵀ).
`save_hf` writes the inverse (names exactly as transformers expects), atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.models import config as config_lib
from hfjax.models import params as params_lib
from hfjax.models.config import ModelConfig, ModelConfigError
from hfjax.models.safetensors_reader import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    MissingWeightError,
    SafetensorsError,
    WeightShapeError,
)

__all__ = [
    "MissingWeightError",
    "SafetensorsError",
    "UnexpectedWeightError",
    "WeightMapping",
    "WeightShapeError",
    "load_hf",
    "save_hf",
    "to_host",
    "weight_mappings",
]

CONFIG_FILE = "config.json"
CLASSIFIER_HEAD = "score.weight"  # transformers' *ForSequenceClassification head [C, D]
_SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")  # the tensor dtypes read and written
# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


class UnexpectedWeightError(SafetensorsError):
    """The checkpoint has learned tensors hfjax's layout cannot hold (e.g. o_proj or MLP biases)."""


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    """One hfjax parameter and the HF tensor(s) it comes from.

    path: key path in the params tree, e.g. ("layers", "q_proj", "kernel").
    hf_name: HF tensor name; "{i}" marks a per-layer tensor stacked on the leading axis.
    transpose: HF stores the transpose (nn.Linear [out, in] vs kernel [in, out]).
    """

    path: tuple[str, ...]
    hf_name: str
    transpose: bool = False

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        if self.stacked:
            return [self.hf_name.format(i=i) for i in range(num_layers)]
        return [self.hf_name]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one HF tensor given the hfjax (possibly stacked) shape."""
        inner = tuple(shape[1:] if self.stacked else shape)
        return inner[::-1] if self.transpose else inner


_MODULE_OF = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


def weight_mappings(cfg: ModelConfig, *, classifier: bool = False) -> list[WeightMapping]:
    """The table hfjax path <-> HF tensor name for `cfg`, in HF's order.

    Norms: attn_norm <- input_layernorm; Llama/Mistral/Qwen2: mlp_norm <- post_attention_layernorm;
    Gemma 2: attn_post_norm <- post_attention_layernorm, mlp_norm <- pre_feedforward_layernorm,
    mlp_post_norm <- post_feedforward_layernorm. classifier: lm_head <- score.weightᵀ (a sequence
    classifier's head, present whatever tie_word_embeddings says).
    """
    layer = "model.layers.{i}."
    if cfg.sandwich_norms:
        norms = {
            "attn_norm": "input_layernorm",
            "attn_post_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "mlp_post_norm": "post_feedforward_layernorm",
        }
    else:
        norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    table = [WeightMapping(("embed_tokens",), "model.embed_tokens.weight")]
    table += [WeightMapping(("layers", k), f"{layer}{v}.weight") for k, v in norms.items()]
    for proj in params_lib.PROJECTIONS:
        hf = f"{layer}{_MODULE_OF[proj]}.{proj}"
        table.append(WeightMapping(("layers", proj, "kernel"), f"{hf}.weight", transpose=True))
        if cfg.qkv_bias and proj in ("q_proj", "k_proj", "v_proj"):
            table.append(WeightMapping(("layers", proj, "bias"), f"{hf}.bias"))
    table.append(WeightMapping(("final_norm",), "model.norm.weight"))
    if classifier:
        table.append(WeightMapping(("lm_head",), CLASSIFIER_HEAD, transpose=True))
    elif not cfg.tie_word_embeddings:
        table.append(WeightMapping(("lm_head",), "lm_head.weight", transpose=True))
    return table


def tree_get(tree: Mapping, path: tuple[str, ...]):
    """tree[path[0]][path[1]]... (a params leaf by its `WeightMapping.path`)."""
    for k in path:
        tree = tree[k]
    return tree


def tree_set(tree: dict, path: tuple[str, ...], value) -> None:
    """Set tree[path[0]]...[path[-1]] = value, creating the inner dicts."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _dtype_name(dtype, supported=_SUPPORTED_DTYPES) -> str:
    name = jnp.dtype(dtype).name
    if name not in supported:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {supported}")
    return name


# ----------------------------------------------------------------------------- loading


def read_config(path: str | os.PathLike, dtype=jnp.float32) -> ModelConfig:
    """ModelConfig from `path/config.json` (errors name the file)."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: an HF model folder needs a config.json")
    try:
        d = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelConfigError(f"{cfg_path} does not hold a JSON object")
    try:
        return config_lib.from_hf_dict(d, dtype=_dtype_name(dtype, config_lib.DTYPES))
    except ModelConfigError as e:
        raise ModelConfigError(f"{cfg_path}: {e}") from None


def _check_checkpoint(ckpt: Checkpoint, cfg: ModelConfig, table, shapes) -> None:
    """Every needed tensor exists with the right shape; no learned tensor is left over."""
    missing, expected = [], set()
    for m in table:
        want = m.hf_shape(tree_get(shapes, m.path).shape)
        for name in m.hf_names(cfg.num_layers):
            expected.add(name)
            if name not in ckpt:
                missing.append(name)
                continue
            found = ckpt.shape(name)
            if found != want:
                raise WeightShapeError(
                    f"weight {name!r} in {ckpt.path_of(name)} has shape {list(found)}, "
                    f"expected {list(want)} from {ckpt.folder / CONFIG_FILE}"
                )
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        hint = ""
        if "lm_head.weight" in missing:
            hint = "; config.json says tie_word_embeddings is false, so lm_head.weight is needed"
        if CLASSIFIER_HEAD in missing:
            hint = f"; a sequence classifier's head is {CLASSIFIER_HEAD}"
        raise MissingWeightError(
            f"{ckpt.source} is missing weights {missing[:5]}{more}{hint}"
        )
    extra = [
        k for k in ckpt.keys()
        if k not in expected
        and not _IGNORED_TENSORS.match(k)
        and not (cfg.tie_word_embeddings and k == "lm_head.weight")
    ]
    if extra:
        raise UnexpectedWeightError(
            f"{ckpt.source} has weights hfjax's {cfg.model_type} layout cannot hold: "
            f"{sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''}"
        )


def _full_index(index, ndim: int) -> tuple[slice, ...]:
    index = tuple(index) if index is not None else ()
    return index + (slice(None),) * (ndim - len(index))


def read_param(ckpt: Checkpoint, m: WeightMapping, shape: tuple[int, ...], dtype,
               index=None) -> np.ndarray:
    """hfjax parameter `m.path`[index] as a host array of `dtype`.

    Only the requested slice is read: for a stacked kernel, index (l, a, b) reads, for every
    layer i in l, HF[i][b, a] and transposes it.
    """
    index = _full_index(index, len(shape))
    dtype = jnp.dtype(dtype)

    def one(name: str, inner: tuple) -> np.ndarray:
        t = ckpt.read(name, inner[::-1] if m.transpose else inner)
        return t.T if m.transpose else t

    if not m.stacked:
        return one(m.hf_name, index).astype(dtype, copy=False)
    layers = range(shape[0])[index[0]]
    out = None
    for j, i in enumerate(layers):
        t = one(m.hf_name.format(i=i), index[1:])
        if out is None:
            out = np.empty((len(layers), *t.shape), dtype)
        np.copyto(out[j], t, casting="unsafe")
    if out is None:  # empty layer slice
        inner = np.empty(shape[1:], dtype)[index[1:]]
        out = np.empty((0, *inner.shape), dtype)
    return out


def load_hf(path: str | os.PathLike, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
            rules: Mapping | None = None, *,
            num_labels: int | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from an HF folder: config.json and model.safetensors or a sharded
    model.safetensors.index.json. Weights are cast to `dtype` (the config's dtype too): one of
    `config.DTYPES`, float64 with 64-bit JAX (`jax_enable_x64`).

    num_labels: read a sequence classifier (transformers' *ForSequenceClassification) with that
    many classes: the backbone as above and, instead of an LM head, `score.weight` [C, D] as
    params["lm_head"] = score.weightᵀ [D, C], with cfg.tie_word_embeddings False, so `forward`
    returns class logits [B, T, C].

    With `mesh`, each parameter is created sharded by `rules` (default `hfjax.sharding.RULES`)
    and every device reads only its slice of the file(s); otherwise plain arrays on the default
    device. Errors name the file and tensor: FileNotFoundError (config.json, weights),
    ModelConfigError (unknown model_type, bad config), SafetensorsError and its subclasses
    MissingWeightError, WeightShapeError, UnexpectedWeightError (corrupt header, unsupported
    dtype, absent / mis-shaped / unmappable tensors).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"HF model folder {path} does not exist")
    cfg = read_config(path, dtype)
    ckpt = Checkpoint(path)
    if num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {num_labels}")
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    shapes = params_lib.param_shapes(cfg, jnp.dtype(dtype))
    if num_labels is not None:
        shapes["lm_head"] = jax.ShapeDtypeStruct((cfg.hidden_size, num_labels), jnp.dtype(dtype))
    table = weight_mappings(cfg, classifier=num_labels is not None)
    _check_checkpoint(ckpt, cfg, table, shapes)

    shardings = None
    if mesh is not None:
        from hfjax import sharding as sharding_lib

        shardings = sharding_lib.tree_shardings(
            params_lib.logical_axes(cfg), shapes, mesh, rules or sharding_lib.RULES
        )
    params: dict = {}
    for m in table:
        shape = tuple(tree_get(shapes, m.path).shape)
        if shardings is None:
            value = jnp.asarray(read_param(ckpt, m, shape, dtype))
        else:
            value = _sharded_param(ckpt, m, shape, dtype, tree_get(shardings, m.path))
        tree_set(params, m.path, value)
    if jax.tree.structure(params) != jax.tree.structure(shapes):
        raise AssertionError("weight_mappings does not cover the params layout")  # a bug, not input
    return cfg, params


def _sharded_param(ckpt, m, shape, dtype, sharding) -> jax.Array:
    """One parameter built shard by shard; devices holding the same slice share one read."""
    cache: dict = {}

    def cb(index):
        index = _full_index(index, len(shape))
        key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        if key not in cache:
            cache[key] = read_param(ckpt, m, shape, dtype, index)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, cb, dtype=jnp.dtype(dtype))


# ----------------------------------------------------------------------------- saving


def _check_params(cfg: ModelConfig, params: Mapping) -> None:
    shapes = params_lib.param_shapes(cfg)
    if jax.tree.structure(params) != jax.tree.structure(shapes):
        raise ValueError(
            f"params do not match the {cfg.model_type} layout of the config: expected "
            f"{jax.tree.structure(shapes)}, got {jax.tree.structure(params)}"
        )
    for m in weight_mappings(cfg):
        got, want = tuple(np.shape(tree_get(params, m.path))), tuple(tree_get(shapes, m.path).shape)
        if got != want:
            raise WeightShapeError(
                f"param {'/'.join(m.path)} has shape {list(got)}, config implies {list(want)}"
            )


def to_host(x) -> np.ndarray:
    """The whole array on this host; an all-gather when it spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _export_plan(cfg: ModelConfig, params: Mapping, dtype):
    """[(hf_name, nbytes, thunk -> np.ndarray)] in HF order (embed, layer 0.., norm, head)."""
    head, per_layer, tail = [], [], []
    for m in weight_mappings(cfg):
        (per_layer if m.stacked else (tail if m.path != ("embed_tokens",) else head)).append(m)

    def entry(m: WeightMapping, i: int | None):
        leaf = tree_get(params, m.path)
        out_dtype = jnp.dtype(dtype if dtype is not None else leaf.dtype)
        _dtype_name(out_dtype)
        shape = m.hf_shape(tuple(np.shape(leaf)))
        name = m.hf_name.format(i=i) if m.stacked else m.hf_name

        def thunk():
            t = to_host(leaf[i] if m.stacked else leaf)
            t = t.T if m.transpose else t
            return np.ascontiguousarray(t.astype(out_dtype, copy=False))

        return name, math.prod(shape) * out_dtype.itemsize, thunk

    plan = [entry(m, None) for m in head]
    plan += [entry(m, i) for i in range(cfg.num_layers) for m in per_layer]
    plan += [entry(m, None) for m in tail]
    return plan


def _group_shards(plan, shard_size_bytes: int | None):
    if shard_size_bytes is None:
        return [plan]
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    shards, current, size = [], [], 0
    for item in plan:
        if current and size + item[1] > shard_size_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item[1]
    shards.append(current)
    return shards


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """`safetensors.numpy.save_file` with PEFT/transformers' metadata, giving the file the mode
    a plain `open` would (save_file creates it 0600 whatever the umask)."""
    from safetensors.numpy import save_file

    from hfjax.eval.report import current_umask

    save_file(dict(tensors), str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())


def save_hf(path: str | os.PathLike, cfg: ModelConfig, params: Mapping, dtype=None,
            shard_size_bytes: int | None = None) -> Path:
    """Write `params` as an HF folder transformers loads with `from_pretrained`.

    Files: config.json (`config.to_hf_dict`, "dtype" = the saved dtype) and model.safetensors,
    or, with `shard_size_bytes`, model-0000k-of-0000n.safetensors shards of at most that many
    bytes (a larger single tensor gets a shard of its own) and model.safetensors.index.json.
    dtype: cast every tensor to it (float32, float16 or bfloat16; a float64 model is saved with
    an explicit one of these); None keeps each parameter's dtype.
    Everything is written to a temporary folder first: a new `path` appears by one rename; into
    an existing folder each file is moved by `os.replace` (other files, e.g. a tokenizer, stay,
    and weight files of an earlier save that the new one does not use are removed).
    In a multi-process run every process must call it (arrays are gathered); process 0 writes.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    _check_params(cfg, params)
    plan = _export_plan(cfg, params, dtype)
    shards = _group_shards(plan, shard_size_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if shard_size_bytes is None else [
        f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)
    ]
    writer = jax.process_index() == 0
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if writer:
            tmp.mkdir(parents=True)
        weight_map = {}
        for fname, shard in zip(names, shards, strict=True):
            tensors = {name: thunk() for name, _, thunk in shard}
            if writer:
                save_safetensors(tensors, tmp / fname)
            weight_map.update(dict.fromkeys(tensors, fname))
            del tensors
        if not writer:
            return path
        saved_dtype = jnp.dtype(dtype if dtype is not None else params["embed_tokens"].dtype).name
        hf_config = config_lib.to_hf_dict(cfg)
        hf_config["dtype"] = hf_config["torch_dtype"] = saved_dtype
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        written = list(names)
        if shard_size_bytes is not None:
            index = {
                "metadata": {"total_size": sum(item[1] for item in plan)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            written.append(INDEX_FILE)
        written.append(CONFIG_FILE)
        if not path.exists():
            os.replace(tmp, path)
        else:
            _replace_into(tmp, path, written)
    finally:
        if writer and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def _replace_into(tmp: Path, path: Path, written: list[str]) -> None:
    """Move the new files into an existing folder (weights first), then drop stale weights."""
    for fname in written:
        os.replace(tmp / fname, path / fname)
    stale = [p for p in path.iterdir() if _WEIGHT_FILE.match(p.name) and p.name not in written]
    for p in sorted(stale, key=lambda p: not p.name.endswith(".json")):  # the index goes first
        p.unlink()
