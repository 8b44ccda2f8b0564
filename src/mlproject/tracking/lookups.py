"""Reading runs back: by id (lineage, experiments, model references), by reuse key (and the
child run that records a reuse), the LoggedModel a run produced, and where to look in the UI.

Every lookup a step makes before or while it runs is done by the main process of a launch, its
result shared with the other ranks (``distributed.main_only``), so steps never test their rank.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any, Mapping

from mlproject import distributed
from mlproject.errors import UserError
from mlproject.redaction import redact
from mlproject.tracking.headline import HEADLINE_VIEW
from mlproject.tracking.link import _LINK, _fail_fast
from mlproject.tracking.names import (CACHE_KEY_TAG, ERROR_TAG, PARENT_RUN_TAG, REUSED_FROM_TAG, REUSED_KEY_TAG,
                                      STEP_TAG, TAG_PREFIX, TOPK_KEY_TAG, VIEW_TAG_PREFIX)
from mlproject.tracking.run import metric_key

if TYPE_CHECKING:
    from mlproject.tracking.run import Run


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
        return client.get_run(run_id).data.tags.get(CACHE_KEY_TAG)
    except (MlflowException, IndexError, ValueError):
        return None


@distributed.main_only
def find_reusable(key: str, experiment_id: str) -> dict | None:
    """The newest FINISHED run of ``experiment_id`` whose ``mlproject.cache_key`` tag equals
    ``key`` exactly: ``{"run_id", "metrics", "tags"}``, or None."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    return {"run_id": run.info.run_id, "metrics": dict(run.data.metrics), "tags": dict(run.data.tags),
            "params": dict(run.data.params), "run_name": run.info.run_name}


@distributed.main_only
def find_tagged_run(tag: str, value: str, experiment_id: str | None = None) -> str | None:
    """The newest FINISHED run tagged ``tag = value``: in ``experiment_id`` first, then in any
    active experiment (a base model's stored distributions serve candidates everywhere)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    query = f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'"

    def newest(ids: list[str]) -> str | None:
        # a pipeline's record of a reused step holds the original's tags but none of its artifacts
        for run in client.search_runs(ids, filter_string=query, order_by=["attributes.start_time DESC"],
                                      max_results=10):
            if REUSED_FROM_TAG not in run.data.tags:
                return run.info.run_id
        return None

    if experiment_id and (found := newest([experiment_id])):
        return found
    token = None
    while True:
        page = client.search_experiments(max_results=100, page_token=token)
        ids = [e.experiment_id for e in page if e.experiment_id != experiment_id]
        if ids and (found := newest(ids)):
            return found
        token = page.token
        if not token:
            return None


@distributed.main_only
def record_reuse(parent: "Run", step: str, original: Mapping[str, Any], run_name: str,
                 extra_tags: Mapping[str, Any] | None = None) -> str:
    """A FINISHED child run of ``parent`` standing for a reused step: the original's params,
    lineage tags and latest metrics copied (so the pipeline's tree shows the numbers), tagged
    ``mlproject.reused_from``. It carries no ``cache_key`` (it is not a result of its own), and
    compare leaves such runs out (the original is the result)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = {k: v for k, v in original["tags"].items()
            if k.startswith(TAG_PREFIX) and k not in (CACHE_KEY_TAG, ERROR_TAG, TOPK_KEY_TAG)}
    tags.update({STEP_TAG: step, REUSED_FROM_TAG: original["run_id"],
                 REUSED_KEY_TAG: original["tags"].get(CACHE_KEY_TAG, ""),
                 PARENT_RUN_TAG: parent.run_id, **(extra_tags or {})})
    created = client.create_run(parent.experiment_id, run_name=run_name,
                                tags={k: str(v) for k, v in tags.items()})
    run_id = created.info.run_id
    now = int(time.time() * 1000)
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
        if VIEW_TAG_PREFIX + HEADLINE_VIEW in mlflow.get_experiment(experiment_id).tags:
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
