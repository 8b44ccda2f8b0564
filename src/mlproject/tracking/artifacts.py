"""Fetching a run's or a registered model's artifacts, through a local cache with pruning.

The cache (``$MLPROJECT_CACHE/artifacts/<hash>``) is keyed by the resolved ``runs:/`` URI and
the run's end time; entries unused for ``MLPROJECT_ARTIFACT_CACHE_DAYS`` (default 7) go on the
next download.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from mlproject import distributed
from mlproject.errors import UserError
from mlproject.redaction import redact
from mlproject.tracking.link import tracking_uri

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
