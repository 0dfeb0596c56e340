"""Reference LoRA training run with PyTorch + PEFT, for hfjax's training parity test.

Both sides start from the same LoRA (hfjax's `lora.init`, seed INIT_SEED, r=4, alpha=8, all
seven projections, written with `save_peft`) on the same base (tests/fixtures/peft/base), see
the same 20 batches (numpy, seed BATCH_SEED), and take AdamW steps with the same
hyper-parameters (lr 1e-3 constant, betas (0.9, 0.999), eps 1e-8, no clipping; weight decay 0
and 0.1). The loss is hfjax.train.loss's response-only mean CE in float32:

    L = − Σ_t m_t log softmax(logits_t)[labels_{t+1}] / max(Σ_t m_t, 1)
    m_t = [labels_{t+1} ≠ −100]

Two steps, in this order:

    /tmp/v312/bin/python scripts/make_train_reference.py --write-init \\
        [--out tests/fixtures/train_reference]
    /tmp/v311/bin/python scripts/make_train_reference.py [--out tests/fixtures/train_reference]

The first (Python 3.12 + hfjax) writes OUT/init_adapter/ with hfjax's save_peft. The second
(torch python) loads it with `PeftModel.from_pretrained(base, init_adapter, is_trainable=True)`,
trains once per weight decay and writes
  reference.npz             input_ids / attention_mask / labels [STEPS, BATCH, LENGTH] (int32) and
                            losses_wd{wd} [STEPS] (float64; the loss before each update)
  peft_trained_wd{wd}/      the trained adapter (PEFT save_pretrained)
  meta.json                 the run's settings and library versions

torch/transformers/peft are imported only in the torch step and jax/hfjax only in --write-init,
so the tests can import this file for `make_batches` and `make_init_adapter`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "train_reference"
DEFAULT_BASE = ROOT / "tests" / "fixtures" / "peft" / "base"

INIT_SEED = 0
RANK, ALPHA = 4, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

BATCH_SEED = 20240
STEPS, BATCH, LENGTH = 20, 4, 24
VOCAB = 128
PAD_ID = 0
MIN_LEN, MIN_PROMPT, MIN_RESPONSE = 6, 2, 3
IGNORE_INDEX = -100

LEARNING_RATE = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAYS = (0.0, 0.1)


def wd_tag(weight_decay: float) -> str:
    """The suffix naming one run's outputs: 0.0 -> 'wd0.0', 0.1 -> 'wd0.1'."""
    return f"wd{weight_decay}"


def make_batches(seed: int = BATCH_SEED) -> dict[str, np.ndarray]:
    """STEPS right-padded batches as {input_ids, attention_mask, labels} of [STEPS, BATCH, LENGTH].

    Row lengths n ∈ [MIN_LEN, LENGTH] and prompt lengths p ∈ [MIN_PROMPT, n − MIN_RESPONSE] are
    drawn per row; tokens are U[1, VOCAB), padding is PAD_ID with mask 0; labels copy the ids on
    the response (p ≤ t < n) and are −100 on the prompt and the padding. One row per batch is
    full length, so every batch has the same shape [BATCH, LENGTH] with real padding in the rest.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (STEPS, BATCH, LENGTH)).astype(np.int32)
    lengths = rng.integers(MIN_LEN, LENGTH + 1, (STEPS, BATCH))
    lengths[np.arange(STEPS), rng.integers(0, BATCH, STEPS)] = LENGTH
    prompts = rng.integers(MIN_PROMPT, lengths - MIN_RESPONSE + 1)
    t = np.arange(LENGTH)
    mask = t < lengths[..., None]
    response = mask & (t >= prompts[..., None])
    ids = np.where(mask, ids, PAD_ID).astype(np.int32)
    labels = np.where(response, ids, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask.astype(np.int32), "labels": labels}


# ---------------------------------------------------------------------------------------------
# Python 3.12 + hfjax step


def make_init_adapter(cfg):
    """hfjax's PEFT-style LoRA init with jax.random.key(INIT_SEED) (B = 0)."""
    import jax

    from hfjax.models import lora as lora_lib

    return lora_lib.init(cfg, jax.random.key(INIT_SEED), rank=RANK, alpha=ALPHA, targets=TARGETS)


def write_init(out: Path, base: Path) -> None:
    from hfjax.models import lora as lora_lib
    from hfjax.models.config import from_hf_dict

    cfg = from_hf_dict(json.loads((base / "config.json").read_text()))
    path = lora_lib.save_peft(out / "init_adapter", cfg, make_init_adapter(cfg))
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# torch step


def _loss(logits, labels):
    """hfjax.train.loss.token_cross_entropy in torch: mean CE over response tokens, float32."""
    import torch

    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, safe[..., None])[..., 0]
    tokens = mask.sum()
    return torch.where(mask, nll, torch.zeros_like(nll)).sum() / tokens.clamp(min=1)


def train_peft(base: Path, init_dir: Path, batches: dict, weight_decay: float):
    """(losses before each update, the trained PeftModel)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(base, attn_implementation="eager").float()
    model = PeftModel.from_pretrained(model, str(init_dir), is_trainable=True)
    model.train()
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = 2 * len(TARGETS) * model.config.num_hidden_layers  # lora_A + lora_B per module
    if len(params) != expected or not all("lora_" in n for n in names):
        raise RuntimeError(f"unexpected trainable parameters: {names}")
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=BETAS, eps=EPS,
                            weight_decay=weight_decay)
    losses = []
    for i in range(STEPS):
        ids = torch.from_numpy(batches["input_ids"][i].astype(np.int64))
        mask = torch.from_numpy(batches["attention_mask"][i].astype(np.int64))
        labels = torch.from_numpy(batches["labels"][i].astype(np.int64))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # = hfjax's positions_from_mask
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        loss = _loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return np.asarray(losses, np.float64), model


def _save_adapter(model, directory: Path) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None  # portable: no path of this machine
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.replace(directory)


def make_reference(out: Path, base: Path) -> None:
    import peft
    import torch
    import transformers

    init_dir = out / "init_adapter"
    if not (init_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{init_dir} has no adapter_model.safetensors: run this script with --write-init "
            "under Python 3.12 + hfjax first")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"base model folder {base} has no config.json")
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    batches = make_batches()
    arrays = dict(batches)
    for wd in WEIGHT_DECAYS:
        losses, model = train_peft(base, init_dir, batches, wd)
        arrays[f"losses_{wd_tag(wd)}"] = losses
        _save_adapter(model, out / f"peft_trained_{wd_tag(wd)}")
        print(f"weight_decay {wd}: losses {losses[0]:.5f} -> {losses[-1]:.5f}")
    tmp = out / "reference.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out / "reference.npz")
    meta = {
        "init_seed": INIT_SEED, "rank": RANK, "alpha": ALPHA, "targets": list(TARGETS),
        "batch_seed": BATCH_SEED, "steps": STEPS, "batch": BATCH, "length": LENGTH,
        "learning_rate": LEARNING_RATE, "betas": list(BETAS), "eps": EPS,
        "weight_decays": list(WEIGHT_DECAYS), "max_grad_norm": None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "numpy": np.__version__},
    }
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "meta.json.tmp").replace(out / "meta.json")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture folder")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="HF base model folder")
    parser.add_argument("--write-init", action="store_true",
                        help="(Python 3.12 + hfjax) write OUT/init_adapter with hfjax's save_peft")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.write_init:
        write_init(args.out, args.base)
    else:
        make_reference(args.out, args.base)


if __name__ == "__main__":
    sys.exit(main())
