"""A pipeline cold vs. fully reused, and the pipeline's own overhead over its steps run alone.

In one process, against a fresh local SQLite store (a temp dir); every other repeat runs the
steps alone before the pipeline, so neither side always pays the process's first-use costs
(imports, lm-eval's task index) — use an even --repeats:
  cold     = `mlproject run <pipeline>` in a new experiment (every step runs)
  reused   = the same command again in that experiment (every step reused: no model load)
  alone    = each step of the pipeline run by itself, in order (`steps.get(name).run(cfg)`,
             no parent run), with the same resolved settings — what a user chaining the
             commands by hand would run
Prints the wall times, cold / reused, and cold / alone (the pipeline's overhead; target <= 1.05).

    python benchmarks/pipeline_reuse.py                                   # the demo pipeline
    python benchmarks/pipeline_reuse.py --set "limit=20 ppl_windows=2 recovered.max_steps=10"   # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def pipeline(path: str, overrides: str, uri: str, experiment: str) -> tuple[float, dict]:
    from mlproject.pipeline.config import PipelineConfig
    from mlproject.pipeline import runner

    start = time.perf_counter()
    result = runner.run(PipelineConfig(pipeline=path, set=overrides, tracking_uri=uri, experiment=experiment))
    return time.perf_counter() - start, result.metrics


def alone(path: str, overrides: str, uri: str, experiment: str) -> float:
    """Each step by itself, outputs handed on by hand (what a user would copy between commands)."""
    import mlflow

    from mlproject.pipeline import runner, spec

    pipe = spec.load(path, overrides)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    outputs: dict[str, dict[str, str]] = {}
    start = time.perf_counter()
    for name in pipe.order():
        cfg = runner.build_config(pipe, name, outputs)
        result = pipe.steps[name].info.run(cfg)
        outputs[name] = {"run_id": result.run_id, "model_uri": result.model_uri or ""}
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "demo.yaml"))
    ap.add_argument("--set", default="", help="overrides, as for mlproject run --set")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary store (models and runs) for inspection")
    args = ap.parse_args(argv)

    os.chdir(ROOT)
    store = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    uri = f"sqlite:///{store}/mlflow.db"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for i in range(args.repeats):
        for exp in (f"bench-pipeline-{i}", f"bench-alone-{i}"):
            # models and reports in the temp store, not ./mlruns (a SQLite store's default)
            client.create_experiment(exp, artifact_location=str(store / "artifacts" / exp))
    cold, reused, by_hand = [], [], []
    for i in range(args.repeats):
        exp = f"bench-pipeline-{i}"
        if i % 2:  # every other repeat runs the steps alone first: neither side always pays first-use costs
            by_hand.append(alone(args.pipeline, args.set, uri, f"bench-alone-{i}"))
            print(f"repeat {i + 1}: steps alone {by_hand[-1]:.1f}s (first)", flush=True)
        seconds, metrics = pipeline(args.pipeline, args.set, uri, exp)
        assert metrics["system/pipeline/steps_reused"] == 0, metrics
        cold.append(seconds)
        print(f"repeat {i + 1}: cold pipeline {seconds:.1f}s ({int(metrics['system/pipeline/steps_run'])} steps run)",
              flush=True)
        seconds, metrics = pipeline(args.pipeline, args.set, uri, exp)
        assert metrics["system/pipeline/steps_run"] <= 1, metrics  # only a compare step runs again
        reused.append(seconds)
        print(f"repeat {i + 1}: reused pipeline {seconds:.1f}s "
              f"({int(metrics['system/pipeline/steps_reused'])} steps reused)", flush=True)
        if not i % 2:
            by_hand.append(alone(args.pipeline, args.set, uri, f"bench-alone-{i}"))
            print(f"repeat {i + 1}: steps alone {by_hand[-1]:.1f}s", flush=True)
    c, r, a = statistics.median(cold), statistics.median(reused), statistics.median(by_hand)
    print(f"pipeline={args.pipeline} set={args.set!r}" + (f" store={store}" if args.keep else ""))
    print(f"cold {c:.1f}s  reused {r:.1f}s  steps alone {a:.1f}s")
    print(f"cold / reused = {c / r:.1f}x   pipeline / steps alone = {c / a:.3f} (target <= 1.05)")
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)  # every model of every run: hundreds of MB
    return 0


if __name__ == "__main__":
    sys.exit(main())
