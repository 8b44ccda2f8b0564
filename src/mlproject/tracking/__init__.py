"""The package that talks to MLflow: runs, batched logging, tags, artifacts, status, registry.

It and ``mlproject.compare.query`` (which searches runs with ``MlflowClient`` for compare) are
the only code that talks to MLflow. Everything logged passes through ``redact``, so no
credential reaches the server. Every write goes spool → link → server: a run writes each record
to its local spool first, then sends it through the process's one link, whose retry budget
bounds what a server that stops answering can cost; what never arrives waits in the spool for
``mlproject runs sync``. Under torchrun / accelerate launch only the main process talks to
MLflow (the other ranks get a ``NullRun``; lookups run on the main process, their result
shared), so steps never test their rank.

Modules, lowest first (a module imports only those above it):

* ``names``      — every tag, param prefix and well-known metric name writers and readers share;
* ``link``       — the process's link to the server: retry budget, fail-fast requests, ``_LINK``;
* ``spool``      — the write-ahead journal of a run on local disk (pure file code);
* ``server``     — checking the store before heavy work: URI shape, SQLite creation, HTTP access;
* ``heartbeat``  — a run's liveness: host, pid and the heartbeat thread reap relies on;
* ``datasets``   — what a step read, as MLflow dataset inputs;
* ``run``        — ``Run`` (logging through spool and link) and ``NullRun``; metric names, params;
* ``headline``   — the experiment's saved runs-table view of the headline numbers;
* ``system_metrics`` — MLflow's CPU / memory / GPU samples on a step's run (its System metrics tab);
* ``lifecycle``  — ``step_run``: a step's run from open (or attach) to its final status;
* ``artifacts``  — fetching ``runs:/`` / ``models:/`` artifacts through a pruned local cache;
* ``lookups``    — reading runs back by id or reuse key, logged models, where to look in the UI;
* ``registry``   — registered model versions and aliases;
* ``repair``     — runs handled after the fact: sync, reap, refusals, ending and tagging by id.

Callers use the names below through the package (``tracking.step_run``, ``tracking.Run``):
tests patch them there, so keep calling them as package attributes.
"""

from mlproject.redaction import clean_mapping, redact
from mlproject.tracking import names
from mlproject.tracking.artifacts import ARTIFACT_CACHE_DAYS_ENV, download
from mlproject.tracking.headline import HEADLINE_VIEW, headline_columns, publish_headline_view
from mlproject.tracking.heartbeat import HEARTBEAT_ENV, heartbeat_seconds, liveness_tags
from mlproject.tracking.lifecycle import command_line, extra_tags, step_run
from mlproject.tracking.link import _LINK, RETRY_ENV, is_transient, retry_budget, tracking_uri, unsent_spools
from mlproject.tracking.lookups import (check_model_uri, experiment_name, find_experiment_id, find_reusable,
                                        find_tagged_run,
                                        last_metric_step, logged_model, record_reuse, run_data, run_experiment_id,
                                        upstream_key, where_to_look)
from mlproject.tracking.names import (DEFAULT_EXPERIMENT, ERROR_TAG, HEARTBEAT_TAG, HOST_TAG, NOTE_TAG, PID_TAG,
                                      REAPED_TAG, SYSTEM_PREFIX, TAG_PREFIX)
from mlproject.tracking.registry import register_alias, register_model
from mlproject.tracking.repair import (end_stale_run, fail_run, reap_runs, record_refusal, run_status, set_run_tags,
                                     sync_spool)
from mlproject.tracking.run import NullRun, Run, metric_key, resolve_params, send_metrics
from mlproject.tracking.server import check_server, strip_userinfo
from mlproject.tracking.system_metrics import SYSTEM_METRICS_ENV

__all__ = [
    "ARTIFACT_CACHE_DAYS_ENV", "DEFAULT_EXPERIMENT", "ERROR_TAG", "HEADLINE_VIEW", "HEARTBEAT_ENV", "HEARTBEAT_TAG",
    "HOST_TAG", "NOTE_TAG", "PID_TAG", "REAPED_TAG", "RETRY_ENV", "SYSTEM_METRICS_ENV", "SYSTEM_PREFIX", "TAG_PREFIX", "_LINK", "NullRun",
    "Run", "check_model_uri", "check_server", "clean_mapping", "command_line", "download", "end_stale_run",
    "experiment_name", "extra_tags", "fail_run", "find_experiment_id", "find_reusable", "find_tagged_run", "headline_columns", "heartbeat_seconds",
    "is_transient", "last_metric_step", "liveness_tags", "logged_model", "metric_key", "names",
    "publish_headline_view", "reap_runs", "record_refusal", "record_reuse", "redact", "register_alias",
    "register_model", "resolve_params", "retry_budget", "run_data", "run_experiment_id", "run_status",
    "send_metrics", "set_run_tags", "step_run", "strip_userinfo", "sync_spool", "tracking_uri", "unsent_spools",
    "upstream_key", "where_to_look",
]
