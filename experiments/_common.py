"""What the pipeline binaries share: flag definitions and running stages of one run (the entry
point `run_main` is `experiments._cli`'s)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from absl import flags, logging

from hfjax.pipeline import Pipeline, report
from hfjax.pipeline import flags as pflags

pflags.define()
FLAGS = flags.FLAGS


def quiet_logs() -> None:
    """absl INFO logs (orbax writes several per checkpoint) only when -v/--verbosity is given."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run(stages: Sequence[str] | None) -> dict:
    """Run `stages` of the run the flags describe (None: all), print its table and wall time."""
    quiet_logs()
    pflags.setup_runtime()
    start = time.perf_counter()
    pipe = Pipeline(pflags.flags_from_absl())
    res = pipe.run(stages)
    if res["rows"]:
        print(report.run_table(res))
    print(f"run folder {pipe.run_dir}; wall time {time.perf_counter() - start:.1f} s")
    return res

