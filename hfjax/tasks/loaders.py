"""The two kinds of task loader, each `(data_seed) -> (train, test)` records.

HubSplits  a named source (`hfjax.data.sources`) read through `datasets`, from the hub or from
           local files in the hub's schema: its train and test splits, or, for a dataset with
           one split, a test part cut from it by the data seed;
Generated  hfjax's offline generator: a deterministic pool of rows in the hub's schema,
           converted by the same source format, then split by the data seed.

A cut is disjoint by prompt key (`hfjax.data.records.prompt_key`): rows sharing a key go to the
same side, so a dataset's duplicate items never leak from train into test.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from hfjax.data.records import DataError, Record, prompt_key
from hfjax.data.sources import SOURCES, convert_rows, load_source

TEST_SHARE = 0.2


def split_by_key(records: list[Record], test_share: float, seed: int
                 ) -> tuple[list[Record], list[Record]]:
    """(train, test): the distinct prompt keys in a seeded order, the first
    ceil(test_share * keys) of them (every row holding one) the test part; rows keep their
    order within each part."""
    keys = list(dict.fromkeys(prompt_key(r) for r in records))
    if not 0 < test_share < 1 or len(keys) < 2:
        raise DataError(f"cannot cut a test share of {test_share} from {len(keys)} distinct "
                        "prompts")
    order = np.random.default_rng([seed, 2]).permutation(len(keys))
    test_keys = {keys[i] for i in order[:min(math.ceil(test_share * len(keys)), len(keys) - 1)]}
    test = [r for r in records if prompt_key(r) in test_keys]
    return [r for r in records if prompt_key(r) not in test_keys], test


@dataclasses.dataclass(frozen=True)
class HubSplits:
    """A named source's train and test splits (`test` None: cut from train by the seed)."""

    source: str
    train: str
    test: str | None = None
    test_share: float = TEST_SHARE

    def __post_init__(self):
        if self.source not in SOURCES:
            raise DataError(f"unknown data source {self.source!r}")

    def __call__(self, data_seed: int) -> tuple[list[Record], list[Record]]:
        train = load_source(self.source, self.train)
        if self.test is None:
            return split_by_key(train, self.test_share, data_seed)
        return train, load_source(self.source, self.test)

    def from_files(self, data_seed: int, train: str | os.PathLike,
                   test: str | os.PathLike | None = None) -> tuple[list[Record], list[Record]]:
        """The same from local files in the hub's schema (JSON/JSONL/CSV/parquet)."""
        rows = load_source(self.source, path=train)
        if test is None:
            return split_by_key(rows, self.test_share, data_seed)
        return rows, load_source(self.source, path=test)


@dataclasses.dataclass(frozen=True)
class Generated:
    """An offline generator: `rows()` gives the full pool in source `source`'s hub schema; its
    records carry source "offline_<source>"; the test part is `test_share` of the pool."""

    source: str
    rows: Callable[[], list[dict[str, Any]]]
    test_share: float = TEST_SHARE

    def pool(self) -> list[Record]:
        records = convert_rows(self.source, self.rows(), f"generated {self.source} rows")
        keys = {prompt_key(r) for r in records}
        if len(keys) != len(records):
            raise AssertionError(f"generated {self.source} rows are not distinct ({len(keys)} "
                                 f"prompts in {len(records)} rows)")
        return [{**r, "source": f"offline_{self.source}"} for r in records]

    def __call__(self, data_seed: int) -> tuple[list[Record], list[Record]]:
        return split_by_key(self.pool(), self.test_share, data_seed)
