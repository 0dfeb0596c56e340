"""SafeInstr / VLGuard: safety data during fine-tuning, mixed in or as a weighted extra loss.

Federico Bianchi, Mirac Suzgun, Giuseppe Attanasio, Paul Röttger, Dan Jurafsky, Tatsunori
Hashimoto, James Zou. "Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language
Models that Follow Instructions". ICLR 2024, arXiv:2309.07875 (SafeInstr: mixing).
Yongshuo Zong, Ondrej Bohdal, Tingyang Yu, Yongxin Yang, Timothy Hospedales. "Safety Fine-Tuning
at (Almost) No Cost: A Baseline for Vision Large Language Models". ICML 2024, arXiv:2402.02207
(VLGuard; the git-disl code base runs it as the weighted loss below).

Mixing form (data level, 1F+1B): `guide_data_num` safety rows replace as many benign rows of
the user data (the total stays n, as git-disl's `normal_num = (1 − p) n − guide_data_num`).

Weighted form (gradient level): every step minimizes

    L(θ) = g(θ; "user") + λ · f(θ; "align")          ∇L = ∇g + λ ∇f

The step's own pass gives ∇g on "user"; the transform adds λ ∇f on "align", a batch of
`align_batch_size` = 4 rows as the official trainer's (the pipeline reads it from the step
options). Cost 2F+2B: the paper's code calls backward() once on g + λf (its "2F+1B"), but that
backward traverses both batches' graphs; in JAX, differentiating g + λf in one `value_and_grad`
runs exactly the same two forward and two reversed layer scans as two gradients summed, so a
separate oracle call costs nothing more and keeps the transform the same in any training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Unpack

import jax
import numpy as np
import optax

from hfjax.data.mixing import sample
from hfjax.data.records import Record
from hfjax.defenses.api import (
    ALIGN,
    USER,
    Cost,
    DefenseError,
    Hints,
    StepOptions,
    check_update,
    register,
)

PAPER = ("Bianchi et al. Safety-Tuned LLaMAs, ICLR 2024, arXiv:2309.07875; Zong et al. VLGuard: "
         "Safety Fine-Tuning at (Almost) No Cost, ICML 2024, arXiv:2402.02207")


def _options(lam: float, align_batch_size: int) -> StepOptions:
    return StepOptions(primary=USER, batch_sizes=((ALIGN, align_batch_size),))


@register("safe_instr", stage="finetune", level="gradient", cost=Cost(2, 2),
          batches=(USER, ALIGN), paper=PAPER, options=_options)
def safe_instr(lam: float = 0.1,
               align_batch_size: int = 4) -> optax.GradientTransformationExtraArgs:
    """∇g + λ ∇f(θ; "align"), the incoming gradient being ∇g on the "user" batch."""
    if not lam >= 0:
        raise DefenseError(f"safe_instr's lam must be >= 0, got {lam}")
    if align_batch_size < 1:
        raise DefenseError(f"safe_instr's align_batch_size must be >= 1, got {align_batch_size}")

    def update_fn(updates, state, params=None, *, loss_fn=None, batches=None, rng=None,
                  **hints: Unpack[Hints]):
        del rng, hints
        check_update("safe_instr", params, loss_fn, batches, (ALIGN,))
        g_f = jax.grad(lambda p: loss_fn(p, batches[ALIGN])[0])(params)
        return optax.tree.add_scale(updates, lam, g_f), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


@register("safe_instr_mix", stage="finetune", level="data", cost=Cost(1, 1), batches=(USER,),
          paper=PAPER)
def safe_instr_mix(guide_data_num: int = 100,
                   seed: int = 0) -> Callable[[Sequence[Record], Sequence[Record]], list[Record]]:
    """`mix(user, safety) -> user'`: `guide_data_num` safety rows replace benign user rows.

    Which benign rows leave and which safety rows come in are drawn with `seed`; the result is
    shuffled and has len(user) rows; harmful user rows are all kept.
    """
    n = guide_data_num
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DefenseError(f"guide_data_num must be a non-negative integer, got {n!r}")

    def mix(user: Sequence[Record], safety: Sequence[Record]) -> list[Record]:
        benign = [i for i, r in enumerate(user) if not r["harmful"]]
        if guide_data_num > len(benign):
            raise DefenseError(f"cannot replace {guide_data_num} benign rows: the user data has "
                               f"only {len(benign)}")
        if any(r["harmful"] for r in safety):
            raise DefenseError("safety rows must be harmful=False (harmful prompt -> refusal)")
        rng = np.random.default_rng(seed)
        drop = set(rng.choice(benign, size=guide_data_num, replace=False).tolist())
        rows = [r for i, r in enumerate(user) if i not in drop]
        rows += sample(safety, guide_data_num, rng, "safety source")
        return [rows[i] for i in rng.permutation(len(rows))]

    return mix
