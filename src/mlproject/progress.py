"""Progress of long work: a rich bar on a terminal, periodic log lines everywhere else.

The one place that shows progress (library code never prints). Every phase that can take
more than a few seconds reports here:

* ``progress(description, total)`` — a loop of known length (PPL windows, pipeline steps);
  yields ``advance(n=1)``.
* ``phase(description)`` — work of unknown length (loading a model, the one-time GGUF
  conversion): elapsed time, and heartbeat lines while it lasts.
* ``task(...)`` — the same as an object (``advance`` / ``update`` / ``close``), for callbacks
  (training steps through a ``TrainerCallback``).
* ``route_tqdm(...)`` — the libraries' own tqdm bars (lm-eval's request loops, transformers'
  weight loading, the GGUF dequantization) report here instead of writing to stderr.

Where it goes (``MLPROJECT_PROGRESS``): ``auto`` (default) is ``rich`` when stderr is a
terminal, else ``log``; ``off`` shows nothing.

* ``rich``: one live display on stderr holding every open task: description, bar, done/total,
  elapsed and time remaining. The remaining time is elapsed × (total − done) / done over the
  whole task, not rich's default 30-second speed window, so it shows even when one step (a
  2048-token PPL window of a 7B model on CPU) takes minutes.
* ``log``: for CI, ``mlflow run`` logs, ``nohup``: an INFO line on logger ``mlproject.progress``
  every ``MLPROJECT_PROGRESS_INTERVAL`` seconds (default 15) per open task — done/total, percent,
  elapsed, ETA — written even while a single step is still running, and a closing line
  ("done in …") for tasks that lasted at least one interval. Interval 0 logs every update.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

MODES = ("auto", "rich", "log", "off")
DEFAULT_INTERVAL = 15.0


def mode() -> str:
    """The effective mode: rich, log or off (off on all but the main process of a distributed
    launch: one report, not one per rank)."""
    from mlproject import distributed

    if not distributed.is_main():
        return "off"
    value = os.environ.get("MLPROJECT_PROGRESS", "auto").strip().lower() or "auto"
    if value not in MODES:
        log.warning("MLPROJECT_PROGRESS=%r is not one of %s; using auto", value, ", ".join(MODES))
        value = "auto"
    if value == "auto":
        try:
            return "rich" if sys.stderr.isatty() else "log"
        except (AttributeError, ValueError):  # a closed or replaced stderr
            return "log"
    return value


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("MLPROJECT_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float | None) -> str:
    """0:07, 1:05:09 — as rich shows times."""
    if seconds is None:
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(elapsed: float, completed: float, total: float | None) -> float | None:
    """Time left at the task's average rate so far (None until one unit is done)."""
    if not total or completed <= 0 or elapsed <= 0:
        return None
    return elapsed * max(total - completed, 0) / completed


class Task:
    """One piece of work being reported. ``total`` None: unknown length (a phase)."""

    def __init__(self, reporter: "_Reporter", description: str, total: float | None, unit: str,
                 clock: Callable[[], float]):
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.clock = clock
        self.completed = 0.0
        self.postfix = ""
        self.start = clock()
        self.last_line = self.start
        self.lines = 0
        self.closed = False
        self.handle: Any = None  # the reporter's own id for it

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def eta(self) -> float | None:
        return eta_seconds(self.elapsed, self.completed, self.total)

    def advance(self, n: float = 1) -> None:
        self.update(completed=self.completed + n)

    def update(self, completed: float | None = None, total: float | None = None,
               description: str | None = None, postfix: str | None = None) -> None:
        if self.closed:
            return
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        if postfix is not None:
            self.postfix = postfix
        self.reporter.update(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.reporter.close(self)

    def line(self, done: bool = False) -> str:
        """The log line: ``perplexity (offline): 3/8 windows (38%) · 0:45 elapsed · ETA 1:15``."""
        unit = f" {self.unit}" if self.unit else ""
        head = f"{self.description}: "
        if self.total:
            count = f"{_num(self.completed)}/{_num(self.total)}{unit} ({100 * self.completed / self.total:.0f}%)"
        else:
            count = f"{_num(self.completed)}{unit}" if self.completed else ""
        bits = [count] if count else []
        if done:
            bits.append(f"done in {duration(self.elapsed)}")
        else:
            bits.append(f"{duration(self.elapsed)} elapsed")
            if self.total:
                eta = self.eta()
                bits.append(f"ETA {duration(eta)}" if eta is not None else "ETA unknown until the first step ends")
        if self.postfix:
            bits.append(self.postfix)
        return head + " · ".join(bits)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


class _Reporter:
    def open(self, task: Task) -> None: ...
    def update(self, task: Task) -> None: ...
    def close(self, task: Task) -> None: ...


class _Off(_Reporter):
    pass


class _LogReporter(_Reporter):
    """Periodic INFO lines; a daemon thread writes them even while a step is running."""

    def __init__(self, every: float, logger: logging.Logger | None = None):
        self.every = every
        self.logger = logger or log
        self.tasks: list[Task] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _emit(self, task: Task, done: bool = False) -> None:
        task.lines += 1
        task.last_line = task.clock()
        self.logger.info("%s", task.line(done=done))

    def _due(self, task: Task) -> bool:
        return task.clock() - task.last_line >= self.every

    def open(self, task: Task) -> None:
        with self.lock:
            self.tasks.append(task)
            if self.every > 0 and (self.thread is None or not self.thread.is_alive()):
                self.stop = threading.Event()
                self.thread = threading.Thread(target=self._tick, args=(self.stop,), name="progress-log",
                                               daemon=True)
                self.thread.start()

    def update(self, task: Task) -> None:
        with self.lock:
            if self._due(task):
                self._emit(task)

    def close(self, task: Task) -> None:
        with self.lock:
            if task in self.tasks:
                self.tasks.remove(task)
            if task.lines or task.elapsed >= self.every:
                self._emit(task, done=True)
            if not self.tasks:
                self.stop.set()

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(min(self.every, 1.0)):
            with self.lock:
                for task in list(self.tasks):
                    if self._due(task):
                        self._emit(task)


class _RichReporter(_Reporter):
    """One live rich display for all open tasks (rich allows one at a time)."""

    def __init__(self, console=None, get_time: Callable[[], float] | None = None):
        self.console = console
        self.get_time = get_time
        self.progress = None
        self.count = 0
        self.lock = threading.RLock()

    def _make(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        kwargs = {"get_time": self.get_time} if self.get_time else {}
        return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), EtaColumn(),
                        TextColumn("{task.fields[postfix]}"),
                        console=self.console or console(), transient=True, **kwargs)

    def open(self, task: Task) -> None:
        with self.lock:
            if self.progress is None:
                self.progress = self._make()
                self.progress.start()
            self.count += 1
            task.handle = self.progress.add_task(task.description, total=task.total, unit=task.unit,
                                                 postfix=task.postfix)

    def update(self, task: Task) -> None:
        with self.lock:
            if self.progress is not None and task.handle is not None:
                self.progress.update(task.handle, completed=task.completed, total=task.total,
                                     description=task.description, postfix=task.postfix)

    def close(self, task: Task) -> None:
        with self.lock:
            if self.progress is None or task.handle is None:
                return
            self.progress.remove_task(task.handle)
            self.count -= 1
            if self.count <= 0:
                self.progress.stop()
                self.progress = None
                self.count = 0


def EtaColumn():  # noqa: N802 - a rich column class, built lazily so importing this module stays cheap
    from rich.progress import ProgressColumn
    from rich.text import Text

    class _Eta(ProgressColumn):
        """Time remaining from the task's average rate since its start (see the module docstring)."""

        def render(self, task) -> Text:
            if task.total is None:
                return Text("")
            if task.finished:
                return Text("ETA 0:00", style="progress.remaining")
            eta = eta_seconds(task.elapsed or 0.0, task.completed, task.total)
            return Text(f"ETA {duration(eta)}" if eta is not None else "ETA -:--", style="progress.remaining")

    return _Eta()


_REPORTER: _Reporter | None = None
_REPORTER_KEY: tuple | None = None
_CONSOLE = None
_LOCK = threading.Lock()


def console():
    """The rich console on stderr that bars and (in the CLI) log lines share."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def reporter() -> _Reporter:
    """The reporter for the current mode (rebuilt when MLPROJECT_PROGRESS* changes)."""
    global _REPORTER, _REPORTER_KEY
    key = (mode(), interval())
    with _LOCK:
        if _REPORTER is None or _REPORTER_KEY != key:
            kind, every = key
            _REPORTER = {"rich": lambda: _RichReporter(), "log": lambda: _LogReporter(every)}.get(kind, _Off)()
            _REPORTER_KEY = key
        return _REPORTER


def task(description: str, total: float | None = None, unit: str = "") -> Task:
    """An open task; call ``close()`` when done (``progress``/``phase`` do it for you)."""
    rep = reporter()
    t = Task(rep, description, total, unit, time.monotonic)
    rep.open(t)
    return t


@contextlib.contextmanager
def progress(description: str, total: float | None, unit: str = "") -> Iterator[Callable[..., None]]:
    """A loop of ``total`` units; yields ``advance(n=1)``."""
    t = task(description, total, unit)
    try:
        yield t.advance
    finally:
        t.close()


@contextlib.contextmanager
def phase(description: str) -> Iterator[Task]:
    """Work of unknown length: elapsed time, heartbeat lines in log mode."""
    t = task(description, None)
    try:
        yield t
    finally:
        t.close()


# --------------------------------------------------------------------------- library bars

class _Null:
    """Where a routed tqdm would write: nowhere (it reports to a Task instead)."""

    encoding = "utf-8"

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def tqdm_class(prefix: str = "", default: str = "working"):
    """A tqdm subclass that draws nothing itself and reports to a :class:`Task` instead.

    Counting, iteration and rate limiting stay tqdm's own (it calls ``display`` at most every
    ``mininterval`` seconds), so the libraries' loops run exactly as before.
    """
    from tqdm.std import tqdm as std_tqdm

    class RoutedTqdm(std_tqdm):
        def __init__(self, *args, **kwargs):
            self._task = None
            if kwargs.get("disable") is None:  # tqdm's None means "off unless a TTY"; we decide
                kwargs["disable"] = False
            kwargs["file"] = _Null()
            kwargs.setdefault("mininterval", 0.5)
            kwargs.pop("name", None)  # huggingface_hub's extension
            super().__init__(*args, **kwargs)
            if not self.disable:
                desc = (self.desc or default).rstrip(": ")
                desc = desc[:1].lower() + desc[1:]
                self._task = task(f"{prefix}{desc}", self.total, self.unit if self.unit != "it" else "")
                self._report()

        def _report(self) -> None:
            if self._task is not None:
                self._task.update(completed=self.n, total=self.total)

        def display(self, msg=None, pos=None):  # noqa: ARG002 - tqdm's signature
            self._report()
            return True

        def close(self):
            t = getattr(self, "_task", None)
            if t is not None and not t.closed:
                self._report()
            super().close()
            if t is not None:
                t.close()

    return RoutedTqdm


@contextlib.contextmanager
def route_tqdm(*modules: str, prefix: str = "", default: str = "working", transformers: bool = False) -> Iterator[None]:
    """Inside the block, the ``tqdm`` that each named module imported (``from tqdm import tqdm``)
    reports here; ``transformers=True`` also routes transformers' own bars (weight loading)
    through its documented ``set_tqdm_hook``. Everything is restored on exit."""
    cls = tqdm_class(prefix, default)
    patched: list[tuple[Any, Any]] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "tqdm"):
            patched.append((mod, mod.tqdm))
            mod.tqdm = cls
    previous_hook, hooked = None, False
    if transformers:
        try:
            from transformers.utils import logging as hf_logging

            if hasattr(hf_logging, "set_tqdm_hook"):
                def hook(factory, args, kwargs):
                    if factory is hf_logging.EmptyTqdm:  # bars disabled by the user: keep it so
                        return factory(*args, **kwargs)
                    return cls(*args, **kwargs)

                previous_hook, hooked = hf_logging.set_tqdm_hook(hook), True
        except ImportError:
            pass
    try:
        yield
    finally:
        for mod, original in patched:
            mod.tqdm = original
        if hooked:
            from transformers.utils import logging as hf_logging

            hf_logging.set_tqdm_hook(previous_hook)


def log_handler(level: int = logging.INFO) -> logging.Handler:
    """The CLI's log handler: rich's (printed above the bars) in rich mode, else plain stderr."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if mode() == "rich":
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console(), show_path=False, rich_tracebacks=False,
                                               log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
    handler.setLevel(level)
    return handler
