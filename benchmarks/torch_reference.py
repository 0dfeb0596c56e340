"""PyTorch + PEFT reference for `step_throughput.py`: the train step of LoRA SFT or a defense.

    python benchmarks/torch_reference.py (--model PATH | --config_json PATH)
        [--method lora_sft] [--batch 4] [--seq 128] [--rank 8] [--alpha 16]
        [--targets q_proj,...] [--dtype float32] [--device cpu] [--steps 8] [--warmup 2]
        [method hyper-parameters: --rho, --lam, ...]

Run by a python that has torch, transformers and peft (never by the hfjax test environment; no
jax or hfjax import here). The model is an HF folder or a .gguf file (transformers dequantizes
it, as hfjax does), or with --config_json an HF config.json built by
`AutoModelForCausalLM.from_config` with random weights (seeded by --seed; `gpu_mfu.py`).
--device cuda puts the model and batches on the GPU (created there directly with --config_json)
and synchronizes before each clock read. LoRA as PEFT's
`LoraConfig(r, lora_alpha, target_modules, lora_dropout=0)`; AdamW over the LoRA parameters
(lr 1e-4, weight decay 0, as hfjax's benchmark); every loss is HF's mean token CE (labels =
input_ids with the first --prompt_tokens positions of each row −100, the shift inside the
model), which is hfjax's response-token CE; HF computes the logits at every position.

--method picks the step, written the way the public PyTorch implementations do it (forward hooks,
plain autograd), computing what hfjax's defense of the same name computes (hfjax/defenses/) with
the hfjax registry's default hyper-parameters as flag defaults:

  lora_sft        ∇g("user")                                                       1F+1B
  vaccine         hooks on every layer's attention block (`self_attn`) output a_l:
                  pass 1 G_l = ∂f/∂a_l ("align"), ε_l = ρ G_l / (‖G‖ + 1e-7) (global norm),
                  pass 2 ∇θ f(a_l + ε_l) is the update direction; --rho 2              2F+2B
  random_vaccine  ∇θ f(a_l + ε_l), ε ~ N(0, ρ I); --rho 2                             1F+1B
  booster         ∇f("align") + λ (∇h(θ) − ∇h(θ − α ∇h/(‖∇h‖ + 1e-7))) ("harmful");
                  --lam 5 --alpha_booster 0.1                                        3F+3B
  booster_perturb_aware  the same with ∇f taken as vaccine's; --rho 5               4F+4B
  repnoise        CE("align") + β mean_l MMD(m ⊙ mlp_out_l(x_h), m ⊙ N(0, I))
                  − α log(1 + mean_{l=0..L} CE(lm_head(norm(s_l)), x_h)) in one backward
                  (hooks: mlp_out_l on `mlp`, s_l on the embeddings and decoder layers, s_L's
                  lens = the model's logits; the MMD is the authors' MMD_loss);
                  --alpha_repnoise 1 --beta 0.001 --kernel_mul 2 --kernel_num 5
                  [--remat_lens: each lens CE under torch.utils.checkpoint, a third head
                  matmul per state; off by default, as in the authors' code, which, like
                  hfjax's fused lens CE, costs 2 head matmuls per state]           2F+1B
  lisa            phase clock t: alignment state iff t mod (K_a + K_f) < K_a ("align",
                  else "user"); on a switch the anchor of the state left ← θ; loss
                  + (ρ/2)‖θ − anchor of the other state‖² (from step --proximal_after);
                  --rho 1 --align_steps 100 --finetune_steps 900 --proximal_after 0  1F+1B
  safe_instr      g("user") + λ f("align") in one backward; --lam 0.1                2F+1B

(--alpha stays the LoRA alpha; Booster's and RepNoise's α are --alpha_booster/--alpha_repnoise.)
Named batches: [batch, seq] numpy default_rng(seed) ids with names ("user", *the hfjax spec's
batches) and seeds their positions, a repeated name keeping its last one (`BATCHES`, as hfjax's
`benchmarks/_hfjax_methods.batch_seeds`). Torch keeps its default thread count. Warm-up steps
are excluded and the median step time is reported. The last stdout line is JSON {"method",
"step_s", "tokens_per_s" (batch·seq of "user" per second), "steps_per_s", "batch_seeds",
"losses" (per step, the objective it minimized; Vaccine's at the perturbed activations),
"device", "peak_memory_bytes" (`torch.cuda.max_memory_allocated()` on cuda, null on cpu), ...}.
For parity checks: --init_adapter DIR starts from a saved PEFT adapter (e.g. hfjax's
`save_peft`), --save_adapter DIR writes the trained one, --seed seeds torch (LoRA init, noise).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# hfjax's `defenses.get(name).batches` per method (hfjax/defenses/*: registry entries)
BATCHES = {
    "lora_sft": (),
    "vaccine": ("align",),
    "random_vaccine": ("align",),
    "booster": ("align", "harmful"),
    "booster_perturb_aware": ("align", "harmful"),
    "repnoise": ("align", "harmful"),
    "lisa": ("align", "user"),
    "safe_instr": ("user", "align"),
}


def load_model(path: Path, dtype: torch.dtype):
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def random_model(config_json: Path, dtype: torch.dtype, device: torch.device):
    """The causal LM of an HF config.json with random weights (transformers' init), built on
    `device` directly."""
    d = json.loads(config_json.read_text())
    with device:
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=dtype)


def batch_seeds(method: str) -> dict[str, int]:
    """{batch name: numpy seed}: ("user", *BATCHES[method]) by position, the last one winning."""
    return {n: i for i, n in enumerate(("user", *BATCHES[method]))}


def make_batches(method: str, vocab: int, batch: int, seq: int,
                 device: torch.device | str = "cpu", prompt_tokens: int = 0) -> dict[str, dict]:
    """The named batches; the first `prompt_tokens` positions of each row get label −100."""
    out = {}
    for name, seed in batch_seeds(method).items():
        ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)
        labels = ids.copy()
        labels[:, :prompt_tokens] = -100
        ids_t = torch.from_numpy(ids).to(device)
        out[name] = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t),
                     "labels": torch.from_numpy(labels).to(device)}
    return out


def decoder_layers(model):
    """The decoder layers of the PEFT-wrapped causal LM (Llama-style `model.model.layers`)."""
    return model.get_base_model().model.layers


def ce(model, batch) -> torch.Tensor:
    """HF's mean token CE of the batch (labels shifted inside the model)."""
    return model(**batch).loss


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def global_norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum(t.float().pow(2).sum() for t in tensors))


class AttentionHooks:
    """Forward hooks on every layer's `self_attn`: a_l (its output[0], before the residual add)
    is kept with its gradient retained (`capture`), or replaced by a_l + ε_l (`perturb`)."""

    def __init__(self, model):
        self.attn = [layer.self_attn for layer in decoder_layers(model)]
        self.handles: list = []
        self.outputs: list[torch.Tensor] = []

    def capture(self):
        self.outputs = []

        def hook(module, args, output):
            output[0].retain_grad()
            self.outputs.append(output[0])

        self.handles = [m.register_forward_hook(hook) for m in self.attn]
        return self

    def perturb(self, eps: list[torch.Tensor]):
        def make(e):
            return lambda module, args, output: (output[0] + e.to(output[0].dtype), *output[1:])

        self.handles = [m.register_forward_hook(make(e))
                        for m, e in zip(self.attn, eps, strict=True)]
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


# --- one train step per method: each returns the loss it minimized (a float) ------------------


def optimizer_step(opt, loss: torch.Tensor) -> float:
    """AdamW step on the gradients `loss.backward()` left in .grad, then clear them."""
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_lora_sft(model, opt, batches, args, state) -> float:
    loss = ce(model, batches["user"])
    loss.backward()
    return optimizer_step(opt, loss)


def vaccine_backward(model, opt, align: dict, rho: float) -> torch.Tensor:
    """Leave ∇θ f(θ; a + ε) in .grad, ε = ρ G/(‖G‖ + 1e-7), G = ∂f/∂a; returns that loss."""
    with AttentionHooks(model).capture() as hooks:
        ce(model, align).backward()  # pass 1: G_l = ∂f/∂a_l (parameter gradients unused)
    grads = [a.grad.float() for a in hooks.outputs]
    scale = rho / (global_norm(grads) + 1e-7)
    eps = [(g * scale).detach() for g in grads]
    opt.zero_grad(set_to_none=True)
    with AttentionHooks(model).perturb(eps):
        loss = ce(model, align)  # pass 2 at a_l + ε_l: its gradient is the update direction
        loss.backward()
    return loss


def step_vaccine(model, opt, batches, args, state) -> float:
    return optimizer_step(opt, vaccine_backward(model, opt, batches["align"], args.rho))


def step_random_vaccine(model, opt, batches, args, state) -> float:
    align = batches["align"]
    b, t = align["input_ids"].shape
    d = model.config.hidden_size
    dev = align["input_ids"].device
    eps = [math.sqrt(args.rho) * torch.randn(b, t, d, device=dev) for _ in decoder_layers(model)]
    with AttentionHooks(model).perturb(eps):
        loss = ce(model, align)
        loss.backward()
    return optimizer_step(opt, loss)


def booster_gap(model, opt, batches, args) -> tuple[list, list]:
    """(g_h, g_h') = (∇h(θ), ∇h(θ − α g_h/(‖g_h‖ + 1e-7))) on "harmful"; θ restored, .grad clear."""
    params = trainable_params(model)
    ce(model, batches["harmful"]).backward()  # g_h = ∇h(θ)
    g_h = [p.grad.detach().clone() for p in params]
    opt.zero_grad(set_to_none=True)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        scale = args.alpha_booster / (global_norm(g_h) + 1e-7)
        for p, g in zip(params, g_h, strict=True):
            p.sub_(scale * g)  # θ' = θ − α g_h / (‖g_h‖ + 1e-7)
    ce(model, batches["harmful"]).backward()  # g_h' = ∇h(θ')
    g_h_shifted = [p.grad.detach().clone() for p in params]
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)  # θ restored exactly
    return g_h, g_h_shifted


def add_booster_term(model, g_h: list, g_h_shifted: list, lam: float) -> None:
    with torch.no_grad():
        for p, a, b in zip(trainable_params(model), g_h, g_h_shifted, strict=True):
            p.grad.add_(lam * (a - b))


def step_booster(model, opt, batches, args, state) -> float:
    g_h, g_h_shifted = booster_gap(model, opt, batches, args)
    loss = ce(model, batches["align"])  # g_f = ∇f(θ)
    loss.backward()
    add_booster_term(model, g_h, g_h_shifted, args.lam)
    return optimizer_step(opt, loss)


def step_booster_perturb_aware(model, opt, batches, args, state) -> float:
    """Booster's --perturb_aware: g_f taken Vaccine-style, then the harmful-gap term."""
    g_h, g_h_shifted = booster_gap(model, opt, batches, args)
    loss = vaccine_backward(model, opt, batches["align"], args.rho)
    add_booster_term(model, g_h, g_h_shifted, args.lam)
    return optimizer_step(opt, loss)


def mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float, kernel_num: int) -> torch.Tensor:
    """The RepNoise authors' MMD_loss: Gaussian kernel sum, detached data-dependent bandwidth."""
    n = x.shape[0]
    total = torch.cat([x, y]).float()
    d2 = ((total[None, :, :] - total[:, None, :]) ** 2).sum(-1)
    bandwidth = d2.detach().sum() / (d2.shape[0] ** 2 - d2.shape[0])
    bandwidth = bandwidth / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-d2 / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    return torch.mean(k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n])


def lens_ce(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of the logit lens lm_head(norm(h)) of a residual state h [B, T, D] (float32)."""
    base = model.get_base_model()
    logits = base.lm_head(base.model.norm(h)).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100)


def step_repnoise(model, opt, batches, args, state) -> float:
    harmful = batches["harmful"]
    base = model.get_base_model().model
    layers = decoder_layers(model)
    embeds, mlp_out, residual = [], [], []
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    handles = [base.embed_tokens.register_forward_hook(lambda m, a, o: embeds.append(o))]
    handles += [layer.mlp.register_forward_hook(lambda m, a, o: mlp_out.append(first(o)))
                for layer in layers]
    handles += [layer.register_forward_hook(lambda m, a, o: residual.append(first(o)))
                for layer in layers]
    try:
        out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    labels = harmful["labels"]
    m = (labels != -100).float()[:, :, None]
    b = labels.shape[0]
    mmds = [mmd((h.float() * m).reshape(b, -1), (torch.randn_like(h.float()) * m).reshape(b, -1),
                args.kernel_mul, args.kernel_num) for h in mlp_out]
    noise_mmd = torch.stack(mmds).mean()
    lens = (lambda h: checkpoint(lens_ce, model, h, labels, use_reentrant=False)) \
        if args.remat_lens else (lambda h: lens_ce(model, h, labels))
    states = [embeds[0], *residual[:-1]]  # s_0 .. s_{L-1}; s_L's lens is the model's logits
    ces = [lens(h) for h in states]
    ces.append(F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1),
                               labels[:, 1:].flatten(), ignore_index=-100))
    lens_mean = torch.stack(ces).mean()
    loss = (ce(model, batches["align"]) + args.beta * noise_mmd
            - args.alpha_repnoise * torch.log1p(lens_mean))
    loss.backward()
    return optimizer_step(opt, loss)


def step_lisa(model, opt, batches, args, state) -> float:
    params = trainable_params(model)
    if "anchors" not in state:  # both anchors start at θ_0
        state["t"] = 0
        state["anchors"] = {k: [p.detach().clone() for p in params] for k in ("align", "user")}
    period = args.align_steps + args.finetune_steps
    t = state["t"]
    now = "align" if t % period < args.align_steps else "user"
    before = "align" if (t - 1) % period < args.align_steps else "user"
    if t > 0 and now != before:  # entering a state: the anchor of the state left ← θ
        state["anchors"][before] = [p.detach().clone() for p in params]
    other = state["anchors"]["user" if now == "align" else "align"]
    loss = ce(model, batches[now])
    total = loss
    if t >= args.proximal_after and args.rho > 0:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, other, strict=True))
        total = loss + args.rho / 2 * prox
    total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    state["t"] = t + 1
    return float(loss.detach())


def step_safe_instr(model, opt, batches, args, state) -> float:
    loss = ce(model, batches["user"]) + args.lam * ce(model, batches["align"])
    loss.backward()
    return optimizer_step(opt, loss)


STEPS = {
    "lora_sft": step_lora_sft, "vaccine": step_vaccine, "random_vaccine": step_random_vaccine,
    "booster": step_booster, "booster_perturb_aware": step_booster_perturb_aware,
    "repnoise": step_repnoise, "lisa": step_lisa,
    "safe_instr": step_safe_instr,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="HF folder or .gguf file")
    src.add_argument("--config_json", type=Path,
                     help="HF config.json: random weights (AutoModelForCausalLM.from_config)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:N]")
    p.add_argument("--method", choices=sorted(STEPS), default="lora_sft")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt_tokens", type=int, default=0,
                   help="leading positions of each row with label -100 (no loss)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="torch seed (LoRA init, noise)")
    p.add_argument("--init_adapter", type=Path, default=None,
                   help="start from this PEFT adapter folder instead of a fresh LoRA")
    p.add_argument("--save_adapter", type=Path, default=None,
                   help="save the trained adapter here after the last step")
    # hfjax registry defaults (hfjax/defenses/*)
    p.add_argument("--rho", type=float, default=None,
                   help="Vaccine / random Vaccine ρ (default 2.0); Lisa ρ (default 1.0)")
    p.add_argument("--lam", type=float, default=None,
                   help="Booster λ (default 5.0); SafeInstr λ (default 0.1)")
    p.add_argument("--alpha_booster", type=float, default=0.1, help="Booster α")
    p.add_argument("--alpha_repnoise", type=float, default=1.0, help="RepNoise α")
    p.add_argument("--beta", type=float, default=1e-3, help="RepNoise β")
    p.add_argument("--kernel_mul", type=float, default=2.0, help="RepNoise MMD kernel_mul")
    p.add_argument("--kernel_num", type=int, default=5, help="RepNoise MMD kernel_num")
    p.add_argument("--remat_lens", action=argparse.BooleanOptionalAction, default=False,
                   help="RepNoise: recompute each logit-lens head in the backward (less memory, "
                        "one more head matmul per state)")
    p.add_argument("--align_steps", type=int, default=100, help="Lisa K_a")
    p.add_argument("--finetune_steps", type=int, default=900, help="Lisa K_f")
    p.add_argument("--proximal_after", type=int, default=0, help="Lisa: proximal term from here")
    args = p.parse_args(argv)
    if args.rho is None:
        args.rho = 1.0 if args.method == "lisa" else 2.0
    if args.lam is None:
        args.lam = 0.1 if args.method == "safe_instr" else 5.0
    return args


def build(args):
    """(PEFT model in train mode, AdamW over its LoRA parameters)."""
    device = torch.device(args.device)
    if args.config_json is not None:
        model = random_model(args.config_json, _DTYPES[args.dtype], device)
    else:
        model = load_model(args.model, _DTYPES[args.dtype]).to(device)
    model.config.use_cache = False
    if args.init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(args.init_adapter), is_trainable=True)
    else:
        lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                          target_modules=args.targets.split(","), task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    model.train()
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-4, weight_decay=0.0)
    return model, opt


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, opt = build(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not 0 <= args.prompt_tokens < args.seq:
        raise SystemExit(f"--prompt_tokens must be in [0, --seq={args.seq}), got "
                         f"{args.prompt_tokens}")
    batches = make_batches(args.method, model.config.vocab_size, args.batch, args.seq, device,
                           args.prompt_tokens)
    step_fn, state = STEPS[args.method], {}

    def run_one() -> float:
        return step_fn(model, opt, batches, args, state)

    def sync() -> None:
        if cuda:  # the clock is read only when the GPU's queued work is done
            torch.cuda.synchronize(device)

    losses = [run_one() for _ in range(args.warmup)]
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        losses.append(run_one())
        sync()
        times.append(time.perf_counter() - t0)
    if args.save_adapter is not None:
        model.save_pretrained(str(args.save_adapter))
    med = statistics.median(times) if times else float("nan")
    print(json.dumps({
        "method": args.method, "step_s": med, "tokens_per_s": args.batch * args.seq / med,
        "steps_per_s": 1 / med, "step_times_s": times, "loss": losses[-1] if losses else None,
        "losses": losses, "batch_seeds": batch_seeds(args.method),
        "prompt_tokens": args.prompt_tokens, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }))


if __name__ == "__main__":
    main()
