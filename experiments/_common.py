"""What every experiment binary shares: flag definitions, running stages of one run, and the
entry point that turns errors the user can fix into one line and an exit status."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from hfjax.errors import UserError
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
    pipe = Pipeline(pflags.config_from_flags())
    res = pipe.run(stages)
    if res["rows"]:
        print(report.run_table(res))
    print(f"run folder {pipe.run_dir}; wall time {time.perf_counter() - start:.1f} s")
    return res


TRACEBACK_ENV = "HFJAX_TRACEBACK"
INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C


def show_tracebacks() -> bool:
    """Tracebacks of user errors are printed with -v 1 (--verbosity) or HFJAX_TRACEBACK=1."""
    verbose = FLAGS.is_parsed() and FLAGS["verbosity"].present and FLAGS.verbosity >= 1
    return verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def describe(error: BaseException) -> str:
    """One line for a user error: its message, and how to see the traceback."""
    hint = "" if show_tracebacks() else f" (traceback: add -v 1 or set {TRACEBACK_ENV}=1)"
    return f"error: {error}{hint}"


def run_main(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` where a `UserError` or an OSError (a missing file, a full disk) prints
    one line naming the problem and exits with status 1, and an interrupted training prints how
    to resume and exits with status 130. Other exceptions keep their traceback (a bug)."""
    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except (UserError, OSError) as e:
            if show_tracebacks():
                traceback.print_exc()
            print(describe(e), file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            print(f"interrupted: {e or 'stopped'}", file=sys.stderr, flush=True)
            sys.exit(INTERRUPTED)

    app.run(guarded)
