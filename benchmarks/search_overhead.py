"""Per-trial overhead of the search (Optuna storage + MLflow tracking + registry) with a trivial
objective, against bare Optuna in memory.

  bare    = optuna.create_study() in memory; the objective suggests the same three parameters
            and returns a formula (N trials)
  search  = the search's own worker (mlproject.search.workers.Worker) on a SQLite storage file and a
            local SQLite tracking store (or --tracking-uri, e.g. a running mlflow server): every
            trial is a pipeline run nested in the study run, with its params, tags, Optuna user
            attrs, per-level and final metrics, report.md and pipeline.yaml — only the pipeline's
            steps and the model scoring are replaced by the same formula; then, once, the end of
            the search (winner tags, registry aliases, trials/Pareto tables, importances, plots),
            counted per trial
Prints ms per trial for both and the search's overhead per trial (target <= 300 ms).

    python benchmarks/search_overhead.py                 # 30 trials
    python benchmarks/search_overhead.py --trials 100 --tracking-uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SPACE = {"name": "overhead", "params": {"q.w_bits": {"int": [2, 8]}, "q.group_size": [32, 64],
                                        "q.scheme": ["symmetric", "asymmetric"]},
         "objectives": ["best_acc"], "pruner": {"type": "none"}, "sampler": {"type": "tpe", "seed": 0}}


def formula(values: dict) -> float:
    return 1.0 / (1 + (values["q.w_bits"] - 6) ** 2) + (0.01 if values["q.scheme"] == "symmetric" else 0.0)


def bare(n: int) -> float:
    import optuna

    from mlproject.search import space as space_mod

    space = make_space(Path(tempfile.mkdtemp()))
    study = optuna.create_study(direction="maximize", sampler=space.sampler_object())
    start = time.perf_counter()
    study.optimize(lambda t: formula({k: p.suggest(t) for k, p in space.params.items()}), n_trials=n)
    del space_mod
    return time.perf_counter() - start


def make_space(tmp: Path, n: int = 1):
    from mlproject.search import space as space_mod

    pipe = tmp / "trivial.yaml"
    pipe.write_text("name: trivial\nparams: {model: smollm2}\nsteps:\n  q: {step: quantize}\n")
    return space_mod.parse({**SPACE, "pipeline": str(pipe)}, n_trials=n)


def search(n: int, uri: str, tmp: Path, name: str = "overhead") -> tuple[float, float]:
    import mlflow
    import optuna

    from mlproject import tracking
    from mlproject.evaluation.engine import plan_eval
    from mlproject.evaluation.options import EvalOptions
    from mlproject.pipeline import runner
    from mlproject.search import report, storage as storage_mod, trials, workers
    from mlproject.search.config import SearchConfig
    from mlproject.search.space import subset
    from mlproject.tracking import names

    class TrivialWorker(workers.Worker):
        """The real worker; only the pipeline's steps and the model scoring are a formula."""

        def plan_trial(self, values):
            return runner.Plan(pipe=subset(self.space.pipe, []), steps={}, order=[], experiment=self.experiment,
                               experiment_id=self.ctx.experiment_id)

        def score(self, trial, prun, results, the_plan):
            # what score() does around the model: the target attr, the duplicate lookup, one
            # level's metrics, the result
            value = formula(trial.params)
            prun.log_text("a stand-in for the target step's model\n", "model/README.md")
            trial.set_user_attr(trials.ATTR_TARGET, {trials.ATTR_EVAL_KEY: self.eval_key(None),
                                                     trials.ATTR_MODEL: f"runs:/{prun.run_id}/model"})
            self.target_tags = {names.TARGET_RUN_TAG: prun.run_id}
            self._same_eval("-", trial.number)
            prun.log_metrics_and_tags({"fidelity/avg_acc": value, "fidelity/documents": 1}, self.target_tags, step=1)
            return self._complete(trial, prun, {"avg_acc": value, "model_size_mb": 1.0, "system/search/documents": 1}, 1)

    mlflow.set_tracking_uri(uri)
    space = make_space(tmp, n)
    cfg = SearchConfig(space="-", storage=f"sqlite:///{tmp}/optuna.db", n_trials=n)
    storage = storage_mod.open_storage(cfg.storage, heartbeat=30)
    study, _ = storage_mod.open_study(storage, name, space)
    checked = (None, plan_eval(EvalOptions(tasks="none", ppl_dataset="none")), [])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tracking.step_run("search", experiment="search-overhead", run_name=f"search:{name}") as srun:
        ctx = workers.Context(cfg=cfg, study_name=name, experiment_id=srun.experiment_id,
                              study_run_id=srun.run_id)
        worker = TrivialWorker(ctx, space=space, study=study, checked=checked)
        start = time.perf_counter()
        worker.loop()
        loop = time.perf_counter() - start
        start = time.perf_counter()
        report.finalize(storage_mod.reload_study(study), space, srun, name)
        end = time.perf_counter() - start
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == n, f"{len(done)} trials completed, {n} wanted"
    return loop, end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--tracking-uri", default="", help="default: a fresh SQLite store in a temp dir")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="search-overhead-") as tmp:
        os.chdir(tmp)  # artifacts of a local store land here
        uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        # imports, database creation and first-call costs out of the measurement
        bare(3)
        search(3, uri, Path(tmp), name="warm-up")
        b = bare(args.trials)
        loop, end = search(args.trials, uri, Path(tmp))
    n = args.trials
    per_trial = (loop + end) / n
    print(f"trials: {n}, tracking: {'server ' + args.tracking_uri if args.tracking_uri else 'local SQLite store'}, "
          "storage: SQLite file (heartbeat on)")
    print(f"bare Optuna in memory:   {1000 * b / n:8.1f} ms/trial")
    print(f"search, trial loop:      {1000 * loop / n:8.1f} ms/trial")
    print(f"search, end of search:   {1000 * end:8.1f} ms once = {1000 * end / n:.1f} ms/trial")
    print(f"search overhead:         {1000 * (per_trial - b / n):8.1f} ms/trial (target <= 300); "
          f"search / bare = {per_trial / (b / n):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
