"""Any transformers sequence classifier as a judge (needs torch; hfjax itself does not).

This module imports neither JAX nor torch at import time, so it also runs from a Python that
has torch but no JAX (the live test does exactly that).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hfjax.errors import UserError
from hfjax.eval.qa_format import BEAVERTAILS_PROMPT, check_pairs


class TorchNotAvailableError(UserError, ImportError):
    """HFSequenceClassifierJudge needs torch and transformers, which hfjax does not depend on."""


class HFSequenceClassifierJudge:
    """A transformers `AutoModelForSequenceClassification` from a local folder.

    text = `template` with {prompt} and {response} (default: the BeaverTails QA format), plus the
    tokenizer's EOS token when `append_eos` (what PKU's `Moderation.predict` does). Per label,
    p = softmax(logits) for single-label heads (the default) or sigmoid(logits) with
    multi_label=True. score = p[harmful_label], or max over labels with harmful_label=None
    (BeaverTails: flagged when the largest category probability is > 0.5). Examples:
    domenicrosati/deberta-v3-xsmall-beavertails-harmful-qa-classifier (harmful_label=1);
    beaver-dam-7b through torch (multi_label=True, harmful_label=None, append_eos=True).
    Batches are padded on the tokenizer's side and truncated to `max_length` tokens.
    """

    def __init__(self, path: str | os.PathLike, *, harmful_label: int | None = 1,
                 multi_label: bool = False, template: str = BEAVERTAILS_PROMPT + "{response}",
                 append_eos: bool = False, batch_size: int = 16, max_length: int = 512,
                 name: str | None = None):
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise TorchNotAvailableError(
                f"HFSequenceClassifierJudge needs torch and transformers ({e}); install torch or "
                "use KeywordRefusalJudge / BeaverDamJudge, which run without it"
            ) from None
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"classifier folder {path} does not exist")
        if batch_size < 1 or max_length < 1:
            raise ValueError("batch_size and max_length must be positive")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), local_files_only=True).eval()
        n = int(self.model.config.num_labels)
        if harmful_label is not None and not 0 <= harmful_label < n:
            raise ValueError(f"harmful_label {harmful_label} out of range for {n} labels")
        if append_eos and self.tokenizer.eos_token is None:
            raise ValueError(f"append_eos=True but the tokenizer in {path} has no EOS token")
        if self.tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer in {path} has no pad token; batches need one")
        self.harmful_label, self.multi_label, self.template = harmful_label, multi_label, template
        self.append_eos, self.batch_size, self.max_length = append_eos, batch_size, max_length
        self.name = name or f"hf:{path.name}"

    def format(self, prompt: str, response: str) -> str:
        text = self.template.format(prompt=prompt, response=response)
        eos = self.tokenizer.eos_token
        return text + eos if self.append_eos and not text.endswith(eos) else text

    def probabilities(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """[N, num_labels] probabilities (softmax, or sigmoid with multi_label)."""
        check_pairs(prompts, responses)
        texts = [self.format(p, r) for p, r in zip(prompts, responses, strict=True)]
        out = []
        with self._torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[s:s + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                logits = self.model(**enc).logits.double()
                p = logits.sigmoid() if self.multi_label else logits.softmax(-1)
                out.append(p.numpy())
        n = int(self.model.config.num_labels)
        return np.concatenate(out) if out else np.zeros((0, n))

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        p = self.probabilities(prompts, responses)
        return p.max(axis=1) if self.harmful_label is None else p[:, self.harmful_label]
