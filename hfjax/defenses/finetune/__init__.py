"""Fine-tuning-stage defenses (applied while fine-tuning on the user's data)."""

from hfjax.defenses.finetune.lisa import LisaState, in_alignment, lisa, phase_index
from hfjax.defenses.finetune.multitask_safety import multitask_safety
from hfjax.defenses.finetune.paraphrase import paraphrase
from hfjax.defenses.finetune.safe_instr import safe_instr, safe_instr_mix

__all__ = ["LisaState", "in_alignment", "lisa", "multitask_safety", "paraphrase", "phase_index",
           "safe_instr", "safe_instr_mix"]
