"""Random perturbation: Gaussian noise on the fine-tuned adapter's weights.

Yibo Wang, Tiansheng Huang, Li Shen, Huanjin Yao, Haotian Luo, Rui Liu, Naiqiang Tan, Jiaxing
Huang, Dacheng Tao. "Panacea: Mitigating Harmful Fine-tuning for Large Language Models via
Post-fine-tuning Perturbation". NeurIPS 2025, arXiv:2501.18100, §3: adding purely random noise
to the fine-tuned model recovers much of its safety at a cost in fine-tuning accuracy (the
baseline that Panacea's optimized perturbation improves on). Every trainable weight w (the LoRA
A and B of every target module and layer):

    w ← w + ε,    ε ~ N(0, σ² I)

as the reference code's `SFT_eval.evaluate` (w-yibo/Panacea `trainer.py:401-406`:
`param.data += torch.randn_like(param) * std` on the parameters with requires_grad). Its
`--noise_std` defaults to 0 (off, `train.py:177`) and the code gives no default σ; hfjax's
default σ = 0.01 is a setting to sweep, not the paper's. The noise of the i-th leaf of
`lora.weights` (modules in sorted order, "A" before "B") is drawn with
`jax.random.split(jax.random.key(seed), n_leaves)[i]` in float32, added in max(dtype, float32)
and cast to the leaf's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hfjax.defenses.api import DefenseError, register
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.models.lora import LoRA

PAPER = ("Wang et al. Panacea: Mitigating Harmful Fine-tuning for Large Language Models via "
         "Post-fine-tuning Perturbation, NeurIPS 2025, arXiv:2501.18100")


def _check_sigma(sigma: float) -> None:
    if not (math.isfinite(float(sigma)) and sigma >= 0):
        raise DefenseError(f"random_perturbation's sigma must be a finite number >= 0, got "
                           f"{sigma!r}")


def random_noise(lora: LoRA, sigma: float = 0.01, seed: int = 0) -> tuple[LoRA, dict]:
    """(adapter + N(0, σ²) noise on every weight, report {"sigma", "seed", "noise_norm"})."""
    _check_sigma(sigma)
    leaves, tree = jax.tree.flatten(lora.weights)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [sigma * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves,
                                                                                strict=True)]
    noisy = [(x.astype(at_least_float32(x.dtype)) + e).astype(x.dtype)
             for x, e in zip(leaves, noise, strict=True)]
    norm = math.sqrt(sum(float(jnp.sum(e * e)) for e in noise))
    report = {"sigma": float(sigma), "seed": int(seed), "noise_norm": norm}
    return lora.replace(weights=jax.tree.unflatten(tree, noisy)), report


@register("random_perturbation", stage="post", level="weights", cost=None, batches=(),
          paper=PAPER)
def random_noise_defense(sigma: float = 0.01, seed: int = 0):
    """Weights-level form: `apply(cfg, params, lora) -> (lora, report)`."""
    _check_sigma(sigma)

    def apply(cfg: ModelConfig, params: dict, lora: LoRA):
        del cfg, params
        return random_noise(lora, sigma=sigma, seed=seed)

    return apply
