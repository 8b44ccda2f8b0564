"""How compare scales: N runs × 20 metrics on a real local ``mlflow server``.

    python benchmarks/compare_scale.py --runs 10000          # the issue's target
    python benchmarks/compare_scale.py --runs 500            # quick check
    python benchmarks/compare_scale.py --runs 10000 --configs 10000x1 2500x4 --render
    python benchmarks/compare_scale.py --runs 10000 --backend sqlite postgresql --configs 2500x4

Fills a SQLite tracking store (one experiment, 10 model families, lineage: every second run
is a fine-tune whose upstream is the evaluation before it; 7 tasks with stderr, PPL,
avg_acc, params_b, eval_seconds, peak_rss_mb, model_size_mb = 20 metrics per run, 5 tags),
serves it with ``mlflow server`` (4 workers, mlflow's default), then times ``compare.build``
(query + every table, view=all, baseline=role:base) and counts the HTTP requests the MLflow
client makes (by wrapping ``mlflow.utils.rest_utils.http_request``; one of them is the
experiment lookup). It runs once per ``--configs`` entry (page size × pages in flight) to show
that the request count follows the number of pages, not the number of runs, and what
concurrent pages buy. CPU seconds of client and server are printed too: on a shared machine
wall times stretch, CPU seconds do not.

Filling: ``--fill bulk`` (default) creates the schema with MLflow's own SqlAlchemyStore and
inserts rows into its tables in a few statements (seconds); ``--fill client`` logs every run
through ``MlflowClient("sqlite:///…")`` (create_run + log_batch + set_terminated per run:
minutes at 10,000 runs, but only public API). Creating 10,000 runs through the REST server
is slower still (~3 requests × 15–50 ms per run here).

Backends (``--backend``, one or both): ``sqlite`` (a file in /dev/shm) or ``postgresql``: a
throw-away PostgreSQL cluster (``tests/services.py``'s ``postgres_cluster``: ``initdb`` +
``pg_ctl`` as the ``postgres`` user when run as root, a free port, a temporary folder; fsync
off, which only speeds the filling: the timed part only reads), stopped and removed whatever
happens (exceptions, Ctrl-C, SIGTERM). The MLflow server needs a PostgreSQL driver: ``pip
install psycopg2-binary``. Server CPU seconds then include the PostgreSQL processes.

The local run table (``mlproject.compare.cache``), per backend, after the ``--configs`` rows
(which run with ``cache=off``): a cold compare (``cache=refresh``: everything fetched, the table
written), a warm one with nothing changed, and a warm one after ``--add`` runs were logged
through the server, each a ``compare.build`` with ``fetch_runs(cache=…)`` (the table's report:
runs served from it, runs fetched).

Targets (issue): query + tables ≤ 15 s at 10,000 runs; a warm compare ≤ 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

TASKS = {"boolq": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc",
         "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
FAMILIES = ["llama", "llama-instruct", "mistral", "mistral-instruct", "qwen", "qwen-instruct",
            "smollm2", "phi", "gemma", "olmo"]


def synth_runs(n: int, seed: int = 0):
    """(run_id, name, start_ms, tags, metrics) for n runs; 20 metrics each."""
    rng = random.Random(seed)
    t0 = 1_700_000_000_000
    prev = None
    for i in range(n):
        fam = FAMILIES[i % len(FAMILIES)]
        rid = uuid.UUID(int=rng.getrandbits(128)).hex
        tags = {"mlproject.family": fam, "mlproject.base_model": fam,
                "mlproject.avg_acc_metrics": json.dumps(TASKS)}
        if i < len(FAMILIES):
            tags.update({"mlproject.step": "evaluate", "mlproject.role": "base"})
        elif i % 2 == 0:
            tags.update({"mlproject.step": "evaluate"})
        else:
            tags.update({"mlproject.step": "finetune", "mlproject.role": f"trial-{i}",
                         "mlproject.upstream_run": prev})
        metrics = {}
        for task, m in TASKS.items():
            metrics[f"{task}/{m}"] = rng.uniform(0.3, 0.9)
            metrics[f"{task}/{m}_stderr"] = rng.uniform(0.005, 0.02)
        metrics["avg_acc"] = sum(metrics[f"{t}/{m}"] for t, m in TASKS.items()) / len(TASKS)
        metrics.update({"ppl/wikitext2": rng.uniform(5, 30), "params_b": rng.choice([6.4, 8.0]),
                        "eval_seconds": rng.uniform(100, 900),
                        "peak_rss_mb": rng.uniform(9000, 30000),
                        "model_size_mb": rng.uniform(4000, 16000)})
        assert len(metrics) == 20
        yield rid, f"run-{i:05d}", t0 + i * 1000, tags, metrics
        prev = rid


def fill_bulk(uri: str, n: int, artifacts: Path) -> str:
    """Schema by MLflow's SqlAlchemyStore, rows by executemany into its tables."""
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import (
        SqlLatestMetric, SqlMetric, SqlRun, SqlTag)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, str(artifacts))
    exp_id = store.create_experiment("scale", artifact_location=str(artifacts / "scale"))
    runs, tags, metrics, latest = [], [], [], []
    for rid, name, start, tg, mt in synth_runs(n):
        runs.append({"run_uuid": rid, "name": name, "source_type": "LOCAL", "source_name": "",
                     "entry_point_name": "", "user_id": "bench", "status": "FINISHED",
                     "start_time": start, "end_time": start + 500, "source_version": "",
                     "lifecycle_stage": "active", "deleted_time": None,
                     "artifact_uri": str(artifacts / "scale" / rid / "artifacts"),
                     "experiment_id": int(exp_id)})
        tags += [{"key": k, "value": v, "run_uuid": rid}
                 for k, v in {**tg, "mlflow.runName": name}.items()]
        for k, v in mt.items():
            row = {"key": k, "value": v, "timestamp": start, "step": 0, "is_nan": False,
                   "run_uuid": rid}
            metrics.append(row)
            latest.append(row)
    engine = sa.create_engine(uri)
    with engine.begin() as conn:
        conn.execute(sa.insert(SqlRun.__table__), runs)
        conn.execute(sa.insert(SqlTag.__table__), tags)
        conn.execute(sa.insert(SqlMetric.__table__), metrics)
        conn.execute(sa.insert(SqlLatestMetric.__table__), latest)
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE"))  # planner statistics, as a live database has
    engine.dispose()
    store.engine.dispose()
    return uri


def fill_client(uri: str, n: int, artifacts: Path) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    exp_id = client.create_experiment("scale", artifact_location=str(artifacts / "scale"))
    ids: dict[str, str] = {}
    for rid, name, start, tg, mt in synth_runs(n):
        if "mlproject.upstream_run" in tg:
            tg = {**tg, "mlproject.upstream_run": ids[tg["mlproject.upstream_run"]]}
        run = client.create_run(exp_id, start_time=start, tags=tg, run_name=name)
        ids[rid] = run.info.run_id
        client.log_batch(run.info.run_id, [Metric(k, v, start, 0) for k, v in mt.items()])
        client.set_terminated(run.info.run_id, end_time=start + 500)
    return uri


class RequestCounter:
    """Counts (and times) calls to mlflow.utils.rest_utils.http_request, which every REST
    call of the MLflow client goes through (compare's paged search included)."""

    def __init__(self):
        import mlflow.utils.rest_utils as ru

        self.ru, self.orig, self.n, self.seconds = ru, ru.http_request, 0, 0.0

    def __enter__(self):
        def counting(*a, **kw):
            self.n += 1
            t = time.perf_counter()
            try:
                return self.orig(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t

        self.ru.http_request = counting
        return self

    def __exit__(self, *exc):
        self.ru.http_request = self.orig


def children_cpu(extra_root: int | None = None) -> float:
    """CPU seconds used so far by this process's children (the server and its workers), and
    by ``extra_root`` and its children (the PostgreSQL postmaster, not our child)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    procs = psutil.Process().children(recursive=True)
    if extra_root:
        try:
            root = psutil.Process(extra_root)
            procs += [root, *root.children(recursive=True)]
        except psutil.Error:
            pass
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


@contextlib.contextmanager
def backend_store(backend: str, base: Path):
    """``(backend store URI, pid of a database server to count CPU of, or None)``.

    ``postgresql``: a throw-away cluster from ``tests/services.py`` (``postgres_cluster``: as
    root, initdb and pg_ctl run as the ``postgres`` user; a free localhost port, a folder in
    /dev/shm; stopped and removed whatever ended the block)."""
    if backend == "sqlite":
        db = base / "mlflow.db"
        if db.exists():
            db.unlink()
        yield f"sqlite:///{db}", None
    else:
        from services import have_postgres, postgres_cluster

        why = have_postgres()
        if why:
            raise SystemExit(f"--backend postgresql: {why}")
        with postgres_cluster(("mlflow",)) as pg:
            yield pg.uri("mlflow"), pg.pid


def add_runs(uri: str, n: int, seed: int = 1) -> None:
    """Log ``n`` more evaluate runs through the server, as a study would (20 metrics each)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("scale").experiment_id
    now = int(time.time() * 1000)
    for i, (_, name, _, tags, metrics) in enumerate(synth_runs(n + 20, seed=seed)):
        if i < 20:  # past the base runs and lineage
            continue
        tags = {k: v for k, v in tags.items()
                if k not in ("mlproject.role", "mlproject.upstream_run")}
        tags["mlproject.step"] = "evaluate"
        run = client.create_run(exp, start_time=now + i, tags=tags, run_name=f"added-{name}")
        client.log_batch(run.info.run_id, [Metric(k, v, now, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, end_time=now + i + 500)


@contextlib.contextmanager
def cache_mode(mode: str):
    """``build`` with ``fetch_runs(cache=mode)``, whether or not ``build`` passes the spec's
    mode itself (a keyword given by the caller overrides the partial's)."""
    import functools

    from mlproject.compare import query

    orig = query.fetch_runs
    query.fetch_runs = functools.partial(orig, cache=mode)
    try:
        yield
    finally:
        query.fetch_runs = orig


def timed(uri: str, spec, db_pid: int | None) -> dict:
    """One ``compare.build`` (query + tables), its HTTP requests and CPU seconds."""
    from mlproject.compare import build

    with RequestCounter() as rc, cache_mode(spec.cache):
        srv0, cpu0 = children_cpu(db_pid), time.process_time()
        t = time.perf_counter()
        res = build(uri, spec)
        total = time.perf_counter() - t
        cpu_client, cpu_server = time.process_time() - cpu0, children_cpu(db_pid) - srv0
    info = res.runset.cache
    return {"runs": res.stats["runs"], "http_requests": rc.n, "in_http_s": round(rc.seconds, 3),
            "query_s": res.stats["query_s"], "tables_s": res.stats["tables_s"],
            "total_s": round(total, 3), "cpu_client_s": round(cpu_client, 2),
            "cpu_server_s": round(cpu_server, 2), "fetched": info.get("fetched"),
            "from_cache": info.get("from_cache"), "cold": info.get("cold"),
            "tables": {k: len(v) for k, v in res.tables.items()}}


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # so every finally (server, PostgreSQL, temp folders) runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--configs", nargs="+", default=["10000x1", "1000x1", "2500x4"],
                    help="PAGE_SIZExPARALLEL to time: runs per search page (server cap "
                         "50000) x pages in flight at once (1 = one after the other)")
    ap.add_argument("--server-workers", type=int, default=4,
                    help="uvicorn workers of the mlflow server (mlflow's default: 4)")
    ap.add_argument("--fill", choices=["bulk", "client"], default="bulk")
    ap.add_argument("--backend", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite"],
                    help="the MLflow server's backend store(s), each timed in turn")
    ap.add_argument("--add", type=int, default=10,
                    help="runs logged between the two warm compares of the run table")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="default: a temporary folder (in /dev/shm when present)")
    ap.add_argument("--render", action="store_true", help="also time Markdown rendering")
    args = ap.parse_args(argv)

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import logging

    logging.basicConfig(level=logging.WARNING)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    from mlflow_server import start_server

    from mlproject.compare import CompareSpec

    base = args.workdir or Path(tempfile.mkdtemp(
        prefix="compare-scale-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    base.mkdir(parents=True, exist_ok=True)
    os.environ["MLPROJECT_COMPARE_CACHE"] = str(base / "compare-cache")  # never the user's
    rows, cache_rows = [], []
    try:
        for backend in args.backend:
            with backend_store(backend, base) as (uri_db, db_pid):
                t = time.perf_counter()
                fill = fill_bulk if args.fill == "bulk" else fill_client
                fill(uri_db, args.runs, base / "artifacts")
                print(f"[{backend}] filled {args.runs} runs × 20 metrics ({args.fill}) in "
                      f"{time.perf_counter() - t:.1f} s")
                t = time.perf_counter()
                with start_server(base / f"server-{backend}", backend_store_uri=uri_db,
                                  workers=args.server_workers) as uri:
                    print(f"[{backend}] server up in {time.perf_counter() - t:.1f} s at {uri} "
                          f"({args.server_workers} workers)")
                    for config in args.configs:
                        page, parallel = (int(x) for x in config.lower().split("x"))
                        spec = CompareSpec(experiments=("scale",), baseline="role:base",
                                           page_size=page, parallel=parallel, cache="off")
                        row = {"backend": backend, "page_size": page, "parallel": parallel,
                               **timed(uri, spec, db_pid)}
                        row["pages"] = -(-row["runs"] // page)
                        if args.render:
                            from mlproject.compare import build

                            res = build(uri, spec)
                            t = time.perf_counter()
                            md = res.markdown()
                            row["markdown_s"] = round(time.perf_counter() - t, 3)
                            row["markdown_kb"] = len(md) // 1024
                        rows.append(row)
                        print(json.dumps(row))
                    steps = [("cold (cache=refresh)", "refresh"), ("warm, nothing changed", "on"),
                             (f"warm, +{args.add} runs", "on")]
                    for what, mode in steps:
                        if what.startswith("warm, +"):
                            add_runs(uri, args.add)
                        spec = CompareSpec(experiments=("scale",), baseline="role:base", cache=mode)
                        row = {"backend": backend, "compare": what,
                               **timed(uri, spec, db_pid)}
                        cache_rows.append(row)
                        print(json.dumps(row))
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print("| backend | page size × parallel | runs | pages | HTTP requests | query s (summed time "
          "in HTTP) | tables s | query+tables s | CPU s client / server |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['page_size']} × {r['parallel']} | {r['runs']} | {r['pages']} | "
              f"{r['http_requests']} | "
              f"{r['query_s']:.2f} ({r['in_http_s']:.2f}) | {r['tables_s']:.2f} | "
              f"{r['total_s']:.2f} | {r['cpu_client_s']:.1f} / {r['cpu_server_s']:.1f} |")
    print()
    print("| backend | compare (run table) | runs | fetched | from table | HTTP requests | query s "
          "(in HTTP) | tables s | query+tables s | CPU s client / server |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in cache_rows:
        print(f"| {r['backend']} | {r['compare']} | {r['runs']} | {r['fetched']} | "
              f"{r['from_cache']} | {r['http_requests']} | {r['query_s']:.2f} ({r['in_http_s']:.2f}) | "
              f"{r['tables_s']:.2f} | {r['total_s']:.2f} | "
              f"{r['cpu_client_s']:.1f} / {r['cpu_server_s']:.1f} |")
    print(f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: wall times "
          "stretch when the machine is shared; CPU seconds do not)")
    for what, key in (("tables", "tables_s"), ("query+tables", "total_s")):
        ok = all(r[key] <= 15 for r in rows)
        print(f"target {what} ≤ 15 s: {'met' if ok else 'missed'}")
    warm = [r for r in cache_rows if r["compare"].startswith("warm")]
    if warm:
        ok = all(r["total_s"] <= 5 for r in warm)
        print(f"target warm compare ≤ 5 s: {'met' if ok else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
