"""Defenses against harmful fine-tuning: data, gradient (optax) and weight transforms.

    import optax, hfjax.defenses as defenses
    opt = optax.chain(defenses.vaccine(rho=2.0), optax.adamw(1e-3))     # any optax optimizer
    u, s = opt.update(g, s, θ, loss_fn=loss_fn, batches=batches, rng=key)  # + optional Hints
    spec = defenses.get("lisa"); tx = spec.build(rho=1.0)               # by name, from flags
    step_kwargs = spec.step_options(rho=1.0).step_kwargs()  # what hfjax.train.builder asks

Importing this package registers every method (`available()` lists them).
"""

from hfjax.defenses.alignment import (
    booster,
    booster_perturb_aware,
    harmful_perturbation_gap,
    random_perturbation,
    random_vaccine,
    repnoise,
    repnoise_loss,
    vaccine,
    vaccine_perturbation,
)
from hfjax.defenses.api import (
    ALIGN,
    HARMFUL,
    HINTS,
    LEVELS,
    STAGES,
    USER,
    Cost,
    CostOf,
    DefenseError,
    DefenseSpec,
    Hints,
    StepOptions,
    available,
    get,
    register,
    step_options,
)
from hfjax.defenses.finetune import (
    LisaState,
    in_alignment,
    lisa,
    phase_index,
    safe_instr,
    safe_instr_mix,
)
from hfjax.defenses.inference import onion_filter
from hfjax.defenses.post import antidote, safelora

__all__ = [
    "ALIGN", "HARMFUL", "HINTS", "LEVELS", "STAGES", "USER", "antidote", "available", "booster",
    "booster_perturb_aware", "Cost", "CostOf", "DefenseError", "DefenseSpec", "get",
    "harmful_perturbation_gap", "Hints", "in_alignment", "lisa", "LisaState", "onion_filter",
    "phase_index", "random_perturbation", "random_vaccine", "register", "repnoise",
    "repnoise_loss", "safe_instr", "safe_instr_mix", "safelora", "step_options", "StepOptions",
    "vaccine", "vaccine_perturbation",
]
