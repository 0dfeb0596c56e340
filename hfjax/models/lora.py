"""LoRA adapters as a separate pytree keyed like HF module names.

    W' x = W x + (alpha / r) · B A x
    training with lora_dropout p:  W x + (alpha / r) · B A (m ⊙ x / (1 − p)),  m ~ Bernoulli(1 − p)

hfjax stores, per targeted projection and stacked over layers (for `lax.scan`),
A: [L, in, r] and B: [L, r, out] so that the update is `x @ A @ B * scale` (the transposes of
PEFT's lora_A.weight [r, in] and lora_B.weight [out, r]). Dropout (PEFT's `lora_dropout`: an
`nn.Dropout` on the branch input of every target module) acts only where `forward` gets a
`dropout_rng`, as hfjax's train step passes; evaluation, generation and `merge` have none.

    lora = init(cfg, key, rank=8, alpha=16, targets=("q_proj", "v_proj"), dropout=0.05)
    params = merge(cfg, params, lora)                    # W += scale · A @ B
    save_peft(dir, cfg, lora); lora = load_peft(dir, cfg)  # PEFT adapter folders
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from hfjax.errors import UserError
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.hf_io import save_safetensors, to_host
from hfjax.models.params import PROJECTIONS, projection_dims


@flax.struct.dataclass
class LoRA:
    """LoRA weights {module: {"A": [L, in, r], "B": [L, r, out]}}, the static alpha and the
    static dropout probability p of the branch inputs in training (PEFT's lora_dropout)."""

    weights: dict
    alpha: float = flax.struct.field(pytree_node=False, default=16.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.weights)

    @property
    def rank(self) -> int:
        first = next(iter(self.weights.values()))
        return int(first["A"].shape[-1])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def dropout_keys(rng: jax.Array, num_layers: int) -> jax.Array:
    """The per-layer LoRA dropout keys of one training step: `jax.random.split(rng, L)`."""
    return jax.random.split(rng, num_layers)


def dropout_mask(layer_key: jax.Array, name: str, p: float, shape: tuple[int, ...]) -> jax.Array:
    """Which inputs of `name`'s LoRA branch dropout keeps (True) in one layer: Bernoulli(1 − p)
    per element, drawn with fold_in(layer_key, index of name in PROJECTIONS), so every target
    module of a layer has its own mask (PEFT: one nn.Dropout per module)."""
    key = jax.random.fold_in(layer_key, PROJECTIONS.index(name))
    return jax.random.bernoulli(key, 1.0 - p, shape)


def apply(x: jax.Array, layer_weights: dict | None, name: str, scale: float, *,
          forward_mode_ad: bool = False, dropout: float = 0.0,
          dropout_key: jax.Array | None = None) -> jax.Array | None:
    """The LoRA branch ((x' @ A) · scale) @ B for one layer's `name` projection, or None.

    x' = x, or with dropout p > 0 and the layer's `dropout_key` (training), inverted dropout
    x' = m ⊙ x · 1/(1 − p), m = `dropout_mask(dropout_key, name, p, x.shape)` (PEFT's
    lora_B(lora_A(dropout(x))) · scaling); E_m[x'] = x, and the gradient flows through m.
    x: [N, in] in the compute dtype; A and B are cast to it. The scale multiplies the rank-r
    intermediate [N, r], not the [N, out] output as PEFT writes it (same value up to rounding;
    exact when scale is a power of two): no elementwise pass over [N, out] for it (f32 LoRA
    step −3%, commit 2e2c113).
    Its gradient is `branch`'s custom VJP (reverse mode only); forward_mode_ad=True
    differentiates the plain expression instead, so that `jax.jvp` (Hessian-vector products)
    works.
    """
    if layer_weights is None or name not in layer_weights:
        return None
    if dropout and dropout_key is not None:
        keep = dropout_mask(dropout_key, name, dropout, x.shape)
        x = jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - dropout), x.dtype), 0)
    a, b = layer_weights[name]["A"], layer_weights[name]["B"]
    if forward_mode_ad:
        return _branch_forward(x, a, b, scale)[0]
    return branch(x, a, b, scale)


_NN = (((1,), (0,)), ((), ()))  # dot_general: lhs [m, k] · rhs [k, n]
_NT = (((1,), (1,)), ((), ()))  # lhs [m, k] · rhs [n, k]ᵀ


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def branch(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """y = (s·x A) B for x [N, in], A [in, r], B [r, out], in x's dtype; h = s·x A.

    Its VJP for ∂y = G [N, out] (weight gradients accumulated in max(x.dtype, float32)):

        ∂h = s·G Bᵀ,   ∂x = ∂h Aᵀ,   ∂Aᵀ = ∂hᵀ x,   ∂B = hᵀ G,   (∂hᵀ, hᵀ) = I_r (∂hᵀ, hᵀ)

    Every product contracts its left operand's last axis and takes row-major operands.
    Autodiff writes the weight gradients as xᵀ ∂h and hᵀ G, which contract the token axis of
    both operands; XLA:CPU runs those outside YNNPACK as f32 dots on upcast copies of x and
    G (512 × 576 × 8: 0.33 ms, against 0.09 ms for ∂hᵀ x). A transposed operand, even
    the [N, r] h, also makes XLA:CPU upcast a bf16 dot, so ∂hᵀ and hᵀ come from exact GEMMs
    with the r × r identity (2·r²·N FLOPs each), and ∂A's final [r, in] → [in, r] transpose
    sits behind an optimization barrier that keeps XLA from folding it back into the dot.
    SmolLM2-135M LoRA step (commit d274e59): bf16 −5.5%, f32 −3.6%.
    """
    return _branch_forward(x, a, b, scale)[0]


def _branch_forward(x, a, b, scale):
    h = (x @ a.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
    return h @ b.astype(x.dtype), (x, h, a, b)


def _branch_backward(scale, residuals, g):
    x, h, a, b = residuals
    s = jnp.asarray(scale, x.dtype)
    a_c, b_c = a.astype(x.dtype), b.astype(x.dtype)
    eye = jnp.eye(h.shape[1], dtype=h.dtype)
    dh = jax.lax.dot_general(g, b_c, _NT) * s                       # [N, r]
    dx = jax.lax.dot_general(dh, a_c, _NT)                          # [N, in]
    dh_t = jax.lax.dot_general(eye, dh, _NT)                        # [r, N] = ∂hᵀ, exact
    h_t = jax.lax.dot_general(eye, h, _NT)                          # [r, N] = hᵀ, exact
    acc = at_least_float32(x.dtype)
    da_t = jax.lax.dot_general(dh_t, x, _NN, preferred_element_type=acc)  # [r, in]
    db = jax.lax.dot_general(h_t, g, _NN, preferred_element_type=acc)     # [r, out]
    da = jax.lax.optimization_barrier(da_t).T
    return dx, da.astype(a.dtype), db.astype(b.dtype)


branch.defvjp(_branch_forward, _branch_backward)


class LoRAError(UserError, ValueError):
    """A LoRA adapter that is invalid or that hfjax cannot represent."""


def _check_dropout(p, where: str = "LoRA dropout") -> float:
    """p as a float, or LoRAError unless it is a number with 0 <= p < 1."""
    ok = isinstance(p, int | float | np.floating) and not isinstance(p, bool)
    if not ok or not 0.0 <= float(p) < 1.0:
        raise LoRAError(f"{where} must be a number in [0, 1), got {p!r}")
    return float(p)


# ---------------------------------------------------------------------------------------------
# init and merge


def kaiming_uniform_bound(fan_in: int, a: float = math.sqrt(5)) -> float:
    """Bound of torch's `nn.init.kaiming_uniform_(w, a)` (mode fan_in, leaky_relu gain).

        gain = sqrt(2 / (1 + a²)),  bound = gain · sqrt(3 / fan_in)

    With PEFT's a = √5: gain = sqrt(1/3), so bound = 1 / sqrt(fan_in).
    """
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return gain * math.sqrt(3.0 / fan_in)


def _check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise LoRAError(f"LoRA needs at least one target projection out of {PROJECTIONS}")
    for t in targets:
        if t not in PROJECTIONS:
            raise LoRAError(f"unknown LoRA target {t!r}; targets must be among {PROJECTIONS}")
    if len(set(targets)) != len(targets):
        raise LoRAError(f"LoRA targets contain duplicates: {targets}")
    return targets


def init(
    cfg: ModelConfig,
    key: jax.Array,
    rank: int = 8,
    alpha: float = 16,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    dropout: float = 0.0,
) -> LoRA:
    """A fresh adapter initialized as PEFT does (`init_lora_weights=True`), in float32 (float64
    for a float64 model: max(cfg.dtype, float32), the same draws).

    A ~ U(-b, b) with b = kaiming_uniform_bound(in) = 1/sqrt(in), drawn for PEFT's lora_A
    weight [r, in] (stored here transposed, [L, in, r]); B = 0 ([L, r, out]), so the adapted
    model starts equal to the base model. dropout: PEFT's lora_dropout p, in [0, 1).
    """
    targets = _check_targets(targets)
    dropout = _check_dropout(dropout)
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise LoRAError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    rank = int(rank)
    if not math.isfinite(float(alpha)):
        raise LoRAError(f"LoRA alpha must be a finite number, got {alpha!r}")
    dims = projection_dims(cfg)
    n = cfg.num_layers
    dtype = at_least_float32(cfg.dtype)
    keys = jax.random.split(key, len(targets))
    weights = {}
    for name, k in zip(targets, keys, strict=True):
        fin, fout = dims[name]
        bound = kaiming_uniform_bound(fin)
        a = jax.random.uniform(k, (n, fin, rank), jnp.float32, -bound, bound)
        weights[name] = {"A": a.astype(dtype), "B": jnp.zeros((n, rank, fout), dtype)}
    return LoRA(weights=weights, alpha=float(alpha), dropout=dropout)


def _check_against_cfg(cfg: ModelConfig, lora: LoRA) -> None:
    """Raise LoRAError unless every adapter tensor has the shape cfg implies."""
    dims = projection_dims(cfg)
    if not lora.weights:
        raise LoRAError("the LoRA adapter has no targets")
    rank = lora.rank
    for name, w in lora.weights.items():
        if name not in dims:
            raise LoRAError(f"unknown LoRA target {name!r}; targets must be among {PROJECTIONS}")
        fin, fout = dims[name]
        want = {"A": (cfg.num_layers, fin, rank), "B": (cfg.num_layers, rank, fout)}
        for part, shape in want.items():
            if part not in w:
                raise LoRAError(f"LoRA target {name!r} has no {part!r} weight")
            if tuple(w[part].shape) != shape:
                raise LoRAError(
                    f"LoRA {name}.{part} has shape {tuple(w[part].shape)}, expected {shape} "
                    f"for this model (layers, in, out) and rank {rank}"
                )


def merge(cfg: ModelConfig, params: dict, lora: LoRA) -> dict:
    """Params with the adapter folded in: W[l] += (alpha / r) · A[l] @ B[l] for each target
    (no dropout: PEFT merges the same way).

    The product and the sum are computed in max(kernel dtype, float32) and cast back to each
    kernel's dtype; the input pytree is not modified (a new dict is returned, untouched leaves
    are shared).
    """
    _check_against_cfg(cfg, lora)
    layers = dict(params["layers"])
    for name, w in lora.weights.items():
        if name not in layers or "kernel" not in layers[name]:
            raise LoRAError(f"params have no layers.{name}.kernel to merge the adapter into")
        kernel = layers[name]["kernel"]
        wide = at_least_float32(kernel.dtype)
        delta = jnp.einsum(
            "lir,lro->lio",
            w["A"].astype(wide),
            w["B"].astype(wide),
            precision=jax.lax.Precision.HIGHEST,
        )
        if tuple(kernel.shape) != tuple(delta.shape):
            raise LoRAError(
                f"layers.{name}.kernel has shape {tuple(kernel.shape)} but the adapter's update "
                f"has shape {tuple(delta.shape)}"
            )
        merged = (kernel.astype(wide) + lora.scale * delta).astype(kernel.dtype)
        layers[name] = {**layers[name], "kernel": merged}
    return {**params, "layers": layers}


# ---------------------------------------------------------------------------------------------
# PEFT interchange

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_MODULE_GROUP = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

# base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.default].weight
_KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
    r"\.lora_([AB])(?:\.default)?\.weight$"
)


def peft_key(layer: int, name: str, part: str) -> str:
    """PEFT's state-dict key of one layer's lora_A / lora_B weight (part "A" or "B")."""
    return f"base_model.model.model.layers.{layer}.{_MODULE_GROUP[name]}.{name}.lora_{part}.weight"


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def peft_config(
    cfg: ModelConfig, lora: LoRA, base_model_name_or_path: str | None = None
) -> dict:
    """The adapter_config.json contents PEFT's LoraConfig writes for this adapter."""
    del cfg
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": _json_number(lora.alpha),
        "target_modules": [name for name in PROJECTIONS if name in lora.weights],
        "exclude_modules": None,
        "lora_dropout": float(lora.dropout),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "layer_replication": None,
        "trainable_token_indices": None,
        "target_parameters": None,
        "auto_mapping": None,
    }


def save_peft(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    lora: LoRA,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter in PEFT's format: adapter_config.json + adapter_model.safetensors.

    Multi-host: call it on every process. Weights sharded across processes are all-gathered
    (a collective every process joins); process 0 writes, the others return without writing.
    Tensors are PEFT's: lora_A.weight = A[l]ᵀ [r, in], lora_B.weight = B[l]ᵀ [out, r], float32
    unless the adapter holds another float dtype. A new directory is written in a sibling temp
    directory and renamed into place; into an existing directory each file goes to a temp name
    first and is `os.replace`d (the weights before the config), so no file is ever half-written.
    """
    _check_against_cfg(cfg, lora)
    directory = Path(directory)
    tensors: dict[str, np.ndarray] = {}
    for name in PROJECTIONS:
        if name not in lora.weights:
            continue
        a = to_host(lora.weights[name]["A"])
        b = to_host(lora.weights[name]["B"])
        for layer in range(cfg.num_layers):
            tensors[peft_key(layer, name, "A")] = np.ascontiguousarray(a[layer].T)
            tensors[peft_key(layer, name, "B")] = np.ascontiguousarray(b[layer].T)
    if jax.process_index() != 0:
        return directory
    config_text = json.dumps(peft_config(cfg, lora, base_model_name_or_path), indent=2) + "\n"

    def write_into(folder: Path, suffix: str = "") -> None:
        save_safetensors(tensors, folder / (ADAPTER_WEIGHTS + suffix))
        (folder / (ADAPTER_CONFIG + suffix)).write_text(config_text)

    if directory.exists():
        if not directory.is_dir():
            raise NotADirectoryError(f"cannot save a PEFT adapter to {directory}: not a directory")
        suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            write_into(directory, suffix)
            for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                os.replace(directory / (fname + suffix), directory / fname)
        finally:
            for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                (directory / (fname + suffix)).unlink(missing_ok=True)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()  # (unlike mkdtemp, honours the umask)
        write_into(tmp)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# Config fields that change what the adapter computes in ways hfjax does not implement:
# field -> what it means.
_UNSUPPORTED_FLAGS = {
    "use_rslora": "rank-stabilized scaling alpha/sqrt(r)",
    "use_dora": "DoRA magnitude vectors",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA pooling",
}
_UNSUPPORTED_NONEMPTY = {
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained module copies",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA",
}


def _targets_from_config(value) -> tuple[str, ...]:
    """Map PEFT's target_modules (list of module names, or "all-linear") to projection names."""
    if value == "all-linear":
        return PROJECTIONS
    if isinstance(value, str):
        raise LoRAError(
            f"target_modules {value!r} is a regex; hfjax reads a list of module names "
            f"(any of {PROJECTIONS}) or 'all-linear'"
        )
    if not isinstance(value, list | tuple) or not value:
        raise LoRAError(f"target_modules must be a non-empty list of module names, got {value!r}")
    found = []
    for entry in value:
        if not isinstance(entry, str):
            raise LoRAError(f"target_modules entry {entry!r} is not a module name")
        parts = entry.split(".")
        name = parts[-1]
        # PEFT matches a name as a suffix of the module path: "q_proj", "self_attn.q_proj".
        prefix_ok = len(parts) == 1 or parts[-2] == _MODULE_GROUP.get(name)
        if name not in PROJECTIONS or not prefix_ok:
            raise LoRAError(
                f"cannot map target module {entry!r} to a projection; hfjax LoRA supports "
                f"{PROJECTIONS}"
            )
        if name not in found:
            found.append(name)
    return tuple(n for n in PROJECTIONS if n in found)


def _read_peft_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{path} does not hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{path}: peft_type is {config['peft_type']!r}, only 'LORA' is supported")
    for field, what in _UNSUPPORTED_FLAGS.items():
        if config.get(field):
            raise LoRAError(f"{path}: {field}=true ({what}) is not supported by hfjax")
    for field, what in _UNSUPPORTED_NONEMPTY.items():
        if config.get(field):
            raise LoRAError(
                f"{path}: {field}={config[field]!r} ({what}) is not supported by hfjax"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise LoRAError(f"{path}: bias={bias!r} is not supported; hfjax LoRA has bias 'none'")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise LoRAError(f"{path} has no {field!r} field")
    r = config["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAError(f"{path}: r must be an integer >= 1, got {r!r}")
    alpha = config["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise LoRAError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    config["lora_dropout"] = _check_dropout(config.get("lora_dropout") or 0.0,
                                            f"{path}: lora_dropout")
    return config


def load_peft(directory: str | os.PathLike, cfg: ModelConfig) -> LoRA:
    """Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

    Accepts keys with or without PEFT's ".default" adapter name and target_modules as a list of
    module names (or "all-linear"); every target needs lora_A [r, in] and lora_B [out, r] for
    every layer of `cfg`. Weights are returned in max(cfg.dtype, float32), A[l] = lora_Aᵀ,
    B[l] = lora_Bᵀ; `lora_dropout` (default 0) becomes the adapter's dropout.
    Raises FileNotFoundError for missing files and LoRAError for anything hfjax cannot map
    (rsLoRA, DoRA, biases, rank/alpha patterns, other modules, shape mismatches).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {directory} does not exist")
    config_path = directory / ADAPTER_CONFIG
    weights_path = directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"PEFT adapter {directory} has no {ADAPTER_CONFIG}")
    if not weights_path.is_file():
        hint = ""
        if (directory / "adapter_model.bin").exists():
            hint = " (only adapter_model.bin, a torch pickle: re-save it with safetensors)"
        raise FileNotFoundError(f"PEFT adapter {directory} has no {ADAPTER_WEIGHTS}{hint}")
    config = _read_peft_config(config_path)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    dropout = config["lora_dropout"]
    targets = _targets_from_config(config["target_modules"])
    layers_to_transform = config.get("layers_to_transform")
    if layers_to_transform is not None:
        if isinstance(layers_to_transform, int):
            layers_to_transform = [layers_to_transform]
        if sorted(layers_to_transform) != list(range(cfg.num_layers)):
            raise LoRAError(
                f"{config_path}: layers_to_transform={config['layers_to_transform']!r} adapts "
                f"only some of the {cfg.num_layers} layers; hfjax adapts every layer"
            )

    tensors = safetensors.numpy.load_file(str(weights_path))
    found: dict[tuple[str, int, str], np.ndarray] = {}
    for key, value in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise LoRAError(f"{weights_path}: cannot map tensor {key!r} to a LoRA projection")
        layer, group, name, part = int(m[1]), m[2], m[3], m[4]
        if _MODULE_GROUP.get(name) != group:
            raise LoRAError(f"{weights_path}: cannot map tensor {key!r} to a LoRA projection")
        if name not in targets:
            raise LoRAError(
                f"{weights_path}: tensor {key!r} is for {name}, which is not in target_modules "
                f"{list(targets)}"
            )
        if layer >= cfg.num_layers:
            raise LoRAError(
                f"{weights_path}: tensor {key!r} is for layer {layer} but the model has "
                f"{cfg.num_layers} layers"
            )
        if (name, layer, part) in found:
            raise LoRAError(f"{weights_path}: more than one tensor for layer {layer} {name} {part}")
        found[(name, layer, part)] = value

    dims = projection_dims(cfg)
    dtype = at_least_float32(cfg.dtype)
    weights = {}
    for name in targets:
        fin, fout = dims[name]
        want = {"A": (rank, fin), "B": (fout, rank)}
        stacked = {}
        for part in ("A", "B"):
            per_layer = []
            for layer in range(cfg.num_layers):
                key = peft_key(layer, name, part)
                if (name, layer, part) not in found:
                    raise LoRAError(f"{weights_path} is missing tensor {key!r}")
                value = found[(name, layer, part)]
                if value.shape != want[part]:
                    raise LoRAError(
                        f"{weights_path}: {key!r} has shape {value.shape}, expected {want[part]} "
                        f"(r={rank}, {name} in={fin}, out={fout})"
                    )
                if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
                    raise LoRAError(f"{weights_path}: {key!r} has non-float dtype {value.dtype}")
                per_layer.append(value.astype(dtype).T)
            stacked[part] = jnp.asarray(np.stack(per_layer))
        weights[name] = stacked
    return LoRA(weights=weights, alpha=alpha, dropout=dropout)
