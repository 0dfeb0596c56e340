"""The base class of errors that are the user's to fix, not hfjax's.

A `UserError` says what is wrong with what was asked for or supplied: a flag, a data file, a
model folder, a run folder in use or made with other settings, a training that diverged. The
experiment binaries print its message and exit with status 1 instead of a traceback (the
traceback is shown with `-v 1` or `HFJAX_TRACEBACK=1`). Each hfjax error class also derives from
the built-in class that fits it (ValueError, FileNotFoundError, ...), so callers may catch
either.
"""


class UserError(Exception):
    """A problem with the user's input or settings; its message says what to change."""
