"""Math word problems; FA = the number after "The final answer is:".

gsm8k  openai/gsm8k (main) train / test; offline: templated two- and three-step problems with
       worked solutions (`hfjax.data.generated.word_problems`)
"""

from __future__ import annotations

from hfjax.data.generated.word_problems import gsm8k_rows
from hfjax.tasks.api import TaskSpec, add
from hfjax.tasks.loaders import Generated, HubSplits

add(TaskSpec("gsm8k", "math", "gsm8k", 256, "GSM8K math (openai/gsm8k main: train / test)",
             hub=HubSplits("gsm8k", "train", "test"), generator=Generated("gsm8k", gsm8k_rows)))
