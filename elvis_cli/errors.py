"""User-facing errors: the CLI prints their message on one line and exits with their code.

Library code raises these for anything a user can fix (bad input, missing files, mismatched
models); everything else is a bug and is allowed to show a traceback.
"""

EXIT_OK = 0
EXIT_ERROR = 1  # the command could not do its job (bad input, missing file, mismatch)
EXIT_USAGE = 2  # bad command-line usage (typer/click's own code)
EXIT_PARTIAL = 3  # the job finished, but some inputs were skipped (e.g. unreadable images)


class ElvisError(Exception):
    """An error with a message meant for the user, printed without a traceback."""

    exit_code = EXIT_ERROR


class InputError(ElvisError):
    """An input file, folder or option that cannot be used as given."""


class ModelMismatchError(ElvisError):
    """Features and a checkpoint that do not belong together (backbone or dimension)."""


class OfflineError(ElvisError):
    """Something must be downloaded but the network cannot be reached."""
