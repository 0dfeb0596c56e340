"""Golden fixtures for hfjax's PEFT LoRA interop (tests/test_lora.py), both directions.

PEFT -> hfjax (torch python):

    /tmp/v311/bin/python scripts/make_peft_fixture.py [--out tests/fixtures/peft]

builds a tiny transformers LlamaForCausalLM (2 layers, hidden 64, 4 heads, 2 kv heads, vocab
128, float32, torch seed 0) and writes, under --out:
  base/                  the model (save_pretrained, safetensors)
  peft_adapter/          a PEFT LoRA (r=4, alpha=8, all seven projections) with lora_A from
                         PEFT's own Kaiming init and lora_B set to nonzero random values
  peft_logits.npz        input_ids, attention_mask (left padded), base_logits (no adapter) and
                         logits (PEFT model), positions = cumsum(mask) - 1 as generate() uses

hfjax -> PEFT (first Python 3.12 with hfjax, then the torch python):

    /tmp/v312/bin/python scripts/make_peft_fixture.py --write-hfjax-adapter \\
        tests/fixtures/peft/hfjax_adapter
    /tmp/v311/bin/python scripts/make_peft_fixture.py --hfjax-adapter \\
        tests/fixtures/peft/hfjax_adapter

The first writes `make_hfjax_adapter(cfg)` (hfjax.models.lora.init with jax seed 1234, then a
nonzero uniform B) with hfjax's save_peft; the second loads it onto base/ with
`PeftModel.from_pretrained` and writes hfjax_adapter_logits.npz (same inputs, PEFT's logits).

torch/transformers/peft are imported only in the torch modes, hfjax/jax only in
--write-hfjax-adapter, so the test suite can import this file for `make_hfjax_adapter`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "peft"

SEED = 0
RANK, ALPHA = 4, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
B_STD = 0.3  # scale of the random lora_B values: makes the adapter change logits by O(1)
HFJAX_SEED = 1234

# Left-padded batch: row 0 is full, rows 1 and 2 have 3 and 6 pad positions on the left.
PAD_ID = 0
INPUT_IDS = np.array(
    [
        [5, 17, 99, 3, 64, 127, 8, 42, 11, 77],
        [PAD_ID, PAD_ID, PAD_ID, 23, 56, 1, 88, 120, 9, 31],
        [PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, 7, 70, 100, 2],
    ],
    dtype=np.int64,
)
ATTENTION_MASK = (np.arange(10)[None, :] >= np.array([[0], [3], [6]])).astype(np.int64)


def base_config_kwargs() -> dict:
    """The tiny Llama's LlamaConfig arguments (initializer_range 0.2 so logits are O(1))."""
    return dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
    )


def make_hfjax_adapter(cfg):
    """The hfjax-made adapter of the fixture: lora.init (seed 1234), then B ~ U(-0.5, 0.5).

    Deterministic: jax's threefry bits and uniform sampling are exact, so tests can check that
    the committed hfjax_adapter/ is byte-for-byte what save_peft writes today.
    """
    import jax

    from hfjax.models import lora as lora_lib

    key_init, key_b = jax.random.split(jax.random.key(HFJAX_SEED))
    lora = lora_lib.init(cfg, key_init, rank=RANK, alpha=ALPHA, targets=TARGETS)
    keys = jax.random.split(key_b, len(TARGETS))
    weights = {
        name: {
            "A": w["A"],
            "B": jax.random.uniform(k, w["B"].shape, w["B"].dtype, -0.5, 0.5),
        }
        for (name, w), k in zip(lora.weights.items(), keys, strict=True)
    }
    return lora_lib.LoRA(weights=weights, alpha=lora.alpha)


def write_hfjax_adapter(adapter_dir: Path, out: Path) -> None:
    """Python 3.12 step: save make_hfjax_adapter(cfg of out/base) with hfjax's save_peft."""
    from hfjax.models import lora as lora_lib
    from hfjax.models.config import from_hf_dict

    cfg = from_hf_dict(json.loads((out / "base" / "config.json").read_text()))
    lora_lib.save_peft(adapter_dir, cfg, make_hfjax_adapter(cfg), base_model_name_or_path=None)
    print(f"wrote {adapter_dir}")


def _torch_inputs():
    import torch

    ids = torch.tensor(INPUT_IDS)
    mask = torch.tensor(ATTENTION_MASK)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _logits(model) -> np.ndarray:
    import torch

    ids, mask, positions = _torch_inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


def _load_base(out: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out / "base", attn_implementation="eager")
    return model.float().eval()


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, **arrays)
    tmp.replace(path)
    print(f"wrote {path}")


def make_peft_fixture(out: Path) -> None:
    """Torch step: base/, peft_adapter/ and peft_logits.npz under `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    config = LlamaConfig(**base_config_kwargs())
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # non-unit norms, so a mix-up of norm weights would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out / "base", safe_serialization=True)

    base = _load_base(out)
    base_logits = _logits(base)
    lora_config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=None,
    )
    peft_model = get_peft_model(base, lora_config)
    torch.manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(B_STD * torch.randn_like(p))
    peft_model.eval()
    logits = _logits(peft_model)
    adapter_dir = out / "peft_adapter"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    # Portable fixture: no absolute path of this machine, no generated model card.
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = "../base"
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").unlink(missing_ok=True)
    _save_npz(out / "peft_logits.npz", base_logits=base_logits, logits=logits)
    valid = ATTENTION_MASK.astype(bool)
    delta = np.abs(logits - base_logits)[valid].max()
    print(f"max |logits(peft) - logits(base)| on valid positions: {delta:.3f}")


def record_hfjax_adapter_logits(adapter_dir: Path, out: Path) -> None:
    """Torch step: PEFT's logits with the hfjax-written adapter on base/."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(out), str(adapter_dir)).eval()
    _save_npz(out / "hfjax_adapter_logits.npz", logits=_logits(model))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture folder")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--hfjax-adapter", type=Path, metavar="DIR",
                      help="record PEFT's logits with this hfjax-written adapter on OUT/base")
    mode.add_argument("--write-hfjax-adapter", type=Path, metavar="DIR",
                      help="(Python 3.12 + hfjax) write the fixture's hfjax adapter to DIR")
    args = parser.parse_args(argv)
    if args.write_hfjax_adapter is not None:
        write_hfjax_adapter(args.write_hfjax_adapter, args.out)
    elif args.hfjax_adapter is not None:
        record_hfjax_adapter_logits(args.hfjax_adapter, args.out)
    else:
        make_peft_fixture(args.out)


if __name__ == "__main__":
    sys.exit(main())
