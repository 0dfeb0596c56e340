"""Reference outputs of every defense from PyTorch mirrors of the authors' code.

A gradient defense's reference is what the official HF `Trainer` subclass leaves in `.grad` of
every LoRA parameter after one `training_step` (before AdamW); a weight defense's is the adapter
it outputs. The mirrors follow the official code operation by operation (hooks, order of the
backward passes, norms and epsilons, which tensors are perturbed or projected), not hfjax:

    case                   official code (repository @ commit, file:lines)
    vaccine                git-disl/Vaccine @8937f68 trainer.py:53-182 VaccineTrainer
    random_vaccine         git-disl/Vaccine @8937f68 trainer.py:186-279 RandomVaccineTrainer
    booster                git-disl/Booster @6421918 trainer.py:125-391 BoosterAlignmentTrainer
    booster_perturb_aware  the same with perturb_aware="True" (Vaccine's passes on "align")
    repnoise               domenicrosati/representation-noising @03689ff
                           representation_noising/loss.py:17-130 rep_noise_loss
    safe_instr             git-disl/Booster @6421918 trainer.py:42-122 VlguardTrainer
    lisa_align, lisa_finetune, lisa_switch, lisa_warmup
                           git-disl/Lisa @68e3659 trainer.py:40-209 LisaTrainer at steps
                           1050, 1500, 1100 (the switch to fine-tuning), 200 (no proximal term
                           yet: it needs steps > 10% of LISA_TOTAL_STEPS)
    antidote_full, antidote_padded, antidote_magnitude
                           git-disl/Antidote @26e2ade utils.py:313-748 prune_wanda_outlier,
                           trainer.py:529-545 save_mask, train.py:516-535 the mask applied
    safelora_threshold, safelora_count
                           IBM/SafeLoRA @d81fda1 model.py:21-115
    safe_instr_mix         git-disl/Lisa @68e3659 train.py:159-194 (`official_vlguard_mix`,
                           pure Python: the test calls it, no fixture)

Setup: the tiny Llama of tests/fixtures/peft/base with a PEFT LoRA (r 4, alpha 8, all seven
projections) written by hfjax (`lora.init`, then B ~ 0.1 N(0, 1) so that every gradient is
non-trivial); seeded numpy batches (`make_batches`) right-padded with labels −100 on prompt and
padding: "user" [4, 20]; "align" (refusals) and "harmful" [4, 16], paired (same prompts, each
harmful answer at least as long as its refusal); calibration batches [4, 16] without and with
padding. Injected noise (random Vaccine's ε/√ρ, RepNoise's Gaussian) is hfjax's
`gaussian.standard_normal(jax.random.key(seed), [L, B, T, D])`, written to OUT/noise.npz and used
in place of the official `torch.randn_like` draws, so hfjax replays it from the same key. Lisa's
anchors (`lisa_anchors`) and SafeLoRA's aligned model (`alignment_delta`) come from seeded numpy.

Adaptations to today's libraries, same arithmetic: HF's Llama computes RMSNorm, RoPE and its
loss in float32 whatever the model dtype, so the reference patches them to keep float64 (and
uses SDPA attention, float64 on CPU); the trainers' `compute_loss` is HF's ForCausalLMLoss
(mean CE over shifted labels ≠ −100) computed here in float64. RepNoise's module names are the
PEFT-wrapped ones (`base_model.model.model.layers.{i}.mlp`). Antidote's layer-by-layer
calibration passes `position_embeddings` (transformers 5 computes RoPE outside the layer),
takes the layer's tensor output (no tuple any more), and keeps its statistics in float64 (the
original casts the inputs to float32).

Two steps, in this order:

    .venv/bin/python scripts/make_defense_reference.py --write-init [--out DIR]
    /tmp/v311/bin/python scripts/make_defense_reference.py [--out DIR]

The first (Python 3.12 + hfjax) writes OUT/init_adapter/ and OUT/noise.npz; the second (torch)
writes OUT/reference.npz with keys "batch:{name}:{field}" (int32), "grad:{case}" (float32 LoRA
gradients), "mask:{case}" (bool, True = zeroed by Antidote), "lora_b:{case}" (float32 lora_B
after SafeLoRA), each `flatten`ed over PEFT keys in sorted order, "cos:{case}" and
"projected:{case}" (SafeLoRA, per (layer, module) in layer-major order), and OUT/meta.json.
torch is imported only in the second step and jax only in the first, so the tests import this
file for its numpy helpers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "defense_reference"
DEFAULT_BASE = ROOT / "tests" / "fixtures" / "peft" / "base"

INIT_SEED, B_SEED, B_SCALE = 0, 1, 0.1
RANK, ALPHA = 4, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

BATCH_SEED = 31
BATCH, VOCAB, PAD_ID, IGNORE_INDEX = 4, 128, 0, -100
USER_LENGTH, PAIRED_LENGTH = 20, 16
CALIBRATION_BATCHES = 2

NOISE_SEEDS = {"random_vaccine": 11, "repnoise": 12}  # jax.random.key(seed) on both sides

HPARAMS = {
    "vaccine": {"rho": 2.0},
    "random_vaccine": {"rho": 2.0},
    "booster": {"lam": 5.0, "alpha": 0.1},
    "repnoise": {"alpha": 1.0, "beta": 1.0},
    "safe_instr": {"lam": 0.1},
    "lisa": {"rho": 1.0, "align_steps": 100, "finetune_steps": 900},
    "antidote": {"dense_ratio": 0.1},
    "safelora_threshold": {"mode": "threshold", "threshold": 0.5},
    "safelora_count": {"mode": "count", "num_proj_layers": 4},
}
# Lisa: len(train dataloader) · epochs; the official proximal term is on for steps > 10% of it
LISA_TOTAL_STEPS = 2000
LISA_STEPS = {"lisa_align": 1050, "lisa_finetune": 1500, "lisa_switch": 1100, "lisa_warmup": 200}
ANCHOR_SEED, ANCHOR_SCALE = 41, 0.05
# SafeLoRA: W_aligned − W_base spans a fraction of the output space (`alignment_delta`)
DELTA_SEED, DELTA_NORM = 51, 1.0
DELTA_FRACTIONS = (0.04, 0.1, 0.16, 0.4, 0.55, 0.75, 0.95)

GRADIENT_CASES = ("vaccine", "random_vaccine", "booster", "booster_perturb_aware", "repnoise",
                  "safe_instr", "lisa_align", "lisa_finetune", "lisa_switch", "lisa_warmup")
ANTIDOTE_CASES = ("antidote_full", "antidote_padded", "antidote_magnitude")
SAFELORA_CASES = ("safelora_threshold", "safelora_count")
GRAD_ACCUMULATION = 1  # the trainers divide hooked gradients by gradient_accumulation_steps


# ---------------------------------------------------------------------------------------------
# numpy: batches, anchors, aligned weights, the official data-mixing rule (shared with the tests)


def peft_key(layer: int, module: str, part: str) -> str:
    """PEFT's state-dict key of lora_A / lora_B (part "A" / "B") without the adapter name."""
    return f"base_model.model.model.layers.{layer}.{GROUPS[module]}.{module}.lora_{part}.weight"


def flatten(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The tensors raveled and concatenated in sorted-key order (one fixture array per case)."""
    return np.concatenate([np.ravel(tensors[k]) for k in sorted(tensors)])


def unflatten(flat: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`flatten`'s inverse for tensors with the keys and shapes of `like`."""
    out, start = {}, 0
    for key in sorted(like):
        size = like[key].size
        out[key] = flat[start:start + size].reshape(like[key].shape)
        start += size
    if start != flat.size:
        raise ValueError(f"{flat.size} values do not fill tensors of {start} values")
    return out


def _right_padded(ids: np.ndarray, lengths: np.ndarray, prompts: np.ndarray) -> dict:
    """{input_ids, attention_mask, labels}: PAD_ID from `lengths` on, labels = ids on
    prompts ≤ t < lengths and −100 elsewhere."""
    t = np.arange(ids.shape[1])
    mask = t < lengths[:, None]
    response = mask & (t >= prompts[:, None])
    ids = np.where(mask, ids, PAD_ID).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask.astype(np.int32),
            "labels": np.where(response, ids, IGNORE_INDEX).astype(np.int32)}


def _lengths(rng: np.random.Generator, length: int, low: int) -> np.ndarray:
    """Row lengths in [low, length] with one row of full length."""
    n = rng.integers(low, length + 1, BATCH)
    n[rng.integers(BATCH)] = length
    return n


def make_batches(seed: int = BATCH_SEED) -> dict[str, dict[str, np.ndarray]]:
    """The named batches: "user", "align", "harmful", "calibration_{full,padded}_{i}".

    "align" (refusal) and "harmful" rows share their prompt (3 to 5 tokens); the harmful answer is
    at least as long as the refusal, so the official RepNoise mask `ids_h != ids_s` never selects
    a pad position of the harmful batch; row 0 has one answer token equal in both. Calibration
    batches: the same tokens once at full length and once right-padded.
    """
    rng = np.random.default_rng(seed)
    n = _lengths(rng, USER_LENGTH, 8)
    batches = {"user": _right_padded(rng.integers(1, VOCAB, (BATCH, USER_LENGTH)), n,
                                     rng.integers(2, n - 2))}
    prompts = rng.integers(3, 6, BATCH)
    n_harmful = _lengths(rng, PAIRED_LENGTH, 10)
    n_refusal = rng.integers(prompts + 3, n_harmful + 1)
    is_prompt = np.arange(PAIRED_LENGTH) < prompts[:, None]
    prompt = rng.integers(1, VOCAB, (BATCH, PAIRED_LENGTH))
    harmful = np.where(is_prompt, prompt, rng.integers(1, VOCAB, (BATCH, PAIRED_LENGTH)))
    refusal = np.where(is_prompt, prompt, rng.integers(1, VOCAB, (BATCH, PAIRED_LENGTH)))
    refusal[0, prompts[0] + 1] = harmful[0, prompts[0] + 1]
    batches["harmful"] = _right_padded(harmful, n_harmful, prompts)
    batches["align"] = _right_padded(refusal, n_refusal, prompts)
    for i in range(CALIBRATION_BATCHES):
        ids = rng.integers(1, VOCAB, (BATCH, PAIRED_LENGTH))
        p = rng.integers(2, 6, BATCH)
        batches[f"calibration_full_{i}"] = _right_padded(ids, np.full(BATCH, PAIRED_LENGTH), p)
        batches[f"calibration_padded_{i}"] = _right_padded(ids, _lengths(rng, PAIRED_LENGTH, 6), p)
    return batches


def calibration(batches: dict, kind: str) -> list[dict]:
    """Antidote's calibration batches: kind "full" or "padded"."""
    return [batches[f"calibration_{kind}_{i}"] for i in range(CALIBRATION_BATCHES)]


def noise_shape(num_layers: int, hidden_size: int) -> tuple[int, int, int, int]:
    """[L, B, T, D] of the attention / MLP outputs on the paired batches."""
    return (num_layers, BATCH, PAIRED_LENGTH, hidden_size)


def lisa_anchors(init: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{"align": θ_al, "finetune": θ_ft}: float32 init + ANCHOR_SCALE · N(0, 1) per PEFT key."""
    rng = np.random.default_rng(ANCHOR_SEED)
    return {state: {k: (init[k] + ANCHOR_SCALE * rng.standard_normal(init[k].shape))
                    .astype(np.float32) for k in sorted(init)}
            for state in ("align", "finetune")}


def lisa_clock(steps: int, align_steps: int, finetune_steps: int) -> tuple[str, int]:
    """LisaTrainer's (status, clock) before training step `steps` of a run started at step 0
    (trainer.py:78-96 init, 137-158 check_mode, 206-208 the counters)."""
    status, clock = "alignment", 0
    for step in range(steps):
        if status == "alignment" and clock % align_steps == 0 and step != 0:
            status, clock = "finetune", 0
        elif status == "finetune" and clock % finetune_steps == 0 and step != 0:
            status, clock = "alignment", 0
        clock += 1
    return status, clock


def alignment_delta(layer: int, module: str, shape: tuple[int, int]) -> np.ndarray:
    """W_aligned − W_base [out, in] of one projection, float64: DELTA_NORM · U Wᵀ / √k with U, W
    random orthonormal k-frames, k = round(f · min(out, in)) and f = DELTA_FRACTIONS[(module
    index + 3 · layer) mod 7]. Then SafeLoRA's C = V Vᵀ/‖V‖ projects onto a k-dimensional
    subspace and cos(C B A, B A) ≈ √(k / out) for a random B: spread over (0.2, 1)."""
    j = TARGETS.index(module)
    k = max(1, round(DELTA_FRACTIONS[(j + 3 * layer) % len(DELTA_FRACTIONS)] * min(shape)))
    rng = np.random.default_rng([DELTA_SEED, layer, j])
    u = np.linalg.qr(rng.standard_normal((shape[0], k)))[0]
    w = np.linalg.qr(rng.standard_normal((shape[1], k)))[0]
    return DELTA_NORM * (u @ w.T) / np.sqrt(k)


def aligned_weight(base: np.ndarray, layer: int, module: str) -> np.ndarray:
    """The aligned model's float32 weight [out, in]: base + `alignment_delta`, rounded once."""
    return (base.astype(np.float64) + alignment_delta(layer, module, base.shape)).astype(
        np.float32)


def official_vlguard_mix(harmful: list, benign: list, safe: list, poison_ratio: float,
                         sample_num: int, guide_data_num: int) -> list:
    """git-disl/Lisa train.py:159-194 (SupervisedDataset, "BeaverTails_dangerous" with
    finetuning_guide_data_num): the first int(p n) harmful rows, the first
    int((1 − p) n − g) benign rows and the first g safe rows, in that order (the Trainer's
    RandomSampler shuffles them)."""
    poison_num = int(poison_ratio * sample_num)
    normal_num = int((1 - poison_ratio) * sample_num - guide_data_num)
    rows = [r for index, r in enumerate(harmful) if index < poison_num]
    rows += [r for index, r in enumerate(benign) if index < normal_num]
    return rows + [r for index, r in enumerate(safe) if index < guide_data_num]


# ---------------------------------------------------------------------------------------------
# Python 3.12 + hfjax step


def make_init_adapter(cfg):
    """hfjax's PEFT-style init (key INIT_SEED) with B ~ B_SCALE · N(0, 1) (keys from B_SEED)."""
    import jax

    from hfjax.models import lora as lora_lib

    init = lora_lib.init(cfg, jax.random.key(INIT_SEED), rank=RANK, alpha=ALPHA, targets=TARGETS)
    keys = jax.random.split(jax.random.key(B_SEED), len(init.weights))
    weights = {name: {"A": w["A"], "B": B_SCALE * jax.random.normal(k, w["B"].shape)}
               for (name, w), k in zip(init.weights.items(), keys, strict=True)}
    return lora_lib.LoRA(weights=weights, alpha=init.alpha)


def make_noise(cfg) -> dict[str, np.ndarray]:
    """{case: gaussian.standard_normal(jax.random.key(NOISE_SEEDS[case]), [L, B, T, D])}."""
    import jax

    from hfjax import gaussian

    shape = noise_shape(cfg.num_layers, cfg.hidden_size)
    return {case: np.asarray(gaussian.standard_normal(jax.random.key(seed), shape))
            for case, seed in NOISE_SEEDS.items()}


def write_init(out: Path, base: Path) -> None:
    from hfjax.models import lora as lora_lib
    from hfjax.models.config import from_hf_dict

    cfg = from_hf_dict(json.loads((base / "config.json").read_text()))
    print(f"wrote {lora_lib.save_peft(out / 'init_adapter', cfg, make_init_adapter(cfg))}")
    _save_npz(out / "noise.npz", make_noise(cfg))


def _save_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# torch step: the model, the loss, the LoRA parameters


def _keep_float64() -> None:
    """HF's Llama computes RMSNorm and RoPE (cos, sin and the inverse frequencies) in float32
    whatever the model's dtype; make both keep the input dtype, same formulas."""
    import torch
    from transformers.models.llama import modeling_llama as llama

    def rms_norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def rotary(self, x, position_ids):
        dim = 2 * self.inv_freq.shape[0]
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(x.dtype),
                (emb.sin() * self.attention_scaling).to(x.dtype))

    llama.LlamaRMSNorm.forward = rms_norm
    llama.LlamaRotaryEmbedding.forward = rotary


def load_base(base: Path):
    """The float64 LlamaForCausalLM (SDPA attention)."""
    from transformers import LlamaForCausalLM

    _keep_float64()
    return LlamaForCausalLM.from_pretrained(base, attn_implementation="sdpa").double()


def load_model(base: Path, adapter: Path):
    """PeftModel over the float64 base with the adapter trainable, in train mode."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), str(adapter), is_trainable=True).double()
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = 2 * len(TARGETS) * model.config.num_hidden_layers
    if len(names) != expected or not all("lora_" in n for n in names):
        raise RuntimeError(f"unexpected trainable parameters: {names}")
    return model


def lora_parameters(model) -> dict:
    """{PEFT key: parameter} of every trainable (LoRA) parameter, in named_parameters order."""
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}


def lora_grads(model) -> dict[str, np.ndarray]:
    return {k: p.grad.detach().numpy().astype(np.float32)
            for k, p in lora_parameters(model).items()}


def to_torch(batch: dict) -> dict:
    import torch

    return {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}


def compute_loss(model, inputs: dict):
    """The trainers' `compute_loss`: HF's ForCausalLMLoss (labels shifted left with −100
    appended, mean CE over labels ≠ −100), in the model's dtype."""
    import torch.nn.functional as F

    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def backward(model, inputs: dict):
    """The trainers' `step()`: compute_loss then backward."""
    loss = compute_loss(model, inputs)
    loss.backward()
    return loss


def _remove(hooks: list) -> None:
    for hook in hooks:
        hook.remove()


# ---------------------------------------------------------------------------------------------
# Vaccine, random Vaccine, Booster, SafeInstr (VLGuard weighted), Lisa


def attention_modules(model) -> list:
    """git-disl's `get_leaf_modules_with_grad`: every LlamaAttention, whose output[0] is a_l."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    return [m for _, m in model.named_modules() if isinstance(m, LlamaAttention)]


def grad_norm(tensors) -> object:
    """git-disl's `_grad_norm`: ‖(‖t‖₂ for t in tensors)‖₂."""
    import torch

    return torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)


def perturb_attention(model, perturbation) -> list:
    """Forward hooks `output[0].data = output[0] + perturbation(module, output)` on every
    attention module (pre_second_step): the value moves, the autograd graph does not."""
    import torch

    @torch.no_grad()
    def hook(module, inputs, output):
        output[0].data = output[0] + perturbation(module, output)
        return output

    return [m.register_forward_hook(hook) for m in attention_modules(model)]


def vaccine_step(model, inputs: dict, rho: float) -> None:
    """VaccineTrainer.training_step: pass 1 records G_l = ∂L/∂a_l with (non-full) backward hooks
    on each attention module, ε_l = ρ G_l / (‖G‖ + 1e-7) with one norm over all layers, then
    zero_grad and pass 2 with a_l + ε_l (trainer.py:54-90, 92-159)."""
    gradient, hooks = {}, []

    def track_gradient_hook(module, grad_input, grad_output):
        gradient[module] = grad_output[0].detach().clone() / GRAD_ACCUMULATION

    for layer in attention_modules(model):
        gradient[layer] = 0
        hooks.append(layer.register_backward_hook(track_gradient_hook))
    backward(model, inputs)
    _remove(hooks)
    norm = grad_norm(gradient.values())
    for module in gradient:
        gradient[module] = (gradient[module] * (rho / (norm + 1e-7))).detach().clone()
    model.zero_grad()
    hooks = perturb_attention(model, lambda module, output: gradient[module])
    backward(model, inputs)
    _remove(hooks)


def random_vaccine_step(model, inputs: dict, rho: float, noise) -> None:
    """RandomVaccineTrainer.training_step: one pass with a_l + ρ^(1/2) · z_l, z_l the injected
    standard normal draw in place of `torch.randn_like(output[0])` (trainer.py:187-244)."""
    hooks = perturb_attention(model, lambda module, output: rho ** (1 / 2)
                              * noise[module.layer_idx].to(output[0].dtype))
    backward(model, inputs)
    _remove(hooks)


def booster_step(model, inputs: dict, harmful_inputs: dict, lam: float, alpha: float,
                 perturb_aware_rho: float | None = None) -> None:
    """BoosterAlignmentTrainer.training_step (trainer.py:272-380): g_h on the harmful batch,
    θ −= α g_h / (‖g_h‖ + 1e-7), g_h' there, θ restored, the alignment gradient (Vaccine's two
    passes when perturb-aware), then grad += λ g_h − λ g_h'."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backward(model, harmful_inputs)
    stored = {n: p.grad.data.clone() for n, p in trainable}
    model.zero_grad()
    with torch.no_grad():
        norm = grad_norm(stored.values()) + 1e-7
    for n, p in trainable:
        p.data -= alpha * stored[n] / norm
    backward(model, harmful_inputs)
    perturbed = {n: p.grad.clone() for n, p in trainable}
    model.zero_grad()
    for n, p in trainable:
        p.data += alpha * stored[n] / norm
    if perturb_aware_rho is None:
        backward(model, inputs)
    else:
        vaccine_step(model, inputs, perturb_aware_rho)
    for n, p in trainable:
        p.grad.data = p.grad.data + lam * stored[n] - lam * perturbed[n]


def safe_instr_step(model, inputs: dict, alignment_inputs: dict, lam: float) -> None:
    """VlguardTrainer.training_step: backward of L(user) + λ L(align) (trainer.py:96-122)."""
    (compute_loss(model, inputs) + lam * compute_loss(model, alignment_inputs)).backward()


class LisaMirror:
    """LisaTrainer's state and training_step (git-disl/Lisa trainer.py:78-209), with the step
    counters and both anchors set explicitly instead of by a run from step 0."""

    def __init__(self, model, steps: int, anchors: dict, rho: float, align_steps: int,
                 finetune_steps: int, total_steps: int):
        import torch

        self.rho, self.align_steps, self.finetune_steps = rho, align_steps, finetune_steps
        self.total_steps = total_steps  # len(self.get_train_dataloader()) * num_train_epochs
        self.steps = steps
        self.status, self.clock = lisa_clock(steps, align_steps, finetune_steps)
        names = {n.replace(".default", ""): n for n, p in model.named_parameters()
                 if p.requires_grad}
        self.alignment_weights = {names[k]: torch.from_numpy(v).double()
                                  for k, v in anchors["align"].items()}
        self.finetune_weights = {names[k]: torch.from_numpy(v).double()
                                 for k, v in anchors["finetune"].items()}

    def switch_model(self, model) -> None:
        target = self.finetune_weights if self.status == "alignment" else self.alignment_weights
        for name, param in model.named_parameters():
            if param.requires_grad:
                target[name] = param.data.detach().clone()

    def check_mode(self, model, inputs: dict, alignment_inputs: dict) -> dict:
        if self.status == "alignment":
            if (self.clock % self.align_steps == 0 and self.steps != 0
                    and self.finetune_steps != 0):
                self.status = "finetune"
                self.switch_model(model)
                self.clock = 0
            else:
                inputs = alignment_inputs
        elif (self.clock % self.finetune_steps == 0 and self.steps != 0
              and self.align_steps != 0):
            self.status = "alignment"
            self.switch_model(model)
            inputs = alignment_inputs
            self.clock = 0
        return inputs

    def training_step(self, model, inputs: dict, alignment_inputs: dict) -> None:
        import torch

        inputs = self.check_mode(model, inputs, alignment_inputs)
        loss = compute_loss(model, inputs)
        anchors = self.finetune_weights if self.status == "alignment" else self.alignment_weights
        if self.steps > 0.1 * self.total_steps:
            for name, param in model.named_parameters():
                if param.requires_grad and self.rho > 0:
                    loss += self.rho / 2 * torch.norm(param - anchors[name]) ** 2
        loss.backward()
        self.steps += 1
        self.clock += 1


# ---------------------------------------------------------------------------------------------
# RepNoise (domenicrosati/representation-noising, representation_noising/loss.py)


def mmd_loss(source, target, kernel_mul: float = 2.0, kernel_num: int = 5):
    """MMD_loss.forward (loss.py:17-49): Gaussian kernel sum, bandwidth from detached distances."""
    import torch

    n_samples = int(source.size()[0]) + int(target.size()[0])
    total = torch.cat([source, target], dim=0)
    n, d = int(total.size(0)), int(total.size(1))
    total0 = total.unsqueeze(0).expand(n, n, d)
    total1 = total.unsqueeze(1).expand(n, n, d)
    l2_distance = ((total0 - total1) ** 2).sum(2)
    bandwidth = torch.sum(l2_distance.data) / (n_samples**2 - n_samples)
    bandwidth /= kernel_mul ** (kernel_num // 2)
    kernels = sum(torch.exp(-l2_distance / (bandwidth * kernel_mul**i))
                  for i in range(kernel_num))
    b = int(source.size()[0])
    return torch.mean(kernels[:b, :b] + kernels[b:, b:] - kernels[:b, b:] - kernels[b:, :b])


def masked_token_ce_loss(logits, labels, mask):
    """loss.py:52-71: logits predicting from masked-out positions are zeroed, labels outside the
    mask (and every label equal to 0) are ignored, mean CE."""
    import torch

    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    shift_logit_mask = mask[..., :-1].contiguous()
    expanded_mask = shift_logit_mask.unsqueeze(-1).expand(-1, -1, shift_logits.size(-1))
    shift_label_mask = mask[..., 1:].contiguous()
    shift_logits = shift_logits * expanded_mask
    shift_labels = shift_labels * shift_label_mask
    shift_labels[shift_labels == 0] = -100
    shift_labels = shift_labels.type(torch.LongTensor)
    return torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)),
                                       shift_labels.view(-1))


def rep_noise_loss(model, harmful_batch: dict, harmless_batch: dict, noise, beta: float,
                   alpha: float):
    """rep_noise_loss (loss.py:74-130), the Gaussian draw of layer i replaced by noise[i]:

        L = CE_m(x_s) + β (1/L) Σ_l MMD(m ⊙ h_l, m ⊙ z_l)
            − α log((CE_m(x_h) + Σ_{i=0..L} CE_m(W_out Norm(s_i), x_h)) / (L + 1) + 1)

    m = ids_h ≠ ids_s; CE_m the masked CE above; s_i HF's hidden_states (the last one already
    normed); h_l the MLP output of layer l.
    """
    import torch

    layers = model.base_model.model.model.layers
    activations = {}
    hooks = [layer.mlp.register_forward_hook(
        lambda module, _, val, i=i: activations.__setitem__(i, val))
        for i, layer in enumerate(layers)]
    harmful_outputs = model(harmful_batch["input_ids"],
                            attention_mask=harmful_batch["attention_mask"],
                            output_hidden_states=True)
    _remove(hooks)
    harmful_activations = [activations[i] for i in range(len(layers))]
    mask = ~torch.eq(harmful_batch["input_ids"], harmless_batch["input_ids"])
    noise_loss = 0
    for i, hidden in enumerate(harmful_activations):
        hiddens_mask = mask.unsqueeze(-1).expand(hidden.size())
        hiddens = hidden * hiddens_mask
        gaussian = noise[i].to(hiddens.dtype) * hiddens_mask
        noise_loss += mmd_loss(hiddens.view(hiddens.size(0), -1),
                               gaussian.view(gaussian.size(0), -1))
    noise_loss /= len(harmful_activations)
    mask = mask.float()
    harmful_outputs_loss = masked_token_ce_loss(harmful_outputs.logits,
                                                harmful_batch["input_ids"], mask)
    harmless_outputs = model(harmless_batch["input_ids"],
                             attention_mask=harmless_batch["attention_mask"],
                             output_hidden_states=True)
    harmless_losses = masked_token_ce_loss(harmless_outputs.logits,
                                           harmless_batch["input_ids"], mask)
    output_embeddings = model.get_output_embeddings()
    norm = model.base_model.model.model.norm
    harmful_losses = harmful_outputs_loss
    for h in harmful_outputs.hidden_states:
        harmful_losses += masked_token_ce_loss(output_embeddings(norm(h)),
                                               harmful_batch["input_ids"], mask)
    harmful_losses = harmful_losses / len(harmful_outputs.hidden_states) + 1
    return harmless_losses + beta * noise_loss - alpha * torch.log(harmful_losses)


# ---------------------------------------------------------------------------------------------
# Antidote (git-disl/Antidote utils.py prune_wanda_outlier)


class WrappedGPT:
    """utils.py:475-505: scaler_row = running mean over samples of Σ_t x_t² per input column."""

    def __init__(self, layer):
        import torch

        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1], dtype=layer.weight.dtype)
        self.nsamples = 0

    def add_batch(self, inp, out) -> None:
        import torch

        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _add_batch(wrapped: WrappedGPT):
    """The official `add_batch(name)` forward hook: the linear's input goes to add_batch."""

    def tmp(_, inp, out):
        wrapped.add_batch(inp[0].data, out.data)

    return tmp


def find_layers(module, name: str = "") -> dict:
    """utils.py:313-337 (LoRA mode): every nn.Linear whose name contains "lora"."""
    import torch

    if type(module) is torch.nn.Linear and "lora" in name:
        return {name: module}
    found = {}
    for child_name, child in module.named_children():
        found.update(find_layers(child, f"{name}.{child_name}" if name else child_name))
    return found


def prepare_calibration_input(model, batches: list[dict]) -> tuple[list, list]:
    """utils.py:421-473: catch each sample's layer-0 input and keyword arguments while the model
    runs on `input_ids` alone (no attention mask, so padding is computed like any token)."""
    import torch

    layers = model.model.layers
    inps, kwargs_list = [], []

    class Catcher(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            for index in range(inp.shape[0]):
                inps.append(inp[index].unsqueeze(0))
                mask = kwargs["attention_mask"]
                kwargs_list.append({
                    "attention_mask": None if mask is None else mask[index].unsqueeze(0),
                    "position_ids": kwargs["position_ids"],
                    "position_embeddings": kwargs["position_embeddings"]})
            raise ValueError

    layers[0] = Catcher(layers[0])
    for batch in batches:
        try:
            model(batch["input_ids"])
        except ValueError:
            pass
    layers[0] = layers[0].module
    return inps, kwargs_list


def prune_wanda_outlier(model, batches: list[dict] | None, dense_ratio: float) -> dict:
    """utils.py:529-748 with prune_n = 0: per LoRA linear W [out, in], the score
    |W| · sqrt(scaler_row) (|W| without calibration data); per row, mask 0 on the first
    int(in · (1 − dense_ratio)) entries of a stable ascending sort, 1 (to prune) on the rest.
    Calibration runs layer by layer, sample by sample, on the unpruned model."""
    import torch

    model.eval()
    full_masks = {}
    with torch.no_grad():
        if batches is not None:
            inps, kwargs_list = prepare_calibration_input(model, batches)
            outs = [[] for _ in inps]
        for i, layer in enumerate(model.model.layers):
            subset = find_layers(layer)
            if batches is not None:
                wrapped = {name: WrappedGPT(subset[name]) for name in subset}
                handles = [subset[name].register_forward_hook(_add_batch(wrapped[name]))
                           for name in wrapped]
                for j in range(len(inps)):
                    outs[j] = layer(inps[j], **kwargs_list[j])
                _remove(handles)
            for name in subset:
                weight = subset[name].weight.data
                if batches is not None:
                    metric = torch.abs(weight) * torch.sqrt(
                        wrapped[name].scaler_row.reshape((1, -1)))
                else:
                    metric = torch.abs(weight)
                w_mask = torch.ones_like(metric)
                sort_res = torch.sort(metric, dim=-1, stable=True)
                indices = sort_res[1][:, :int(metric.shape[1] * (1 - dense_ratio))]
                w_mask.scatter_(1, indices, 0)
                full_masks[f"base_model.model.model.layers.{i}.{name}.weight"] = w_mask
            if batches is not None:
                for j in range(len(inps)):
                    outs[j] = layer(inps[j], **kwargs_list[j])
                inps, outs = outs, inps
    return full_masks


def antidote(model, batches: list[dict] | None, dense_ratio: float) -> dict[str, np.ndarray]:
    """AntidoteTrainer.save_mask on `self.model.model` (the LoRA-injected LlamaForCausalLM),
    then train.py's `param.data *= (1 - bad_mask[name])`; returns {PEFT key: True where zeroed}."""
    masks = prune_wanda_outlier(model.base_model.model, batches, dense_ratio)
    for name, param in model.named_parameters():
        if name in masks:
            param.data *= (1 - masks[name])
    return {k.replace(".default", ""): v.numpy().astype(bool) for k, v in masks.items()}


# ---------------------------------------------------------------------------------------------
# SafeLoRA (IBM/SafeLoRA model.py)


def aligned_matrices(base_model, aligned_model, target_modules) -> list:
    """get_aligned_matrix (model.py:54-82): V Vᵀ / ‖V‖ with V = W_aligned − W_base for every
    parameter named after a target module, in named_parameters order."""
    import torch

    v = []
    for (_, b_param), (a_name, a_param) in zip(base_model.named_parameters(),
                                               aligned_model.named_parameters(), strict=True):
        if any(module in a_name for module in target_modules):
            vec = a_param - b_param
            v.append((torch.mm(vec, vec.t()) / torch.norm(vec)).detach())
    return v


def projected_weighted(peft_model, model_ori, project_matrix: list, thrs_cos: float,
                       rank: int) -> list[float]:
    """projected_weighted (model.py:84-115): per lora_B (paired with the preceding lora_A),
    cos = round(cos(P B A, B A), 5); B ← P B where cos ≤ thrs_cos, else the original B."""
    import torch

    idx, cos_total, a = 0, [], None
    for (name, param), (_, param_ori) in zip(peft_model.named_parameters(),
                                             model_ori.named_parameters(), strict=True):
        if "lora" not in name:
            continue
        if param.shape[0] == rank:
            a = copy.deepcopy(param_ori)
            continue
        p = project_matrix[idx]
        fw = torch.mm(torch.mm(p, param_ori.data), a)
        ori = torch.mm(param_ori, a)
        cos = np.round(torch.nn.functional.cosine_similarity(
            fw.reshape(1, -1), ori.reshape(1, -1)).item(), 5)
        cos_total.append(cos)
        param.data = torch.mm(p, param_ori.data) if cos <= thrs_cos else param_ori
        idx += 1
    return cos_total


def safelora(peft_model, base_model, aligned_model, mode: str, threshold: float = 0.5,
             num_proj_layers: int = 10) -> tuple[list[float], float]:
    """SafeLoRA.__init__ (model.py:21-52): "threshold" projects where cos ≤ threshold; "number"
    (hfjax's "count") where cos ≤ the num_proj_layers-th smallest cos. Returns (cos, cut)."""
    import torch

    with torch.no_grad():
        config = peft_model.peft_config["default"]
        model_ori = copy.deepcopy(peft_model)
        project_matrix = aligned_matrices(base_model, aligned_model, list(config.target_modules))
        if mode == "threshold":
            cut = threshold
        else:
            cos = projected_weighted(peft_model, model_ori, project_matrix, 0.3, config.r)
            cut = float(np.sort(cos)[:num_proj_layers][-1])
        return projected_weighted(peft_model, model_ori, project_matrix, cut, config.r), cut


def aligned_model_from(base_model):
    """A copy of the base whose target weights are `aligned_weight` (float64 of float32)."""
    import torch

    aligned = copy.deepcopy(base_model)
    for layer, block in enumerate(aligned.model.layers):
        for module in TARGETS:
            linear = getattr(getattr(block, GROUPS[module]), module)
            base = linear.weight.data.numpy().astype(np.float32)
            linear.weight.data = torch.from_numpy(aligned_weight(base, layer, module)).double()
    return aligned


# ---------------------------------------------------------------------------------------------
# the torch step


def gradient_case(case: str, base: Path, adapter: Path, batches: dict, noise: dict,
                  anchors: dict) -> dict[str, np.ndarray]:
    """The LoRA .grad after one official training_step of `case`."""
    import torch

    model = load_model(base, adapter)
    model.zero_grad()
    user, align, harmful = (to_torch(batches[k]) for k in ("user", "align", "harmful"))
    if case == "vaccine":
        vaccine_step(model, align, **HPARAMS["vaccine"])
    elif case == "random_vaccine":
        random_vaccine_step(model, align, **HPARAMS["random_vaccine"],
                            noise=torch.from_numpy(noise["random_vaccine"]))
    elif case == "booster":
        booster_step(model, align, harmful, **HPARAMS["booster"])
    elif case == "booster_perturb_aware":
        booster_step(model, align, harmful, **HPARAMS["booster"],
                     perturb_aware_rho=HPARAMS["vaccine"]["rho"])
    elif case == "repnoise":
        rep_noise_loss(model, harmful, align, torch.from_numpy(noise["repnoise"]),
                       **HPARAMS["repnoise"]).backward()
    elif case == "safe_instr":
        safe_instr_step(model, user, align, **HPARAMS["safe_instr"])
    elif case in LISA_STEPS:
        lisa = LisaMirror(model, LISA_STEPS[case], anchors, total_steps=LISA_TOTAL_STEPS,
                          **HPARAMS["lisa"])
        lisa.training_step(model, user, align)
    else:
        raise ValueError(f"unknown gradient case {case!r}")
    return lora_grads(model)


def make_reference(out: Path, base: Path) -> None:
    import peft
    import safetensors.numpy
    import torch
    import transformers

    adapter = out / "init_adapter"
    for path in (adapter / "adapter_model.safetensors", out / "noise.npz"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run this script with --write-init under "
                                    "Python 3.12 + hfjax first")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"base model folder {base} has no config.json")
    torch.set_num_threads(1)
    init = safetensors.numpy.load_file(str(adapter / "adapter_model.safetensors"))
    noise = dict(np.load(out / "noise.npz"))
    batches = make_batches()
    arrays = {f"batch:{name}:{field}": v for name, b in batches.items() for field, v in b.items()}
    anchors = lisa_anchors(init)
    timings = {}

    for case in GRADIENT_CASES:
        start = time.perf_counter()
        arrays[f"grad:{case}"] = flatten(gradient_case(case, base, adapter, batches, noise,
                                                       anchors))
        timings[case] = time.perf_counter() - start

    for case in ANTIDOTE_CASES:
        start = time.perf_counter()
        kind = case.removeprefix("antidote_")
        data = None if kind == "magnitude" else [to_torch(b) for b in calibration(batches, kind)]
        masks = antidote(load_model(base, adapter), data, **HPARAMS["antidote"])
        arrays[f"mask:{case}"] = flatten(masks)
        timings[case] = time.perf_counter() - start

    base_model = load_base(base)
    aligned = aligned_model_from(base_model)
    for case in SAFELORA_CASES:
        start = time.perf_counter()
        model = load_model(base, adapter)
        hp = {**HPARAMS[case], "mode": "number" if HPARAMS[case]["mode"] == "count"
              else "threshold"}
        cos, cut = safelora(model, base_model, aligned, **hp)
        final = {k: p.detach().numpy() for k, p in lora_parameters(model).items()}
        arrays[f"lora_b:{case}"] = flatten({k: v.astype(np.float32) for k, v in final.items()
                                            if ".lora_B." in k})
        arrays[f"cos:{case}"] = np.asarray(cos, np.float64)
        arrays[f"projected:{case}"] = np.asarray(cos) <= cut
        timings[case] = time.perf_counter() - start

    _save_npz(out / "reference.npz", arrays)
    meta = {
        "init_seed": INIT_SEED, "b_seed": B_SEED, "b_scale": B_SCALE, "rank": RANK,
        "alpha": ALPHA, "targets": list(TARGETS), "batch_seed": BATCH_SEED, "batch": BATCH,
        "user_length": USER_LENGTH, "paired_length": PAIRED_LENGTH, "noise_seeds": NOISE_SEEDS,
        "hparams": HPARAMS, "lisa_total_steps": LISA_TOTAL_STEPS, "lisa_steps": LISA_STEPS,
        "anchor_seed": ANCHOR_SEED, "anchor_scale": ANCHOR_SCALE, "delta_seed": DELTA_SEED,
        "delta_norm": DELTA_NORM, "delta_fractions": list(DELTA_FRACTIONS), "dtype": "float64",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "numpy": np.__version__},
    }
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "meta.json.tmp").replace(out / "meta.json")
    print("seconds per case:", {k: round(v, 2) for k, v in timings.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture folder")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="HF base model folder")
    parser.add_argument("--write-init", action="store_true",
                        help="(Python 3.12 + hfjax) write OUT/init_adapter and OUT/noise.npz")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.write_init:
        write_init(args.out, args.base)
    else:
        make_reference(args.out, args.base)


if __name__ == "__main__":
    sys.exit(main())
