"""Post-fine-tuning defenses: weight-space repairs of the fine-tuned adapter (no training).

    lora, report = safelora(cfg, base_params, aligned_params, lora, mode="threshold")
    lora, report = antidote(cfg, params, lora, harmful_batches, dense_ratio=0.1)
"""

from hfjax.defenses.post.antidote import antidote, top_score_mask, wanda_scores
from hfjax.defenses.post.random_noise import random_noise
from hfjax.defenses.post.resta import resta
from hfjax.defenses.post.safelora import safelora

__all__ = ["antidote", "safelora", "top_score_mask", "wanda_scores"]
__all__ += ["random_noise", "resta"]
