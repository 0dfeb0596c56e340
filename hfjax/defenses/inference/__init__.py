"""Inference-time defenses: transforms of the inputs a deployed model is asked.

    texts = onion_filter(texts, cfg=ref_cfg, params=ref_params, tokenizer=ref_tokenizer)
"""

from hfjax.defenses.inference.onion import (
    OnionError,
    onion_filter,
    suspicion_scores,
    text_perplexities,
)

__all__ = ["OnionError", "onion_filter", "suspicion_scores", "text_perplexities"]
