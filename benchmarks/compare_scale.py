"""How compare scales: N runs × 20 metrics on a real local ``mlflow server``.

    python benchmarks/compare_scale.py --runs 10000          # the issue's target
    python benchmarks/compare_scale.py --runs 500            # quick check
    python benchmarks/compare_scale.py --runs 10000 --configs 10000x1 2500x4 --render

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

Target (issue): query + tables ≤ 15 s at 10,000 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def fill_bulk(db: Path, n: int, artifacts: Path) -> str:
    """Schema by MLflow's SqlAlchemyStore, rows by executemany into its tables."""
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import (
        SqlLatestMetric, SqlMetric, SqlRun, SqlTag)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{db}"
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
    engine.dispose()
    return uri


def fill_client(db: Path, n: int, artifacts: Path) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = f"sqlite:///{db}"
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


def children_cpu() -> float:
    """CPU seconds used so far by this process's children (the server and its worker)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--configs", nargs="+", default=["10000x1", "1000x1", "2500x4"],
                    help="PAGE_SIZExPARALLEL to time: runs per search page (server cap "
                         "50000) x pages in flight at once (1 = one after the other)")
    ap.add_argument("--server-workers", type=int, default=4,
                    help="uvicorn workers of the mlflow server (mlflow's default: 4)")
    ap.add_argument("--fill", choices=["bulk", "client"], default="bulk")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="default: a temporary folder (in /dev/shm when present)")
    ap.add_argument("--render", action="store_true", help="also time Markdown rendering")
    args = ap.parse_args(argv)

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from mlflow_server import start_server

    from mlproject.compare import CompareSpec, build

    base = args.workdir or Path(tempfile.mkdtemp(
        prefix="compare-scale-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    base.mkdir(parents=True, exist_ok=True)
    db = base / "mlflow.db"
    if db.exists():
        db.unlink()
    t = time.perf_counter()
    fill = fill_bulk if args.fill == "bulk" else fill_client
    uri_db = fill(db, args.runs, base / "artifacts")
    print(f"filled {args.runs} runs × 20 metrics ({args.fill}) in "
          f"{time.perf_counter() - t:.1f} s → {db}")

    rows = []
    t = time.perf_counter()
    with start_server(base / "server", backend_store_uri=uri_db,
                      workers=args.server_workers) as uri:
        print(f"server up in {time.perf_counter() - t:.1f} s at {uri} "
              f"({args.server_workers} workers)")
        for config in args.configs:
            page, parallel = (int(x) for x in config.lower().split("x"))
            spec = CompareSpec(experiments=("scale",), baseline="role:base", page_size=page,
                               parallel=parallel)
            with RequestCounter() as rc:
                srv0, cpu0 = children_cpu(), time.process_time()
                t = time.perf_counter()
                res = build(uri, spec)
                total = time.perf_counter() - t
                cpu_client, cpu_server = time.process_time() - cpu0, children_cpu() - srv0
            row = {"page_size": page, "parallel": parallel, "runs": res.stats["runs"],
                   "pages": -(-res.stats["runs"] // page), "http_requests": rc.n,
                   "in_http_s": round(rc.seconds, 3),
                   "query_s": res.stats["query_s"], "tables_s": res.stats["tables_s"],
                   "total_s": round(total, 3), "cpu_client_s": round(cpu_client, 2),
                   "cpu_server_s": round(cpu_server, 2)}
            if args.render:
                t = time.perf_counter()
                md = res.markdown()
                row["markdown_s"] = round(time.perf_counter() - t, 3)
                row["markdown_kb"] = len(md) // 1024
            rows.append(row)
            sizes = {k: len(v) for k, v in res.tables.items()}
            print(json.dumps(row), "tables:", sizes)
    print()
    print("| page size × parallel | runs | pages | HTTP requests | query s (summed time in HTTP) "
          "| tables s | query+tables s | CPU s client / server |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['page_size']} × {r['parallel']} | {r['runs']} | {r['pages']} | "
              f"{r['http_requests']} | "
              f"{r['query_s']:.2f} ({r['in_http_s']:.2f}) | {r['tables_s']:.2f} | "
              f"{r['total_s']:.2f} | {r['cpu_client_s']:.1f} / {r['cpu_server_s']:.1f} |")
    print(f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: wall times "
          "stretch when the machine is shared; CPU seconds do not)")
    for what, key in (("tables", "tables_s"), ("query+tables", "total_s")):
        ok = all(r[key] <= 15 for r in rows)
        print(f"target {what} ≤ 15 s: {'met' if ok else 'missed'}")
    if args.workdir is None:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
