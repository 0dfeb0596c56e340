"""Translation (Jan et al.'s English -> French task); metric BLEU / chrF against the reference
("response").

wmt14_en_fr  wmt/wmt14 (fr-en): the first TRAIN_ROWS pairs of train (of 40.8M) / test
             (newstest2014); offline: sentences composed from an English-French phrase table
             (`hfjax.data.generated.translation`)
"""

from __future__ import annotations

from hfjax.data.generated.translation import wmt14_en_fr_rows
from hfjax.tasks.api import TaskSpec, add
from hfjax.tasks.loaders import Generated, HubSplits

TRAIN_ROWS = 10_000

add(TaskSpec("wmt14_en_fr", "translation", "translation", 128,
             f"WMT14 English -> French (wmt/wmt14 fr-en: train[:{TRAIN_ROWS}] / test)",
             hub=HubSplits("wmt14_en_fr", f"train[:{TRAIN_ROWS}]", "test"),
             generator=Generated("wmt14_en_fr", wmt14_en_fr_rows)))
