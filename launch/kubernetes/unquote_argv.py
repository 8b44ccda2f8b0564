#!/usr/bin/env python3
"""`unquote-argv PROGRAM ARGS...`: run PROGRAM with the arguments MLflow's kubernetes backend meant.

MLflow's kubernetes backend (mlflow/projects/kubernetes.py, `_get_run_command`) splits the entry
point's shell command into words and then shell-quotes each word again before writing them as the
container's exec-form `command`. No shell ever reads that list, so a value that needed quoting
reaches the program with its quotes: `-P set="a=1 b=2"` arrives as the one argument `'a=1 b=2'`,
quotes included, and an empty value as `''`. This wrapper, baked into the image as
/usr/local/bin/unquote-argv (launch/kubernetes/Dockerfile) and named first in every command of
launch/kubernetes/MLproject, undoes exactly that: an argument that is `shlex.quote(x)` of some x
becomes x again; any other argument passes unchanged (so the same command also works under the
local docker backend, where bash has already removed the quotes). Then it execs PROGRAM.

It imports nothing but the standard library: it runs before anything else in the container.
"""

from __future__ import annotations

import os
import shlex
import sys


def unquote(word: str) -> str:
    """The argument `shlex.quote` turned into `word`, or `word` itself when it is no such quoting."""
    try:
        parts = shlex.split(word)
    except ValueError:  # an unbalanced quote: not something shlex.quote wrote
        return word
    if len(parts) == 1 and shlex.quote(parts[0]) == word:
        return parts[0]
    return word


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: unquote-argv PROGRAM [ARGS...]\n")
        return 2
    args = [unquote(a) for a in argv]
    os.execvp(args[0], args)
    return 127  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
