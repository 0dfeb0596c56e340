"""Inference-time defenses: transforms of the inputs a deployed model is asked (level
"inference": registered at the post stage, applied by the evaluation of the final model).

    texts = onion_filter(texts, cfg=ref_cfg, params=ref_params, tokenizer=ref_tokenizer)
"""

from hfjax.defenses.inference import registered  # noqa: F401 - registers "onion"
from hfjax.defenses.inference.onion import (
    OnionError,
    onion_filter,
    suspicion_scores,
    text_perplexities,
)

__all__ = ["OnionError", "onion_filter", "suspicion_scores", "text_perplexities"]
