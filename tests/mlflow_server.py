"""Start a real local ``mlflow server`` for tests and benchmarks.

Usage::

    from mlflow_server import start_server

    with start_server(tmp_path) as uri:          # "http://127.0.0.1:<free port>"
        client = MlflowClient(uri)

or as a module-scoped fixture::

    @pytest.fixture(scope="module")
    def mlflow_uri(tmp_path_factory):
        with start_server(tmp_path_factory.mktemp("mlflow")) as uri:
            yield uri

The server is ``python -m mlflow server`` with a SQLite backend store and a proxied local
artifact store (``--artifacts-destination``), one uvicorn worker, and the background job
runner switched off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: it would start a huey
consumer we never use). It runs in its own process group, so leaving the context kills the
``mlflow`` launcher *and* the uvicorn child it spawned, even when the test failed.

The SQLite file goes to ``/dev/shm`` when it exists (``fast_db=True``): SQLite fsyncs every
commit, and on a shared disk that doubles the cost of each logging request.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def start_server(
    root: str | os.PathLike,
    *,
    backend_store_uri: str | None = None,
    timeout: float = 90.0,
    workers: int = 1,
    fast_db: bool = True,
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    port: int | None = None,
    artifacts: str | os.PathLike | None = None,
    serve_artifacts: bool = True,
) -> Iterator[str]:
    """Run ``mlflow server`` on a free port under ``root``; yield its ``http://`` URI.

    ``backend_store_uri`` defaults to ``sqlite:///<root>/mlflow.db`` (pass one to serve a
    database filled beforehand). Artifacts go to ``<root>/artifacts``; the server log to
    ``<root>/server.log`` (its tail is put into the error when the server does not come up).
    ``extra_args`` go to ``mlflow server`` (e.g. ``["--app-name", "basic-auth"]``); ``port``
    reuses a port (a server restarted where clients expect it); ``artifacts`` is the artifact
    folder (default ``<root>/artifacts``), so a restart can serve the same store;
    ``serve_artifacts=False`` makes it the ``--default-artifact-root`` of a server that does not
    proxy artifacts (``--no-serve-artifacts``): clients read and write that folder themselves.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    shm_dir = None
    if backend_store_uri is None and fast_db and os.path.isdir("/dev/shm"):
        shm_dir = tempfile.mkdtemp(prefix="mlflow-db-", dir="/dev/shm")
        backend_store_uri = f"sqlite:///{shm_dir}/mlflow.db"
    backend = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", str(workers),
        "--backend-store-uri", backend,
        *(["--artifacts-destination", str(artifacts or root / "artifacts")] if serve_artifacts else
          ["--no-serve-artifacts", "--default-artifact-root", str(Path(artifacts or root / "artifacts").resolve())]),
        *(extra_args or []),
    ]
    env = dict(os.environ)
    env.update({
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PYTHONUNBUFFERED": "1",
    })
    # The client side of the tests may point MLflow elsewhere; the server must not inherit it.
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    env.update(extra_env or {})
    log_path = root / "server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(uri):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy after {timeout:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.2)
        yield uri
    finally:
        _stop(proc)
        log.close()
        if shm_dir:
            shutil.rmtree(shm_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    # The launcher forwards SIGTERM to uvicorn, but signal the whole group we created so
    # nothing survives a launcher that is already gone.
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # The launcher is gone; make sure no child of its group lingers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""
