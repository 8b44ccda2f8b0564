"""The only module that talks to MLflow: runs, batched logging, tags, artifacts, status.

A step opens its run with :func:`step_run`. Under ``mlflow run`` it attaches to the run
MLflow created (``MLFLOW_RUN_ID``); otherwise it creates one. Whatever goes wrong inside
the block ends the run FAILED with the error as the ``mlproject.error`` tag (Ctrl-C and
SIGTERM end it KILLED), so no run is left RUNNING and no crash is recorded as FINISHED.
Everything logged passes through :func:`redact`, so no credential reaches the server.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import re
import shlex
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlproject import envinfo
from mlproject.errors import UserError

log = logging.getLogger(__name__)

TAG_PREFIX = "mlproject."
DEFAULT_EXPERIMENT = "mlproject"
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000

# "hf_token", "api_key", "db_password" hide their value; counts like "ppl.tokens" stay visible.
_SECRET_KEY = re.compile(r"(token(?![a-z])|passw|secret|api[_-]?key|credential|auth(?![a-z]))", re.I)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.\-]*://)(?P<userinfo>[^/@\s]+)@")
_TOKEN_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9\-_]{16,}|ghp_[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16})\b")
_QUERY_SECRET = re.compile(r"([?&](?:[\w\-]*(?:token|password|secret|key|signature|credential)|sig)=)[^&\s]+", re.I)
_METRIC_BAD = re.compile(r"[^\w\-. /:]")


def redact(text: Any) -> str:
    """Strip credentials from a string: URI user-info, known token shapes, secret query args."""
    s = str(text)
    s = _URI_USERINFO.sub(lambda m: m.group("scheme") + "***@", s)
    s = _TOKEN_VALUE.sub("***", s)
    return _QUERY_SECRET.sub(r"\1***", s)


def clean_mapping(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Stringify, redact and truncate; keys that name a secret get their value hidden."""
    out = {}
    for key, value in values.items():
        if value is None:
            value = ""
        s = "***" if _SECRET_KEY.search(key) and value not in ("", None) else redact(value)
        out[key] = s[:limit]
    return out


def metric_key(name: str) -> str:
    """An MLflow-legal metric name (lm-eval's ``acc,none`` style keys have commas)."""
    return _METRIC_BAD.sub("_", name)


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def check_server(uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail fast, before any heavy work, if an HTTP tracking server does not answer."""
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as resp:  # noqa: S310 - user's server
                if resp.status >= 400:
                    raise UserError(f"tracking server {redact(uri)} answered {resp.status} on /health")
        except UserError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"tracking server {redact(uri)} is unreachable ({reason})") from None
    return uri


class Run:
    """Logging for one active MLflow run, batched through `MlflowClient.log_batch`."""

    def __init__(self, run_id: str, experiment_id: str):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.experiment_id = experiment_id
        self.env: dict | None = None  # the snapshot logged as env.json, when step_run took one
        self.client = MlflowClient()

    # -- params, tags, metrics -------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = []
        for k, v in clean_mapping(params, _MAX_PARAM_LEN).items():
            if k in existing and existing[k] != v:
                # `mlflow run` already logged the raw entry-point value (params are
                # immutable); the value we resolved it to goes beside it.
                k = f"resolved.{k}"
            if existing.get(k) != v:
                items.append(Param(k, v))
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in clean_mapping(tags, _MAX_TAG_LEN).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """One request per 1000 metrics (per-metric REST calls are ~20x slower)."""
        self.log_metric_steps([(step or 0, metrics, None)])

    def log_metric_steps(self, rows: "list[tuple[int, Mapping[str, float], int | None]]") -> None:
        """Many steps' metrics (``(step, {name: value}, timestamp_ms or None)``) in one request per
        1000 points: training curves are buffered by the caller and sent with this."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for step, metrics, ts in rows:
            for name, value in metrics.items():
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    continue
                items.append(Metric(metric_key(name), v, ts or now, int(step)))
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000], synchronous=True)

    def log_metrics_and_tags(self, metrics: Mapping[str, float], tags: Mapping[str, Any], step: int = 0) -> None:
        """Metrics and tags in one request (a search trial's result: fewer round trips per trial)."""
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        items = []
        for name, value in metrics.items():
            try:
                items.append(Metric(metric_key(name), float(value), now, int(step)))
            except (TypeError, ValueError):
                continue
        tag_items = [RunTag(k, v) for k, v in clean_mapping(tags, _MAX_TAG_LEN).items()]
        if len(items) > 1000 or len(tag_items) > 100:
            self.set_tags(tags)
            self.log_metrics(metrics, step=step)
            return
        self.client.log_batch(self.run_id, metrics=items, tags=tag_items, synchronous=True)

    def delete_tag(self, key: str) -> None:
        with contextlib.suppress(Exception):  # absent tag
            self.client.delete_tag(self.run_id, key)

    # -- artifacts -------------------------------------------------------------------
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def model_uri(self, path: str = "model") -> str:
        return f"runs:/{self.run_id}/{path}"


def _env_tags(info: Mapping[str, Any]) -> dict[str, Any]:
    return {f"env.{k}": v for k, v in info.items() if v is not None}


def command_line() -> str:
    return redact(" ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]))


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
        base_tags = {f"{TAG_PREFIX}step": step, f"{TAG_PREFIX}command": command_line(), **_EXTRA_TAGS.get(),
                     **(tags or {})}
        if run_name:
            base_tags["mlflow.runName"] = run_name
        run.set_tags(base_tags)
        if log_env:
            run.env = envinfo.collect()
            run.set_tags(_env_tags(run.env))
            run.log_dict(run.env, "env.json")
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as exc:
        status = "KILLED"
        _record_error(run, f"{type(exc).__name__}: interrupted")
        raise
    except BaseException as exc:
        _record_error(run, exc)
        raise
    finally:
        # End exactly this run (a child must not end its parent, whatever happened inside).
        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.run_id:
            mlflow.end_run(status=status)
        else:
            with contextlib.suppress(Exception):
                MlflowClient().set_terminated(run.run_id, status=status)


def _record_error(run: Run, exc: BaseException | str) -> None:
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    try:
        run.set_tags({f"{TAG_PREFIX}error": msg.strip().splitlines()[0] if msg.strip() else msg})
    except Exception:  # the server may be what failed; the status still gets set
        log.warning("could not record the error on run %s", run.run_id)


# -- reading back -------------------------------------------------------------------------
def download(uri: str) -> Path:
    """Materialize ``runs:/…`` or ``models:/name@alias`` artifacts locally (cached per URI)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

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
            if mv.run_id and not source.startswith("runs:/"):
                # MLflow 3 may record a logged-model source; prefer the run's model folder.
                source = f"runs:/{mv.run_id}/model"
            uri = source
        dest = Path(tempfile.mkdtemp(prefix="mlproject-artifacts-"))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except MlflowException as exc:
        raise UserError(f"cannot fetch {redact(uri)}: {str(exc).splitlines()[0]}") from None


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


def last_metric_step(run_id: str, key: str) -> int:
    """Highest step logged for metric ``key`` on the run (0 when none): where a resumed
    training's curve must continue so no step is recorded twice."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, metric_key(key))
    return max((int(m.step) for m in history), default=0)


def find_experiment_id(name: str) -> str | None:
    """The id of an existing, active experiment (None: it does not exist; nothing is created)."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient().get_experiment_by_name(name)
    return exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None


def run_experiment_id(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id).info.experiment_id


def experiment_name(experiment_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_experiment(experiment_id).name


def check_model_uri(uri: str) -> None:
    """Cheap existence check of a runs:/ or models:/ reference, before any run starts."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].partition("/")
            client.get_run(run_id)
            top = path.split("/")[0]
            if top and top not in {a.path for a in client.list_artifacts(run_id)}:
                raise UserError(f"run {run_id} has no artifact {top!r} (from {uri})")
        elif uri.startswith("models:/"):
            body = uri[len("models:/"):]
            if "@" in body:
                client.get_model_version_by_alias(*body.split("@", 1))
            else:
                client.get_model_version(*body.split("/", 1))
    except MlflowException as exc:
        raise UserError(f"model {uri!r} not found on the tracking server: {str(exc).splitlines()[0]}") from None


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


def register_model(run_id: str, name: str, alias: str | None = None, path: str = "model") -> str:
    """Register a run's model folder as a version of `name`, optionally under an alias."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"runs:/{run_id}/{path}", run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return mv.version


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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
    version = None
    with contextlib.suppress(Exception):  # no such model yet
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if mv.source == source or mv.source.rstrip("/").endswith(f"/{path}"):
                version = mv.version
                break
    if version is None:
        version = register_model(run_id, name, path=path)
    client.set_registered_model_alias(name, alias, version)
    for key, value in clean_mapping(tags or {}, _MAX_TAG_LEN).items():
        client.set_model_version_tag(name, version, key, value)
    return str(version)
