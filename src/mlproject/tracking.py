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
#: MLflow's own prefix for metrics that describe the machinery, not the model: the UI shows them
#: under "System metrics", apart from the model metrics. Bookkeeping (compare, pipeline) goes here.
SYSTEM_PREFIX = "system/"
NOTE_TAG = "mlflow.note.content"
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
        # MLflow LoggedModels this run produced, by name ("model", "adapter"); metrics logged
        # after the "model" exists are linked to it (the experiment's Models tab shows them).
        self.model_ids: dict[str, str] = {}

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
        1000 points: training curves are buffered by the caller and sent with this. Once the run
        has logged its output model, model metrics are linked to it (``system/`` ones are not)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        model_id = self.model_ids.get("model")
        items = []
        for step, metrics, ts in rows:
            for name, value in metrics.items():
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    continue
                key = metric_key(name)
                linked = model_id if model_id and not key.startswith(SYSTEM_PREFIX) else None
                items.append(Metric(key, v, ts or now, int(step), model_id=linked))
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000], synchronous=True)

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
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for spec in specs:
            dataset = _dataset(spec)
            tags = [InputTag("mlflow.data.context", spec.get("context") or "evaluation")]
            tags += [InputTag(str(k), redact(v)) for k, v in (spec.get("tags") or {}).items()]
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags))
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
        if str(started.data.tags.get("mlflow.source.name", "")).endswith("__main__.py"):
            # MLflow names the source after sys.argv[0]: `python -m mlproject` reads as __main__.py
            base_tags["mlflow.source.name"] = " ".join(command_line().split()[:2])
        if run_name:
            base_tags["mlflow.runName"] = run_name
        run.set_tags(base_tags)
        if log_env:
            run.env = envinfo.collect()
            run.set_tags(_env_tags(run.env))
            run.log_dict(run.env, "env.json")
        yield run
        status = "FINISHED"
        publish_headline_view(run)
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
            if mv.run_id and not source.startswith(("runs:/", "models:/")):
                # a storage location of a run's model folder: fetch it through the run
                source = f"runs:/{mv.run_id}/model"
            uri = source  # runs:/<id>/<path> or models:/<model_id> (an MLflow 3 LoggedModel)
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
    """Two lines that end a command: where the run's report is and how to open the run in the UI."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if experiment_id is None:
        experiment_id = run_experiment_id(run_id)
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
