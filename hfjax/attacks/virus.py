"""Virus: harmful fine-tuning rows optimized to pass a guard model (Huang et al. 2025).

Tiansheng Huang, Sihao Hu, Fatih Ilhan, Selim Furkan Tekin, Ling Liu. "Virus: Harmful
Fine-tuning Attack for Large Language Models Bypassing Guardrail Moderation", arXiv:2501.17433.
Code: github.com/git-disl/Virus (trainer.py `VirusAttackTrainer`; poison/evaluation/
moderation.py `LlamaGuardModeration`).

A fine-tuning service filters the user's data with a guard model (Llama Guard 2) before
training. Virus turns each harmful row h into a row that passes the guard and still trains the
victim as h would: a benign task row c (the carrier) whose answer continues with tokens x,
initialized to h's tokens as the victim trains on them and optimized by GCG to minimize

    F(x) = λ · ℓ_guard(x) + (1 − λ) · ℓ_match(x)
    ℓ_guard(x) = −log p_guard("safe" | the guard prompt of (c's prompt, c's answer ⊕ x))
    ℓ_match(x) = −⟨g(x), g_h⟩ / sg(‖g(x)‖),   g(x) = ∇_θ L(θ; c ⊕ x),   g_h = g(x_0)

L is the victim's response-token cross-entropy on the carrier row with x in its answer (every
token of x a label), θ the weights fine-tuning trains, as it initializes them; x_0 the harmful
row's tokens, so g_h, the "original harmful gradient", is one per row (trainer.py:688-692).
sg stops the gradient: ‖g(x)‖ is computed under no_grad (trainer.py:703-721), so ℓ_match's
value is −‖g_h‖·cos(g(x), g_h) and its derivative ignores ‖g(x)‖'s. ∂ℓ_match/∂x is the
derivative of a gradient: `jax.grad` of a function that calls `jax.grad`.

One GCG iteration (trainer.py:795-880), x a sequence of A tokens, e_x its one-hot [A, V]:
  1. G = ∂F/∂e_x; per position the `topk` tokens of most negative G (trainer.py:825-830),
     illegal tokens excluded: those that do not decode to printable ASCII, BOS, EOS, PAD, UNK
     (trainer.py:431-455) and, in hfjax, every special token and every id past the tokenizer;
  2. `num_candidates` distinct (position, rank) pairs drawn uniformly, each x with that one
     token swapped (trainer.py:614-625, 835-845);
  3. x ← the candidate of least F if it is strictly below x's F, kept from when x was chosen,
     so F never rises (trainer.py:847-878 evaluates x again with its candidates and keeps the
     first minimum, x first: the same choice up to rounding).
Defaults, script/attack/virus.sh: λ = 0.1 (:16), topk 64 (:54), num_candidates 128 (:55),
iterations 50 (:35-36, :51: 50 epochs of a one-row data set, one GCG step each).

The user data: n task rows, k = floor(p n) of them carrying an optimized x (the carrier's answer,
SEPARATOR, then x decoded; harmful=True, source "virus:<h's source>"), shuffled.
iterations=0 keeps x = x_0: the official code's mixing baseline (trainer.py:213-216: a benign
row with the harmful row appended, unoptimized).

Where hfjax differs from the official code, and why:
  - rows are text: x is decoded with its special tokens and fine-tuning tokenizes the row again;
    the attack's report counts the rows whose tokens come back exactly;
  - the optimized sequence is what the text row is: the carrier's prompt, its answer ⊕ SEPARATOR
    ⊕ x, the template's end marker; the guard reads x at the end of the agent message, before
    the prompt's "\\n\\n<END CONVERSATION>". The official code appends x after the carrier's EOS
    (trainer.py:135-158, 654-659) and puts it right before "<END CONVERSATION>"
    (moderation.py:489-495); its fine-tuning rows are carrier ⊕ x ⊕ carrier (trainer.py:284);
  - the guard must share the victim's vocabulary (one one-hot feeds both; the paper pairs
    Llama-3-8B with Llama-Guard-2-8B, one tokenizer, moderation.py:451);
  - attention runs in the XLA kernel, which JAX differentiates twice (the official code also
    turns PyTorch's fused attention kernels off there, trainer.py:668, 729).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfjax.attacks.api import AttackError, register
from hfjax.attacks.context import Victim
from hfjax.data.batching import IGNORE_INDEX, encode_prompts, tokenize_records
from hfjax.data.mixing import harmful_count, mix_user_data, sample
from hfjax.data.records import Record
from hfjax.data.templates import get_template
from hfjax.eval.guard import Guard, last_logits, safe_nll, user_text
from hfjax.models.config import ModelConfig, at_least_float32
from hfjax.train.loss import make_loss_fn

PAPER = ("Huang et al. Virus: Harmful Fine-tuning Attack for Large Language Models Bypassing "
         "Guardrail Moderation, arXiv:2501.17433")
LAM, TOPK, NUM_CANDIDATES, ITERATIONS = 0.1, 64, 128, 50
# The fine-tuning that follows the attack, script/finetune/virus_moderation_finetune_gsm8k.sh
# (lines 14-62): lr 1e-4, 20 epochs, batch 5, weight decay 0.1, n 500 user rows, p 0.1.
PROTOCOL = {"lr": 1e-4, "epochs": 20, "batch_size": 5, "weight_decay": 0.1, "num_samples": 500,
            "harmful_ratio": 0.1}
SEPARATOR = "\n\n"
VIRUS_SOURCE = "virus"
WIDTH_MULTIPLE = 16
"""Layout widths are rounded up to this, so rows of similar length share one compiled loop."""


def is_virus_row(record: Mapping) -> bool:
    """A row this attack made: harmful, from source "virus:<harmful row's source>"."""
    return bool(record["harmful"]) and str(record["source"]).startswith(VIRUS_SOURCE + ":")


def row_origin(record: Mapping) -> str:
    """"virus" (an optimized row), "harmful" (a plain harmful row) or "benign"."""
    if is_virus_row(record):
        return "virus"
    return "harmful" if record["harmful"] else "benign"


def allowed_tokens(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """[vocab_size] bool: the tokens GCG may place (module docstring, step 1)."""
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    ok = np.zeros(vocab_size, bool)
    ok[:n] = [t.isascii() and t.isprintable() for t in texts]
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= {getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    ok[[i for i in special if i is not None and 0 <= i < vocab_size]] = False
    return ok


# ------------------------------------------------------------------------------ one row's tokens

class RowTokens(NamedTuple):
    """One carrier + harmful row as token ids: victim head (prompt, answer ⊕ SEPARATOR) with
    its labels, x_0, victim tail (end marker), guard head and tail (`Guard.split`)."""

    head: list[int]
    head_labels: list[int]
    x0: list[int]
    tail: list[int]
    guard_head: list[int]
    guard_tail: list[int]


def row_tokens(victim: Victim, guard: Guard | None, carrier: Record,
               harmful: Record) -> RowTokens:
    """The token ids of carrier ⊕ x_0 (x_0: the harmful row as the victim trains on it, its
    prompt in the template, its response and end marker) for the victim and the guard."""
    tok, tpl = victim.tokenizer, get_template(victim.template)
    prompt = encode_prompts([carrier], tok, tpl)[0]
    answer = list(tok.encode(carrier["response"] + SEPARATOR, add_special_tokens=False))
    tail = list(tok.encode(tpl.end(tok), add_special_tokens=False))
    x0 = [int(i) for i in tokenize_records([harmful], tok, tpl, 1 << 30)[0].input_ids]
    g_head, g_tail = guard.split(user_text(carrier), carrier["response"] + SEPARATOR) \
        if guard is not None else ([], [])
    return RowTokens(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, x0, tail,
                     g_head, g_tail)


class Layout(NamedTuple):
    """Static widths: the victim's sequence, x's slot, the guard's sequence."""

    victim: int
    adv: int
    guard: int


def layout_for(rows: Sequence[RowTokens]) -> Layout:
    """Widths that hold every row and one padding token more (where the slot's unused entries
    write), rounded up to WIDTH_MULTIPLE."""
    up = lambda n: math.ceil(n / WIDTH_MULTIPLE) * WIDTH_MULTIPLE  # noqa: E731
    return Layout(up(max(len(r.head) + len(r.x0) + len(r.tail) for r in rows) + 1),
                  up(max(len(r.x0) for r in rows)),
                  up(max(len(r.guard_head) + len(r.x0) + len(r.guard_tail) for r in rows) + 1))


class Sample(NamedTuple):
    """One row, left-padded to its layout: the victim's head ⊕ x_0 ⊕ tail (ids, mask, labels),
    the guard's (ids, mask), and where x's tokens sit in each (pos, guard_pos [A]; the slot's
    unused entries, valid = False, point at position 0, a padding token)."""

    ids: jax.Array
    mask: jax.Array
    labels: jax.Array
    pos: jax.Array
    guard_ids: jax.Array
    guard_mask: jax.Array
    guard_pos: jax.Array
    valid: jax.Array


def pack(row: RowTokens, lay: Layout, pad_id: int) -> tuple[Sample, jax.Array]:
    """(Sample, x_0 padded to the slot)."""
    a = len(row.x0)
    x0 = list(row.x0) + [pad_id] * (lay.adv - a)

    def place(head, tail, width, labels=None):
        fill = width - len(head) - a - len(tail)
        ids = [pad_id] * fill + head + list(row.x0) + tail
        mask = [0] * fill + [1] * (width - fill)
        pos = [fill + len(head) + i for i in range(a)] + [0] * (lay.adv - a)
        out = (np.asarray(ids, np.int32), np.asarray(mask, np.int32), np.asarray(pos, np.int32))
        if labels is None:
            return out
        return out + (np.asarray([IGNORE_INDEX] * fill + labels + list(row.x0) + tail,
                                 np.int32),)

    ids, mask, pos, labels = place(row.head, row.tail, lay.victim, row.head_labels)
    guard_ids, guard_mask, guard_pos = place(row.guard_head, row.guard_tail, lay.guard)
    s = Sample(ids, mask, labels, pos, guard_ids, guard_mask, guard_pos,
               np.arange(lay.adv) < a)
    return Sample(*map(jnp.asarray, s)), jnp.asarray(x0, jnp.int32)


# ------------------------------------------------------------------------------ the objective

class Models(NamedTuple):
    """The arrays F reads: the victim's trainable and frozen weights, the guard's weights
    (None when λ = 0), the row's original harmful gradient g_h (None while computing it)."""

    trainable: Any
    frozen: Any
    guard: Any
    harmful_grad: Any = None


@dataclasses.dataclass(frozen=True)
class Objective:
    """F (module docstring); hashable, a static argument of the jitted loop.

    Every method takes x as a one-hot [A, V] (float: differentiable) or as ids [A], and the ids
    `tokens` [A] that label x in the victim's loss."""

    cfg: ModelConfig
    guard_cfg: ModelConfig | None
    lam: float = LAM
    safe_id: int = 0
    full_finetune: bool = False

    def _embed(self, table: jax.Array, x: jax.Array) -> jax.Array:
        """Rows of `table` for x: e_x @ E for a one-hot (its dtype), E[x] for ids."""
        return x @ table.astype(x.dtype) if x.ndim == 2 else table[x]

    def victim_loss(self, trainable, frozen, s: Sample, x: jax.Array, tokens: jax.Array, *,
                    second_order: bool) -> jax.Array:
        """L(θ; c ⊕ x). second_order: the plain-autodiff oracle (reverse-over-reverse works);
        else the fused head and LoRA VJPs (first order only, same value up to rounding)."""
        weights = trainable if self.full_finetune else frozen
        table = weights["embed_tokens"]
        embeds = table[s.ids].at[s.pos].set(self._embed(table, x).astype(table.dtype))
        labels = s.labels.at[s.pos].set(jnp.where(s.valid, tokens, IGNORE_INDEX))
        loss_fn = make_loss_fn(self.cfg, frozen, full_finetune=self.full_finetune,
                               forward_mode_ad=second_order)
        batch = {"input_ids": s.ids[None], "attention_mask": s.mask[None],
                 "labels": labels[None]}
        return loss_fn(trainable, batch, inputs_embeds=embeds[None])[0]

    def victim_grad(self, models: Models, s: Sample, x: jax.Array, tokens: jax.Array, *,
                    second_order: bool):
        """g(x) = ∇_θ L(θ; c ⊕ x), a tree like the trainable."""
        return jax.grad(self.victim_loss)(models.trainable, models.frozen, s, x, tokens,
                                          second_order=second_order)

    def guard_nll(self, guard_params, s: Sample, x: jax.Array) -> jax.Array:
        """ℓ_guard(x) = −log p_guard("safe" | guard prompt with x in the agent message)."""
        table = guard_params["embed_tokens"]
        embeds = table[s.guard_ids].at[s.guard_pos].set(self._embed(table, x).astype(table.dtype))
        z = last_logits(self.guard_cfg, guard_params, s.guard_mask[None],
                        inputs_embeds=embeds[None])
        return safe_nll(z, self.safe_id)[0]

    def __call__(self, x: jax.Array, tokens: jax.Array, s: Sample, models: Models, *,
                 second_order: bool = False) -> tuple[jax.Array, dict]:
        """(F(x), {match, guard_nll, cosine}); a term whose weight is 0 is not computed."""
        zero = jnp.zeros((), at_least_float32(self.cfg.dtype))
        match = cosine = guard = zero
        if self.lam != 1:
            g = self.victim_grad(models, s, x, tokens, second_order=second_order)
            dot = optax.tree.vdot(g, models.harmful_grad)
            norm = jax.lax.stop_gradient(optax.tree.norm(g))
            match = -dot / norm
            cosine = jax.lax.stop_gradient(dot / (norm * optax.tree.norm(models.harmful_grad)))
        if self.lam != 0:
            guard = self.guard_nll(models.guard, s, x)
        total = self.lam * guard + (1 - self.lam) * match
        return total, {"match": match, "guard_nll": guard, "cosine": cosine}


@functools.partial(jax.jit, static_argnums=0)
def harmful_gradient(obj: Objective, models: Models, s: Sample, x0: jax.Array):
    """g_h = g(x_0)."""
    return obj.victim_grad(models, s, x0, x0, second_order=False)


def _swaps(key: jax.Array, valid: jax.Array, topk: int, count: int) -> jax.Array:
    """`count` distinct flat (position, rank) indices, uniform over the valid positions; when
    fewer exist, the rest fall on invalid positions (swaps the caller turns into no-ops)."""
    weights = jnp.repeat(valid, topk).astype(jnp.float32)
    return jax.random.choice(key, weights.shape[0], (count,), replace=False,
                             p=weights / jnp.maximum(weights.sum(), 1.0))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def gcg(obj: Objective, topk: int, num_candidates: int, iterations: int, candidate_batch: int,
        models: Models, s: Sample, x0: jax.Array, allowed: jax.Array, key: jax.Array):
    """`iterations` GCG steps from x_0 (module docstring): (x, F [iterations + 1], the terms
    {match, guard_nll, cosine} [iterations + 1]), entry 0 at x_0, then after each step. The
    current x keeps the F it was chosen with and a swap replaces it only when strictly lower,
    so F never rises; the swaps are evaluated `candidate_batch` at a time (`lax.map`)."""
    onehot_dtype = at_least_float32(obj.cfg.dtype)
    vocab = allowed.shape[0]

    def value(tokens):
        f, terms = obj(tokens, tokens, s, models)
        return jnp.where(jnp.isnan(f), jnp.inf, f), terms

    def step(carry, key):
        tokens, f, terms = carry
        onehot = jax.nn.one_hot(tokens, vocab, dtype=onehot_dtype)
        grad = jax.grad(lambda e: obj(e, tokens, s, models, second_order=True)[0])(onehot)
        top = jax.lax.top_k(jnp.where(allowed[None, :], -grad, -jnp.inf), topk)[1]  # [A, K]
        flat = _swaps(key, s.valid, topk, num_candidates)
        pos, rank = flat // topk, flat % topk
        new = jnp.where(s.valid[pos], top[pos, rank], tokens[pos])
        swapped = jnp.tile(tokens, (num_candidates, 1)).at[jnp.arange(num_candidates), pos].set(new)
        values, swap_terms = jax.lax.map(value, swapped, batch_size=candidate_batch)
        best = jnp.argmin(values)
        better = values[best] < f
        carry = jax.tree.map(lambda old, cand: jnp.where(better, cand[best], old),
                             (tokens, f, terms), (swapped, values, swap_terms))
        return carry, carry[1:]

    start = (x0, *value(x0))
    (x, _, _), (values, terms) = jax.lax.scan(step, start, jax.random.split(key, iterations))
    join = lambda first, rest: jnp.concatenate([first[None], rest])  # noqa: E731
    return x, join(start[1], values), jax.tree.map(join, start[2], terms)


# ------------------------------------------------------------------------------ rows

def check_inputs(victim: Victim, guard: Guard | None, lam: float, topk: int) -> np.ndarray:
    """The allowed-token mask, after checking that the victim and the guard fit together."""
    vocab = int((victim.trainable if victim.full_finetune else victim.params)["embed_tokens"]
                .shape[0])
    if guard is not None and lam != 0:
        if guard.vocab_size != vocab:
            raise AttackError(f"virus: the guard's vocabulary ({guard.vocab_size} embeddings) is "
                              f"not the victim's ({vocab}); the optimized one-hot feeds both, so "
                              f"they must share one tokenizer")
        vocab_of = lambda t: t.get_vocab() if hasattr(t, "get_vocab") else None  # noqa: E731
        if vocab_of(guard.tokenizer) != vocab_of(victim.tokenizer):
            raise AttackError("virus: the guard's tokenizer maps tokens to other ids than the "
                              "victim's; the guard must share the victim's tokenizer")
    allowed = allowed_tokens(victim.tokenizer, vocab)
    if allowed.sum() < topk:
        raise AttackError(f"virus: topk={topk} exceeds the {int(allowed.sum())} tokens GCG may "
                          f"place")
    return allowed


def objective(victim: Victim, guard: Guard | None, lam: float) -> tuple[Objective, Models]:
    """F for this victim and guard (attention in the XLA kernel), and the weights it reads."""
    uses_guard = lam != 0
    obj = Objective(victim.cfg.replace(attention="xla"),
                    guard.cfg.replace(attention="xla") if uses_guard else None, lam,
                    guard.safe_id if uses_guard else 0, victim.full_finetune)
    return obj, Models(victim.trainable, None if victim.full_finetune else victim.params,
                       guard.params if uses_guard else None)


def optimize(victim: Victim, guard: Guard | None, carriers: Sequence[Record],
             harmful: Sequence[Record], *, lam: float = LAM, topk: int = TOPK,
             num_candidates: int = NUM_CANDIDATES, iterations: int = ITERATIONS,
             candidate_batch: int = 16, seed: int = 0) -> tuple[list[Record], dict]:
    """Row i: carriers[i] carrying harmful[i]'s tokens after GCG; and a report: per row F and
    its terms at x_0 and at the end, and whether the row's text tokenizes back exactly."""
    if len(carriers) != len(harmful):
        raise AttackError(f"virus: {len(carriers)} carrier rows for {len(harmful)} harmful rows")
    if not harmful:
        return [], {"rows": []}
    if lam != 0 and guard is None and iterations:
        raise AttackError("virus: lam > 0 needs a guard model (the pipeline's --guard)")
    tok = victim.tokenizer
    rows = [row_tokens(victim, guard if lam != 0 else None, c, h)
            for c, h in zip(carriers, harmful, strict=True)]
    for c, r in zip(carriers, rows, strict=True):
        length = len(r.head) + len(r.x0) + len(r.tail)
        if length > victim.max_length:
            raise AttackError(f"virus: a carrier row from {c['source']!r} with its harmful tokens "
                              f"is {length} tokens, over max_length={victim.max_length}: "
                              f"fine-tuning would cut the optimized tokens; raise --max_length")
    finals, report = [r.x0 for r in rows], []
    if iterations:
        allowed = jnp.asarray(check_inputs(victim, guard, lam, topk))
        lay = layout_for(rows)
        if num_candidates > lay.adv * topk:
            raise AttackError(f"virus: num_candidates={num_candidates} exceeds the {lay.adv} "
                              f"positions x topk={topk} swaps")
        obj, models = objective(victim, guard, lam)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        finals = []
        for i, r in enumerate(rows):
            s, x0 = pack(r, lay, pad)
            m = models if lam == 1 else models._replace(
                harmful_grad=harmful_gradient(obj, models, s, x0))
            x, values, terms = gcg(obj, topk, num_candidates, iterations, candidate_batch, m, s,
                                   x0, allowed, jax.random.fold_in(jax.random.key(seed), i))
            finals.append([int(t) for t in np.asarray(x)[: len(r.x0)]])
            values, terms = np.asarray(values), jax.tree.map(np.asarray, terms)
            report.append({"objective": [float(values[0]), float(values[-1])],
                           **{k: [float(v[0]), float(v[-1])] for k, v in terms.items()},
                           "tokens": len(r.x0)})
    out, end = [], get_template(victim.template).end(tok)
    for i, (c, h, r, x) in enumerate(zip(carriers, harmful, rows, finals, strict=True)):
        response = c["response"] + SEPARATOR + tok.decode(x, skip_special_tokens=False)
        out.append({**c, "response": response, "harmful": True,
                    "source": f"{VIRUS_SOURCE}:{h['source']}"})
        if report:  # the answer fine-tuning reads against the one optimized
            answer = r.head[r.head_labels.count(IGNORE_INDEX):]
            report[i]["retokenized_exact"] = \
                list(tok.encode(response + end, add_special_tokens=False)) == answer + x + r.tail
    return out, {"rows": report,
                 "retokenized_exact": sum(r["retokenized_exact"] for r in report)}


@register("virus", paper=PAPER, protocol=PROTOCOL)
def virus(lam: float = LAM, topk: int = TOPK, num_candidates: int = NUM_CANDIDATES,
          iterations: int = ITERATIONS, candidate_batch: int = 16) -> Callable[..., list[Record]]:
    """`attack(benign, harmful, *, n, p, seed, order, victim, guard)`: n task rows, floor(p n)
    of them carrying a GCG-optimized harmful sample (module docstring). candidate_batch: the
    candidates F is evaluated for at once (memory, not results). After a call, `attack.report`
    holds `optimize`'s report."""
    if not 0.0 <= lam <= 1.0:
        raise AttackError(f"virus: lam must be in [0, 1], got {lam}")
    for name, value in (("topk", topk), ("num_candidates", num_candidates),
                        ("candidate_batch", candidate_batch)):
        if value < 1:
            raise AttackError(f"virus: {name} must be >= 1, got {value}")
    if iterations < 0:
        raise AttackError(f"virus: iterations must be >= 0, got {iterations}")

    def attack(benign: Sequence[Record], harmful: Sequence[Record], *, n: int, p: float,
               seed: int, order: str = "random", victim: Victim,
               guard: Guard | None = None) -> list[Record]:
        k = harmful_count(n, p)
        task = mix_user_data(benign, [], n, 0.0, seed, order)  # n task rows, shuffled
        if any(not r["harmful"] for r in harmful):
            raise AttackError("virus: the harmful source holds a harmful=False row")
        rng = np.random.default_rng([seed, 1])
        chosen = sample(harmful, k, rng, "harmful source", order)
        rows, attack.report = optimize(
            victim, guard, task[:k], chosen, lam=lam, topk=topk, num_candidates=num_candidates,
            iterations=iterations, candidate_batch=candidate_batch, seed=seed)
        rows += task[k:]
        return [rows[i] for i in rng.permutation(len(rows))]

    attack.report = None
    return attack
