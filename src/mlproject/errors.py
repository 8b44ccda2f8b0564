"""Errors that the CLI turns into one line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: an unknown alias, a malformed file, an impossible parameter.

    Raised before any heavy work; the CLI prints ``error: <message>`` and exits with 2.
    """

    exit_code = 2


class StepFailed(RuntimeError):
    """A step failed for a reason the user can act on (e.g. training diverged).

    The run is already marked FAILED with the message; the CLI prints one line and exits 1
    (the traceback only with -v).
    """

    exit_code = 1
