"""HFT: the harmful fine-tuning attack of the protocol (Huang et al. survey; the git-disl code
base's Vaccine/Lisa/Booster experiments).

The user's data are n rows of which k = floor(p · n) are harmful (harmful prompt -> harmful
answer) and n − k benign task rows, shuffled (`hfjax.data.mixing.mix_user_data`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hfjax.attacks.api import register
from hfjax.data.mixing import mix_user_data
from hfjax.data.records import Record

PAPER = ("Huang et al. 2024, Harmful Fine-tuning Attacks and Defenses for Large Language Models: "
         "A Survey, arXiv:2409.18169")


@register("hft", paper=PAPER)
def hft() -> Callable[..., list[Record]]:
    """`attack(benign, harmful, *, n, p, seed, order)`: n rows, floor(p n) of them harmful."""
    def attack(benign: Sequence[Record], harmful: Sequence[Record], *, n: int, p: float,
               seed: int, order: str = "random") -> list[Record]:
        return mix_user_data(benign, harmful, n, p, seed, order)

    return attack
