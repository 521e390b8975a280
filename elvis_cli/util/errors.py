"""User-facing errors: the CLI prints their message on one line and exits with their code.

Library code raises these for anything a user can fix (bad input, missing files, mismatched
models); everything else is a bug and is allowed to show a traceback.
"""

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_ERROR = 1  # the command could not do its job (bad input, missing file, mismatch)
EXIT_USAGE = 2  # bad command-line usage (typer/click's own code)
EXIT_PARTIAL = 3  # the job finished, but some inputs were skipped (e.g. unreadable images)
EXIT_DISK_FULL = 4  # no space left: finished work is kept, re-run the command after freeing space


class ElvisError(Exception):
    """An error with a message meant for the user, printed without a traceback."""

    exit_code = EXIT_ERROR


class InputError(ElvisError):
    """An input file, folder or option that cannot be used as given."""


class ModelMismatchError(ElvisError):
    """Features and a checkpoint that do not belong together (backbone or dimension)."""


class OfflineError(ElvisError):
    """Something must be downloaded but the network cannot be reached."""


class DiskFullError(ElvisError):
    """The disk filled up; everything finished before is intact and a re-run resumes."""

    exit_code = EXIT_DISK_FULL


class ElvisWarning(UserWarning):
    """Something a user should know that did not stop the job; the CLI prints it on one line."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> InputError:
    """The error for a misspelt name: the closest known one as a suggestion, then all of them."""
    names = list(known)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputError(f"unknown {kind} {name!r}{hint}; known: {', '.join(names)}")
