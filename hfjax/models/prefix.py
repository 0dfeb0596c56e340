"""Prefix tuning (Li & Liang 2021) as huggingface/peft implements it for causal LMs.

P virtual tokens give every layer l a key and a value prefix [P, H_kv, d] (the KV heads under
grouped-query attention; d = head_dim). They are prepended to the layer's projected, already
rotated keys and values; the prefix itself is not rotated; real tokens' positions start at P
and the attention mask gets P ones in front (`decoder.forward(..., prefix=)`):

    attn_l(x) = softmax(s · q_l [K_l^pre ; R(k_l)]ᵀ + mask) [V_l^pre ; v_l],  positions P + t

The trained table is the encoder output E = materialize(prefix) [P, L·2·H_kv·d], flat index
((2l + kv)·H_kv + h)·d + j (layer-major, K before V, then head, then head dim), either the
table itself (PEFT's default) or, with `projection` D' (PEFT's prefix_projection, D' its
encoder_hidden_size), a reparameterization of a [P, H_kv·d] embedding:

    E = tanh(emb W_in + b_in) W_out + b_out,   W_in [H_kv·d, D'],  W_out [D', L·2·H_kv·d]

Init as PEFT's PrefixEncoder: nn.Embedding's N(0, 1); nn.Linear's U(−1/√fan_in, 1/√fan_in)
for weights and biases. PEFT's format (`save_peft` / `load_peft`): adapter_model.safetensors
holds the one tensor `prompt_embeddings` = E (the projection MLP is not saved), and
adapter_config.json has peft_type PREFIX_TUNING, token_dim = H_kv·d, num_attention_heads =
H_kv (PEFT >= 0.12 under grouped-query attention).

Checked against PEFT on Llama (grouped-query) and Qwen2, full-attention layers. On a
sliding-window layer the prefix holds key slots [0, P) and leaves the window as any earlier key.

    prefix = init(cfg, key, num_virtual_tokens=20)            # or projection=512
    logits = decoder.forward(cfg, params, ids, mask, prefix=prefix)
    save_peft(dir, cfg, prefix); prefix = load_peft(dir, cfg)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jax.sharding import Mesh

from hfjax import sharding as sharding_lib
from hfjax.errors import UserError
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.hf_io import save_safetensors, to_host
from hfjax.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, kaiming_uniform_bound

WEIGHTS_KEY = "prompt_embeddings"


class PrefixError(UserError, ValueError):
    """A prefix adapter that is invalid or that hfjax cannot represent."""


@flax.struct.dataclass
class Prefix:
    """The trained prefix: `embedding` [P, L·2·H_kv·d] (the table itself), or with a
    projection `embedding` [P, H_kv·d] and `transform` {w_in [H_kv·d, D'], b_in [D'],
    w_out [D', L·2·H_kv·d], b_out [L·2·H_kv·d]} (module docstring)."""

    embedding: jax.Array
    transform: dict | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embedding.shape[0])


def token_dim(cfg: ModelConfig) -> int:
    """H_kv · head_dim: PEFT's token_dim for a grouped-query model."""
    return cfg.num_kv_heads * cfg.head_dim


def table_width(cfg: ModelConfig) -> int:
    """L · 2 · H_kv · head_dim: the width of the materialized prefix."""
    return cfg.num_layers * 2 * token_dim(cfg)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise PrefixError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def init(cfg: ModelConfig, key: jax.Array, num_virtual_tokens: int = 20,
         projection: int | None = None) -> Prefix:
    """A fresh prefix drawn as PEFT's PrefixEncoder draws it, in max(cfg.dtype, float32).

    projection None: the table [P, L·2·H_kv·d] ~ N(0, 1) is trained. projection D': an
    embedding [P, H_kv·d] ~ N(0, 1) and the MLP Linear(H_kv·d → D') → tanh → Linear(D' →
    L·2·H_kv·d), each Linear's weight and bias ~ U(−1/√fan_in, 1/√fan_in).
    """
    p = _positive_int(num_virtual_tokens, "num_virtual_tokens")
    dtype = at_least_float32(cfg.dtype)
    if projection is None:
        return Prefix(jax.random.normal(key, (p, table_width(cfg)), jnp.float32).astype(dtype))
    hidden = _positive_int(projection, "the prefix projection size")
    k_emb, k_wi, k_bi, k_wo, k_bo = jax.random.split(key, 5)

    def uniform(k, shape, fan_in):
        bound = kaiming_uniform_bound(fan_in)
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dtype)

    dim, width = token_dim(cfg), table_width(cfg)
    transform = {"w_in": uniform(k_wi, (dim, hidden), dim), "b_in": uniform(k_bi, (hidden,), dim),
                 "w_out": uniform(k_wo, (hidden, width), hidden),
                 "b_out": uniform(k_bo, (width,), hidden)}
    return Prefix(jax.random.normal(k_emb, (p, dim), jnp.float32).astype(dtype), transform)


def materialize(prefix: Prefix) -> jax.Array:
    """The encoder output E [P, L·2·H_kv·d]: the table, or the projection MLP applied."""
    if prefix.transform is None:
        return prefix.embedding
    t = prefix.transform
    hidden = jnp.tanh(prefix.embedding @ t["w_in"] + t["b_in"])
    return hidden @ t["w_out"] + t["b_out"]


def layer_kv(cfg: ModelConfig, prefix: Prefix, dtype) -> tuple[jax.Array, jax.Array]:
    """(K, V) [L, P, H_kv, d] in `dtype`: E viewed as [P, L, 2, H_kv, d] (PEFT's view of
    [P, 2L, H_kv, d], pairs (2l, 2l + 1) = layer l's (K, V))."""
    _check_against_cfg(cfg, prefix)
    e = materialize(prefix).astype(dtype)
    kv = e.reshape(prefix.num_virtual_tokens, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
    kv = kv.transpose(1, 2, 0, 3, 4)
    return kv[:, 0], kv[:, 1]


def _check_against_cfg(cfg: ModelConfig, prefix: Prefix) -> None:
    """Raise PrefixError unless the prefix's arrays have the shapes cfg implies."""
    p = prefix.num_virtual_tokens
    dim, width = token_dim(cfg), table_width(cfg)
    if prefix.transform is None:
        want = {"embedding": (p, width)}
        got = {"embedding": prefix.embedding.shape}
    else:
        hidden = prefix.transform["w_in"].shape[-1]
        want = {"embedding": (p, dim), "w_in": (dim, hidden), "b_in": (hidden,),
                "w_out": (hidden, width), "b_out": (width,)}
        got = {"embedding": prefix.embedding.shape,
               **{k: prefix.transform[k].shape for k in ("w_in", "b_in", "w_out", "b_out")}}
    for name, shape in want.items():
        if tuple(got[name]) != shape:
            raise PrefixError(
                f"prefix {name} has shape {tuple(got[name])}, expected {shape} for this model "
                f"(L={cfg.num_layers}, H_kv={cfg.num_kv_heads}, head_dim={cfg.head_dim})")


def logical_axes(prefix: Prefix) -> Prefix:
    """The prefix's logical axis names (`hfjax.sharding.RULES`), one tuple per leaf."""
    transform = None if prefix.transform is None else {
        "w_in": ("prefix_features", "prefix_hidden"), "b_in": ("prefix_hidden",),
        "w_out": ("prefix_hidden", "prefix_features"), "b_out": ("prefix_features",)}
    return Prefix(("prefix_tokens", "prefix_features"), transform)


def shardings(prefix: Prefix, mesh: Mesh, rules=sharding_lib.RULES) -> Prefix:
    """NamedShardings of the prefix's leaves (shapes or arrays) from their logical axes."""
    return sharding_lib.tree_shardings(logical_axes(prefix), prefix, mesh, rules)


# ---------------------------------------------------------------------------------------------
# PEFT interchange


def peft_config(cfg: ModelConfig, prefix: Prefix,
                base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json PEFT's PrefixTuningConfig writes for the materialized prefix."""
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": prefix.num_virtual_tokens,
        "token_dim": token_dim(cfg),
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.num_kv_heads,
        "num_layers": cfg.num_layers,
        "modules_to_save": None,
        "init_weights": None,
        "encoder_hidden_size": token_dim(cfg),
        "prefix_projection": False,
    }


def _write_folder(directory: Path, tensors: dict, config_text: str) -> None:
    """adapter_model.safetensors and adapter_config.json into `directory`, never half-written:
    a new folder is written beside it and renamed into place; into an existing one each file
    goes to a temporary name and is `os.replace`d, the weights first."""
    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def write_into(folder: Path, end: str = "") -> None:
        save_safetensors(tensors, folder / (ADAPTER_WEIGHTS + end))
        (folder / (ADAPTER_CONFIG + end)).write_text(config_text)

    if directory.exists():
        if not directory.is_dir():
            raise NotADirectoryError(f"cannot save a PEFT adapter to {directory}: not a directory")
        try:
            write_into(directory, suffix)
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                os.replace(directory / (name + suffix), directory / name)
        finally:
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                (directory / (name + suffix)).unlink(missing_ok=True)
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}{suffix}"
    try:
        tmp.mkdir()
        write_into(tmp)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_peft(directory: str | os.PathLike, cfg: ModelConfig, prefix: Prefix,
              base_model_name_or_path: str | None = None) -> Path:
    """Write the prefix in PEFT's format: `prompt_embeddings` = materialize(prefix) [P,
    L·2·H_kv·d] (float32 unless the prefix holds another float dtype) and the config of
    `peft_config` (prefix_projection false: the table PEFT loads for inference or training).

    Multi-host: call it on every process; process 0 writes.
    """
    _check_against_cfg(cfg, prefix)
    directory = Path(directory)
    table = np.ascontiguousarray(to_host(materialize(prefix)))
    if jax.process_index() != 0:
        return directory
    config_text = json.dumps(peft_config(cfg, prefix, base_model_name_or_path), indent=2) + "\n"
    _write_folder(directory, {WEIGHTS_KEY: table}, config_text)
    return directory


def _read_config(path: Path, cfg: ModelConfig) -> int:
    """num_virtual_tokens of a PEFT prefix config at `path`, after checking it fits cfg."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PrefixError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise PrefixError(f"{path} does not hold a JSON object")
    kind = config.get("peft_type")
    if kind != "PREFIX_TUNING":
        hint = " (a LoRA adapter: models.lora.load_peft reads it)" if kind == "LORA" else ""
        raise PrefixError(f"{path}: peft_type is {kind!r}; a prefix adapter has "
                          f"'PREFIX_TUNING'{hint}")
    task = config.get("task_type", "CAUSAL_LM")
    if task != "CAUSAL_LM":
        raise PrefixError(f"{path}: task_type is {task!r}; hfjax reads CAUSAL_LM prefixes")
    for field in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
        if field not in config:
            raise PrefixError(f"{path} has no {field!r} field")
    p = config["num_virtual_tokens"]
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise PrefixError(f"{path}: num_virtual_tokens must be an integer >= 1, got {p!r}")
    want = {"num_layers": cfg.num_layers, "num_attention_heads": cfg.num_kv_heads,
            "token_dim": token_dim(cfg), "num_transformer_submodules": 1}
    for field, value in want.items():
        if config.get(field, 1) != value:
            raise PrefixError(
                f"{path}: {field}={config[field]!r}, but this model needs {value} (L="
                f"{cfg.num_layers}, H_kv={cfg.num_kv_heads}, head_dim={cfg.head_dim}; PEFT "
                f"before 0.12 wrote token_dim = hidden size for grouped-query models)")
    return p


def load_peft(directory: str | os.PathLike, cfg: ModelConfig) -> Prefix:
    """Read a PEFT prefix-tuning folder as a table Prefix (no transform) in max(cfg.dtype,
    float32). An adapter saved with prefix_projection holds its encoder output, which is the
    table here. Raises FileNotFoundError for missing files and PrefixError for anything that
    does not fit `cfg` or that is not a causal-LM prefix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {directory} does not exist")
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"PEFT adapter {directory} has no {path.name}")
    p = _read_config(config_path, cfg)
    tensors = safetensors.numpy.load_file(str(weights_path))
    if set(tensors) != {WEIGHTS_KEY}:
        raise PrefixError(f"{weights_path} holds {sorted(tensors)}; a prefix adapter holds the "
                          f"one tensor {WEIGHTS_KEY!r}")
    table = tensors[WEIGHTS_KEY]
    if table.shape != (p, table_width(cfg)):
        raise PrefixError(f"{weights_path}: {WEIGHTS_KEY} has shape {table.shape}, expected "
                          f"{(p, table_width(cfg))} (num_virtual_tokens, L·2·H_kv·head_dim)")
    if not np.issubdtype(table.dtype, np.floating) or not np.all(np.isfinite(table)):
        raise PrefixError(f"{weights_path}: {WEIGHTS_KEY} must hold finite floats")
    return Prefix(jnp.asarray(table.astype(at_least_float32(cfg.dtype))))

