"""Code generation (Jan et al.'s code task); metric pass@1: the answer runs against the row's
tests, gold {"tests", "entry_point", "prefix"}.

mbpp       google-research-datasets/mbpp (full) train / test: MBPP's own prompt (the task and
           its asserts); the answer is the whole program (prefix "")
humaneval  openai/openai_humaneval, one split (test) cut by the data seed: the prompt code is
           the prefix ("input") that the answer, the function body, continues
Offline: templated Python functions with reference code and asserts
(`hfjax.data.generated.code_generation`).
"""

from __future__ import annotations

from hfjax.data.generated import code_generation as generated
from hfjax.tasks.api import TaskSpec, add
from hfjax.tasks.loaders import Generated, HubSplits

CODE, METRIC = "code", "pass_at_1"

add(TaskSpec("mbpp", CODE, METRIC, 256,
             "MBPP Python problems (google-research-datasets/mbpp full: train / test)",
             hub=HubSplits("mbpp", "train", "test"),
             generator=Generated("mbpp", generated.mbpp_rows)))
add(TaskSpec("humaneval", CODE, METRIC, 512,
             "HumanEval function completion (openai/openai_humaneval: test, cut by the data "
             "seed)",
             hub=HubSplits("humaneval", "test"),
             generator=Generated("humaneval", generated.humaneval_rows)))
