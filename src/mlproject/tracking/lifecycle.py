"""A step's run from open to final status: :func:`step_run`.

A step opens its run with :func:`step_run`. Under ``mlflow run`` it attaches to the run MLflow
created (``MLFLOW_RUN_ID``); otherwise it creates one. Whatever goes wrong inside the block ends
the run FAILED with the error as the ``mlproject.error`` tag (Ctrl-C and SIGTERM end it KILLED),
so no run is left RUNNING and no crash is recorded as FINISHED. The first tags (step, command
line, liveness, :func:`extra_tags`, environment snapshot) go with the run's first request. A
step that does the heavy work also samples the machine into the run's System metrics while the
run is open (``tracking.system_metrics``).

Under torchrun / accelerate launch (``WORLD_SIZE`` > 1) there is one run per launch: the main
process opens it and the other ranks get a :class:`~mlproject.tracking.run.NullRun` on it; a
failure on any rank ends it FAILED with that rank's error (``mlproject.distributed``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlproject import distributed, envinfo
from mlproject.redaction import redact
from mlproject.tracking.headline import publish_headline_view
from mlproject.tracking.heartbeat import liveness_tags
from mlproject.tracking.link import _LINK, _fail_fast, tracking_uri
from mlproject.tracking.names import (COMMAND_TAG, CONTINUED_IN_TAG, DEFAULT_EXPERIMENT, ENV_TAG_PREFIX, ERROR_TAG,
                                      RUN_NAME_TAG, SOURCE_NAME_TAG, STEP_TAG)
from mlproject.tracking.run import NullRun, Run
from mlproject.tracking.server import _first_line, strip_userinfo
from mlproject.tracking.system_metrics import MONITORED_STEPS, start_system_metrics

log = logging.getLogger(__name__)


def _env_tags(info: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{ENV_TAG_PREFIX}{k}": v for k, v in info.items() if v is not None}


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
    # Step runs get our sampler (tracking.system_metrics), so not MLflow's too, whatever
    # MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says; the other runs keep MLflow's own switch.
    mlflow_sampler = False if step in MONITORED_STEPS else None
    reopened = bool(run_id)
    if parent is not None:
        # mlflow run's MLFLOW_RUN_ID would override the parent of a nested run (mlflow#15713).
        os.environ.pop("MLFLOW_RUN_ID", None)
        if run_id:
            started = mlflow.start_run(run_id=run_id, nested=active is not None, log_system_metrics=mlflow_sampler)
        elif active is not None:
            if active.info.run_id != parent.run_id:
                raise RuntimeError(f"run {active.info.run_id} is active, not the parent {parent.run_id}")
            started = mlflow.start_run(experiment_id=parent.experiment_id, run_name=run_name, nested=True,
                                       log_system_metrics=mlflow_sampler)
        else:
            started = mlflow.start_run(experiment_id=parent.experiment_id, run_name=run_name,
                                       parent_run_id=parent.run_id, log_system_metrics=mlflow_sampler)
    else:
        launcher_id = os.environ.get("MLFLOW_RUN_ID")
        attach_id = run_id or launcher_id
        reopened = bool(attach_id)
        if attach_id:
            # The attached run decides the experiment, whatever was set earlier in this process.
            mlflow.set_experiment(experiment_id=MlflowClient().get_run(attach_id).info.experiment_id)
            started = mlflow.start_run(run_id=attach_id, log_system_metrics=mlflow_sampler)
            # mlflow run sets MLFLOW_RUN_ID for us; left in place it would override the parent
            # of any nested run we open later (mlflow#15713).
            os.environ.pop("MLFLOW_RUN_ID", None)
            if launcher_id and launcher_id != attach_id:
                with contextlib.suppress(Exception):
                    MlflowClient().set_tag(launcher_id, CONTINUED_IN_TAG, attach_id)
        else:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            # By id, not through the active experiment: when another process creates the same new
            # experiment at once, MLflow's set_experiment returns it without making it active, and
            # the run would land in "Default" (a concurrent first run's result went missing so).
            exp = mlflow.set_experiment(name)
            started = mlflow.start_run(experiment_id=exp.experiment_id, run_name=run_name,
                                       log_system_metrics=mlflow_sampler)
    run = Run(started.info.run_id, started.info.experiment_id)
    status = "FAILED"
    sampler = None
    try:
        run.open_spool(step)
        base_tags = {STEP_TAG: step, COMMAND_TAG: command_line(), **liveness_tags(),
                     **_EXTRA_TAGS.get(),
                     **(tags or {})}
        if str(started.data.tags.get(SOURCE_NAME_TAG, "")).endswith("__main__.py"):
            # MLflow names the source after sys.argv[0]: `python -m mlproject` reads as __main__.py
            base_tags[SOURCE_NAME_TAG] = " ".join(command_line().split()[:2])
        if run_name:
            base_tags[RUN_NAME_TAG] = run_name
        run.set_tags(base_tags)
        run.start_heartbeat(tag=False)
        sampler = start_system_metrics(run.run_id, step, resume=reopened)
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
        try:
            if sampler is not None:
                sampler.stop()  # its last sample and batch go before the final status
        finally:
            # Ends exactly this run (a child never ends its parent, whatever happened inside).
            _close(run, status)


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
