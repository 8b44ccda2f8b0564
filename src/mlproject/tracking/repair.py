"""Runs handled after the fact, from outside the process that opened them: ``mlproject runs
sync`` (a spool sent late), ``mlproject runs reap`` (RUNNING runs whose process is gone),
refusals under ``mlflow run``, and runs ended, tagged or read by id (a search trial's run after
its process died or ended).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Collection, Mapping

from mlproject.errors import UserError
from mlproject.redaction import clean_mapping, redact
from mlproject.tracking.heartbeat import heartbeat_seconds
from mlproject.tracking.link import _fail_fast, _http_defaults
from mlproject.tracking.names import (ERROR_TAG, HEARTBEAT_TAG, HOST_TAG, NOTE_TAG, PARENT_RUN_TAG, PID_TAG,
                                      PROJECT_BACKEND_TAG, PROJECT_ENTRY_POINT_TAG, PROJECT_ENV_TAG, REAPED_TAG,
                                      RUN_NAME_TAG, RUNS_CHANGED_TAG, STEP_TAG)
from mlproject.tracking.run import (_MAX_TAG_LEN, create_logged_model, model_upload_calls, resolve_params,
                                   send_metrics, write_mlmodel)
from mlproject.tracking.server import _first_line, check_server
from mlproject.tracking.spool import Spool

log = logging.getLogger(__name__)

# mark_runs_changed sets names.RUNS_CHANGED_TAG on an experiment when runs of it were changed after
# they ended (tags written here, a spool sent late); compare's run table refetches an experiment
# whose mark changed (``mlproject.compare.cache``). Value: ``<ms>-<random>``, unique per write.


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
            elif op == "model":
                if not _sync_model(client, spool, rec, run):
                    counts["missing_models"] = counts.get("missing_models", 0) + 1
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
        if counts:
            mark_runs_changed(client, run.info.experiment_id)
    finally:
        lock.release()
    if complete:
        shutil.rmtree(spool.path, ignore_errors=True)
    return counts


def _sync_model(client, spool: Spool, rec: dict, run) -> bool:
    """A ``model`` record: the LoggedModel the step created (its id noted in the spool) or a new
    one, its MLmodel file written, linked to the run, the folder uploaded, finalized READY.
    False when the folder is gone."""
    from mlflow.exceptions import MlflowException

    run_id = run.info.run_id
    src = spool.artifact_source(rec)
    if src is None:
        log.warning("model %s of run %s is gone (neither in the spool nor at %s); skipped", rec["name"], run_id,
                    rec.get("original_path"))
        return False
    model = None
    model_id = spool.notes(rec["seq"]).get("model_id")
    if model_id:
        with contextlib.suppress(MlflowException):
            model = client.get_logged_model(model_id)
    if model is None:
        model = create_logged_model(client, run.info.experiment_id, run_id, rec)
        spool.note(rec["seq"], model_id=model.model_id)
    if str(model.status) == "READY":  # uploaded after all (the answer was what got lost)
        return True
    write_mlmodel(src, model, run_id, rec.get("flavor"))
    linked = {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}
    for call in model_upload_calls(client, run_id, model.model_id, src, link=model.model_id not in linked):
        call()
    return True


# How long `mlflow run` may build an environment (conda solving, CUDA torch downloading) before reap
# calls a run it created for one of our entry points, in which no step ever started, dead.
UNSTARTED_SECONDS = 3600.0
# the env managers whose environment MLflow's local backend builds before it starts the command
_BUILT_ENVS = ("conda", "virtualenv", "uv")


def reap_runs(experiments: list[str] | None = None, stale_seconds: float | None = None,
              dry_run: bool = False, entry_points: Mapping[str, Collection[str]] | None = None) -> list[dict]:
    """RUNNING runs whose process is gone → FAILED, each with the reason it was decided on.

    A run started by mlproject carries ``mlproject.host``, ``mlproject.pid`` and a heartbeat
    its process refreshes every ``MLPROJECT_HEARTBEAT_SECONDS`` (60). On this host the pid
    decides (gone, or reused by a process that started after the run: dead). On another host
    the heartbeat does: older than ``stale_seconds`` (default 10 heartbeats, at least 10
    minutes) is dead. Runs without a heartbeat tag (not started by mlproject) are left alone,
    but for one kind: ``mlflow run`` creates its run before it builds the environment, and when
    the build fails (no conda executable, a failed install) it exits and leaves that run RUNNING
    with no process at all. A run with the env tag of a built environment (conda, virtualenv, uv),
    no backend tag (MLflow tags it once the command started), no step tag, for one of
    ``entry_points`` (name → the parameters it declares, every one logged) is dead when older than
    ``stale_seconds`` (default ``UNSTARTED_SECONDS``). The reason goes to ``mlproject.reaped`` and
    ``mlproject.error``; the end time is the last heartbeat (the start, for a run never started).
    Returns one dict per RUNNING run looked at: run_id, name, action, reason.
    """
    from mlflow.entities import RunTag, ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    stale = stale_seconds if stale_seconds is not None else max(600.0, 10 * heartbeat_seconds())
    unstarted = stale_seconds if stale_seconds is not None else UNSTARTED_SECONDS
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
                out.append(_reap_one(client, run, here, now, stale, dry_run, RunTag)
                           if run.data.tags.get(HEARTBEAT_TAG) or not entry_points else
                           _reap_unstarted(client, run, now, unstarted, dry_run, RunTag, entry_points))
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


def _reap_unstarted(client, run, now: float, limit: float, dry_run: bool, RunTag,  # noqa: N803
                    entry_points: Mapping[str, Collection[str]]) -> dict:
    """A RUNNING run without a heartbeat: failed only if ``mlflow run`` made it for one of our
    entry points and never got its command started (reap_runs says how that is told)."""
    tags = run.data.tags
    item = {"run_id": run.info.run_id, "name": run.info.run_name, "action": "kept",
            "reason": "no heartbeat tag (not started by mlproject): left alone"}
    env, entry_point = tags.get(PROJECT_ENV_TAG), tags.get(PROJECT_ENTRY_POINT_TAG)
    if (env not in _BUILT_ENVS or PROJECT_BACKEND_TAG in tags or STEP_TAG in tags
            or entry_point not in entry_points or not set(entry_points[entry_point]) <= set(run.data.params)):
        return item
    age = now - run.info.start_time / 1000.0
    if age <= limit:
        item["reason"] = (f"created by `mlflow run` {age:.0f} s ago, its {env} environment may still be "
                          f"building (limit {limit:.0f} s)")
        return item
    hint = " (no conda executable? --env-manager uv or local need none)" if env == "conda" else ""
    reason = (f"created by `mlflow run --env-manager {env}` {age:.0f} s ago and no step ever started in it: "
              f"MLflow could not build its environment{hint}")
    item.update(action="would fail" if dry_run else "failed", reason=reason)
    if not dry_run:
        client.log_batch(run.info.run_id, tags=[RunTag(REAPED_TAG, reason), RunTag(ERROR_TAG, f"reaped: {reason}")],
                         synchronous=True)
        client.set_terminated(run.info.run_id, "FAILED", end_time=run.info.start_time)
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
            if STEP_TAG in client.get_run(run_id).data.tags:
                return  # the step ran in this run and recorded its own failure
            client.log_batch(run_id, tags=[RunTag(RUN_NAME_TAG, f"{step}:refused"),
                                           RunTag(STEP_TAG, step),
                                           RunTag(ERROR_TAG, redact(message)[:_MAX_TAG_LEN]),
                                           RunTag(NOTE_TAG,
                                                  redact(f"**Failed before it started:** {message}"))],
                             synchronous=True)
            client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # the tracking server may be what was refused
        log.debug("could not record the refusal on run %s: %s", run_id, exc)


def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags on a run that is not open in this process (a search trial after it ended)."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    items = [RunTag(k, v) for k, v in clean_mapping(tags, _MAX_TAG_LEN).items()]
    if items:
        client = MlflowClient()
        client.log_batch(run_id, tags=items, synchronous=True)
        mark_runs_changed(client, client.get_run(run_id).info.experiment_id)


def mark_runs_changed(client, experiment_id: str) -> None:
    """Tell compare's run tables that runs of this experiment changed after the fact: MLflow
    keeps no per-run change time, and a tag write does not touch the experiment. Best effort
    (the run's own write already succeeded); a table missing the mark goes stale until its
    time to live (``MLPROJECT_COMPARE_CACHE_TTL``)."""
    import uuid

    from mlflow.exceptions import MlflowException

    try:
        client.set_experiment_tag(experiment_id, RUNS_CHANGED_TAG,
                                  f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}")
    except MlflowException as exc:
        log.warning("could not mark experiment %s as changed (compare caches may show old tags "
                    "until their time to live): %s", experiment_id, _first_line(exc))


def run_status(run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def fail_run(run_id: str, error: str, tags: Mapping[str, Any] | None = None) -> None:
    """End a run FAILED with ``error`` whatever its status now (a search trial whose result came
    after its trial had been failed and retried: the run may already have ended FINISHED)."""
    from mlflow.tracking import MlflowClient

    set_run_tags(run_id, {ERROR_TAG: error, **dict(tags or {})})
    MlflowClient().set_terminated(run_id, status="FAILED")


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
                              filter_string=f"tags.`{PARENT_RUN_TAG}` = '{run_id}' and attributes.status = 'RUNNING'",
                              max_results=1000)
    for r in [*kids, run]:
        if r.info.status not in ("RUNNING", "SCHEDULED"):
            continue
        extra = dict(tags or {}) if r is run else {}
        set_run_tags(r.info.run_id, {ERROR_TAG: error, **extra})
        client.set_terminated(r.info.run_id, status="FAILED")
        ended.append(r.info.run_id)
    if run.info.status not in ("RUNNING", "SCHEDULED") and tags:
        set_run_tags(run_id, tags)
    return ended
