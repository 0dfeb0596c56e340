"""Golden fixtures for hfjax's prefix tuning against PyTorch + PEFT (tests/test_prefix.py).

Bases (committed fixtures): the tiny Llama of tests/fixtures/peft/base (4 heads, 2 KV heads)
and the tiny Qwen2 of tests/fixtures/parity/qwen2/model (q/k/v biases, tied embeddings, 4/2
heads). Every logit is taken on the left-padded batch of make_peft_fixture.py with
position_ids = cumsum(mask) − 1, which PEFT offsets by num_virtual_tokens.

Four modes, in this order (torch python: /tmp/v311/bin/python; hfjax python: .venv/bin/python):

    /tmp/v311/bin/python scripts/make_prefix_fixture.py peft
    .venv/bin/python      scripts/make_prefix_fixture.py write-hfjax
    /tmp/v311/bin/python scripts/make_prefix_fixture.py record-hfjax
    /tmp/v311/bin/python scripts/make_prefix_fixture.py train

peft (PEFT -> hfjax), under OUT/{family}/:
  peft_adapter/, peft_logits.npz   a PEFT prefix (P = PEFT_TOKENS, PEFT's N(0, 1) init) saved with
                                   save_pretrained; input_ids, attention_mask, base_logits, logits
  llama/projection_*               a PEFT prefix with prefix_projection (encoder_hidden_size
                                   PROJECTION): projection_weights.npz (its embedding and MLP in
                                   torch layout), projection_adapter/ (what PEFT saves: the
                                   encoder output) and projection_logits.npz (training mode: the
                                   MLP applied)
write-hfjax (hfjax -> PEFT): OUT/{family}/hfjax_adapter/ with hfjax's save_peft of
  `make_hfjax_prefix` (Llama: with a projection, saved materialized; Qwen2: a table), and
  TRAIN_OUT/init_table/ + TRAIN_OUT/init_projection.npz, the training runs' hfjax inits
record-hfjax: OUT/{family}/hfjax_adapter_logits.npz, PEFT's logits with those adapters
train: TRAIN_OUT/reference.npz: per run of TRAIN_RUNS, PEFT prefix training from the hfjax init
  on the Llama base: plain torch AdamW (betas (0.9, 0.999), eps 1e-8, no weight decay), one
  step per batch of make_train_reference.make_batches (the first TRAIN_STEPS), the loss
  hfjax.train.loss's response-only mean CE; losses_{run} [steps] (before each update),
  grad_norms_{run} [steps], final_{run} the encoder output after the last step; meta.json

torch/transformers/peft are imported only in the torch modes and jax/hfjax only in write-hfjax,
so the tests can import this file for its constants and `make_hfjax_prefix`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "prefix_peft"
DEFAULT_TRAIN_OUT = ROOT / "tests" / "fixtures" / "prefix_train"
BASES = {"llama": ROOT / "tests" / "fixtures" / "peft" / "base",
         "qwen2": ROOT / "tests" / "fixtures" / "parity" / "qwen2" / "model"}

PEFT_TOKENS = {"llama": 3, "qwen2": 5}
PROJECTION = 16  # encoder_hidden_size of the projection fixtures
HFJAX_SEED = 4321
HFJAX_TOKENS = {"llama": 4, "qwen2": 2}

TRAIN_SEED = 7
TRAIN_TOKENS = 4
TRAIN_STEPS = 8
TRAIN_LR = 1e-2
TRAIN_RUNS = ("table", "projection")
BETAS = (0.9, 0.999)
EPS = 1e-8

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


def _train_reference_module():
    """scripts/make_train_reference.py (its batches and loss), imported by path."""
    path = Path(__file__).resolve().parent / "make_train_reference.py"
    spec = importlib.util.spec_from_file_location("make_train_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def train_batches() -> dict[str, np.ndarray]:
    """The first TRAIN_STEPS batches of make_train_reference.make_batches()."""
    batches = _train_reference_module().make_batches()
    return {k: v[:TRAIN_STEPS] for k, v in batches.items()}


# ---------------------------------------------------------------------------------------------
# hfjax side


def make_hfjax_prefix(cfg, family: str):
    """The fixture's hfjax prefix: Llama with a projection (PROJECTION), Qwen2 a table."""
    import jax

    from hfjax.models import prefix as prefix_lib

    projection = PROJECTION if family == "llama" else None
    return prefix_lib.init(cfg, jax.random.key(HFJAX_SEED), num_virtual_tokens=HFJAX_TOKENS[family],
                           projection=projection)


def make_train_init(cfg, run: str):
    """The training run's hfjax init: a table, or a projection of width PROJECTION."""
    import jax

    from hfjax.models import prefix as prefix_lib

    return prefix_lib.init(cfg, jax.random.key(TRAIN_SEED), num_virtual_tokens=TRAIN_TOKENS,
                           projection=PROJECTION if run == "projection" else None)


def _hfjax_cfg(family: str):
    from hfjax.models.config import from_hf_dict

    return from_hf_dict(json.loads((BASES[family] / "config.json").read_text()))


def write_hfjax(out: Path, train_out: Path) -> None:
    from hfjax.models import prefix as prefix_lib

    for family in BASES:
        cfg = _hfjax_cfg(family)
        path = prefix_lib.save_peft(out / family / "hfjax_adapter", cfg,
                                    make_hfjax_prefix(cfg, family))
        print(f"wrote {path}")
    cfg = _hfjax_cfg("llama")
    prefix_lib.save_peft(train_out / "init_table", cfg, make_train_init(cfg, "table"))
    projection = make_train_init(cfg, "projection")
    np.savez(train_out / "init_projection.npz", embedding=np.asarray(projection.embedding),
             **{k: np.asarray(v) for k, v in projection.transform.items()})
    print(f"wrote {train_out}/init_table and init_projection.npz")


# ---------------------------------------------------------------------------------------------
# torch side


def _load_base(family: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASES[family], attn_implementation="eager")
    return model.float().eval()


def _logits(model, ids=INPUT_IDS, mask=ATTENTION_MASK) -> np.ndarray:
    import torch

    ids, mask = torch.from_numpy(np.asarray(ids, np.int64)), torch.from_numpy(
        np.asarray(mask, np.int64))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, **arrays)
    tmp.replace(path)
    print(f"wrote {path}")


def _save_adapter(model, directory: Path) -> None:
    """save_pretrained, portable: no path of this machine, no model card."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.replace(directory)


def _prefix_model(family: str, tokens: int, projection: int | None):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens,
                                prefix_projection=projection is not None,
                                encoder_hidden_size=projection)
    return get_peft_model(_load_base(family), config)


def make_peft(out: Path) -> None:
    import torch

    for i, family in enumerate(BASES):
        torch.manual_seed(i)
        base_logits = _logits(_load_base(family))
        model = _prefix_model(family, PEFT_TOKENS[family], None).eval()
        logits = _logits(model)
        _save_adapter(model, out / family / "peft_adapter")
        _save_npz(out / family / "peft_logits.npz", base_logits=base_logits, logits=logits)
        delta = np.abs(logits - base_logits)[ATTENTION_MASK.astype(bool)].max()
        print(f"{family}: max |logits(prefix) - logits(base)| {delta:.3f}")
    torch.manual_seed(10)
    model = _prefix_model("llama", PEFT_TOKENS["llama"], PROJECTION).eval()
    encoder = model.prompt_encoder["default"]
    weights = {"embedding": encoder.embedding.weight,
               "transform.0.weight": encoder.transform[0].weight,
               "transform.0.bias": encoder.transform[0].bias,
               "transform.2.weight": encoder.transform[2].weight,
               "transform.2.bias": encoder.transform[2].bias}
    np.savez(out / "llama" / "projection_weights.npz",
             **{k: v.detach().numpy() for k, v in weights.items()})
    _save_npz(out / "llama" / "projection_logits.npz", logits=_logits(model))
    _save_adapter(model, out / "llama" / "projection_adapter")


def record_hfjax(out: Path) -> None:
    from peft import PeftModel

    for family in BASES:
        model = PeftModel.from_pretrained(_load_base(family), str(out / family / "hfjax_adapter"))
        _save_npz(out / family / "hfjax_adapter_logits.npz", logits=_logits(model.eval()))


def _train_model(train_out: Path, run: str):
    import torch
    from safetensors.torch import load_file

    if run == "table":
        # PeftModel.from_pretrained refuses is_trainable for prompt learning: a fresh prefix
        # model takes the hfjax-written table through PEFT's own load_prompt_embeddings
        model = _prefix_model("llama", TRAIN_TOKENS, None)
        table = load_file(str(train_out / "init_table" / "adapter_model.safetensors"))
        model.prompt_encoder["default"].load_prompt_embeddings(table["prompt_embeddings"])
        return model
    init = np.load(train_out / "init_projection.npz")
    model = _prefix_model("llama", TRAIN_TOKENS, PROJECTION)
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():  # hfjax's kernels are x @ W: torch's Linear weight is Wᵀ
        encoder.embedding.weight.copy_(torch.from_numpy(init["embedding"]))
        encoder.transform[0].weight.copy_(torch.from_numpy(init["w_in"].T.copy()))
        encoder.transform[0].bias.copy_(torch.from_numpy(init["b_in"]))
        encoder.transform[2].weight.copy_(torch.from_numpy(init["w_out"].T.copy()))
        encoder.transform[2].bias.copy_(torch.from_numpy(init["b_out"]))
    return model


def train_peft(train_out: Path, run: str, batches: dict) -> dict[str, np.ndarray]:
    """PEFT prefix training from the hfjax init: losses, grad norms, final encoder output."""
    import torch

    loss_of = _train_reference_module()._loss
    torch.manual_seed(0)
    model = _train_model(train_out, run)
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not names or not all(n.startswith("prompt_encoder.") for n in names):
        raise RuntimeError(f"unexpected trainable parameters: {names}")
    opt = torch.optim.AdamW(params, lr=TRAIN_LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    losses, norms = [], []
    for i in range(TRAIN_STEPS):
        ids = torch.from_numpy(batches["input_ids"][i].astype(np.int64))
        mask = torch.from_numpy(batches["attention_mask"][i].astype(np.int64))
        labels = torch.from_numpy(batches["labels"][i].astype(np.int64))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        loss = loss_of(logits, labels)
        loss.backward()
        losses.append(float(loss.detach()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, float("inf"))))
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = model.get_prompt_embedding_to_save("default").numpy()
    return {"losses": np.asarray(losses, np.float64), "grad_norms": np.asarray(norms, np.float64),
            "final": final}


def make_train(train_out: Path) -> None:
    import peft
    import torch
    import transformers

    for need in (train_out / "init_table" / "adapter_model.safetensors",
                 train_out / "init_projection.npz"):
        if not need.is_file():
            raise FileNotFoundError(f"{need} is missing: run the write-hfjax mode first")
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    batches = train_batches()
    arrays = {}
    for run in TRAIN_RUNS:
        traces = train_peft(train_out, run, batches)
        arrays.update({f"{k}_{run}": v for k, v in traces.items()})
        print(f"{run}: losses {traces['losses'][0]:.5f} -> {traces['losses'][-1]:.5f}")
    tmp = train_out / "reference.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(train_out / "reference.npz")
    meta = {"seed": TRAIN_SEED, "num_virtual_tokens": TRAIN_TOKENS, "projection": PROJECTION,
            "steps": TRAIN_STEPS, "learning_rate": TRAIN_LR, "betas": list(BETAS), "eps": EPS,
            "weight_decay": 0.0, "runs": list(TRAIN_RUNS),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "numpy": np.__version__}}
    (train_out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {train_out}/reference.npz")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("peft", "write-hfjax", "record-hfjax", "train"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="logit fixtures folder")
    parser.add_argument("--train-out", type=Path, default=DEFAULT_TRAIN_OUT,
                        help="training reference folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.train_out.mkdir(parents=True, exist_ok=True)
    {"peft": lambda: make_peft(args.out),
     "write-hfjax": lambda: write_hfjax(args.out, args.train_out),
     "record-hfjax": lambda: record_hfjax(args.out),
     "train": lambda: make_train(args.train_out)}[args.mode]()


if __name__ == "__main__":
    sys.exit(main())
