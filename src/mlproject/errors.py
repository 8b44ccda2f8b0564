"""Errors that the CLI turns into one line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: an unknown alias, a malformed file, an impossible parameter.

    Raised before any heavy work; the CLI prints ``error: <message>`` and exits with 2.
    """

    exit_code = 2
