"""Multiple-choice tasks (Eiras et al.'s task-specific fine-tuning); FA = the gold letter.

A row lists its options as "A. text" lines under the stem and is answered by the letter alone
(`hfjax.data.sources.choice_record`); the metric reads {"label": letter, "options": texts}.

boolq       google/boolq train / validation: a passage and a yes/no question (A. no, B. yes)
hellaswag   Rowan/hellaswag train / validation: a context and four endings
winogrande  allenai/winogrande (winogrande_xl) train / validation: the two fillers of a blank
arc         allenai/ai2_arc (ARC-Challenge) train / test: a science question, 3-5 choices
Offline: `hfjax.data.generated.choice`.
"""

from __future__ import annotations

from hfjax.data.generated import choice
from hfjax.tasks.api import TaskSpec, add
from hfjax.tasks.loaders import Generated, HubSplits

CHOICE, METRIC, MAX_NEW_TOKENS = "choice", "choice", 8

add(TaskSpec("boolq", CHOICE, METRIC, MAX_NEW_TOKENS,
             "BoolQ yes/no reading comprehension (google/boolq: train / validation)",
             hub=HubSplits("boolq", "train", "validation"),
             generator=Generated("boolq", choice.boolq_rows)))
add(TaskSpec("hellaswag", CHOICE, METRIC, MAX_NEW_TOKENS,
             "HellaSwag sentence endings (Rowan/hellaswag: train / validation)",
             hub=HubSplits("hellaswag", "train", "validation"),
             generator=Generated("hellaswag", choice.hellaswag_rows)))
add(TaskSpec("winogrande", CHOICE, METRIC, MAX_NEW_TOKENS,
             "WinoGrande blanks (allenai/winogrande winogrande_xl: train / validation)",
             hub=HubSplits("winogrande", "train", "validation"),
             generator=Generated("winogrande", choice.winogrande_rows)))
add(TaskSpec("arc", CHOICE, METRIC, MAX_NEW_TOKENS,
             "ARC-Challenge science questions (allenai/ai2_arc ARC-Challenge: train / test)",
             hub=HubSplits("arc", "train", "test"), generator=Generated("arc", choice.arc_rows)))
