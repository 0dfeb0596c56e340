"""Answer a prompt with a model (default: the embedded SmolLM2-135M-Instruct), greedily.

    python -m experiments.generate --prompt "What is the capital of France?"
"""

from __future__ import annotations

import time

import jax.numpy as jnp
from absl import flags

from experiments._cli import run_main
from hfjax import models
from hfjax.eval.generate import greedy_generate

_MODEL = flags.DEFINE_string("model", None, "HF folder or .gguf file (default: embedded SmolLM2)")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "user message")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "tokens to generate")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")


def main(argv):
    del argv
    path = _MODEL.value or models.default_model_path()
    start = time.perf_counter()
    cfg, params = models.load_pretrained(path, dtype=jnp.dtype(_DTYPE.value))
    cfg = cfg.replace(dtype=_DTYPE.value)
    tok = models.load_tokenizer(path)
    loaded = time.perf_counter()
    messages = [{"role": "user", "content": _PROMPT.value}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    (answer,) = greedy_generate(cfg, params, [list(prompt_ids)], max_new_tokens=_MAX_NEW.value)
    done = time.perf_counter()
    print(f"model: {path} ({cfg.model_type}, {cfg.num_layers} layers, {_DTYPE.value})")
    print(f"prompt: {_PROMPT.value}")
    print(f"answer: {tok.decode(answer, skip_special_tokens=True).strip()}")
    print(f"load {loaded - start:.1f} s, generate {len(answer)} tokens {done - loaded:.1f} s (CPU)")


if __name__ == "__main__":
    run_main(main)
