"""Fine-tuning-stage defenses (applied while fine-tuning on the user's data)."""

from hfjax.defenses.finetune.bea import bea, bea_eval_prompt, bea_secret
from hfjax.defenses.finetune.constrained_sft import ConstrainedSFTState, constrained_sft
from hfjax.defenses.finetune.guard_filter import guard_filter
from hfjax.defenses.finetune.ldifs import LDIFSState, ldifs
from hfjax.defenses.finetune.lisa import LisaState, in_alignment, lisa, phase_index
from hfjax.defenses.finetune.multitask_safety import multitask_safety
from hfjax.defenses.finetune.panacea import PanaceaState, panacea, panacea_final
from hfjax.defenses.finetune.paraphrase import paraphrase
from hfjax.defenses.finetune.ptst import ptst, ptst_eval_prompt
from hfjax.defenses.finetune.safe_instr import safe_instr, safe_instr_mix
from hfjax.defenses.finetune.salora import SaLoRAState, salora, salora_chain

__all__ = ["LisaState", "in_alignment", "lisa", "multitask_safety", "panacea",
           "panacea_final", "PanaceaState", "paraphrase", "phase_index",
           "safe_instr", "safe_instr_mix"]
__all__ += ["ConstrainedSFTState", "constrained_sft", "LDIFSState", "ldifs", "SaLoRAState",
            "salora", "salora_chain"]
__all__ += ["bea", "bea_eval_prompt", "bea_secret", "ptst", "ptst_eval_prompt"]
__all__ += ["guard_filter"]
