"""Alignment-stage defenses (applied while aligning the base model on safety data)."""

from hfjax.defenses.alignment.booster import booster, harmful_perturbation_gap
from hfjax.defenses.alignment.booster_perturb_aware import booster_perturb_aware
from hfjax.defenses.alignment.deep_align import deep_align
from hfjax.defenses.alignment.repnoise import harmful_regularizer, repnoise, repnoise_loss
from hfjax.defenses.alignment.t_vaccine import TVaccineState, t_vaccine
from hfjax.defenses.alignment.tar import TARState, tar
from hfjax.defenses.alignment.vaccine import (
    random_perturbation,
    random_vaccine,
    vaccine,
    vaccine_perturbation,
)

__all__ = ["booster", "booster_perturb_aware", "harmful_perturbation_gap", "harmful_regularizer",
           "random_perturbation", "random_vaccine", "repnoise", "repnoise_loss", "t_vaccine",
           "TVaccineState", "vaccine",
           "vaccine_perturbation"]
__all__ += ["deep_align"]
__all__ += ["tar", "TARState"]
