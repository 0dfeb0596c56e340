"""Model configuration: one frozen dataclass for every supported decoder family.

Families differ only in a handful of switches (see `ModelConfig`); `from_hf_dict` reads an HF
`config.json` (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`).
The config is hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")  # see hfjax.models.attention
DTYPES = ("float32", "bfloat16", "float16", "float64")


def at_least_float32(dtype) -> np.dtype:
    """max(dtype, float32): the dtype norms, softmax, logits, losses and gradient accumulations
    run in. float32 for bfloat16 / float16 / float32 models, float64 for a float64 model."""
    return jnp.promote_types(dtype, jnp.float32)


class ModelConfigError(UserError, ValueError):
    """A model configuration that hfjax cannot represent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only LM.

    Attributes mirror HF names where they exist. Per-family switches:
      qkv_bias              Qwen2: biases on q/k/v projections.
      norm_weight_offset    Gemma 2: RMSNorm multiplies by (offset + w) with offset 1.
      scale_embeddings      Gemma 2: h0 = embed(x) * sqrt(hidden_size).
      sandwich_norms        Gemma 2: extra RMSNorm after attention and after the MLP.
      attn_logit_softcap    Gemma 2: scores = c * tanh(scores / c).
      final_logit_softcap   Gemma 2: logits = c * tanh(logits / c).
      query_pre_attn_scalar Gemma 2: attention scale is s^-1/2 instead of head_dim^-1/2.
      layer_windows         per layer sliding window (0 = global attention); Mistral uses one
                            window everywhere, Gemma 2 alternates local/global.
    Run-time switches (not from config.json): dtype, remat, scan_unroll, and attention, the
    attention kernel ("auto", "xla" or "cudnn": `hfjax.models.attention`).
    dtype: the compute dtype (DTYPES); reductions run in `at_least_float32(dtype)`. "float64"
    needs 64-bit JAX (`jax.config.update("jax_enable_x64", True)` before making arrays).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_windows: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    mlp_activation: str = "silu"
    norm_weight_offset: float = 0.0
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    remat: bool = False
    scan_unroll: int = 1  # layers per scan iteration (num_layers: fully unrolled; see BUILD_NOTES)
    attention: str = "auto"


    def __post_init__(self):
        if not 1 <= self.scan_unroll:
            raise ModelConfigError(f"scan_unroll must be >= 1, got {self.scan_unroll}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ModelConfigError(f"unknown attention {self.attention!r}; choose from "
                                   f"{ATTENTION_IMPLEMENTATIONS}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"unknown model_type {self.model_type!r}; hfjax supports {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if len(self.layer_windows) != self.num_layers:
            raise ModelConfigError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )
        if self.mlp_activation not in ("silu", "gelu_tanh"):
            raise ModelConfigError(f"unsupported activation {self.mlp_activation!r}")
        if self.dtype not in DTYPES:
            raise ModelConfigError(f"unsupported dtype {self.dtype!r}; choose from {DTYPES}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ModelConfigError("dtype float64 needs 64-bit JAX: call "
                                   "jax.config.update('jax_enable_x64', True) first")

    @property
    def attention_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(base)

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}


def _eos_tuple(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def _rope_settings(d: dict) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or the 4.x fields."""
    params = dict(d.get("rope_parameters") or {})
    legacy = dict(d.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelConfigError(
            f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)"
        )
    if rope_type == "default":
        return theta, None
    return theta, tuple(sorted(scaling.items()))


def _layer_windows(d: dict, model_type: str, num_layers: int) -> tuple[int, ...]:
    window = d.get("sliding_window")
    layer_types = d.get("layer_types")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        return (0,) * num_layers
    if layer_types:
        return tuple(int(window or 0) if t == "sliding_attention" else 0 for t in layer_types)
    if model_type == "gemma2":
        return tuple(int(window or 0) if i % 2 == 0 else 0 for i in range(num_layers))
    if model_type == "qwen2":
        max_window_layers = d.get("max_window_layers", num_layers)
        return tuple(int(window or 0) if i >= max_window_layers else 0 for i in range(num_layers))
    return (int(window or 0),) * num_layers


def from_hf_dict(d: dict, *, dtype: str = "float32") -> ModelConfig:
    """Build a ModelConfig from the contents of an HF `config.json`."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"unknown model_type {model_type!r}; hfjax supports {SUPPORTED_MODEL_TYPES}"
        )
    try:
        num_layers = int(d["num_hidden_layers"])
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        theta, scaling = _rope_settings(d)
        act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        if act not in _ACTIVATIONS:
            raise ModelConfigError(f"unsupported activation {act!r}")
        gemma = model_type == "gemma2"
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            layer_windows=_layer_windows(d, model_type, num_layers),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            qkv_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            mlp_activation=_ACTIVATIONS[act],
            norm_weight_offset=1.0 if gemma else 0.0,
            scale_embeddings=gemma,
            sandwich_norms=gemma,
            attn_logit_softcap=d.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcap=d.get("final_logit_softcapping") if gemma else None,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_eos_tuple(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            dtype=dtype,
        )
    except KeyError as e:
        raise ModelConfigError(f"config is missing required field {e.args[0]!r}") from None


def to_hf_dict(cfg: ModelConfig) -> dict:
    """The inverse of `from_hf_dict` (transformers 5 layout), for exporting merged weights."""
    windows = {w for w in cfg.layer_windows if w}
    d = {
        "model_type": cfg.model_type,
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {
            "rope_theta": cfg.rope_theta,
            "rope_type": "default",
            **cfg.rope_scaling_dict,
        },
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu" if cfg.mlp_activation == "silu" else "gelu_pytorch_tanh",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids)
        if len(cfg.eos_token_ids) != 1
        else cfg.eos_token_ids[0],
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.dtype,
    }
    d["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "qwen2":
        d["use_sliding_window"] = bool(windows)
    if windows:
        d["sliding_window"] = windows.pop()
        d["layer_types"] = [
            "sliding_attention" if w else "full_attention" for w in cfg.layer_windows
        ]
    if cfg.model_type == "gemma2":
        d.update(
            hidden_activation=d.pop("hidden_act"),
            attn_logit_softcapping=cfg.attn_logit_softcap,
            final_logit_softcapping=cfg.final_logit_softcap,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar,
        )
    return d


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
