"""MLflow server under team load: N step processes logging at once to one ``mlflow server``,
SQLite-backed vs PostgreSQL-backed.

    python benchmarks/server_load.py                                  # sqlite + postgresql, N = 4, 8, 30 s each
    python benchmarks/server_load.py --workers 4 8 --seconds 15       # the README's run (~5 min here)
    python benchmarks/server_load.py --backend postgresql --workers 8 16 --seconds 60
    python benchmarks/server_load.py --steps 10 --compare none        # 10 steps per process, no compare

The server is a real ``mlflow server`` (``tests/mlflow_server.py``; 4 uvicorn workers, like a team
server; proxied artifacts) on (a) a SQLite file in /dev/shm or (b) a throw-away PostgreSQL 15
cluster (``tests/services.py``'s ``postgres_cluster``; fsync off).

The N client processes (multiprocessing, spawn) are started once, before the first row, and given
one job per row, so their start-up is never inside a measured window. Each plays what mlproject
steps do to the server, through the project's own tracking layer (``tracking.step_run`` and
``Run``: the spool, the link's retry budget, the heartbeat thread with a small
``MLPROJECT_HEARTBEAT_SECONDS``), not raw HTTP, and with no model compute: a pipeline parent run
(``--pipeline-steps`` children; 0 = top-level steps), and for each step the pipeline's reuse lookup
(``find_reusable``: a run search), then an evaluate-like child run: opened with its first tags, env
tags and ``env.json``; params; lineage tags; more params; ``--progress-batches`` batches of
progress metrics; **the result write** (``log_metrics_and_tags``: the final 20 metrics + tags in
one request; its latency is the one reported); system metrics; ``eval/documents.parquet``
(``--documents-kb``, incompressible bytes) and ``report.md`` (``--report-kb``) through the spool;
the run description; the end (headline view update, final status). The environment snapshot is
collected once, up front, and handed to every process (``envinfo.collect`` imports torch: that is
client start-up, not server load).

Counted in every process: each HTTP request (``mlflow.utils.rest_utils.http_request`` and the
copies of it that the proxied-artifact client and the server-info probe imported are wrapped:
latency, status or exception). Errors: requests that got an HTTP 5xx / 429 answer or none at all
(refused, reset, timed out); of those, the ones the link sent again
(``tracking.link.is_transient`` said "retry"; MLflow's own retries are off:
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``); steps that raised (their run ended FAILED); spools left
with records the server never got (what ``mlproject runs sync`` would have to send). HTTP 4xx
answers are listed apart (a lookup of something absent is a 404 by design). The server log is
searched for ``database is locked`` and tracebacks. MLflow's SQLite store sets ``PRAGMA
busy_timeout = 20000``: concurrent writers wait for the lock (up to 20 s) rather than fail.

Client CPU: the N processes' own CPU seconds in the window. Server CPU: the mlflow server's
process tree plus, on PostgreSQL, the postmaster and its backends (psutil; a process that exits
within the window is missed). "Cores busy" is CPU seconds / wall seconds. On a machine with few
cores, shared with the clients (and here with other work), requests/s and latencies measure the
machine; *server CPU ms per request* is the figure that carries over to a team server whose
clients are other machines. The summary line under the table says which side was the bigger
consumer in this run.

``--compare-runs`` (default 10,000) fills the backend with that many synthetic runs first
(``compare_scale.fill_bulk``: the runs of ``benchmarks/compare_scale.py``), so the load runs
against a store that holds them, as a team server does, and a compare over them is timed (query +
every table, ``cache=off``, 2500 × 4 pages). ``--compare during`` (default) adds one load row per
backend, N = the largest ``--workers``, with the compare running while the N processes log (a
person compares while the others' steps write; with SQLite this is where a long read meets the
single writer lock); ``after`` times the compare alone once the load is over
(``compare_scale.timed``, with its CPU seconds); ``none`` skips it. ``compare_scale.py`` has the
full figures for a compare on an idle server (page sizes, the run table warm and cold).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TASKS = {"boolq": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc",
         "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


# -- in each client process ------------------------------------------------------------------
class Recorder:
    """Every HTTP request of this process: (seconds, status code or exception name). Wraps
    ``rest_utils.http_request`` (every REST call) and the name ``http_artifact_repo`` imported
    from it (proxied artifact uploads), so both are seen; the heartbeat thread's requests too."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[tuple[float, str, str]] = []  # seconds, status or exception, what
        self.retries = 0

    def install(self) -> "Recorder":
        import importlib

        import mlflow.utils.rest_utils as ru

        from mlproject.tracking import link

        orig = ru.http_request

        def recorded(*a, **kw):
            endpoint = str(kw.get("endpoint", a[1] if len(a) > 1 else ""))
            method = str(kw.get("method", a[2] if len(a) > 2 else ""))
            what = f"{method} artifact" if "/mlflow/" not in endpoint else \
                f"{method} {endpoint.split('/mlflow/', 1)[-1]}"
            t = time.perf_counter()
            outcome = "exception"
            try:
                resp = orig(*a, **kw)
                outcome = str(resp.status_code)
                return resp
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                raise
            finally:
                with self.lock:
                    self.requests.append((time.perf_counter() - t, outcome, what))

        # modules that imported the name themselves (artifact uploads, the server-info probe)
        for name in ("mlflow.utils.rest_utils", "mlflow.store.artifact.http_artifact_repo", "mlflow.utils.server_info"):
            with contextlib.suppress(ImportError):
                module = importlib.import_module(name)
                if getattr(module, "http_request", None) is orig:
                    module.http_request = recorded
        orig_transient = link.is_transient

        def counted(exc):
            transient = orig_transient(exc)
            if transient:
                with self.lock:
                    self.retries += 1  # the link sleeps and tries again (or gives up: unsent)
            return transient

        link.is_transient = counted
        return self

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.retries = 0


def _final_metrics(rng) -> dict[str, float]:
    metrics = {}
    for task, m in TASKS.items():
        metrics[f"{task}/{m}"] = rng.uniform(0.3, 0.9)
        metrics[f"{task}/{m}_stderr"] = rng.uniform(0.005, 0.02)
    metrics["avg_acc"] = sum(metrics[f"{t}/{m}"] for t, m in TASKS.items()) / len(TASKS)
    metrics.update({"ppl/wikitext2": rng.uniform(5, 30), "nll/wikitext2": rng.uniform(1.5, 3.5),
                    "params_b": 0.36, "eval_seconds": rng.uniform(100, 900), "model_size_mb": 690.0})
    return metrics


def _report_md(metrics: dict[str, float], kb: int) -> str:
    lines = ["# evaluate: load test", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    text = "\n".join(lines) + "\n"
    filler = "Settings and notes of the evaluation, as a report carries them. "
    while len(text) < kb * 1024:
        text += filler
    return text


def one_step(run_parent, w: int, i: int, rng, documents: bytes, cfg: dict, latencies: list) -> None:
    """One evaluate-like step through ``tracking.step_run``: what the server sees of it."""
    from mlproject import tracking
    from mlproject.tracking import names

    key = f"load-{cfg['tag']}-{w}-{i}"
    if run_parent is not None:
        # a pipeline looks the step's reuse key up first (never found here: the step runs)
        tracking.find_reusable(key, run_parent.experiment_id)
    model = f"tiny-{rng.choice(['llama', 'mistral', 'qwen'])}"
    params = {"model": model, "adapter": "none", "dtype": "bfloat16", "device": "cpu", "suite": "quick",
              "tasks": ",".join(TASKS), "limit": 200, "ppl_dataset": "wikitext2", "ppl_max_windows": 64,
              "ppl_stride": 512, "batch_size": 8, "seed": 0, "world_size": 1}
    with tracking.step_run("evaluate", experiment=cfg["experiment"], run_name=f"evaluate:{model}",
                           tags={names.CACHE_KEY_TAG: key}, parent=run_parent) as run:
        run.log_params(params)
        run.set_tags({names.MODEL_TAG: model, names.BASE_MODEL_TAG: model, names.FAMILY_TAG: model,
                      names.ROLE_TAG: "eval"})
        run.log_params({"resolved_model": f"/models/{model}", "model_dtype": "torch.bfloat16"})
        for b in range(cfg["progress_batches"]):
            run.log_metrics({"system/eval/progress": (b + 1) / cfg["progress_batches"],
                             "system/eval/documents_done": 200 * (b + 1), "system/eval/windows_done": 8 * (b + 1)},
                            step=b)
        metrics = _final_metrics(rng)
        t = time.perf_counter()
        run.log_metrics_and_tags(metrics, {names.AVG_ACC_METRICS_TAG: json.dumps(TASKS)})
        latencies.append(time.perf_counter() - t)
        run.log_metrics({"peak_rss_mb": rng.uniform(900, 3000)})
        run.log_bytes(documents, "eval/documents.parquet")
        run.log_text(_report_md(metrics, cfg["report_kb"]), "report.md")
        run.set_description(f"**evaluate · {model}**: avg_acc {metrics['avg_acc']:.3f}, "
                            f"ppl {metrics['ppl/wikitext2']:.2f}")


def client(w: int, inbox, out, stop) -> None:
    """One client process, kept for every row (start-up is paid once): per job from ``inbox``, get
    ready, say so on ``out``, wait for "go", log steps until the time is up and ``stop`` is set (or
    the count is reached), put the measurements on ``out``. ``None`` ends it."""
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    try:
        import logging
        import random

        import mlflow

        from mlproject import envinfo, tracking

        logging.basicConfig(level=logging.WARNING, format=f"[client {w}] %(levelname)s %(name)s: %(message)s")
        rec = Recorder().install()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which aborts
        out.put(("up", w, f"start-up: {type(exc).__name__}: {exc}"))
        return
    out.put(("up", w, None))
    while True:
        cfg = inbox.get()
        if cfg is None:
            return
        try:
            os.environ.update({"MLPROJECT_HEARTBEAT_SECONDS": str(cfg["heartbeat"]),
                               "MLPROJECT_SPOOL": str(Path(cfg["spool"]) / f"w{w}")})
            snapshot = cfg["env"]
            envinfo.collect = lambda: dict(snapshot)  # same tags and env.json, without importing torch per process
            mlflow.set_tracking_uri(cfg["uri"])
            tracking._LINK.reset()
            tracking._LINK.spools.clear()
            mlflow.set_experiment(cfg["experiment"])  # warm: connection pool made, experiment known
            rng = random.Random(w)
            documents = os.urandom(cfg["documents_kb"] * 1024)
        except Exception as exc:  # noqa: BLE001
            out.put(("ready", w, f"{type(exc).__name__}: {exc}"))
            inbox.get()  # the parent's "skip"
            continue
        out.put(("ready", w, None))
        if inbox.get() != "go":
            continue
        out.put(("done", w, run_job(w, cfg, rec, rng, documents, stop)))


def run_job(w: int, cfg: dict, rec: Recorder, rng, documents: bytes, stop) -> dict:
    """The steps of one row, in one client process, and what they measured."""
    from mlproject import tracking
    from mlproject.tracking import names

    rec.reset()
    latencies: list[float] = []
    failures: list[str] = []
    steps = parents = 0
    cpu0, t0 = time.process_time(), time.time()
    deadline = t0 + cfg["seconds"] if cfg["seconds"] else None

    def more() -> bool:
        if deadline is None:
            return steps + len(failures) < cfg["steps"]
        return time.time() < deadline or not stop.is_set()  # a compare in the parent may outlast the time

    def first_line(exc: BaseException) -> str:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]

    def step(parent) -> None:
        nonlocal steps
        try:
            one_step(parent, w, steps + len(failures), rng, documents, cfg, latencies)
            steps += 1
        except Exception as exc:  # noqa: BLE001 - a failed step is an error to count; the run ended FAILED
            failures.append(first_line(exc))

    while more():
        if cfg["pipeline_steps"] <= 0:
            step(None)
            continue
        try:
            with tracking.step_run("pipeline", experiment=cfg["experiment"], run_name=f"pipeline:load-{w}",
                                   tags={names.PIPELINE_TAG: "load"}) as prun:
                prun.log_params({"pipeline": "load.yaml", "set": "none", "no_reuse": False, "rerun": "none"})
                started = time.perf_counter()
                done = 0
                while done < cfg["pipeline_steps"] and more():
                    with tracking.extra_tags({names.PIPELINE_STEP_TAG: f"eval{done}"}):
                        step(prun)
                    done += 1
                prun.log_metrics({"system/pipeline/steps_run": done, "system/pipeline/steps_reused": 0,
                                  "system/pipeline/seconds": time.perf_counter() - started})
                prun.log_text(f"# pipeline load\n\n{done} steps\n", "report.md")
                prun.set_description(f"pipeline load: {done} steps")
            parents += 1
        except Exception as exc:  # noqa: BLE001
            failures.append("pipeline: " + first_line(exc))
    t1, cpu1 = time.time(), time.process_time()
    with rec.lock:
        requests = list(rec.requests)
        retries = rec.retries
    return {"steps": steps, "parents": parents, "failures": failures, "latencies": latencies,
            "requests": requests, "retries": retries, "unsent_spools": len(tracking.unsent_spools()),
            "offline": tracking._LINK.offline, "t0": t0, "t1": t1, "cpu_s": cpu1 - cpu0}


# -- the parent process -----------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q / 100 * len(ordered))) - 1)]


def server_log_counts(path: Path) -> dict[str, int]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {"locked": 0, "tracebacks": 0}
    return {"locked": text.count("database is locked"), "tracebacks": text.count("Traceback (most recent call last)")}


def server_cpu(exclude: set[int], db_pid: int | None) -> float:
    """CPU seconds so far of this process's children but ``exclude`` (the clients), with their
    descendants (the mlflow server and its uvicorn workers), and of ``db_pid``'s tree (the
    PostgreSQL postmaster and its backends, not our child)."""
    import psutil

    roots = [c for c in psutil.Process().children() if c.pid not in exclude]
    if db_pid:
        with contextlib.suppress(psutil.Error):
            roots.append(psutil.Process(db_pid))
    total = 0.0
    for root in roots:
        with contextlib.suppress(psutil.Error):
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
    return total


class Clients:
    """``size`` client processes (spawn), started once and given one job per row."""

    def __init__(self, size: int):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.out, self.stop = self.ctx.Queue(), self.ctx.Event()
        self.inboxes = [self.ctx.Queue() for _ in range(size)]
        self.procs = [self.ctx.Process(target=client, args=(w, self.inboxes[w], self.out, self.stop), daemon=True)
                      for w in range(size)]

    def __enter__(self) -> "Clients":
        try:
            for p in self.procs:
                p.start()
            errors = [err for _, _, err in (self._get("up") for _ in self.procs) if err]
            if errors:
                raise RuntimeError(f"{len(errors)} client process(es) did not start: {errors[0]}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs if p.pid}

    def _get(self, what: str, timeout: float = 600):
        msg = self.out.get(timeout=timeout)
        if msg[0] != what:
            raise RuntimeError(f"client {msg[1]}: expected {what!r}, got {msg[0]!r}")
        return msg

    def run(self, n: int, cfg: dict, during=None, timeout: float = 600):
        """The first ``n`` clients run ``cfg`` together; ``during()`` runs here meanwhile. Returns
        (their results, what ``during`` returned, the seconds from "go" to ``during``'s end)."""
        self.stop.clear()
        for w in range(n):
            self.inboxes[w].put(cfg)
        errors = [err for _, _, err in (self._get("ready") for _ in range(n)) if err]
        if errors:
            for w in range(n):
                self.inboxes[w].put("skip")
            raise RuntimeError(f"{len(errors)} client(s) could not get ready: {errors[0]}")
        for w in range(n):
            self.inboxes[w].put("go")
        extra = None
        try:
            if during is not None:
                extra = during()
        finally:
            self.stop.set()
        results = [self._get("done", timeout)[2] for _ in range(n)]
        return results, extra

    def close(self) -> None:
        for q in self.inboxes:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self.procs:
            if p.pid is None:
                continue
            p.join(timeout=15)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


def load(clients: Clients, uri: str, n: int, args, env: dict, base: Path, db_pid: int | None, server_log: Path,
         compare_spec=None) -> dict:
    """N client processes against ``uri``; one row of the table. With ``compare_spec`` a compare
    runs in this process while they log (its wall time goes into the row)."""
    from mlflow import MlflowClient

    experiment = f"load-n{n}" + ("-compare" if compare_spec is not None else "")
    MlflowClient(uri).create_experiment(experiment)  # up front: no N-way race to create it in the window
    cfg = {"uri": uri, "experiment": experiment, "tag": f"{n}", "seconds": args.seconds, "steps": args.steps,
           "pipeline_steps": args.pipeline_steps, "progress_batches": args.progress_batches,
           "documents_kb": args.documents_kb, "report_kb": args.report_kb, "heartbeat": args.heartbeat,
           "spool": str(base / f"spool-{experiment}"), "env": env}

    def compare() -> dict:
        from mlproject.compare import build

        t = time.perf_counter()
        res = build(uri, compare_spec)
        return {"compare_s": round(time.perf_counter() - t, 1), "compare_runs": res.stats["runs"]}

    log0 = server_log_counts(server_log)
    srv0 = server_cpu(clients.pids, db_pid)
    results, extra = clients.run(n, cfg, during=compare if compare_spec is not None else None,
                                 timeout=(args.seconds or 0) + 600)
    srv1 = server_cpu(clients.pids, db_pid)
    log1 = server_log_counts(server_log)
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    reqs = [x for r in results for x in r["requests"]]
    lat = [x for r in results for x in r["latencies"]]
    kinds: dict[str, int] = {}
    for _, _, what in reqs:
        kinds[what] = kinds.get(what, 0) + 1
    http5 = [(s, what) for _, s, what in reqs if s.isdigit() and (int(s) >= 500 or int(s) == 429)]
    http4 = [(s, what) for _, s, what in reqs if s.isdigit() and 400 <= int(s) < 500 and int(s) != 429]
    conn = [(round(t, 1), s, what) for t, s, what in reqs if not s.isdigit()]
    failures = [f for r in results for f in r["failures"]]
    steps = sum(r["steps"] for r in results)
    row = {
        "n": n, "wall_s": round(wall, 1), "steps": steps, "parents": sum(r["parents"] for r in results),
        "requests": len(reqs), "requests_per_s": round(len(reqs) / wall, 1), "steps_per_s": round(steps / wall, 2),
        "requests_per_step": round(len(reqs) / max(1, steps), 1),
        "result_write_p50_ms": round(1000 * pct(lat, 50), 1), "result_write_p95_ms": round(1000 * pct(lat, 95), 1),
        "result_write_max_ms": round(1000 * max(lat, default=float("nan")), 1),
        "request_p50_ms": round(1000 * pct([t for t, _, _ in reqs], 50), 1),
        "request_p95_ms": round(1000 * pct([t for t, _, _ in reqs], 95), 1),
        "request_max_ms": round(1000 * max((t for t, _, _ in reqs), default=float("nan")), 1),
        "step_failures": len(failures), "http_5xx": len(http5), "conn_failures": len(conn),
        "link_retries": sum(r["retries"] for r in results),
        "unsent_spools": sum(r["unsent_spools"] for r in results),
        "offline_processes": sum(1 for r in results if r["offline"]), "http_4xx": len(http4), "some_4xx": http4[:5],
        "server_log_locked": log1["locked"] - log0["locked"],
        "server_log_tracebacks": log1["tracebacks"] - log0["tracebacks"],
        "cpu_client_s": round(sum(r["cpu_s"] for r in results), 1), "cpu_server_s": round(srv1 - srv0, 1),
        "first_failures": sorted(set(failures))[:3], "some_failed_requests": (http5 + conn)[:5],
        "requests_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), **(extra or {}),
    }
    # requests that got no answer or a server error; results that failed or never arrived
    row["failed_requests"] = row["http_5xx"] + row["conn_failures"]
    row["errors"] = row["failed_requests"] + row["step_failures"] + row["unsent_spools"]
    row["server_ms_per_request"] = round(1000 * row["cpu_server_s"] / max(1, len(reqs)), 2)
    row["client_ms_per_request"] = round(1000 * row["cpu_client_s"] / max(1, len(reqs)), 2)
    row["client_cores"] = round(row["cpu_client_s"] / wall, 2)  # cores kept busy on average
    row["server_cores"] = round(row["cpu_server_s"] / wall, 2)
    return row


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # so every finally (clients, server, PostgreSQL, temp folders) runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    ap.add_argument("--workers", nargs="+", type=int, default=[4, 8], help="client processes at once (N), each timed")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=float, default=None, help="each process logs steps for this long (default 30)")
    how.add_argument("--steps", type=int, default=None, help="each process logs this many steps instead")
    ap.add_argument("--pipeline-steps", type=int, default=3,
                    help="steps per pipeline parent run (0: steps are top-level runs, no reuse lookup)")
    ap.add_argument("--progress-batches", type=int, default=4, help="progress-metric requests per step")
    ap.add_argument("--documents-kb", type=int, default=200, help="size of eval/documents.parquet")
    ap.add_argument("--report-kb", type=int, default=4, help="size of report.md")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="MLPROJECT_HEARTBEAT_SECONDS of the clients (>= 1)")
    ap.add_argument("--server-workers", type=int, default=4, help="uvicorn workers of the mlflow server")
    ap.add_argument("--compare-runs", type=int, default=10_000, help="synthetic runs in the store (0: none)")
    ap.add_argument("--compare", choices=["during", "after", "none"], default="during",
                    help="a cold compare over them: while the largest N logs (one more row), after the load, or none")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder (in /dev/shm when present)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.seconds is None and args.steps is None:
        args.seconds = 30.0
    if not args.compare_runs:
        args.compare = "none"

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's usage telemetry (a thread posting to mlflow.org) is no server load; the clients and
    # the server inherit this
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    logging.basicConfig(level=logging.WARNING)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    from mlproject import envinfo

    load_before = os.getloadavg()[0]
    env = envinfo.collect()
    base = args.workdir or Path(tempfile.mkdtemp(
        prefix="server-load-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    base.mkdir(parents=True, exist_ok=True)
    os.environ["MLPROJECT_COMPARE_CACHE"] = str(base / "compare-cache")  # never the user's
    rows, compares = [], []
    try:
        clients = Clients(max(args.workers))
        t = time.perf_counter()
        with clients:
            print(f"{max(args.workers)} client processes up in {time.perf_counter() - t:.1f} s", flush=True)
            run_backends(args, clients, env, base, rows, compares)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    report(args, env, load_before, rows, compares)
    return 0


def run_backends(args, clients: Clients, env: dict, base: Path, rows: list, compares: list) -> None:
    from compare_scale import backend_store, fill_bulk, timed
    from mlflow_server import start_server

    from mlproject.compare import CompareSpec

    for backend in args.backend:
        with backend_store(backend, base) as (uri_db, db_pid):
            if args.compare_runs:
                t = time.perf_counter()
                fill_bulk(uri_db, args.compare_runs, base / "artifacts")
                print(f"[{backend}] store filled with {args.compare_runs} runs in {time.perf_counter() - t:.1f} s",
                      flush=True)
            root = base / f"server-{backend}"
            t = time.perf_counter()
            with start_server(root, backend_store_uri=uri_db, workers=args.server_workers) as uri:
                print(f"[{backend}] server up in {time.perf_counter() - t:.1f} s", flush=True)
                spec = CompareSpec(experiments=("scale",), baseline="role:base", page_size=2500, parallel=4,
                                   cache="off")
                plan = [(n, None) for n in args.workers]
                if args.compare == "during":
                    plan.append((max(args.workers), spec))
                for n, during in plan:
                    row = {"backend": backend,
                           **load(clients, uri, n, args, env, base, db_pid, root / "server.log",
                                   compare_spec=during)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if args.compare == "after":
                    row = {"backend": backend, **timed(uri, spec, db_pid)}
                    compares.append(row)
                    print(json.dumps(row), flush=True)


def report(args, env: dict, load_before: float, rows: list, compares: list) -> None:
    """The Markdown tables and what they say."""
    cores = os.cpu_count() or 1
    if args.json:
        machine = {"cpu": env.get("cpu"), "cores": cores, "load_before": load_before, "load_after": os.getloadavg()[0]}
        args.json.write_text(json.dumps({"args": vars(args), "machine": machine, "load": rows, "compare": compares},
                                        indent=2, default=str))
    how_long = f"{args.seconds:g} s per process" if args.seconds else f"{args.steps} steps per process"
    label = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
    print()
    print(f"Machine: {env.get('cpu') or platform.processor()}, {cores} CPU cores, load average {load_before:.1f} "
          f"before the run and {os.getloadavg()[0]:.1f} after (other processes share the cores). mlflow server: "
          f"{args.server_workers} workers; {how_long}; pipelines of {args.pipeline_steps} steps; heartbeat every "
          f"{args.heartbeat:g} s; {args.compare_runs} other runs in the store.")
    print()
    print("| backend | N | steps | steps/s | requests (per step) | requests/s | result write p50 / p95 ms "
          "| all requests p95 ms | failed requests (link retries) / failed steps / unsent | HTTP 4xx "
          "| CPU s client / server | cores busy client / server | server CPU ms / request |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = f"{r['n']} + compare ({r['compare_s']:.0f} s)" if "compare_s" in r else str(r["n"])
        print(f"| {label[r['backend']]} | {n} | {r['steps']} | {r['steps_per_s']:.2f} | "
              f"{r['requests']} ({r['requests_per_step']:.0f}) | {r['requests_per_s']:.0f} | "
              f"{r['result_write_p50_ms']:.0f} / {r['result_write_p95_ms']:.0f} | {r['request_p95_ms']:.0f} | "
              f"{r['failed_requests']} ({r['link_retries']}) / {r['step_failures']} / {r['unsent_spools']} | "
              f"{r['http_4xx']} | {r['cpu_client_s']:.0f} / {r['cpu_server_s']:.0f} | "
              f"{r['client_cores']:.1f} / {r['server_cores']:.1f} | {r['server_ms_per_request']:.1f} |")
    print()
    print("Errors (target 0): failed requests = HTTP 5xx/429 answers + requests that got no answer (refused, "
          "reset, timed out); link retries = those the tracking layer sent again (a result write, a param, an "
          "artifact; heartbeats, the headline view and the repeated set_terminated of mlflow.end_run are best "
          "effort, never retried); failed steps = step runs that ended FAILED; unsent = spools left for "
          "`mlproject runs sync`. "
          f"In all: {sum(r['failed_requests'] for r in rows)} failed requests "
          f"({sum(r['link_retries'] for r in rows)} retried), {sum(r['step_failures'] for r in rows)} failed steps, "
          f"{sum(r['unsent_spools'] for r in rows)} unsent spools, {sum(r['http_5xx'] for r in rows)} HTTP 5xx. "
          f"Server log: {sum(r['server_log_locked'] for r in rows)} 'database is locked', "
          f"{sum(r['server_log_tracebacks'] for r in rows)} tracebacks.")
    for r in rows:
        if r["first_failures"]:
            print(f"  {label[r['backend']]} N={r['n']} failed steps (first): {r['first_failures']}")
        if r["some_failed_requests"]:
            print(f"  {label[r['backend']]} N={r['n']} failed requests (s, outcome, request): "
                  f"{r['some_failed_requests']}")
        if r["some_4xx"]:
            print(f"  {label[r['backend']]} N={r['n']} HTTP 4xx (status, request): {r['some_4xx']}")
    busy = max(r["client_cores"] + r["server_cores"] for r in rows)
    client = max(r["client_cores"] for r in rows)
    server = max(r["server_cores"] for r in rows)
    saturated = (f"client and server together kept up to {busy:.1f} of the {cores} cores busy: requests/s is "
                 "this machine's ceiling, not the server's, and latencies grow with N by queueing for the cores; "
                 if busy >= 0.6 * cores else "")
    who = ("the server process tree is the bigger consumer, so" if server >= client else
           "the client processes are the bigger consumer (CPU-bound clients on few cores);")
    verdict = f"{saturated}{who} the per-request server CPU is the figure that carries to a team server whose " \
              "clients are other machines."
    print(f"Cores busy: clients up to {client:.1f}, server up to {server:.1f}, of {cores}. "
          f"{verdict[0].upper()}{verdict[1:]}")
    if compares:
        print()
        print("| backend | compare after the load (cold, cache=off, 2500 × 4) | HTTP requests | query s | tables s "
              "| total s | CPU s client / server |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in compares:
            print(f"| {label[r['backend']]} | {r['runs']} runs | {r['http_requests']} | {r['query_s']:.1f} | "
                  f"{r['tables_s']:.1f} | {r['total_s']:.1f} | {r['cpu_client_s']:.1f} / {r['cpu_server_s']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
