"""Progress bars for long loops (library code never prints)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Any]:
    """A rich progress bar on stderr; yields advance(n). Silent when stderr is not a TTY, and on
    all but the main process of a distributed launch (one bar, not one per rank)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mlproject import distributed

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=True, disable=not distributed.is_main()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
