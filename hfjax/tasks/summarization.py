"""Summarization tasks (Jiang et al.'s BillSum and XSum; CNN/DailyMail); metric ROUGE against
the reference summary ("response").

xsum           EdinburghNLP/xsum train / test: one-sentence summaries of BBC articles
billsum        FiscalNote/billsum train / test: summaries of US Congressional bills
cnn_dailymail  abisee/cnn_dailymail (3.0.0) train / test: news highlights
Offline: documents about made-up landmarks whose summaries state their key facts
(`hfjax.data.generated.summarization`).
"""

from __future__ import annotations

from hfjax.data.generated import summarization as generated
from hfjax.tasks.api import TaskSpec, add
from hfjax.tasks.loaders import Generated, HubSplits

SUMMARIZATION, METRIC = "summarization", "rouge"

add(TaskSpec("xsum", SUMMARIZATION, METRIC, 64,
             "XSum one-sentence summaries (EdinburghNLP/xsum: train / test)",
             hub=HubSplits("xsum", "train", "test"),
             generator=Generated("xsum", generated.xsum_rows)))
add(TaskSpec("billsum", SUMMARIZATION, METRIC, 256,
             "BillSum bill summaries (FiscalNote/billsum: train / test)",
             hub=HubSplits("billsum", "train", "test"),
             generator=Generated("billsum", generated.billsum_rows)))
add(TaskSpec("cnn_dailymail", SUMMARIZATION, METRIC, 128,
             "CNN/DailyMail highlights (abisee/cnn_dailymail 3.0.0: train / test)",
             hub=HubSplits("cnn_dailymail", "train", "test"),
             generator=Generated("cnn_dailymail", generated.cnn_dailymail_rows)))
