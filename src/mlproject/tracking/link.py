"""The process's link to the tracking server: one retry budget, fail-fast requests.

Every write goes spool → link → server: a :class:`~mlproject.tracking.run.Run` writes each
record to its spool (``tracking.spool``) first, then sends it through :data:`_LINK`, the one
:class:`_Link` of the process. A server that stops answering costs at most a retry budget
(``MLPROJECT_TRACKING_RETRY_SECONDS``, default 300 s, counted from the first failed call, for
the whole process); once it is spent every later send is refused at once and the records wait
in the spool for ``mlproject runs sync``. Each MLflow HTTP request is tried once
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=30`` unless you set them):
the retrying is ours, bounded, and a signal ends it at once.

The process's tracking URI is read here too (:func:`tracking_uri`): the link names it in its
warnings, and everything above imports the link, never the other way round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from mlproject.errors import UserError
from mlproject.redaction import redact

log = logging.getLogger(__name__)

RETRY_ENV = "MLPROJECT_TRACKING_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
#: After Ctrl-C / SIGTERM the final status gets this long (the rest waits in the spool).
EXIT_SECONDS = 5.0


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def retry_budget() -> float:
    raw = os.environ.get(RETRY_ENV, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise UserError(f"{RETRY_ENV}={raw!r} is not a number of seconds") from None


def _http_defaults() -> None:
    """One try per request, 30 s at most: MLflow's default (7 retries, 120 s timeout) blocks a
    single call for minutes when the server is gone. Values the user set are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow prints "View run … at: <tracking URI>" on every set_terminated, user:password
    # included when the URI carries them; we log the link ourselves, credentials stripped.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


@contextlib.contextmanager
def _fail_fast(timeout: int = 3) -> Iterator[None]:
    """Requests in this block give up after ``timeout`` seconds, without retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_transient(exc: BaseException) -> bool:
    """A failure of the connection to the server (gone, hanging, overloaded), not of the request."""
    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                        TimeoutError)):
        return True
    if isinstance(exc, requests.exceptions.HTTPError):
        return getattr(exc.response, "status_code", 0) in (429, 502, 503, 504)
    if isinstance(exc, MlflowException):
        if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        msg = str(exc)
        return msg.startswith("API request to") and ("failed with exception" in msg or "timeout exception" in msg)
    return False


class _Link:
    """The process's view of the tracking server: answering, or down since when, or given up."""

    def __init__(self):
        self.down_since: float | None = None
        self.offline = False
        self.exiting = False
        self.spools: list[Path] = []  # spools left with unsent records by runs of this process

    def reset(self) -> None:
        self.down_since, self.offline, self.exiting = None, False, False

    def send(self, fn: Callable[[], Any], what: str) -> bool:
        """Call ``fn`` until it succeeds or the budget is spent (then False, and every later
        call is False at once). Errors that are not about the connection propagate."""
        if self.offline:
            return False
        pause = 1.0
        while True:
            try:
                if self.exiting:  # each try a few seconds at most, so the budget holds
                    with _fail_fast():
                        fn()
                else:
                    fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                if self.down_since is None:
                    self.down_since = now
                    log.warning("tracking server %s is not answering (%s); retrying for up to %.0f s, "
                                "results are kept in the local spool meanwhile", redact(tracking_uri()),
                                redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__),
                                self.budget())
                left = self.down_since + self.budget() - now
                if left <= 0:
                    self.offline = True
                    log.warning("tracking server %s did not answer for %.0f s: giving up on it (%s); this "
                                "process logs to its spool only from now on", redact(tracking_uri()),
                                now - self.down_since, what)
                    return False
                time.sleep(min(pause, left))
                pause = min(pause * 2, 15.0)
                continue
            if self.down_since is not None:
                log.info("tracking server answers again")
                self.down_since = None
            return True

    def budget(self) -> float:
        return min(retry_budget(), EXIT_SECONDS) if self.exiting else retry_budget()


#: The one link of the process: every module of the package sends through this object (tests
#: patch its ``send``), so the budget and the offline state are shared by all runs.
_LINK = _Link()


def unsent_spools() -> list[Path]:
    """Spool folders that runs of this process left with records the server never got."""
    return list(_LINK.spools)
