"""What sampling MLflow's system metrics costs a step (tracking.system_metrics).

Against a real local `mlflow server` (tests/mlflow_server.py), in one process:

1. one sample, measured alone: the collectors' CPU time (MLflow's CPUMonitor, and the GPU one
   where pynvml finds a GPU) and the client CPU and wall time of sending one batch of
   FLUSH_SECONDS / interval samples; the sampler's cost per second of step at the default
   interval (its CPU time / the interval: an upper bound on the step time it can take), and
   the same for MLflow's own monitor (a get_run and a log_batch per sample);
2. the end of a run: how long ``stop()`` holds the step (the last sample and batch);
3. an A/B of a small real step: ``mlproject evaluate`` of SmolLM2 (the shipped GGUF, converted
   once into the cache) with the sampler off, at the default interval, and at 1 s (ten times
   the rate), alternated, printing the medians and the ratios on / off.

    python benchmarks/system_metrics_cost.py                   # ~20 s steps, 3 repeats per arm
    python benchmarks/system_metrics_cost.py --repeats 5 --limit 40
    python benchmarks/system_metrics_cost.py --no-ab           # parts 1 and 2 only (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def per_sample(uri: str, n: int) -> dict[str, float]:
    """Collect and send costs of one sample, in seconds (CPU: this thread only)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from mlproject.tracking import system_metrics as sm
    from mlproject.tracking.run import send_metrics

    client = MlflowClient(uri)
    exp = client.create_experiment(f"sysm-bench-{time.time_ns()}")
    run_id = client.create_run(exp).info.run_id
    collectors = sm._collectors()
    sampler = sm.SystemMetrics(run_id, uri, sm.DEFAULT_SECONDS)
    import psutil

    psutil.cpu_percent()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for step in range(n):
        sampler._sample(collectors, step)
    collect_cpu, collect_wall = (time.thread_time() - cpu0) / n, (time.perf_counter() - wall0) / n
    points = sampler._buffer
    keys = len(points) // n
    per_batch = max(1, round(sm.FLUSH_SECONDS / sm.DEFAULT_SECONDS))
    batches = [points[i:i + keys * per_batch] for i in range(0, len(points), keys * per_batch)]
    send_metrics(client, run_id, batches.pop(0))  # warm the connection
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for batch in batches:
        send_metrics(client, run_id, batch)
    send_cpu, send_wall = (time.thread_time() - cpu0) / len(batches), (time.perf_counter() - wall0) / len(batches)
    # MLflow's SystemMetricsMonitor: get_run (is the run still RUNNING?) and log_batch every sample
    one = [Metric(p[0], p[1], p[2], p[3]) for p in points[:keys]]
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(len(batches)):
        client.get_run(run_id)
        client.log_batch(run_id, metrics=one, synchronous=True)
    mlflow_cpu, mlflow_wall = (time.thread_time() - cpu0) / len(batches), (time.perf_counter() - wall0) / len(batches)
    client.set_terminated(run_id)
    return dict(keys=keys, per_batch=per_batch, collect_cpu=collect_cpu, collect_wall=collect_wall,
                send_cpu=send_cpu, send_wall=send_wall, mlflow_cpu=mlflow_cpu, mlflow_wall=mlflow_wall,
                gpu=any(type(c).__name__ != "CPUMonitor" for c in collectors))


def end_of_run(uri: str, n: int) -> tuple[float, float]:
    """Median wall seconds start_system_metrics() and stop() hold the step."""
    from mlflow.tracking import MlflowClient

    from mlproject.tracking import system_metrics as sm

    client = MlflowClient(uri)
    exp = client.create_experiment(f"sysm-bench-stop-{time.time_ns()}")
    starts, stops = [], []
    for _ in range(n):
        run_id = client.create_run(exp).info.run_id
        t0 = time.perf_counter()
        sampler = sm.start_system_metrics(run_id, "evaluate")
        t1 = time.perf_counter()
        time.sleep(0.3)  # the thread's set-up (imports, collectors) done, as in a real step
        t2 = time.perf_counter()
        sampler.stop()
        t3 = time.perf_counter()
        assert sampler.sent > 0 and not sampler.is_alive()
        starts.append(t1 - t0)
        stops.append(t3 - t2)
        client.set_terminated(run_id)
    return statistics.median(starts), statistics.median(stops)


def evaluate_once(uri: str, setting: str, args) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of one evaluate step."""
    from mlproject.config import EvaluateConfig
    from mlproject.steps import evaluate

    os.environ["MLPROJECT_SYSTEM_METRICS"] = setting
    start, cpu = time.perf_counter(), time.process_time()
    evaluate.run(EvaluateConfig(model=args.model, tasks=args.tasks, limit=str(args.limit), seqlen=args.seqlen,
                                ppl_windows=args.ppl_windows, batch_size=str(args.batch_size),
                                experiment="sysm-bench-ab", tracking_uri=uri))
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300, help="samples for the per-sample cost")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="offline")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ab", action="store_true", help="skip the A/B of real steps")
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from mlflow_server import start_server

    from mlproject.tracking import system_metrics as sm
    from mlproject.tracking.link import _http_defaults

    _http_defaults()
    with tempfile.TemporaryDirectory(prefix="sysm-bench-") as tmp, start_server(Path(tmp) / "server") as uri:
        import mlflow

        mlflow.set_tracking_uri(uri)
        c = per_sample(uri, args.samples)
        interval = sm.DEFAULT_SECONDS
        ours = c["collect_cpu"] + c["send_cpu"] / c["per_batch"]
        print(f"one sample: {c['keys']} metrics ({'with' if c['gpu'] else 'no'} GPU series); collect "
              f"{c['collect_cpu'] * 1e3:.3f} ms CPU ({c['collect_wall'] * 1e3:.3f} ms wall); one batch of "
              f"{c['per_batch']} samples: {c['send_cpu'] * 1e3:.2f} ms client CPU, {c['send_wall'] * 1e3:.2f} ms wall")
        print(f"per sample, ours: {ours * 1e3:.3f} ms CPU, {1 / c['per_batch']:.2f} requests; "
              f"MLflow's monitor: {(c['collect_cpu'] + c['mlflow_cpu']) * 1e3:.3f} ms CPU, 2 requests "
              f"({c['mlflow_wall'] * 1e3:.2f} ms wall)")
        print(f"fraction of a step at the default {interval:g} s: ours {ours / interval:.2e} "
              f"(CPU per second of step), MLflow's {(c['collect_cpu'] + c['mlflow_cpu']) / interval:.2e}; "
              f"at 1 s, counting a request per sample (an upper bound): {c['collect_cpu'] + c['send_cpu']:.2e}")
        start_s, stop_s = end_of_run(uri, 10)
        print(f"end of run: start {start_s * 1e3:.2f} ms, stop (last sample + batch) {stop_s * 1e3:.2f} ms wall = "
              f"{stop_s / 20:.1e} of a 20 s step, {stop_s / 60:.1e} of a 60 s step")
        if args.no_ab:
            return 0
        arms = {"off": "off", f"{interval:g}s": "", "1s": "1"}
        print(f"A/B: evaluate {args.model} tasks={args.tasks} limit={args.limit} seqlen={args.seqlen} "
              f"ppl_windows={args.ppl_windows}; warm-up", flush=True)
        evaluate_once(uri, "off", args)
        # CPU time is the steadier figure on a shared machine: other tenants stretch the wall time
        # of a run but add little to its own CPU seconds.
        wall: dict[str, list[float]] = {a: [] for a in arms}
        cpu: dict[str, list[float]] = {a: [] for a in arms}
        for i in range(args.repeats):
            order = list(arms) if i % 2 == 0 else list(reversed(arms))  # spread drift over the arms
            for arm in order:
                w, c = evaluate_once(uri, arms[arm], args)
                wall[arm].append(w)
                cpu[arm].append(c)
            print(f"  repeat {i + 1}: " + "  ".join(f"{a} {wall[a][-1]:.2f}s wall {cpu[a][-1]:.2f}s CPU" for a in arms),
                  flush=True)
        for name, t in (("wall", wall), ("CPU", cpu)):
            off = statistics.median(t["off"])
            ratios = "  ".join(f"{a} {statistics.median(t[a]) / off:.3f}" for a in arms if a != "off")
            print(f"{name}: medians " + "  ".join(f"{a} {statistics.median(v):.2f}s" for a, v in t.items())
                  + f"; ratios on/off {ratios} (the off runs spread {(max(t['off']) - min(t['off'])) / off:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
