"""Reference LoRA training runs with PyTorch + PEFT and HF Trainer's arithmetic, for hfjax's
training parity test.

Both sides start from the same LoRA (hfjax's `lora.init`, seed INIT_SEED, r=4, alpha=8, all
seven projections, written with `save_peft`) on the same base (tests/fixtures/peft/base), see
the same 20 micro-batches (numpy, seed BATCH_SEED) and train with AdamW (betas (0.9, 0.999),
eps 1e-8). Each run in RUNS sets what HF Trainer's `TrainingArguments` would: learning rate,
weight decay, lr schedule and warmup ratio, max_grad_norm, gradient accumulation k. The loss
of a micro-batch is hfjax.train.loss's response-only mean CE in float32:

    L = − Σ_t m_t log softmax(logits_t)[labels_{t+1}] / max(Σ_t m_t, 1)
    m_t = [labels_{t+1} ≠ −100]

and one optimizer update is what `Trainer._inner_training_loop` does with a `compute_loss`
that returns such a per-batch mean (transformers 5: `loss_is_scaled_for_ga` is then False, so
`training_step` divides the loss by k; the model's own loss with `num_items_in_batch` would
instead divide the summed CE of all k micro-batches by their total token count):

    g = Σ_{i=1..k} ∇(L_i / k)                  one backward per micro-batch, summed in .grad
    n = ‖g‖₂ over all trainable tensors       `clip_grad_norm_(params, c)`, c = max_grad_norm
    g ← g · min(1, c / (n + 1e−6))            (skipped when c is None)
    θ ← AdamW(θ, g, lr η_s);  s ← s + 1      one scheduler step per update
    η_s = η · get_scheduler(schedule, w, U)(s),  U = 20 / k,  w = ceil(U · warmup_ratio)
                                              (`TrainingArguments.get_warmup_steps(U)`)

The optimizer is torch.optim.AdamW (Trainer's default `adamw_torch_fused` is the same update).

Two steps, in this order:

    .venv/bin/python scripts/make_train_reference.py --write-init \\
        [--out tests/fixtures/train_reference]
    /tmp/v311/bin/python scripts/make_train_reference.py [--out tests/fixtures/train_reference]

The first (Python 3.12 + hfjax) writes OUT/init_adapter/ with hfjax's save_peft. The second
(torch python) loads it with `PeftModel.from_pretrained(base, init_adapter, is_trainable=True)`,
trains once per run and writes
  reference.npz        input_ids / attention_mask / labels [STEPS, BATCH, LENGTH] (int32);
                       per run (float64): losses_{run} [STEPS] (each micro-batch's L, before the
                       update it joins), grad_norms_{run} [U] (n before clipping), lrs_{run} [U]
                       (the lr of each update); per SCHEDULE_CASES entry, schedule_{case}
                       [total]: the lr multiplier of each update under Trainer's scheduler
  peft_trained_{run}/  the trained adapter (PEFT save_pretrained)
  meta.json            the runs' settings and library versions

torch/transformers/peft are imported only in the torch step and jax/hfjax only in --write-init,
so the tests can import this file for `make_batches`, `make_init_adapter` and RUNS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
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

BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class Run:
    """One reference run, in HF TrainingArguments' terms (max_grad_norm None: no clipping)."""

    name: str
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = None
    accumulation: int = 1

    @property
    def updates(self) -> int:
        """Optimizer updates over the STEPS micro-batches."""
        return STEPS // self.accumulation


RUNS = (
    Run("wd0.0"),
    Run("wd0.1", weight_decay=0.1),
    Run("clip", max_grad_norm=1.0),  # ‖g‖ > 1 on every update of these batches
    Run("linear_warmup", schedule="linear", warmup_ratio=0.1),
    Run("accum2", accumulation=2),
    Run("accum2_clip_linear", schedule="linear", warmup_ratio=0.1, max_grad_norm=1.0,
        accumulation=2),
    # clips 6 of the 10 updates: the bound sits inside the range of ‖g‖ (1.1..1.7), so only
    # g = mean of the k micro-batch gradients (not their sum, 2.2..3.4) gives these clips
    Run("accum2_clip1.4", max_grad_norm=1.4, accumulation=2),
)
RUNS_BY_NAME = {r.name: r for r in RUNS}

# (schedule, total updates, warmup ratio): HF's lr multipliers, including warmups where
# ceil(total · ratio) ≠ int(total · ratio)
SCHEDULE_CASES = (
    ("linear", 20, 0.1), ("linear", 25, 0.1), ("linear", 7, 0.5), ("linear", 10, 0.03),
    ("cosine", 25, 0.1), ("cosine", 7, 0.5), ("constant", 5, 0.0),
)


def schedule_key(schedule: str, total: int, warmup_ratio: float) -> str:
    """The reference.npz key of one SCHEDULE_CASES entry: 'schedule_linear_t25_w0.1'."""
    return f"schedule_{schedule}_t{total}_w{warmup_ratio}"


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


def hf_scheduler(optimizer, schedule: str, total: int, warmup_ratio: float):
    """The scheduler `Trainer.create_scheduler` builds: `get_scheduler(schedule, warmup, total)`
    with warmup = `TrainingArguments(warmup_steps=warmup_ratio).get_warmup_steps(total)`."""
    from transformers import TrainingArguments, get_scheduler

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, warmup_steps=warmup_ratio, report_to="none")
        warmup = args.get_warmup_steps(total)
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def schedule_multipliers(schedule: str, total: int, warmup_ratio: float) -> np.ndarray:
    """[total] HF's lr multiplier at each update (lr 1, one scheduler step per update)."""
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = hf_scheduler(opt, schedule, total, warmup_ratio)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.asarray(lrs, np.float64)


def train_peft(base: Path, init_dir: Path, batches: dict, run: Run):
    """({losses, grad_norms, lrs}, the trained PeftModel) of HF Trainer's loop for `run`."""
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
    opt = torch.optim.AdamW(params, lr=run.learning_rate, betas=BETAS, eps=EPS,
                            weight_decay=run.weight_decay)
    sched = hf_scheduler(opt, run.schedule, run.updates, run.warmup_ratio)
    max_norm = float("inf") if run.max_grad_norm is None else run.max_grad_norm
    out = {"losses": [], "grad_norms": [], "lrs": []}
    opt.zero_grad(set_to_none=True)
    for i in range(STEPS):
        ids = torch.from_numpy(batches["input_ids"][i].astype(np.int64))
        mask = torch.from_numpy(batches["attention_mask"][i].astype(np.int64))
        labels = torch.from_numpy(batches["labels"][i].astype(np.int64))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # = hfjax's positions_from_mask
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        loss = _loss(logits, labels)
        (loss / run.accumulation).backward()
        out["losses"].append(float(loss.detach()))
        if (i + 1) % run.accumulation == 0:
            # Trainer: clip (or only measure with an infinite bound), step, schedule, zero
            out["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            out["lrs"].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}, model


def _save_adapter(model, directory: Path) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None  # portable: no path of this machine
    config["target_modules"] = sorted(config["target_modules"])  # a set: PEFT's order varies
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
    for case in SCHEDULE_CASES:
        arrays[schedule_key(*case)] = schedule_multipliers(*case)
    for run in RUNS:
        traces, model = train_peft(base, init_dir, batches, run)
        arrays.update({f"{k}_{run.name}": v for k, v in traces.items()})
        _save_adapter(model, out / f"peft_trained_{run.name}")
        norms = traces["grad_norms"]
        print(f"{run.name}: losses {traces['losses'][0]:.5f} -> {traces['losses'][-1]:.5f}, "
              f"grad norm {norms.min():.3f}..{norms.max():.3f}")
    tmp = out / "reference.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out / "reference.npz")
    meta = {
        "init_seed": INIT_SEED, "rank": RANK, "alpha": ALPHA, "targets": list(TARGETS),
        "batch_seed": BATCH_SEED, "steps": STEPS, "batch": BATCH, "length": LENGTH,
        "betas": list(BETAS), "eps": EPS, "runs": [dataclasses.asdict(r) for r in RUNS],
        "schedule_cases": [list(c) for c in SCHEDULE_CASES],
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
