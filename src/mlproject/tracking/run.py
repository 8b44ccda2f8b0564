"""One open MLflow run as the steps see it: :class:`Run` (batched logging through the spool and
the link) and :class:`NullRun` (every call a no-op, for the other ranks of a launch).

Also the rules every logged value follows: :func:`metric_key` (MLflow-legal, redacted metric
names), :func:`resolve_params` (params are immutable: a changed value goes beside the old one)
and :func:`send_metrics` (one request per 1000 points). Opening and closing a run with its final
status is ``tracking.lifecycle``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from mlproject.errors import StepFailed
from mlproject.redaction import clean_mapping, redact
from mlproject.tracking.datasets import dataset_inputs
from mlproject.tracking.heartbeat import _Heartbeat, heartbeat_seconds, liveness_tags
from mlproject.tracking.link import _LINK, _http_defaults, tracking_uri
from mlproject.tracking.names import NOTE_TAG, RESOLVED_PARAM_PREFIX, SYSTEM_PREFIX
from mlproject.tracking.server import _first_line, strip_userinfo
from mlproject.tracking.spool import Spool

log = logging.getLogger(__name__)

# What MLflow's SQL stores accept (longer values are cut by clean_mapping).
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000
_METRIC_BAD = re.compile(r"[^\w\-. /:]")


def metric_key(name: str) -> str:
    """An MLflow-legal metric name (lm-eval's ``acc,none`` style keys have commas), with any
    secret a user-given name carried (``…?token=…``) redacted first."""
    return _METRIC_BAD.sub("_", redact(name))


class Run:
    """Logging for one active MLflow run, batched through `MlflowClient.log_batch`.

    With a spool (:meth:`open_spool`, done by :func:`~mlproject.tracking.lifecycle.step_run`) every call is written there
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
        # Models whose upload did not reach the server: name -> their folder in the spool.
        self.unsent_models: dict[str, Path] = {}

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
        inputs = dataset_inputs(specs)
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
        taking the output of another.

        Spooled and sent like every record, each call within the retry budget. When the server
        does not take it, the folder is *moved* into the spool (``unsent_models[name]`` says
        where; it is usually the caller's temporary folder) and the step goes on: ``mlproject runs
        sync`` creates or finishes the model later, and ``runs:/<run_id>/<name>`` resolves from
        then on. An error that is not about the connection still propagates, the folder kept in
        the spool all the same. Returns the model id (``models:/<model_id>``), "" while the
        server has none."""
        local_dir = Path(local_dir)
        spec = model_record(name, flavor, tags, params)
        seq = self.spool.append("model", **spec, dir=local_dir.name, original_path=str(local_dir.resolve())) \
            if self.spool else None
        model = None
        try:
            made: list = []
            if _LINK.send(lambda: made.append(create_logged_model(self.client, self.experiment_id, self.run_id,
                                                                  spec)), "model"):
                model = made[-1]
                self.model_ids[name] = model.model_id
                if seq is not None:
                    self.spool.note(seq, model_id=model.model_id)
                write_mlmodel(local_dir, model, self.run_id, flavor)
                if all(_LINK.send(call, "model")
                       for call in model_upload_calls(self.client, self.run_id, model.model_id, local_dir)):
                    if seq is not None:
                        self.spool.mark_sent(seq)
                    return model.model_id
        except BaseException as exc:
            if seq is not None:
                try:
                    self._keep_model(seq, name, local_dir, _first_line(exc) or type(exc).__name__)
                except OSError as move:
                    log.warning("could not keep model folder %s in spool %s: %s", local_dir, self.spool.path, move)
            elif model is not None:
                with contextlib.suppress(Exception):
                    self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        if seq is None:  # no spool to keep it in (it could not be opened): the folder would be lost
            raise StepFailed(f"model {name!r} of run {self.run_id} could not be uploaded to tracking server "
                             f"{redact(strip_userinfo(tracking_uri()))} and this run has no spool to keep it in")
        self._keep_model(seq, name, local_dir, "the tracking server did not take it")
        return model.model_id if model is not None else ""

    def _keep_model(self, seq: int, name: str, local_dir: Path, why: str) -> None:
        kept = self.spool.keep_moved(seq, local_dir)
        self.unsent_models[name] = kept
        log.warning("model %r of run %s is not on tracking server %s (%s); its folder waits in %s — send it with: "
                    "mlproject runs sync %s", name, self.run_id, redact(strip_userinfo(tracking_uri())), why, kept,
                    self.spool.path)

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

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """A generated binary artifact (a Parquet table, safetensors), through the spool like text."""
        if self.spool is not None:
            self._log_bytes(data, artifact_file)
            return
        import tempfile

        parent = str(Path(artifact_file).parent)
        with tempfile.TemporaryDirectory(prefix="mlproject-artifact-") as tmp:
            local = Path(tmp) / Path(artifact_file).name
            local.write_bytes(data)
            _LINK.send(lambda: self.client.log_artifact(self.run_id, str(local), None if parent in ("", ".") else parent),
                       "artifact")

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

    def model_uri(self, path: str = "model") -> str:
        return f"runs:/{self.run_id}/{path}"

    # -- liveness ---------------------------------------------------------------------
    def start_heartbeat(self, tag: bool = True) -> None:
        """Refresh the heartbeat tag from a daemon thread (see ``tracking.repair.reap_runs``); ``tag``: set
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
        self.unsent_models: dict[str, Path] = {}

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

    def log_bytes(self, data, artifact_file):
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


def resolve_params(existing: Mapping[str, str], params: Mapping[str, str]) -> dict[str, str]:
    """The params still to log. `mlflow run` already logged the raw entry-point value (params
    are immutable); a value we resolved differently goes beside it as ``resolved.<name>``."""
    items: dict[str, str] = {}
    for k, v in params.items():
        if k in existing and existing[k] != v:
            k = f"{RESOLVED_PARAM_PREFIX}{k}"
        if existing.get(k) != v:
            items[k] = v
    return items


def model_record(name: str, flavor: Mapping[str, Any] | None, tags: Mapping[str, Any] | None,
                 params: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a ``model`` spool record holds to create the LoggedModel: name, tags, params (as
    strings, redacted), model type and the MLmodel flavor."""
    return {"name": name, "flavor": dict(flavor) if flavor else None,
            "model_type": "transformers" if flavor else None,
            "tags": {k: str(v) for k, v in clean_mapping(tags or {}, _MAX_TAG_LEN).items()},
            "params": {k: str(v) for k, v in clean_mapping(params or {}, _MAX_PARAM_LEN).items()}}


def create_logged_model(client, experiment_id: str, run_id: str, record: Mapping[str, Any]):
    """The PENDING LoggedModel a :func:`model_record` describes, produced by ``run_id``."""
    return client.create_logged_model(experiment_id, name=record["name"], source_run_id=run_id,
                                      tags=record.get("tags") or None, params=record.get("params") or None,
                                      model_type=record.get("model_type"))


def write_mlmodel(folder: str | Path, model, run_id: str, flavor: Mapping[str, Any] | None) -> None:
    """The folder's ``MLmodel`` file for LoggedModel ``model``."""
    from mlflow.models import Model

    mlmodel = Model(artifact_path=model.artifact_location, run_id=run_id, model_id=model.model_id,
                    model_uuid=model.model_id)
    if flavor:
        mlmodel.add_flavor("transformers", **flavor)
    mlmodel.save(str(Path(folder) / "MLmodel"))


def model_upload_calls(client, run_id: str, model_id: str, folder: str | Path,
                       link: bool = True) -> list[Callable[[], Any]]:
    """The calls that make a created LoggedModel whole, in order: linked to the run as its output
    (``link``), the folder uploaded, finalized READY. Each may be repeated."""
    from mlflow.entities import LoggedModelOutput

    calls = [lambda: client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])] if link else []
    return calls + [lambda: client.log_model_artifacts(model_id, str(folder)),
                    lambda: client.finalize_logged_model(model_id, "READY")]


def _metric_entities(points: list) -> list:
    from mlflow.entities import Metric

    # [key, value, timestamp, step] or, linked to an MLflow LoggedModel, [..., model_id]
    return [Metric(p[0], float(p[1]), int(p[2]), int(p[3]), model_id=p[4] if len(p) > 4 else None)
            for p in points]


def send_metrics(client, run_id: str, points: list) -> None:
    metrics = _metric_entities(points)
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)
