"""A run's liveness: who runs it (host, pid) and a heartbeat its process keeps refreshing.

A running step refreshes the tag ``mlproject.heartbeat`` (with ``mlproject.host`` /
``mlproject.pid``) every ``MLPROJECT_HEARTBEAT_SECONDS`` (60) from a daemon thread, so
``tracking.repair.reap_runs`` can tell a live run from one whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

from mlproject.tracking.link import _LINK
from mlproject.tracking.names import HEARTBEAT_TAG, HOST_TAG, PID_TAG

HEARTBEAT_ENV = "MLPROJECT_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 60.0


def liveness_tags() -> dict[str, Any]:
    """Who runs this run: host, pid and the first heartbeat (unix seconds)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(), HEARTBEAT_TAG: int(time.time())}


def heartbeat_seconds() -> float:
    raw = os.environ.get(HEARTBEAT_ENV, "")
    try:
        return max(1.0, float(raw)) if raw.strip() else DEFAULT_HEARTBEAT_SECONDS
    except ValueError:
        return DEFAULT_HEARTBEAT_SECONDS


class _Heartbeat(threading.Thread):
    """Refreshes ``mlproject.heartbeat`` every ``interval`` s: one small request, skipped while
    the server is not answering (a heartbeat is not a result; it is never spooled)."""

    def __init__(self, run_id: str, uri: str, interval: float):
        super().__init__(name=f"mlproject-heartbeat-{run_id[:8]}", daemon=True)
        self.run_id, self.uri, self.interval = run_id, uri, interval
        self.stop = threading.Event()

    def run(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        while not self.stop.wait(self.interval):
            if _LINK.offline or _LINK.down_since is not None:
                continue
            with contextlib.suppress(Exception):
                client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))
