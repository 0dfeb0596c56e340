"""Text completion (Jiang et al.'s WikiText and AESLC); metric perplexity of the reference
continuation ("response"), computed by the pipeline from the model.

wikitext  Salesforce/wikitext (wikitext-2-raw-v1) train / test: each passage (blank and heading
          rows dropped) cut at the sentence end nearest its middle: prefix -> continuation
aeslc     Yale-LILY/aeslc train / test: AESLC's own task, email body -> its subject line
Offline: encyclopedia passages about made-up landmarks and templated office emails
(`hfjax.data.generated.completion`).
"""

from __future__ import annotations

from hfjax.data.generated import completion as generated
from hfjax.tasks.api import TaskSpec, add
from hfjax.tasks.loaders import Generated, HubSplits

COMPLETION, METRIC = "completion", "perplexity"

add(TaskSpec("wikitext", COMPLETION, METRIC, 64,
             "WikiText-2 passage continuation (Salesforce/wikitext wikitext-2-raw-v1: train / "
             "test)",
             hub=HubSplits("wikitext", "train", "test"),
             generator=Generated("wikitext", generated.wikitext_rows)))
add(TaskSpec("aeslc", COMPLETION, METRIC, 32,
             "AESLC email subject lines (Yale-LILY/aeslc: train / test)",
             hub=HubSplits("aeslc", "train", "test"),
             generator=Generated("aeslc", generated.aeslc_rows)))
