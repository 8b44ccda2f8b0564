"""The only module that talks to MLflow: runs, batched logging, tags, artifacts, status.

A step opens its run with :func:`step_run`. Under ``mlflow run`` it attaches to the run
MLflow created (``MLFLOW_RUN_ID``); otherwise it creates one. Whatever goes wrong inside
the block ends the run FAILED with the error as the ``mlproject.error`` tag (Ctrl-C and
SIGTERM end it KILLED), so no run is left RUNNING and no crash is recorded as FINISHED.
Everything logged passes through :func:`redact`, so no credential reaches the server.

A server that stops answering costs at most a retry budget
(``MLPROJECT_TRACKING_RETRY_SECONDS``, default 300 s, counted from the first failed call,
for the whole process): everything a run logs is first written to its spool
(``mlproject.spool``), so when the budget is spent the step goes on logging to the spool
only, ends, and ``mlproject runs sync`` sends the rest later. Each MLflow HTTP request is
tried once (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=30`` unless
you set them): the retrying is ours, bounded, and a signal ends it at once. A running step
refreshes the tag ``mlproject.heartbeat`` (with ``mlproject.host`` / ``mlproject.pid``) so
:func:`reap_runs` can tell a live run from one whose process is gone.

Under torchrun / accelerate launch (``WORLD_SIZE`` > 1) only the main process talks to MLflow:
:func:`step_run` gives the other ranks a :class:`NullRun` on the same run, and every function
here that reads the server runs on the main process with its result (or error) shared with the
other ranks (``mlproject.distributed``), so steps never test their rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mlproject import distributed, envinfo
from mlproject.errors import UserError
from mlproject.redaction import clean_mapping, redact  # noqa: F401 - re-exported: tracking.redact
from mlproject.spool import Spool

log = logging.getLogger(__name__)

TAG_PREFIX = "mlproject."
DEFAULT_EXPERIMENT = "mlproject"
#: MLflow's own prefix for metrics that describe the machinery, not the model: the UI shows them
#: under "System metrics", apart from the model metrics. Bookkeeping (compare, pipeline) goes here.
SYSTEM_PREFIX = "system/"
NOTE_TAG = "mlflow.note.content"
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000
_METRIC_BAD = re.compile(r"[^\w\-. /:]")

RETRY_ENV = "MLPROJECT_TRACKING_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
HEARTBEAT_ENV = "MLPROJECT_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 60.0
#: After Ctrl-C / SIGTERM the final status gets this long (the rest waits in the spool).
EXIT_SECONDS = 5.0
HEARTBEAT_TAG = f"{TAG_PREFIX}heartbeat"
HOST_TAG = f"{TAG_PREFIX}host"
PID_TAG = f"{TAG_PREFIX}pid"
ERROR_TAG = f"{TAG_PREFIX}error"
REAPED_TAG = f"{TAG_PREFIX}reaped"


def metric_key(name: str) -> str:
    """An MLflow-legal metric name (lm-eval's ``acc,none`` style keys have commas), with any
    secret a user-given name carried (``…?token=…``) redacted first."""
    return _METRIC_BAD.sub("_", redact(name))


# -- talking to the server: one retry budget, fail-fast requests --------------------------
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


_LINK = _Link()


def unsent_spools() -> list[Path]:
    """Spool folders that runs of this process left with records the server never got."""
    return list(_LINK.spools)


def strip_userinfo(uri: str) -> str:
    """``http://user:pass@host:5000`` → ``http://host:5000``."""
    return re.sub(r"^([a-zA-Z][\w+.\-]*://)[^/@\s]*@", r"\1", uri)


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


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


class Run:
    """Logging for one active MLflow run, batched through `MlflowClient.log_batch`.

    With a spool (:meth:`open_spool`, done by :func:`step_run`) every call is written there
    first and sent through the process's retry budget; a call the server never got stays in
    the spool for ``mlproject runs sync``. Without one (a ``Run`` made for a parent run or a
    lookup) calls go straight to the server, still within the budget.
    """

    records = True
    """False on a :class:`NullRun`: what would only be written to be logged can be skipped."""

    def __init__(self, run_id: str, experiment_id: str):
        from mlflow.tracking import MlflowClient

        _http_defaults()
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.env: dict | None = None  # the snapshot logged as env.json, when step_run took one
        self.client = MlflowClient()
        self.spool: Spool | None = None
        self._params: dict[str, str] | None = None  # params the run holds, as far as we know
        self._heartbeat: _Heartbeat | None = None
        # MLflow LoggedModels this run produced, by name ("model", "adapter"); metrics logged
        # after the "model" exists are linked to it (the experiment's Models tab shows them).
        self.model_ids: dict[str, str] = {}

    # -- delivery ---------------------------------------------------------------------------
    def _deliver(self, op: str, send: Callable[[], Any], original: str | Path | None = None, **fields: Any) -> bool:
        """Spool the record, send it; True when the server has it. An artifact that could not
        be sent (``original``: a file or folder that may vanish) is copied into the spool."""
        seq = self.spool.append(op, **fields) if self.spool else None
        try:
            ok = _LINK.send(send, op)
        except (KeyboardInterrupt, SystemExit):
            if seq is not None and original is not None:
                with contextlib.suppress(OSError):
                    self.spool.keep_copy(seq, original)
            raise
        if seq is not None:
            if ok:
                self.spool.mark_sent(seq)
            elif original is not None:
                self.spool.keep_copy(seq, original)
        return ok

    def open_spool(self, step: str) -> Spool | None:
        # Stored without credentials: sync takes them from the usual variables again.
        try:
            self.spool = Spool.open(self.run_id, experiment_id=self.experiment_id, step=step,
                                    tracking_uri=redact(strip_userinfo(tracking_uri())))
        except Exception as exc:  # a read-only home must not stop the step: log straight to the server
            log.warning("no tracking spool for run %s (%s): results go to the server only", self.run_id,
                        _first_line(exc))
            self.spool = None
        return self.spool

    # -- params, tags, metrics -------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if self._params is None:
            holder: dict = {}
            if _LINK.send(lambda: holder.update(self.client.get_run(self.run_id).data.params), "get_run"):
                self._params = dict(holder)
        items = resolve_params(self._params or {}, clean_mapping(params, _MAX_PARAM_LEN))
        if not items:
            return
        if self._params is not None:
            self._params.update(items)

        def send():
            batch = [Param(k, v) for k, v in items.items()]
            for i in range(0, len(batch), 100):
                self.client.log_batch(self.run_id, params=batch[i:i + 100], synchronous=True)

        self._deliver("params", send, params=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        cleaned = clean_mapping(tags, _MAX_TAG_LEN)

        def send():
            items = [RunTag(k, v) for k, v in cleaned.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, tags=items[i:i + 100], synchronous=True)

        self._deliver("tags", send, tags=cleaned)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """One request per 1000 metrics (per-metric REST calls are ~20x slower)."""
        self.log_metric_steps([(step or 0, metrics, None)])

    def log_metric_steps(self, rows: "list[tuple[int, Mapping[str, float], int | None]]") -> None:
        """Many steps' metrics (``(step, {name: value}, timestamp_ms or None)``) in one request per
        1000 points: training curves are buffered by the caller and sent with this. Once the run
        has logged its output model, model metrics are linked to it (``system/`` ones are not)."""
        self._send_points(self._metric_points(rows))

    def _send_points(self, points: list[list]) -> None:
        if points:
            self._deliver("metrics", lambda: send_metrics(self.client, self.run_id, points), metrics=points)

    def _metric_points(self, rows: "list[tuple[int, Mapping[str, float], int | None]]") -> list[list]:
        """Spool-ready points ``[key, value, timestamp, step(, model_id)]``; non-numbers skipped."""
        now = int(time.time() * 1000)
        model_id = self.model_ids.get("model")
        points = []
        for step, metrics, ts in rows:
            for name, value in metrics.items():
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    continue
                key = metric_key(name)
                linked = model_id if model_id and not key.startswith(SYSTEM_PREFIX) else None
                points.append([key, v, ts or now, int(step)] + ([linked] if linked else []))
        return points

    def set_description(self, markdown: str) -> None:
        """The run's description (MLflow's ``mlflow.note.content`` tag): shown at the top of the
        run page, so it carries the headline numbers and settings."""
        self.set_tags({NOTE_TAG: markdown})

    def log_datasets(self, specs: "list[Mapping[str, Any]]") -> None:
        """Log what a step read as MLflow dataset inputs (the runs table's Dataset column, the
        run page's Datasets). Each spec (plain data, see ``evaluation.engine.scored_datasets``):
        ``name``, ``context`` (evaluation, training, calibration), ``source`` (``{"kind": "file",
        "path"}`` or ``{"kind": "hf", "path", "config_name", "split"}``), optional ``rows`` (the
        records scored: schema, row count and a content digest) or ``digest``, and ``tags``."""
        if not specs:
            return
        import warnings

        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for spec in specs:
            tags = [InputTag("mlflow.data.context", spec.get("context") or "evaluation")]
            tags += [InputTag(str(k), redact(v)) for k, v in (spec.get("tags") or {}).items()]
            with warnings.catch_warnings():
                # MLflow's schema hint about integer columns and its "source can be interpreted
                # in multiple ways" (two registered local-file sources) say nothing to a user here
                warnings.simplefilter("ignore", UserWarning)
                inputs.append(DatasetInput(_dataset(spec)._to_mlflow_entity(), tags))
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception as exc:  # noqa: BLE001 - the numbers matter more than their provenance card
            log.warning("could not log the datasets of run %s: %s", self.run_id, str(exc).splitlines()[0])

    def log_model_dir(self, local_dir: str | Path, name: str = "model", flavor: Mapping[str, Any] | None = None,
                      tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> str:
        """Log a model folder as this run's MLflow model ``name`` (an MLflow 3 LoggedModel): the
        runs table's Models column, the experiment's Models tab (with the metrics logged after
        it), the registry (``register_model``) and ``mlflow.transformers.load_model`` see it.

        The folder stays what it was — a plain Hugging Face directory (or a PEFT adapter) with
        ``mlproject_model.json`` — plus an ``MLmodel`` file describing it with ``flavor`` (the
        transformers flavor's keys, ``model_binary: "."``). It is still fetched as
        ``runs:/<run_id>/<name>`` (MLflow resolves a run's models by name), so every step keeps
        taking the output of another. Returns the model id (``models:/<model_id>``)."""
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model

        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id,
            tags={k: str(v) for k, v in clean_mapping(tags or {}, _MAX_TAG_LEN).items()} or None,
            params={k: str(v) for k, v in clean_mapping(params or {}, _MAX_PARAM_LEN).items()} or None,
            model_type="transformers" if flavor else None)
        try:
            mlmodel = Model(artifact_path=model.artifact_location, run_id=self.run_id, model_id=model.model_id,
                            model_uuid=model.model_id)
            if flavor:
                mlmodel.add_flavor("transformers", **flavor)
            mlmodel.save(str(Path(local_dir) / "MLmodel"))
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
            self.client.log_model_artifacts(model.model_id, str(local_dir))
            self.client.finalize_logged_model(model.model_id, "READY")
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.model_ids[name] = model.model_id
        return model.model_id

    def log_metrics_and_tags(self, metrics: Mapping[str, float], tags: Mapping[str, Any], step: int = 0) -> None:
        """A result's tags and metrics in one request (a search trial's outcome: fewer round trips
        per trial), spooled as the two records ``set_tags`` and ``log_metrics`` would write."""
        cleaned = clean_mapping(tags, _MAX_TAG_LEN)
        points = self._metric_points([(step, metrics, None)])
        if not cleaned or not points or len(cleaned) > 100 or len(points) > 1000:
            if cleaned:
                self.set_tags(cleaned)
            self._send_points(points)
            return
        from mlflow.entities import RunTag

        seqs = [self.spool.append("tags", tags=cleaned), self.spool.append("metrics", metrics=points)] \
            if self.spool else []

        def send():
            self.client.log_batch(self.run_id, metrics=_metric_entities(points),
                                  tags=[RunTag(k, v) for k, v in cleaned.items()], synchronous=True)

        if _LINK.send(send, "metrics") and self.spool:
            for seq in seqs:
                self.spool.mark_sent(seq)

    def delete_tag(self, key: str) -> None:
        def send():
            with contextlib.suppress(Exception):  # absent tag (a connection failure too: not worth a retry)
                self.client.delete_tag(self.run_id, key)

        self._deliver("delete_tag", send, key=key)

    # -- artifacts -------------------------------------------------------------------
    def log_text(self, text: str, artifact_file: str) -> None:
        text = redact(text)
        if self.spool is None:
            _LINK.send(lambda: self.client.log_text(self.run_id, text, artifact_file), "artifact")
            return
        self._log_bytes(text.encode("utf-8"), artifact_file)

    def _log_bytes(self, data: bytes, artifact_file: str) -> None:
        """A generated artifact: written into the spool, then sent from there."""
        parent = str(Path(artifact_file).parent)
        artifact_path = None if parent in ("", ".") else parent
        name = Path(artifact_file).name
        seq = self.spool.append("artifact", name=name, artifact_path=artifact_path)
        local = self.spool.slot(seq) / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        if _LINK.send(lambda: self.client.log_artifact(self.run_id, str(local), artifact_path), "artifact"):
            self.spool.mark_sent(seq)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        local_path = Path(local_path)
        self._deliver("artifact", lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_path),
                      original=local_path, name=local_path.name, artifact_path=artifact_path,
                      original_path=str(local_path.resolve()))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        local_dir = Path(local_dir)
        self._deliver("artifacts", lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path),
                      original=local_dir, name=local_dir.name, artifact_path=artifact_path,
                      original_path=str(local_dir.resolve()))

    def log_figure(self, figure, artifact_file: str) -> None:
        if self.spool is None:
            _LINK.send(lambda: self.client.log_figure(self.run_id, figure, artifact_file), "artifact")
            return
        import io

        buf = io.BytesIO()
        figure.savefig(buf, format=Path(artifact_file).suffix.lstrip(".") or "png")
        self._log_bytes(buf.getvalue(), artifact_file)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def model_uri(self, path: str = "model") -> str:
        return f"runs:/{self.run_id}/{path}"

    # -- liveness ---------------------------------------------------------------------
    def start_heartbeat(self, tag: bool = True) -> None:
        """Refresh the heartbeat tag from a daemon thread (see :func:`reap_runs`); ``tag``: set
        :func:`liveness_tags` first (step_run sends them with its first tags instead)."""
        if tag:
            self.set_tags(liveness_tags())
        self._heartbeat = _Heartbeat(self.run_id, tracking_uri(), heartbeat_seconds())
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop.set()
            self._heartbeat = None


class NullRun(Run):
    """The run as the other ranks of a distributed launch see it: the same ``run_id``, and every
    logging call a no-op (only the main process talks to MLflow). Steps log through it exactly
    as through a :class:`Run`, so no step tests its rank."""

    records = False

    def __init__(self, run_id: str, experiment_id: str):  # noqa: D107 - no client: never talks to MLflow
        self.run_id, self.experiment_id, self.env = run_id, experiment_id, None
        self.model_ids: dict[str, str] = {}

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_metric_steps(self, rows):
        pass

    def log_metrics_and_tags(self, metrics, tags, step=0):
        pass

    def delete_tag(self, key):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_artifact(self, local_path, artifact_path=None):
        pass

    def log_artifacts(self, local_dir, artifact_path=None):
        pass

    def log_figure(self, figure, artifact_file):
        pass

    def _log_bytes(self, data, artifact_file):
        pass

    def open_spool(self, step):
        return None

    def log_datasets(self, specs):
        pass

    def log_model_dir(self, local_dir, name="model", flavor=None, tags=None, params=None):
        return ""

    def start_heartbeat(self, tag=True):
        pass

    def stop_heartbeat(self):
        pass

    @property
    def artifact_uri(self) -> str:
        return ""


def liveness_tags() -> dict[str, Any]:
    """Who runs this run: host, pid and the first heartbeat (unix seconds)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(), HEARTBEAT_TAG: int(time.time())}


def resolve_params(existing: Mapping[str, str], params: Mapping[str, str]) -> dict[str, str]:
    """The params still to log. `mlflow run` already logged the raw entry-point value (params
    are immutable); a value we resolved differently goes beside it as ``resolved.<name>``."""
    items: dict[str, str] = {}
    for k, v in params.items():
        if k in existing and existing[k] != v:
            k = f"resolved.{k}"
        if existing.get(k) != v:
            items[k] = v
    return items


def _metric_entities(points: list) -> list:
    from mlflow.entities import Metric

    # [key, value, timestamp, step] or, linked to an MLflow LoggedModel, [..., model_id]
    return [Metric(p[0], float(p[1]), int(p[2]), int(p[3]), model_id=p[4] if len(p) > 4 else None)
            for p in points]


def send_metrics(client, run_id: str, points: list) -> None:
    metrics = _metric_entities(points)
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)


def heartbeat_seconds() -> float:
    raw = os.environ.get(HEARTBEAT_ENV, "")
    try:
        return max(1.0, float(raw)) if raw.strip() else DEFAULT_HEARTBEAT_SECONDS
    except ValueError:
        return DEFAULT_HEARTBEAT_SECONDS


class _Heartbeat(threading.Thread):
    """Refreshes ``mlproject.heartbeat`` every ``interval`` s: one small request, skipped while
    the server is not answering (a heartbeat is not a result; it is never spooled)."""

    def __init__(self, run_id: str, uri: str, interval: float):
        super().__init__(name=f"mlproject-heartbeat-{run_id[:8]}", daemon=True)
        self.run_id, self.uri, self.interval = run_id, uri, interval
        self.stop = threading.Event()

    def run(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        while not self.stop.wait(self.interval):
            if _LINK.offline or _LINK.down_since is not None:
                continue
            with contextlib.suppress(Exception):
                client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))


def _dataset(spec: Mapping[str, Any]):
    """An ``mlflow.data`` dataset for a spec of ``Run.log_datasets``."""
    import mlflow.data
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    src = spec["source"]
    if src.get("kind") == "hf":
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        source = HuggingFaceDatasetSource(path=src["path"], config_name=src.get("config_name"),
                                          split=src.get("split"))
    else:
        source = resolve_dataset_source(str(src["path"]))
    if spec.get("rows") is not None:
        import pandas as pd

        return mlflow.data.from_pandas(pd.DataFrame(list(spec["rows"])), source=source, name=spec["name"],
                                       digest=spec.get("digest"))
    return MetaDataset(source=source, name=spec["name"], digest=spec.get("digest"))


def _env_tags(info: Mapping[str, Any]) -> dict[str, Any]:
    return {f"env.{k}": v for k, v in info.items() if v is not None}


def command_line() -> str:
    """The command as a person would type it: ``mlproject evaluate --model …`` whether it ran as
    the console script or as ``python -m mlproject`` (MLproject's commands), never ``__main__.py``."""
    prog = Path(sys.argv[0]).name
    if prog == "__main__.py":
        prog = Path(sys.argv[0]).parent.name or "python -m"
    return redact(" ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])]))


_EXTRA_TAGS: contextvars.ContextVar[dict] = contextvars.ContextVar("mlproject_extra_tags", default={})


@contextlib.contextmanager
def extra_tags(tags: Mapping[str, Any]) -> Iterator[None]:
    """Tags every run opened inside the block gets from its first request (a pipeline names
    the step a child run stands for, so even a child that fails at once carries it)."""
    token = _EXTRA_TAGS.set({**_EXTRA_TAGS.get(), **tags})
    try:
        yield
    finally:
        _EXTRA_TAGS.reset(token)


@contextlib.contextmanager
def step_run(
    step: str,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    log_env: bool = True,
    run_id: str | None = None,
    parent: "Run | None" = None,
) -> Iterator[Run]:
    """Open (or attach to) the run for one step invocation and guarantee its final status.

    Under a distributed launch (``torchrun``, ``accelerate launch``: ``WORLD_SIZE`` > 1) there is
    one run per launch: the main process opens it as described below and the other ranks get a
    :class:`NullRun` with the same ``run_id``. A failure on any rank ends the run FAILED with
    that rank's error (``rank <r>: <error>``), raises on every rank (so the launcher exits
    non-zero), and the other ranks only return once the run is closed (see
    ``mlproject.distributed``).

    Where the run goes, first match wins:

    * ``parent`` given, or a run already active in this process (a pipeline, a search
      trial): a child run of it (``mlflow.parentRunId``), in the parent's experiment;
      ``experiment`` is ignored — the tracking URI and experiment were set once, by whoever
      opened the parent.
    * ``run_id``: that existing run is reopened (a resumed fine-tune continues its own run).
      Under ``mlflow run`` the run MLflow created for this launch is then left with a tag
      ``mlproject.continued_in`` pointing at the reopened run.
    * under ``mlflow run`` (``MLFLOW_RUN_ID``): the run MLflow created.
    * else a new run in ``experiment`` (default ``$MLFLOW_EXPERIMENT_NAME`` or ``mlproject``).
    """
    kwargs = dict(experiment=experiment, run_name=run_name, tags=tags, log_env=log_env, run_id=run_id,
                  parent=parent)
    if not distributed.active():
        with _open_run(step, **kwargs) as run:
            yield run
        return
    gang = distributed.StepGang()
    inner = _main_of_launch(gang, step, kwargs) if gang.is_main else _rank_of_launch(gang)
    with inner as run:
        yield run


@contextlib.contextmanager
def _main_of_launch(gang: "distributed.StepGang", step: str, kwargs: dict) -> Iterator[Run]:
    """Rank 0 of a launch: the real run; the other ranks' outcomes decide its status."""
    status, failed_rank, error = "FAILED", 0, ""
    try:
        with _open_run(step, **kwargs) as run:
            gang.publish_run((run.run_id, run.experiment_id))
            with gang.watch(lambda r, err: _mark_failed(run, distributed.RankFailed(r, err))):
                try:
                    yield run
                except BaseException as exc:
                    def report():
                        gang.fail(exc)
                        return gang.first_failure()

                    first = _quietly(report)
                    if first is not None and first[0] != gang.rank:
                        # Our error is a consequence (a collective whose peer died, the
                        # launcher's SIGTERM): the run records the cause.
                        raise distributed.RankFailed(*first) from exc
                    raise
                gang.done()
                first = gang.wait_all()
                if first is not None:
                    raise distributed.RankFailed(*first)
        status = "FINISHED"
    except BaseException as exc:
        _quietly(lambda: gang.publish_run_error(exc))  # the run never opened: the waiting ranks raise this too
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        if isinstance(exc, distributed.RankFailed):
            failed_rank, error = exc.rank, exc.error
        else:
            error = distributed.describe(exc)["text"]
        raise
    finally:
        _quietly(lambda: gang.publish_final(status, failed_rank, error))


@contextlib.contextmanager
def _rank_of_launch(gang: "distributed.StepGang") -> Iterator[Run]:
    """Any other rank: a NullRun on the main process's run; returns only once that is closed."""
    run_id, experiment_id = gang.wait_run()
    try:
        yield NullRun(run_id, experiment_id)
    except BaseException as exc:
        _quietly(lambda: gang.fail(exc))  # first, so rank 0 records this error as the cause
        raise
    gang.done()
    status, failed_rank, error = gang.wait_final()
    if status != "FINISHED":
        raise distributed.RankFailed(failed_rank, error or status)


def _quietly(fn):
    """Coordination on a failure path: if the launcher's store is gone too, the error being
    handled is what matters, not the store's."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        log.warning("rank coordination failed while handling an error", exc_info=log.isEnabledFor(logging.DEBUG))
        return None


def _mark_failed(run: Run, exc: BaseException) -> None:
    """End ``run`` FAILED now (from rank 0's watcher thread: another rank failed)."""
    from mlflow.tracking import MlflowClient

    _record_error(run, exc)
    MlflowClient().set_terminated(run.run_id, status="FAILED")


@contextlib.contextmanager
def _open_run(
    step: str,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    log_env: bool = True,
    run_id: str | None = None,
    parent: "Run | None" = None,
) -> Iterator[Run]:
    """step_run in one process (see there)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    active = mlflow.active_run()
    if parent is None and active is not None:
        parent = Run(active.info.run_id, active.info.experiment_id)
    if parent is not None:
        # mlflow run's MLFLOW_RUN_ID would override the parent of a nested run (mlflow#15713).
        os.environ.pop("MLFLOW_RUN_ID", None)
        if run_id:
            started = mlflow.start_run(run_id=run_id, nested=active is not None)
        elif active is not None:
            if active.info.run_id != parent.run_id:
                raise RuntimeError(f"run {active.info.run_id} is active, not the parent {parent.run_id}")
            started = mlflow.start_run(experiment_id=parent.experiment_id, run_name=run_name, nested=True)
        else:
            started = mlflow.start_run(experiment_id=parent.experiment_id, run_name=run_name,
                                       parent_run_id=parent.run_id)
    else:
        launcher_id = os.environ.get("MLFLOW_RUN_ID")
        attach_id = run_id or launcher_id
        if attach_id:
            # The attached run decides the experiment, whatever was set earlier in this process.
            mlflow.set_experiment(experiment_id=MlflowClient().get_run(attach_id).info.experiment_id)
            started = mlflow.start_run(run_id=attach_id)
            # mlflow run sets MLFLOW_RUN_ID for us; left in place it would override the parent
            # of any nested run we open later (mlflow#15713).
            os.environ.pop("MLFLOW_RUN_ID", None)
            if launcher_id and launcher_id != attach_id:
                with contextlib.suppress(Exception):
                    MlflowClient().set_tag(launcher_id, f"{TAG_PREFIX}continued_in", attach_id)
        else:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            mlflow.set_experiment(name)
            started = mlflow.start_run(run_name=run_name)
    run = Run(started.info.run_id, started.info.experiment_id)
    status = "FAILED"
    try:
        run.open_spool(step)
        base_tags = {f"{TAG_PREFIX}step": step, f"{TAG_PREFIX}command": command_line(), **liveness_tags(),
                     **_EXTRA_TAGS.get(),
                     **(tags or {})}
        if str(started.data.tags.get("mlflow.source.name", "")).endswith("__main__.py"):
            # MLflow names the source after sys.argv[0]: `python -m mlproject` reads as __main__.py
            base_tags["mlflow.source.name"] = " ".join(command_line().split()[:2])
        if run_name:
            base_tags["mlflow.runName"] = run_name
        run.set_tags(base_tags)
        run.start_heartbeat(tag=False)
        if log_env:
            run.env = envinfo.collect()
            run.set_tags(_env_tags(run.env))
            run.log_dict(run.env, "env.json")
        yield run
        status = "FINISHED"
        publish_headline_view(run)
    except (KeyboardInterrupt, SystemExit) as exc:
        status = "KILLED"
        _LINK.exiting = True  # a signal is honoured within seconds, whatever the server does
        _record_error(run, f"{type(exc).__name__}: interrupted")
        raise
    except BaseException as exc:
        _record_error(run, exc)
        raise
    finally:
        # Ends exactly this run (a child never ends its parent, whatever happened inside).
        _close(run, status)


#: The experiment's saved view (MLflow UI "Views" menu; ``?viewStateShareKey=`` in a link)
#: whose runs table shows the headline numbers: MLflow's own runs table starts with none.
HEADLINE_VIEW = "mlproject-headline"
_VIEW_TAG = "mlflow.sharedViewState."


def headline_columns(metrics: Mapping[str, float], tags: Mapping[str, str]) -> list[str]:
    """Runs-table columns for a run's headline numbers (MLflow UI column keys)."""
    keys = [k for k in ("avg_acc",) if k in metrics] + sorted(k for k in metrics if k.startswith("ppl/"))
    try:
        used = json.loads(tags.get(f"{TAG_PREFIX}avg_acc_metrics") or "{}")
    except ValueError:
        used = {}
    keys += [f"{t}/{m}" for t, m in used.items() if f"{t}/{m}" in metrics]
    keys += [k for k in ("params_b", "model_size_mb") if k in metrics]
    return [f"metrics.`{k}`" for k in keys]


def publish_headline_view(run: Run) -> str | None:
    """Merge this run's headline columns into the experiment's saved view ``HEADLINE_VIEW`` (step
    runs only: pipeline parents and compare runs, which hold no scores, are filtered out), so the
    runs table opened through ``where_to_look``'s link shows PPL, avg_acc and task scores without
    picking columns by hand. Best effort: never fails a run."""
    import time

    try:
        data = run.client.get_run(run.run_id).data
        columns = headline_columns(data.metrics, data.tags)
        if not columns:
            return None
        exp = run.client.get_experiment(run.experiment_id)
        key = _VIEW_TAG + HEADLINE_VIEW
        state: dict = {}
        created = int(time.time() * 1000)
        if key in exp.tags:
            envelope = json.loads(exp.tags[key])
            state, created = json.loads(envelope["state"]), envelope.get("createdAt", created)
        # metrics first (what a person looks for), then what was scored and the model logged
        before = [c for c in state.get("selectedColumns", []) if c.startswith("metrics.")]
        merged = list(dict.fromkeys(before + columns))
        state["selectedColumns"] = merged + ["params.`limit`", "tags.`mlproject.role`", "attributes.`Dataset`",
                                             "attributes.`Models`"]
        state["columnOrder"] = state["selectedColumns"]  # else the UI sorts them by name
        # A pipeline's steps are child runs, folded under a parent that has no scores, and a shared
        # view cannot unfold them (MLflow drops runsExpanded from it): grouped by model family,
        # with the groups open, the step runs are listed flat. Pipeline parents and compare runs
        # (no scores) are filtered out.
        state["searchFilter"] = (f"tags.`{TAG_PREFIX}step` != 'pipeline' AND tags.`{TAG_PREFIX}step` != 'compare' "
                                 f"AND tags.`{TAG_PREFIX}step` != 'search'")
        family = data.tags.get(f"{TAG_PREFIX}family")
        if family:
            state["groupBy"] = {"aggregateFunction": "max",
                                "groupByKeys": [{"mode": "tag", "groupByData": f"{TAG_PREFIX}family"}]}
            state.setdefault("groupsExpanded", {})[f"tag.{TAG_PREFIX}family.{family}"] = True
        value = json.dumps({"name": "Headline numbers (mlproject)", "createdAt": created,
                            "updatedAt": int(time.time() * 1000), "state": json.dumps(state)})
        run.client.set_experiment_tag(run.experiment_id, key, value)
        return HEADLINE_VIEW
    except Exception as exc:  # noqa: BLE001 - a convenience for the UI, never a failure
        log.debug("could not update the headline view of experiment %s: %s", run.experiment_id, exc)
        return None


def _record_error(run: Run, exc: BaseException | str) -> None:
    if isinstance(exc, distributed.RankFailed):
        exc = str(exc)  # already "rank <r>: <type>: <message>"
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    try:
        run.set_tags({ERROR_TAG: msg.strip().splitlines()[0] if msg.strip() else msg})
    except Exception:  # the server may be what failed; the status still gets set
        log.warning("could not record the error on run %s", run.run_id)


def _close(run: Run, status: str) -> None:
    """Final status: spooled, sent within the budget, MLflow's active run popped without
    waiting on a server that is gone; the spool removed when the server has everything."""
    import mlflow

    run.stop_heartbeat()
    end = int(time.time() * 1000)
    try:
        run._deliver("status", lambda: run.client.set_terminated(run.run_id, status, end_time=end),
                     status=status, end_time=end)
    except Exception as exc:  # not a connection problem: report it, still pop the run below
        log.warning("could not set run %s to %s: %s", run.run_id, status, _first_line(exc))
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.run_id:
            # end_run pops its stack before its own (repeated, harmless) set_terminated call.
            with _fail_fast(), contextlib.suppress(Exception):
                mlflow.end_run(status=status)
        uri = tracking_uri()
        if uri.startswith(("http://", "https://")):
            log.info("run %s (%s): %s/#/experiments/%s/runs/%s", run.run_id, status,
                     redact(strip_userinfo(uri)).rstrip("/"), run.experiment_id, run.run_id)
        spool = run.spool
        if spool is not None:
            left = spool.pending()
            spool.close(remove=not left)
            if left:
                _LINK.spools.append(spool.path)
                log.warning("run %s (%s): %d logging call(s) never reached tracking server %s; they are kept in "
                            "%s — send them with: mlproject runs sync %s", run.run_id, status, len(left),
                            redact(tracking_uri()), spool.path, spool.path)
        _LINK.exiting = False


# -- reading back -------------------------------------------------------------------------
ARTIFACT_CACHE_DAYS_ENV = "MLPROJECT_ARTIFACT_CACHE_DAYS"
_DOWNLOAD_META = ".mlproject-download.json"


def download(uri: str) -> Path:
    """Materialize ``runs:/…`` or ``models:/name@alias`` artifacts locally (see :func:`_download`).

    Under a distributed launch the main process downloads once and the other ranks use its
    copy; a rank on another node (where that path does not exist) fetches its own."""
    path = distributed.on_main(_download, uri)
    return path if path.exists() else _download(uri)


def _download(uri: str) -> Path:
    """Materialize ``runs:/…`` or ``models:/name@alias`` artifacts locally, cached per URI.

    The cache (``$MLPROJECT_CACHE/artifacts/<hash>``) is keyed by the resolved ``runs:/`` URI
    and the run's end time, so a registry alias that moves, or a run that logged again, is
    fetched anew; a run still in progress is never served from the cache. Entries unused for
    ``MLPROJECT_ARTIFACT_CACHE_DAYS`` (default 7) are removed on the next download.
    """
    import mlflow
    from filelock import FileLock
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mlproject.paths import artifacts_root, shared_mkdtemp

    client = MlflowClient()
    try:
        if uri.startswith("models:/"):
            body = uri[len("models:/"):]
            if "@" in body:
                name, alias = body.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, version = body.split("/", 1)
                mv = client.get_model_version(name, version)
            source = mv.source
            if mv.run_id and not source.startswith(("runs:/", "models:/")):
                # a storage location of a run's model folder: fetch it through the run
                source = f"runs:/{mv.run_id}/model"
            uri = source
        version = ""
        if uri.startswith("runs:/"):
            info = client.get_run(uri[len("runs:/"):].split("/", 1)[0]).info
            version = str(info.end_time) if info.status in ("FINISHED", "FAILED", "KILLED") else f"live-{time.time_ns()}"
        root = artifacts_root()
        root.mkdir(parents=True, exist_ok=True)
        _prune_artifact_cache(root)
        entry = root / hashlib.sha256(f"{tracking_uri()}|{uri}|{version}".encode()).hexdigest()[:24]
        with FileLock(str(entry) + ".lock", timeout=3600):
            meta = entry / _DOWNLOAD_META
            if meta.is_file():
                os.utime(meta)
                return entry / json.loads(meta.read_text())["path"]
            tmp = shared_mkdtemp(root, ".tmp-")
            try:
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
                rel = got.relative_to(tmp)
                (tmp / _DOWNLOAD_META).write_text(json.dumps({"uri": redact(uri), "path": str(rel)}))
                if entry.exists():  # a half-written entry of a crashed process
                    shutil.rmtree(entry)
                os.replace(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return entry / rel
    except MlflowException as exc:
        raise UserError(f"cannot fetch {redact(uri)}: {str(exc).splitlines()[0]}") from None


def _prune_artifact_cache(root: Path) -> None:
    """Drop entries unused for the configured days, abandoned partial downloads, and the
    ``/tmp/mlproject-artifacts-*`` folders that versions before the cache left behind."""
    import tempfile

    from filelock import FileLock, Timeout

    try:
        days = float(os.environ.get(ARTIFACT_CACHE_DAYS_ENV) or 7)
    except ValueError:
        days = 7.0
    now = time.time()
    for path in root.iterdir():
        try:
            if path.name.startswith(".tmp-") and path.is_dir() and now - path.stat().st_mtime > 86400:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and now - (path / _DOWNLOAD_META).stat().st_mtime > days * 86400:
                lock = FileLock(str(path) + ".lock")
                try:
                    with lock.acquire(timeout=0):
                        shutil.rmtree(path, ignore_errors=True)
                except Timeout:
                    continue  # in use right now
        except OSError:
            continue
    for old in Path(tempfile.gettempdir()).glob("mlproject-artifacts-*"):
        with contextlib.suppress(OSError):
            if old.is_dir() and old.stat().st_uid == os.getuid() and now - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)


@distributed.main_only
def run_data(run_id: str) -> dict:
    """Tags, params and latest metrics of a run (lineage lookups)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise UserError(f"run {run_id!r} not found: {str(exc).splitlines()[0]}") from None
    return {"tags": dict(run.data.tags), "params": dict(run.data.params),
            "metrics": dict(run.data.metrics), "status": run.info.status}


@distributed.main_only
def last_metric_step(run_id: str, key: str) -> int:
    """Highest step logged for metric ``key`` on the run (0 when none): where a resumed
    training's curve must continue so no step is recorded twice."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, metric_key(key))
    return max((int(m.step) for m in history), default=0)


@distributed.main_only
def find_experiment_id(name: str) -> str | None:
    """The id of an existing, active experiment (None: it does not exist; nothing is created)."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient().get_experiment_by_name(name)
    return exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None


@distributed.main_only
def run_experiment_id(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id).info.experiment_id


@distributed.main_only
def experiment_name(experiment_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_experiment(experiment_id).name


@distributed.main_only
def check_model_uri(uri: str) -> None:
    """Cheap existence check of a runs:/ or models:/ reference, before any run starts."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].partition("/")
            run = client.get_run(run_id)
            top = path.split("/")[0]
            if top and top not in {a.path for a in client.list_artifacts(run_id)} \
                    and logged_model(run_id, top, run.info.experiment_id) is None:
                raise UserError(f"run {run_id} has no artifact or model {top!r} (from {uri})")
        elif uri.startswith("models:/"):
            body = uri[len("models:/"):]
            if "@" in body:
                client.get_model_version_by_alias(*body.split("@", 1))
            else:
                client.get_model_version(*body.split("/", 1))
    except MlflowException as exc:
        raise UserError(f"model {uri!r} not found on the tracking server: {str(exc).splitlines()[0]}") from None


@distributed.main_only
def upstream_key(ref: str) -> str | None:
    """The reuse key (tag ``mlproject.cache_key``) of the run behind ``runs:/<id>…`` or
    ``models:/<name>@<alias>`` / ``models:/<name>/<version>``; None when it has none (or
    cannot be found: the reference check reports that)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if ref.startswith("models:/"):
            body = ref[len("models:/"):]
            if "@" in body:
                mv = client.get_model_version_by_alias(*body.split("@", 1))
            else:
                name, version = body.split("/", 1)
                mv = client.get_model_version(name, version.split("/")[0])
            run_id = mv.run_id
        else:
            run_id = ref[len("runs:/"):].split("/")[0]
        if not run_id:
            return None
        return client.get_run(run_id).data.tags.get(f"{TAG_PREFIX}cache_key")
    except (MlflowException, IndexError, ValueError):
        return None


@distributed.main_only
def find_reusable(key: str, experiment_id: str) -> dict | None:
    """The newest FINISHED run of ``experiment_id`` whose ``mlproject.cache_key`` tag equals
    ``key`` exactly: ``{"run_id", "metrics", "tags"}``, or None."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PREFIX}cache_key` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    return {"run_id": run.info.run_id, "metrics": dict(run.data.metrics), "tags": dict(run.data.tags),
            "params": dict(run.data.params), "run_name": run.info.run_name}


@distributed.main_only
def record_reuse(parent: Run, step: str, original: Mapping[str, Any], run_name: str,
                 extra_tags: Mapping[str, Any] | None = None) -> str:
    """A FINISHED child run of ``parent`` standing for a reused step: the original's params,
    lineage tags and latest metrics copied (so the pipeline's tree shows the numbers), tagged
    ``mlproject.reused_from``. It carries no ``cache_key`` (it is not a result of its own), and
    compare leaves such runs out (the original is the result)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = {k: v for k, v in original["tags"].items()
            if k.startswith(TAG_PREFIX) and k not in (f"{TAG_PREFIX}cache_key", f"{TAG_PREFIX}error")}
    tags.update({f"{TAG_PREFIX}step": step, f"{TAG_PREFIX}reused_from": original["run_id"],
                 f"{TAG_PREFIX}reused_key": original["tags"].get(f"{TAG_PREFIX}cache_key", ""),
                 "mlflow.parentRunId": parent.run_id, **(extra_tags or {})})
    created = client.create_run(parent.experiment_id, run_name=run_name,
                                tags={k: str(v) for k, v in tags.items()})
    run_id = created.info.run_id
    now = int(__import__("time").time() * 1000)
    params = [Param(k, v) for k, v in original["params"].items()]
    metrics = [Metric(k, float(v), now, 0) for k, v in original["metrics"].items()]
    for i in range(0, max(len(params), 1), 100):
        client.log_batch(run_id, params=params[i:i + 100], synchronous=True)
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def logged_model(run_id: str, name: str = "model", experiment_id: str | None = None):
    """The MLflow LoggedModel called ``name`` that run ``run_id`` produced, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = experiment_id or client.get_run(run_id).info.experiment_id
    token = None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"name = '{name}'", page_token=token)
        for model in page:
            if model.source_run_id == run_id:
                return model
        token = page.token
        if not token:
            return None




@distributed.main_only
def register_model(run_id: str, name: str, alias: str | None = None, path: str = "model") -> str:
    """Register a run's model (its LoggedModel ``path``, else the artifact folder of that name) as a
    version of `name`, optionally under an alias."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    model = logged_model(run_id, path)
    if model is not None:
        mv = client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id,
                                         model_id=model.model_id)
    else:
        mv = client.create_model_version(name, source=f"runs:/{run_id}/{path}", run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return mv.version


def where_to_look(run_id: str, experiment_id: str | None = None, report: str = "report.md") -> str:
    """Two lines that end a command: where the run's report is and how to open the run in the UI.
    A hint, never an error: with the server gone (results in the spool) it asks nothing."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if _LINK.offline or _LINK.down_since is not None:
        return f"Run {run_id}: the tracking server {redact(uri)} is not answering; see it there once it is back"
    if experiment_id is None:
        try:
            with _fail_fast(3):
                experiment_id = run_experiment_id(run_id)
        except Exception:  # noqa: BLE001 - a hint, never an error
            return f"Run {run_id} on {redact(uri)}"
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    table = ""
    with contextlib.suppress(Exception):
        if _VIEW_TAG + HEADLINE_VIEW in mlflow.get_experiment(experiment_id).tags:
            table = f"#/experiments/{experiment_id}/runs?viewStateShareKey={HEADLINE_VIEW}"
    if uri.startswith(("http://", "https://")):
        base = redact(uri).rstrip("/")
        return (f"Report: {base}/{page}/artifacts/{report}\nUI: {base}/{page}"
                + (f"\nAll runs with their headline numbers: {base}/{table}" if table else ""))
    try:
        artifacts = mlflow.get_run(run_id).info.artifact_uri
    except Exception:  # noqa: BLE001 - a hint, never an error
        artifacts = ""
    if artifacts.startswith("file://"):
        artifacts = artifacts[len("file://"):]
    if artifacts.startswith("/"):
        with contextlib.suppress(ValueError):
            artifacts = os.path.relpath(artifacts)
    report_line = f"Report: {artifacts}/{report}\n" if artifacts else ""
    return (report_line + f"UI: mlflow ui --backend-store-uri {redact(uri)} (or make ui), then open "
            f"http://127.0.0.1:5000/{page}"
            + (f"\nAll runs with their headline numbers: http://127.0.0.1:5000/{table}" if table else ""))


def record_launch_error(message: str) -> None:
    """Under ``mlflow run`` a bad input fails after MLflow created the run: give that run the error
    (tag ``mlproject.error`` and its description) so the UI says why it FAILED. Best effort, and
    quick: nothing is tried when the server does not answer."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        check_server(timeout=2.0)
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.set_tag(run_id, f"{TAG_PREFIX}error", redact(message)[:_MAX_TAG_LEN])
        client.set_tag(run_id, "mlflow.note.content", redact(f"**Failed before it started:** {message}"))
    except Exception:  # noqa: BLE001 - the user sees the error on stderr anyway
        log.debug("could not record the error on run %s", run_id, exc_info=True)


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -- housekeeping: mlproject runs sync / reap, refusals under mlflow run --------------------
def sync_spool(path: str | Path, tracking_uri_: str | None = None) -> dict:
    """Send what a spool holds and the server never got; remove the spool when done.

    Idempotent: acknowledged records are skipped, and metric points carry the timestamp they
    were logged with, so a point sent twice is the same point (MLflow's SQL store keeps one).
    The tracking URI: ``tracking_uri_``, else ``MLFLOW_TRACKING_URI``, else the one the run
    was logged to (stored without credentials: give them through the usual variables).
    Returns counts per kind of record sent.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    spool = Spool(path)
    meta = spool.meta()
    if not meta.get("run_id"):
        raise UserError(f"{path} is not an mlproject spool (no meta.json)")
    lock = spool.try_lock()
    if lock is None:
        raise UserError(f"spool {path} is still being written by process {meta.get('pid')} on "
                        f"{meta.get('host')}: wait for it to end")
    try:
        uri = check_server(tracking_uri_ or os.environ.get("MLFLOW_TRACKING_URI") or meta.get("tracking_uri"))
        client = MlflowClient(uri)
        run_id = meta["run_id"]
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise UserError(f"run {run_id} is not on {redact(uri)} ({_first_line(exc)}): sync to the server the "
                            f"run was created on ({meta.get('tracking_uri')})") from None
        counts: dict[str, int] = {}
        params = dict(run.data.params)
        for rec in spool.pending():
            op = rec["op"]
            if op == "params":
                items = resolve_params(params, rec["params"])
                if items:
                    from mlflow.entities import Param

                    client.log_batch(run_id, params=[Param(k, v) for k, v in items.items()], synchronous=True)
                    params.update(items)
            elif op == "tags":
                from mlflow.entities import RunTag

                tags = [RunTag(k, v) for k, v in rec["tags"].items()]
                for i in range(0, len(tags), 100):
                    client.log_batch(run_id, tags=tags[i:i + 100], synchronous=True)
            elif op == "metrics":
                send_metrics(client, run_id, rec["metrics"])
            elif op == "delete_tag":
                with contextlib.suppress(MlflowException):
                    client.delete_tag(run_id, rec["key"])
            elif op in ("artifact", "artifacts"):
                src = spool.artifact_source(rec)
                if src is None:
                    log.warning("artifact %s of run %s is gone (neither in the spool nor at %s); skipped",
                                rec["name"], run_id, rec.get("original_path"))
                    counts["missing_artifacts"] = counts.get("missing_artifacts", 0) + 1
                elif src.is_dir():
                    client.log_artifacts(run_id, str(src), rec.get("artifact_path"))
                else:
                    client.log_artifact(run_id, str(src), rec.get("artifact_path"))
            elif op == "status":
                if rec["status"] == "FINISHED" and REAPED_TAG in run.data.tags:
                    # reap gave up on it while its results waited here: they are in now
                    for key in (REAPED_TAG, ERROR_TAG):
                        with contextlib.suppress(MlflowException):
                            client.delete_tag(run_id, key)
                client.set_terminated(run_id, rec["status"], end_time=rec.get("end_time"))
            spool.mark_sent(rec["seq"])
            counts[op] = counts.get(op, 0) + 1
        complete = not spool.pending()
    finally:
        lock.release()
    if complete:
        shutil.rmtree(spool.path, ignore_errors=True)
    return counts


def reap_runs(experiments: list[str] | None = None, stale_seconds: float | None = None,
              dry_run: bool = False) -> list[dict]:
    """RUNNING runs whose process is gone → FAILED, each with the reason it was decided on.

    A run started by mlproject carries ``mlproject.host``, ``mlproject.pid`` and a heartbeat
    its process refreshes every ``MLPROJECT_HEARTBEAT_SECONDS`` (60). On this host the pid
    decides (gone, or reused by a process that started after the run: dead). On another host
    the heartbeat does: older than ``stale_seconds`` (default 10 heartbeats, at least 10
    minutes) is dead. Runs without a heartbeat tag (not started by mlproject) are left alone.
    The reason goes to ``mlproject.reaped`` and ``mlproject.error``; the end time is the last
    heartbeat. Returns one dict per RUNNING run looked at: run_id, name, action, reason.
    """
    from mlflow.entities import RunTag, ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    stale = stale_seconds if stale_seconds is not None else max(600.0, 10 * heartbeat_seconds())
    if experiments:
        from mlflow.exceptions import MlflowException

        exp_ids = []
        for name in experiments:
            exp = None
            with contextlib.suppress(MlflowException):
                exp = client.get_experiment_by_name(name) or (client.get_experiment(name) if name.isdigit() else None)
            if exp is None:
                raise UserError(f"experiment not found: {name!r}")
            exp_ids.append(exp.experiment_id)
    else:
        exp_ids, token = [], None
        while True:
            page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            exp_ids += [e.experiment_id for e in page]
            token = page.token
            if not token:
                break
    here, now, out = socket.gethostname(), time.time(), []
    for i in range(0, len(exp_ids), 100):
        token = None
        while True:
            page = client.search_runs(exp_ids[i:i + 100], "attributes.status = 'RUNNING'", max_results=1000,
                                      page_token=token)
            for run in page:
                out.append(_reap_one(client, run, here, now, stale, dry_run, RunTag))
            token = page.token
            if not token:
                break
    return out


def _reap_one(client, run, here: str, now: float, stale: float, dry_run: bool, RunTag) -> dict:  # noqa: N803
    tags = run.data.tags
    item = {"run_id": run.info.run_id, "name": run.info.run_name, "action": "kept", "reason": ""}
    beat = tags.get(HEARTBEAT_TAG)
    if not beat:
        item["reason"] = "no heartbeat tag (not started by mlproject): left alone"
        return item
    beat_s = float(beat)
    age = now - beat_s
    host, pid = tags.get(HOST_TAG, ""), int(tags.get(PID_TAG) or 0)
    if host == here and pid:
        if _process_alive(pid, run.info.start_time / 1000.0):
            item["reason"] = f"process {pid} on {host} is alive"
            return item
        reason = f"process {pid} on {host} is gone (last heartbeat {age:.0f} s ago)"
    elif age > stale:
        reason = f"no heartbeat from {host or 'its host'} for {age:.0f} s (limit {stale:.0f} s)"
    else:
        item["reason"] = f"heartbeat from {host} {age:.0f} s ago (limit {stale:.0f} s)"
        return item
    item.update(action="would fail" if dry_run else "failed", reason=reason)
    if not dry_run:
        client.log_batch(run.info.run_id, tags=[RunTag(REAPED_TAG, reason), RunTag(ERROR_TAG, f"reaped: {reason}")],
                         synchronous=True)
        client.set_terminated(run.info.run_id, "FAILED", end_time=int(beat_s * 1000))
    return item


def _process_alive(pid: int, started_before: float) -> bool:
    """``pid`` runs and is the process that started the run (not a later one reusing the pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= started_before + 1
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def record_refusal(step: str, message: str) -> None:
    """Under ``mlflow run`` the run exists before the step could refuse its input: name it
    ``<step>:refused``, tag the error and end it FAILED (best effort, seconds at most)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    _http_defaults()
    try:
        with _fail_fast(5):
            client = MlflowClient()
            if f"{TAG_PREFIX}step" in client.get_run(run_id).data.tags:
                return  # the step ran in this run and recorded its own failure
            client.log_batch(run_id, tags=[RunTag("mlflow.runName", f"{step}:refused"),
                                           RunTag(f"{TAG_PREFIX}step", step),
                                           RunTag(ERROR_TAG, redact(message)[:_MAX_TAG_LEN]),
                                           RunTag("mlflow.note.content",
                                                  redact(f"**Failed before it started:** {message}"))],
                             synchronous=True)
            client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # the tracking server may be what was refused
        log.debug("could not record the refusal on run %s: %s", run_id, exc)


# -- search: runs handled by id, registry aliases ---------------------------------------
def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags on a run that is not open in this process (a search trial after it ended)."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    items = [RunTag(k, v) for k, v in clean_mapping(tags, _MAX_TAG_LEN).items()]
    if items:
        MlflowClient().log_batch(run_id, tags=items, synchronous=True)


def run_status(run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def end_stale_run(run_id: str, error: str, tags: Mapping[str, Any] | None = None) -> list[str]:
    """End a run whose process died (SIGKILL leaves it RUNNING forever, mlflow#3932) and its
    RUNNING child runs: FAILED, the error as ``mlproject.error``. Returns the runs ended."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return []
    ended = []
    kids = client.search_runs([run.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'",
                              max_results=1000)
    for r in [*kids, run]:
        if r.info.status not in ("RUNNING", "SCHEDULED"):
            continue
        extra = dict(tags or {}) if r is run else {}
        set_run_tags(r.info.run_id, {f"{TAG_PREFIX}error": error, **extra})
        client.set_terminated(r.info.run_id, status="FAILED")
        ended.append(r.info.run_id)
    if run.info.status not in ("RUNNING", "SCHEDULED") and tags:
        set_run_tags(run_id, tags)
    return ended


def register_alias(name: str, run_id: str, alias: str, tags: Mapping[str, Any] | None = None,
                   path: str = "model") -> str:
    """Point ``models:/<name>@<alias>`` at the run's model folder: the version already
    registered from that run and path if there is one, else a new version. ``tags`` go on the
    version. Returns the version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    source = f"runs:/{run_id}/{path}"
    model = logged_model(run_id, path)  # registered versions of a LoggedModel have source models:/<id>
    version = None
    with contextlib.suppress(Exception):  # no such model yet
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if mv.source == source or (model is not None and mv.source == f"models:/{model.model_id}"):
                version = mv.version
                break
    if version is None:
        version = register_model(run_id, name, path=path)
    client.set_registered_model_alias(name, alias, version)
    for key, value in clean_mapping(tags or {}, _MAX_TAG_LEN).items():
        client.set_model_version_tag(name, version, key, value)
    return str(version)
