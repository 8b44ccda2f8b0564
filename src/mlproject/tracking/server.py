"""Checking the tracking store before any heavy work: URI shape, SQLite creation, HTTP access.

:func:`check_server` fails fast, with one line naming the URI (credentials hidden), unless the
store answers a real API call; only a URI that works becomes the process's tracking URI. The
error wording helpers (:func:`_first_line`, :func:`_short`) and :func:`strip_userinfo` live here
too: every module that reports a store failure words it the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlproject import distributed
from mlproject.errors import UserError
from mlproject.redaction import redact
from mlproject.tracking.link import _LINK, _fail_fast, _http_defaults


def strip_userinfo(uri: str) -> str:
    """``http://user:pass@host:5000`` → ``http://host:5000``."""
    return re.sub(r"^([a-zA-Z][\w+.\-]*://)[^/@\s]*@", r"\1", uri)


_SEARCH_EXPERIMENTS = "/api/2.0/mlflow/experiments/search"


def check_server(uri: str | None = None, timeout: float = 10.0) -> str:
    """Fail fast, before any heavy work, unless the tracking store answers a real API call.

    ``/health`` is not enough: MLflow 3 answers it for any Host header while refusing every
    API call from a host name it does not allow (``--allowed-hosts``), and a server with
    authentication answers it without credentials. So: one experiments search, with the
    credentials MLflow itself would use (user-info in the URI, ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``). A SQLite store is created or
    upgraded here, once, under a file lock (concurrent first runs would race MLflow's schema
    migration). Any failure is a UserError with one line naming the URI (credentials hidden).
    """
    import mlflow

    _http_defaults()
    given = uri
    if given:
        _check_uri_shape(given)
    uri = given or mlflow.get_tracking_uri()
    _check_store(uri, timeout)
    if given:  # only a URI that works becomes the process's tracking URI
        mlflow.set_tracking_uri(given)
    _LINK.reset()
    return uri


@distributed.main_only
def _check_store(uri: str, timeout: float) -> None:
    """Only the main process of a launch asks the server (or creates a SQLite store)."""
    scheme = uri.split(":", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        _check_http(uri, timeout)
    elif scheme == "sqlite":
        _init_sqlite(uri)
    else:
        _call_store(uri, redact(uri))


def _check_uri_shape(uri: str) -> None:
    from urllib.parse import urlsplit

    if "://" not in uri:
        raise UserError(f"tracking URI {redact(uri)!r} is not a URI: use http(s)://host:port, "
                        "sqlite:///path/mlflow.db or postgresql://…")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise UserError(f"tracking URI {redact(uri)!r} is malformed ({exc})") from None


def _call_store(uri: str, shown: str) -> None:
    """One real call on the store behind ``uri`` (creating its client validates the scheme)."""
    from mlflow.tracking import MlflowClient

    try:
        with _fail_fast(int(10)):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # unknown scheme, unreachable database, unusable path
        if "unsupported uri" in str(exc).lower():
            scheme = uri.split("://", 1)[0]
            raise UserError(f"tracking URI {shown} has an unsupported scheme {scheme!r}: use http(s)://host:port, "
                            "sqlite:///path/mlflow.db, postgresql://, mysql:// or mssql://") from None
        raise UserError(f"tracking store {shown} is unusable: {_first_line(exc)}") from None


def _init_sqlite(uri: str) -> None:
    """Create / migrate a SQLite store once: other processes wait on the lock, then find it
    ready (MLflow only migrates a database whose tables are missing or outdated)."""
    from filelock import FileLock, Timeout

    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        _call_store(uri, redact(uri))
        return
    db = Path(path).expanduser()
    if not db.parent.is_dir():
        raise UserError(f"tracking store {redact(uri)}: folder {db.parent} does not exist")
    if not os.access(db.parent, os.W_OK):
        raise UserError(f"tracking store {redact(uri)}: folder {db.parent} is not writable")
    try:
        with FileLock(str(db) + ".lock", timeout=600):
            _call_store(uri, redact(uri))
    except Timeout:
        raise UserError(f"tracking store {redact(uri)}: another process has held {db}.lock for 10 minutes") from None


def _check_http(uri: str, timeout: float) -> None:
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.tracking import MlflowClient
    from mlflow.utils import rest_utils

    shown = redact(uri)
    try:
        store = MlflowClient(uri)._tracking_client.store
        creds = store.get_host_creds() if isinstance(store, RestStore) else None
    except Exception as exc:
        raise UserError(f"tracking server {shown} is unusable: {_first_line(exc)}") from None
    if creds is None:
        _call_store(uri, shown)
        return
    try:
        resp = rest_utils.http_request(creds, _SEARCH_EXPERIMENTS, "POST", json={"max_results": 1},
                                       max_retries=0, timeout=timeout)
    except Exception as exc:
        reason = str(getattr(exc, "__cause__", None) or exc)
        raise UserError(f"tracking server {shown} is unreachable ({redact(_short(reason))})") from None
    if resp.status_code == 200:
        return
    body = redact(resp.text.strip().splitlines()[0] if resp.text.strip() else "")[:200]
    if resp.status_code == 401:
        raise UserError(f"tracking server {shown} needs credentials (401): set MLFLOW_TRACKING_USERNAME and "
                        "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if resp.status_code == 403 and "Invalid Host header" in resp.text:
        host = uri.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        raise UserError(f"tracking server {shown} refuses the host name {host!r} (403 Invalid Host header): "
                        f"start it with --allowed-hosts {host} (MLFLOW_ALLOWED_HOSTS in tracking/team.env)")
    if resp.status_code == 403:
        raise UserError(f"tracking server {shown} refused access (403): {body or 'permission denied'}")
    raise UserError(f"tracking server {shown} answered {resp.status_code} to an API call: {body}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__)


def _short(reason: str) -> str:
    """The useful tail of a urllib3 / requests connection error."""
    for marker in ("Failed to establish a new connection: ", "Caused by ", "Read timed out", "NameResolutionError"):
        if marker in reason:
            return reason[reason.index(marker):].split("'))")[0].strip("( )")[:200]
    return reason.splitlines()[0][:200] if reason else "no answer"
