"""Fetching a run's or a registered model's artifacts: read in place from a local store, else
downloaded through a size-capped local cache.

An artifact whose store is a directory on this machine (a ``file:`` or absolute-path artifact
location: the local ``./mlflow.db`` + ``./mlruns`` store, a server without ``--serve-artifacts``)
is returned where it lies. Anything else goes to ``$MLPROJECT_CACHE/artifacts/<hash>``, keyed by
the resolved ``runs:/`` URI and the run's end time. The cache holds at most
``MLPROJECT_ARTIFACT_CACHE_GB`` (default 32) and evicts the least recently used entries to make
room; an artifact larger than the whole cap is downloaded to a folder removed when the process
exits. Entries unused for ``MLPROJECT_ARTIFACT_CACHE_DAYS`` (default 7) go on the next download.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from mlproject import distributed
from mlproject.errors import UserError
from mlproject.redaction import redact
from mlproject.tracking.link import tracking_uri

log = logging.getLogger(__name__)

ARTIFACT_CACHE_DAYS_ENV = "MLPROJECT_ARTIFACT_CACHE_DAYS"
ARTIFACT_CACHE_GB_ENV = "MLPROJECT_ARTIFACT_CACHE_GB"
DEFAULT_ARTIFACT_CACHE_GB = 32.0
_DOWNLOAD_META = ".mlproject-download.json"
_UNCACHED_DIR = "artifacts-uncached"  # beside the cache: downloads too large for it
_GB = 1024**3  # GB here are 2^30 bytes, as MB are 2^20 in compression/

#: This process's downloads that were too large for the cache: cache key -> local path.
_UNCACHED: dict[str, Path] = {}


def download(uri: str) -> Path:
    """Materialize ``runs:/…`` or ``models:/name@alias`` artifacts locally (see :func:`_download`).

    Under a distributed launch the main process downloads once and the other ranks use its
    copy; a rank on another node (where that path does not exist) fetches its own."""
    path = distributed.on_main(_download, uri)
    return path if path.exists() else _download(uri)


def cache_bytes() -> int:
    """Bytes held by the artifact cache now (entries and downloads in progress)."""
    from mlproject.paths import artifacts_root

    return _tree_bytes(artifacts_root())


def cache_cap_bytes() -> int:
    """The cache's cap in bytes: ``MLPROJECT_ARTIFACT_CACHE_GB`` (default 32; GB of 2^30 bytes)."""
    raw = os.environ.get(ARTIFACT_CACHE_GB_ENV, "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_ARTIFACT_CACHE_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        raise UserError(f"{ARTIFACT_CACHE_GB_ENV} must be a number of GB >= 0, got {raw!r}")
    return int(gb * _GB)


def _download(uri: str) -> Path:
    """Materialize ``runs:/…`` or ``models:/name@alias`` artifacts locally.

    A registry reference resolves to the run's (or LoggedModel's) artifacts first. When those
    lie in a directory on this machine, that path is returned: nothing is copied. Otherwise
    they are downloaded into the cache (``$MLPROJECT_CACHE/artifacts/<hash>``), keyed by the
    resolved URI and the run's end time, so a registry alias that moves, or a run that logged
    again, is fetched anew; a run still in progress is never served from the cache. Before a
    download the least recently used entries not in use are evicted until the artifact fits
    under ``MLPROJECT_ARTIFACT_CACHE_GB``, and again after it; one larger than the cap goes to
    a folder removed at exit. Entries unused for ``MLPROJECT_ARTIFACT_CACHE_DAYS`` go too.
    """
    from filelock import FileLock
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mlproject.paths import artifacts_root

    cap = cache_cap_bytes()
    client = MlflowClient()
    try:
        uri = _resolve_registry(client, uri)
        info = client.get_run(uri[len("runs:/"):].split("/", 1)[0]).info if uri.startswith("runs:/") else None
        root = artifacts_root()
        in_place = _local_path(client, uri, info)
        if in_place is not None:
            if root.is_dir():
                _evict(root, cap, None, cap)  # nothing added, but the cap may have been lowered
            return in_place
        version = ""
        if info is not None:
            version = str(info.end_time) if info.status in ("FINISHED", "FAILED", "KILLED") else f"live-{time.time_ns()}"
        key = hashlib.sha256(f"{tracking_uri()}|{uri}|{version}".encode()).hexdigest()[:24]
        root.mkdir(parents=True, exist_ok=True)
        known = _UNCACHED.get(key)
        if known is not None and known.exists():  # too large for the cache, fetched already
            _evict(root, cap, None, cap)
            return known
        _prune_artifact_cache(root)
        entry = root / key
        with FileLock(str(entry) + ".lock", timeout=3600):
            meta = entry / _DOWNLOAD_META
            if meta.is_file():
                _touch(meta)
                _evict(root, cap, entry, cap)  # the cap may have been lowered since
                return entry / json.loads(meta.read_text())["path"]
            try:
                size = _remote_size(uri)
            except Exception as exc:  # noqa: BLE001 - a store that cannot list: weighed after the download
                log.debug("cannot list %s (%s); sizing it after the download", redact(uri), exc)
                size = 0
            if size <= cap:
                _evict(root, cap - size, entry, cap)
                rel = _fetch_into_cache(uri, root, entry)
                size = _tree_bytes(entry)
                if size <= cap:
                    _evict(root, cap, entry, cap)
                    return entry / rel
                # larger than its listing said: out of the cache, as if it had been listed so
                (entry / _DOWNLOAD_META).unlink()
                folder = _uncached_folder(uri, size, cap)
                os.replace(entry, folder / "download")
                _UNCACHED[key] = folder / "download" / rel
                return _UNCACHED[key]
        got = _fetch_uncached(uri, key, size, cap)
        _evict(root, cap, None, cap)  # the rest of the cache still answers to the cap
        return got
    except MlflowException as exc:
        raise UserError(f"cannot fetch {redact(uri)}: {str(exc).splitlines()[0]}") from None


def _resolve_registry(client, uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/version`` → the version's source: ``runs:/…``, or
    ``models:/<model_id>`` for a LoggedModel; any other URI as it is."""
    if not uri.startswith("models:/"):
        return uri
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
    return source


def _local_dir(location: str | None) -> Path | None:
    """The directory behind an artifact location when it is on this machine (``file:`` or an
    absolute path, resolved as MLflow's local artifact repository does) and exists; else None."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return None
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(location)
    if not isinstance(repo, LocalArtifactRepository):
        return None
    path = Path(repo.artifact_dir)
    return path if path.is_absolute() and path.is_dir() else None


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` when it exists and stays inside ``root``."""
    path = root / rel if rel else root
    with contextlib.suppress(OSError, ValueError):
        if path.exists() and path.resolve().is_relative_to(root.resolve()):
            return path
    return None


def _local_path(client, uri: str, info) -> Path | None:
    """Where ``uri``'s artifacts lie on this machine, to be read in place; None: download them.

    ``runs:/<id>/<name>/…`` is what ``mlflow.artifacts.download_artifacts`` would fetch: the
    run's artifacts at that path and those of the run's LoggedModel ``<name>`` (merged, the
    model's winning). It is served in place only when every source is local and exactly one
    holds the path. ``models:/<model_id>/…`` is the LoggedModel's artifact location."""
    from mlproject.tracking.lookups import logged_model

    if uri.startswith("runs:/"):
        run_dir = _local_dir(info.artifact_uri)
        if run_dir is None:
            return None
        rel = uri[len("runs:/"):].strip("/").partition("/")[2]
        in_run = _inside(run_dir, rel)
        if not rel:
            return in_run
        name, _, rest = rel.partition("/")
        model = logged_model(info.run_id, name, info.experiment_id)
        if model is None:
            return in_run
        model_dir = _local_dir(model.artifact_location)
        if model_dir is None:
            return None
        in_model = _inside(model_dir, rest)
        if in_run is not None and in_model is not None:
            return None  # two folders MLflow would merge into one: download that
        return in_model or in_run
    if uri.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        model_id, _, rest = uri[len("models:/"):].strip("/").partition("/")
        try:
            model_dir = _local_dir(client.get_logged_model(model_id).artifact_location)
        except MlflowException:  # not a LoggedModel id: MLflow's download resolves it
            return None
        return None if model_dir is None else _inside(model_dir, rest)
    return _local_dir(uri)  # a registered version whose source is a storage location


def _list(uri: str) -> list:
    import mlflow

    if uri.startswith("runs:/"):
        run_id, _, rel = uri[len("runs:/"):].strip("/").partition("/")
        # run_id + path lists the run's artifacts and its LoggedModel's, as a download fetches them
        return mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path=rel or None)
    return mlflow.artifacts.list_artifacts(artifact_uri=uri)


def _remote_size(uri: str) -> int:
    """Bytes that downloading ``uri`` would write (a folder, listed recursively, or one file)."""

    def walk(u: str, infos: list) -> int:
        total = 0
        for fi in infos:
            child = f"{u.rstrip('/')}/{fi.path.rstrip('/').rsplit('/', 1)[-1]}"
            total += walk(child, _list(child)) if fi.is_dir else int(fi.file_size or 0)
        return total

    if uri.startswith("models:/"):  # a LoggedModel: list its storage location (models:/<id>/<sub> names no path)
        from mlflow.tracking import MlflowClient

        model_id, _, rest = uri[len("models:/"):].strip("/").partition("/")
        location = MlflowClient().get_logged_model(model_id).artifact_location.rstrip("/")
        uri = f"{location}/{rest}" if rest else location
    infos = _list(uri)
    if infos:
        return walk(uri, infos)
    parent, _, name = uri.rstrip("/").rpartition("/")  # a file lists as nothing: find it in its folder
    if parent.endswith(":") or not name:
        return 0
    with contextlib.suppress(Exception):
        for fi in _list(parent):
            if not fi.is_dir and fi.path.rstrip("/").rsplit("/", 1)[-1] == name:
                return int(fi.file_size or 0)
    return 0


def _fetch_into_cache(uri: str, root: Path, entry: Path) -> Path:
    """Download into a temporary folder of the cache, then rename it to ``entry`` (its lock
    held); returns the artifact's path inside the entry."""
    import mlflow

    from mlproject.paths import shared_mkdtemp

    tmp = shared_mkdtemp(root, ".tmp-")
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        rel = got.relative_to(tmp)
        (tmp / _DOWNLOAD_META).write_text(json.dumps({"uri": redact(uri), "path": str(rel)}))
        _touch(tmp / _DOWNLOAD_META)
        if entry.exists():  # a half-written entry of a crashed process
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rel


def _uncached_folder(uri: str, size: int, cap: int) -> Path:
    """A folder beside the cache for an artifact larger than the cap, removed at exit (named
    ``<host>-<pid>-<random>``, so a later prune knows when its process is gone)."""
    from mlproject.paths import cache_root, shared_mkdtemp

    folder = shared_mkdtemp(cache_root() / _UNCACHED_DIR, f"{socket.gethostname()}-{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    log.warning("%s is %s, more than the artifact cache's cap of %s (%s): not cached, "
                "downloaded to %s and removed when this process exits",
                redact(uri), _size(size), _size(cap), ARTIFACT_CACHE_GB_ENV, folder)
    return folder


def _fetch_uncached(uri: str, key: str, size: int, cap: int) -> Path:
    """An artifact larger than the cap: downloaded to a folder beside the cache, removed when
    the process exits (and reused by this process until then)."""
    import mlflow

    folder = _uncached_folder(uri, size, cap)
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _UNCACHED[key] = got
    return got


def _size(nbytes: int) -> str:
    return f"{nbytes / _GB:.2f} GB" if nbytes >= _GB / 10 else f"{nbytes / 2**20:.1f} MB"


def _touch(path: Path) -> None:
    # An explicit nanosecond time: a plain touch takes the kernel's coarse clock (milliseconds),
    # so two uses in quick succession could not be ordered.
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _last_used(entry: Path) -> int:
    try:
        return (entry / _DOWNLOAD_META).stat().st_mtime_ns
    except OSError:
        return 0  # a half-written entry: first to go


def _evict(root: Path, budget: int, keep: Path | None, cap: int) -> None:
    """Remove the least recently used entries (not ``keep``, not in use: lock held) until the
    cache holds at most ``budget`` bytes (``cap`` less the room a download needs)."""
    from filelock import FileLock, Timeout

    sizes: dict[Path, int] = {}
    total = 0
    for path in root.iterdir():
        if path.is_dir():
            sizes[path] = _tree_bytes(path)
        total += sizes.get(path, 0)
    if total <= budget:
        return
    candidates = sorted((p for p in sizes if p != keep and not p.name.startswith(".tmp-")),
                        key=lambda p: (_last_used(p), p.name))
    for path in candidates:
        if total <= budget:
            break
        try:
            with FileLock(str(path) + ".lock").acquire(timeout=0):
                used = _last_used(path)
                uri = "?"
                with contextlib.suppress(OSError, ValueError, KeyError):
                    uri = json.loads((path / _DOWNLOAD_META).read_text())["uri"]
                with contextlib.suppress(FileNotFoundError):
                    (path / _DOWNLOAD_META).unlink()  # first, so a partial removal is no entry
                shutil.rmtree(path, ignore_errors=True)
        except Timeout:
            continue  # in use right now
        total -= sizes[path]
        log.info("artifact cache: evicted %s (%s, last used %s) to keep the cache under its cap of %s (%s)",
                 uri, _size(sizes[path]),
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used / 1e9)) if used else "never",
                 _size(cap), ARTIFACT_CACHE_GB_ENV)


def _prune_artifact_cache(root: Path) -> None:
    """Drop entries unused for the configured days, abandoned partial downloads, uncached
    downloads of processes gone, and the ``/tmp/mlproject-artifacts-*`` folders that versions
    before the cache left behind."""
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
    uncached = root.parent / _UNCACHED_DIR
    host = socket.gethostname()
    for path in uncached.glob("*") if uncached.is_dir() else ():
        with contextlib.suppress(OSError, ValueError):
            owner, pid, _ = path.name.rsplit("-", 2)  # <host>-<pid>-<random>, see _uncached_folder
            # a process of this host that is gone (SIGKILL skips atexit); another host's: by age
            gone = not _alive(int(pid)) if owner == host else now - path.stat().st_mtime > days * 86400
            if path.is_dir() and gone:
                shutil.rmtree(path, ignore_errors=True)
    for old in Path(tempfile.gettempdir()).glob("mlproject-artifacts-*"):
        with contextlib.suppress(OSError):
            if old.is_dir() and old.stat().st_uid == os.getuid() and now - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
