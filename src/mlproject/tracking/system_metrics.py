"""MLflow's system metrics on a step's run: what the run page's "System metrics" tab shows.

The runs that do the heavy work (:data:`MONITORED_STEPS`: evaluate, finetune, quantize, prune)
get a daemon thread, started when ``step_run`` opens the run and stopped when it closes it
(whatever closed it), that samples the machine with MLflow's own collectors
(``mlflow.system_metrics.metrics``: ``CPUMonitor`` for CPU and memory, ``GPUMonitor`` through
``pynvml`` from the ``nvidia-ml-py`` package, ``ROCMMonitor`` through ``pyrsmi``, each when
importable) every ``MLPROJECT_SYSTEM_METRICS`` seconds (default :data:`DEFAULT_SECONDS`; ``0`` or
``off`` turns it off) and logs them under MLflow's names (``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage`` …; see
:data:`SAMPLED_METRICS`), one metric step per sample.

Why not ``mlflow.start_run(log_system_metrics=True)`` with MLflow's ``SystemMetricsMonitor``: it
asks the server for the run before every sample (a request per sample), logs as often as it
samples, drops the samples of the last interval when stopped (a step shorter than the interval
gets none), and its stop waits on the server with no bound. Here a sample costs no request,
points go in one ``log_batch`` every :data:`FLUSH_SECONDS` and at the end, a last sample is
taken when the run ends (so every step run has at least one point), and the end waits at most
:data:`STOP_SECONDS` for the last batch. MLflow's ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` still
applies to the runs not monitored here (pipeline parents, searches, compare); on step runs this
module replaces it, so no point is logged twice.

System metrics describe the machine, not a result: they bypass the spool (``runs sync`` never
sends them) and are not sent while the link is retrying or has given up on the server; a
failure to collect or send is a warning, never a failed step. Disk and network use (MLflow's
other two collectors) are left out: the machine's disk fill and its network counters say
nothing about a step, and every metric key a run holds is a column of compare's run table.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from mlproject.redaction import redact
from mlproject.tracking.link import _LINK, is_transient, tracking_uri
from mlproject.tracking.names import SYSTEM_PREFIX
from mlproject.tracking.run import send_metrics
from mlproject.tracking.server import _first_line

log = logging.getLogger(__name__)

SYSTEM_METRICS_ENV = "MLPROJECT_SYSTEM_METRICS"
#: Seconds between samples (MLflow's default too). Measured (benchmarks/system_metrics_cost.py):
#: ~0.1 ms of CPU to collect a sample, ~1 ms with its share of a batch's request, so ~1e-4 of a
#: step at 10 s, far below the 1 % budget; more often would mostly add points to store.
DEFAULT_SECONDS = 10.0
#: The shortest interval taken (a smaller value is raised to it).
MIN_SECONDS = 0.1
#: Points are sent at most this often (and when the run ends): one request per batch.
FLUSH_SECONDS = 30.0
#: The end of a run waits at most this long for the last batch (a hung server costs no more).
STOP_SECONDS = 5.0
#: Points kept while the server does not take them (then the oldest go: they are not results).
MAX_BUFFERED = 20_000
#: The steps whose runs are sampled: the ones doing the heavy work. Not the pipeline parent or
#: the search study (their children are the step runs, sampled themselves; the same machine
#: twice would be noise), nor compare (seconds of queries and pandas).
MONITORED_STEPS = frozenset({"evaluate", "finetune", "quantize", "prune"})
#: What every sampled run holds (MLflow's names); with a GPU also ``system/gpu_<i>_`` +
#: ``utilization_percentage``, ``memory_usage_megabytes``, ``memory_usage_percentage``,
#: ``power_usage_watts``, ``power_usage_percentage`` (NVIDIA; ROCm: ``memory_usage_gigabytes``).
#: No MLflow name has a second ``/``: ours (``system/compare/*``, ``system/pipeline/*``,
#: ``system/search/*``) never clash with them.
SAMPLED_METRICS = (f"{SYSTEM_PREFIX}cpu_utilization_percentage", f"{SYSTEM_PREFIX}system_memory_usage_megabytes",
                   f"{SYSTEM_PREFIX}system_memory_usage_percentage")
_OFF = {"0", "off", "false", "no", "none"}


def sampling_seconds() -> float | None:
    """Seconds between samples from ``MLPROJECT_SYSTEM_METRICS``; None when it is off. A value
    that is not a number is warned about and the default taken: it must not fail a step."""
    raw = os.environ.get(SYSTEM_METRICS_ENV, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    if raw.lower() in _OFF:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number of seconds (or 0/off): sampling every %g s", SYSTEM_METRICS_ENV, raw,
                    DEFAULT_SECONDS)
        return DEFAULT_SECONDS
    return max(MIN_SECONDS, seconds) if seconds > 0 else None


def start_system_metrics(run_id: str, step: str, *, resume: bool = False) -> "SystemMetrics | None":
    """Start sampling for the run of ``step`` (None: not a monitored step, or switched off).
    ``resume``: the run was reopened, so its metric steps continue after the ones it holds."""
    if step not in MONITORED_STEPS:
        return None
    try:
        seconds = sampling_seconds()
        if seconds is None:
            return None
        monitor = SystemMetrics(run_id, tracking_uri(), seconds, resume=resume)
        monitor.start()  # everything slow (imports, NVML, the resume lookup) happens in the thread
    except Exception as exc:  # noqa: BLE001 - e.g. no thread to be had: the step goes on without samples
        log.warning("system metrics off for run %s: %s", run_id, redact(_first_line(exc)))
        return None
    return monitor


class _Once(logging.Filter):
    """Each distinct message once: MLflow's GPU collector warns at every sample about a reading
    the device does not support (power or utilisation on a MIG slice), every 10 s for hours."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _collectors() -> list:
    """MLflow's collectors this machine has: CPU and memory always; the GPUs when ``pynvml``
    (NVIDIA) or ``pyrsmi`` (AMD) is importable and finds one (as MLflow's own monitor picks)."""
    import importlib

    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    gpu_log = logging.getLogger("mlflow.system_metrics.metrics.gpu_monitor")
    if not any(isinstance(f, _Once) for f in gpu_log.filters):
        gpu_log.addFilter(_Once())

    collectors = [CPUMonitor()]
    for module, name in (("gpu_monitor", "GPUMonitor"), ("rocm_monitor", "ROCMMonitor")):
        try:
            collectors.append(getattr(importlib.import_module(f"mlflow.system_metrics.metrics.{module}"), name)())
            break
        except Exception as exc:  # noqa: BLE001 - no library or no device: no GPU series
            log.debug("no %s: %s", name, exc)
    return collectors


class SystemMetrics(threading.Thread):
    """Samples the machine every ``interval`` s for run ``run_id``; :meth:`stop` takes a last
    sample, sends what is left and ends the thread."""

    def __init__(self, run_id: str, uri: str, interval: float, *, resume: bool = False):
        super().__init__(name=f"mlproject-system-metrics-{run_id[:8]}", daemon=True)
        self.run_id, self.uri, self.interval, self.resume = run_id, uri, interval, resume
        self._stop_event = threading.Event()
        self._buffer: list[list] = []
        self._warned = False
        self.samples = 0  # taken so far (the benchmark and tests read it)
        self.sent = 0  # points the server took

    # -- the thread ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - never the step's problem
            log.warning("system metrics of run %s stopped: %s", self.run_id, redact(_first_line(exc)))

    def _loop(self) -> None:
        import psutil
        from mlflow.tracking import MlflowClient

        collectors = _collectors()
        client = MlflowClient(self.uri)
        # psutil.cpu_percent() measures since its previous call; the first one measures nothing.
        psutil.cpu_percent()
        step = self._next_step(client) if self.resume else 0
        last_flush = time.monotonic()
        while True:
            stopping = self._stop_event.wait(self.interval)
            self._sample(collectors, step)
            step += 1
            if stopping or time.monotonic() - last_flush >= FLUSH_SECONDS:
                self._flush(client)
                last_flush = time.monotonic()
            if stopping:
                return

    def _sample(self, collectors: list, step: int) -> None:
        now = int(time.time() * 1000)
        for collector in collectors:
            try:
                collector.collect_metrics()
                values: dict[str, Any] = collector.aggregate_metrics()
            except Exception as exc:  # noqa: BLE001 - one collector failing leaves the others
                self._warn("collecting", exc)
                continue
            finally:
                collector.clear_metrics()
            self._buffer.extend([f"{SYSTEM_PREFIX}{k}", float(v), now, step] for k, v in values.items())
        self.samples += 1
        if len(self._buffer) > MAX_BUFFERED:
            del self._buffer[:-MAX_BUFFERED]

    def _flush(self, client) -> None:
        if not self._buffer or _LINK.offline or _LINK.down_since is not None:
            return  # the step's own results have the link first; these wait for the next batch
        points, self._buffer = self._buffer, []
        try:
            send_metrics(client, self.run_id, points)
            self.sent += len(points)
        except Exception as exc:  # noqa: BLE001
            if is_transient(exc):  # kept for the next batch
                self._buffer = points + self._buffer
            self._warn("sending", exc)

    def _next_step(self, client) -> int:
        """After the largest step of the run's sampled metrics (a resumed run continues them)."""
        try:
            # The run's latest points carry their steps (as MLflow's own monitor reads them);
            # the metric history would be every sample the run ever took.
            latest = client.get_run(self.run_id).data._metric_objs
        except Exception as exc:  # noqa: BLE001
            self._warn("reading", exc)
            return 0
        steps = [m.step for m in latest if m.key == SAMPLED_METRICS[0]]  # every sample has it
        return max(steps) + 1 if steps else 0

    def _warn(self, doing: str, exc: BaseException) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "system metrics of run %s: %s failed (%s)", self.run_id, doing, redact(_first_line(exc)))

    # -- the step's side -------------------------------------------------------------------
    def stop(self, wait: float = STOP_SECONDS) -> None:
        """Take the last sample, send what is left, end the thread: at most ``wait`` s (1 s after
        Ctrl-C / SIGTERM, which must end the process within seconds), then the daemon thread is
        left to finish on its own (a hung server must not hold the step)."""
        self._stop_event.set()
        if _LINK.exiting:
            wait = min(wait, 1.0)
        if self.is_alive():
            self.join(timeout=wait)
        if self.is_alive():
            log.warning("system metrics of run %s: the last batch is still being sent after %g s; not waiting",
                        self.run_id, wait)
