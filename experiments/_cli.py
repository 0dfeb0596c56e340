"""The binaries' entry point: errors the user can fix become one line and an exit status.

Defines no flags, so any binary (with its own flags) can use it.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags

from hfjax.errors import UserError

TRACEBACK_ENV = "HFJAX_TRACEBACK"
INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C


def show_tracebacks() -> bool:
    """Tracebacks of user errors are printed with -v 1 (--verbosity) or HFJAX_TRACEBACK=1."""
    verbose = flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present and \
        flags.FLAGS.verbosity >= 1
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
