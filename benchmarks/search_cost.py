"""What multi-fidelity pruning saves: the demo space searched with the same seed and trial count —
with the space's pruner (or each of --pruner a,b: scoring 10% → 30% → 100% of the documents,
stopping poor trials) and without (every trial scores every document) — on SmolLM2, offline.

For each: documents and PPL windows scored (summed over the trials), scoring seconds (loading
the trial's model and scoring it), wall time, trials completed / pruned, and the best config
(best_acc: the completed trial with the highest avg_acc). Prints pruned / unpruned ratios and
whether the searches found the same best config (target: <= 1/2 of the documents, same winner).

Each search runs in its own experiment of a fresh local store (a temp dir), so neither reuses
the other's pipeline steps.

    python benchmarks/search_cost.py                                  # demo space, 8 trials, seed 0
    python benchmarks/search_cost.py --n-trials 12 --pruner wilcoxon,successive_halving
    python benchmarks/search_cost.py --set "limit=100"                # quicker: 100 documents per task
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def one_search(args, tmp: Path, pruner: str) -> dict:
    import optuna

    from mlproject.search import report, study as study_mod
    from mlproject.search.config import SearchConfig

    import mlflow
    from mlflow.tracking import MlflowClient

    name = f"cost-{pruner or 'space'}".replace("_", "-")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    # the trials' model artifacts go to the temp dir (a local store would put them in ./mlruns)
    MlflowClient().create_experiment(name, artifact_location=str(tmp / "artifacts" / name))
    cfg = SearchConfig(space=args.space, model=args.model, set=args.set, n_trials=args.n_trials, seed=args.seed,
                       pruner=pruner, study=name, experiment=name, storage=f"sqlite:///{tmp}/optuna.db",
                       tracking_uri=f"sqlite:///{tmp}/mlflow.db", heartbeat=0)
    start = time.perf_counter()
    result = study_mod.run(cfg)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=cfg.storage)
    rows = report.trial_rows(study)
    best = report.pick_winners(rows, None).get("best_acc")
    return {
        "pruner": study_mod.space_mod.load(args.space, args.set, model=args.model, pruner=pruner).pruner["type"],
        "documents": sum(r.get("system/search/documents") or 0 for r in rows),
        "windows": sum(r.get("system/search/ppl_windows") or 0 for r in rows),
        "scoring_s": sum(r.get("eval_seconds") or 0 for r in rows),
        "wall_s": wall,
        "complete": sum(r["state"] == "COMPLETE" for r in rows), "pruned": sum(r["state"] == "PRUNED" for r in rows),
        "best": best, "run_id": result.run_id,
        "trials": [(r["trial"], r["state"], {k[6:]: v for k, v in r.items() if k.startswith("param ")},
                    r.get("avg_acc") if r["state"] == "COMPLETE" else r.get("estimate/avg_acc"), r.get("documents"))
                   for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(ROOT / "pipelines/spaces/demo.yaml"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruner", default="", help="the pruned searches' pruners, comma-separated (default: the space's)")
    parser.add_argument("--set", default="", help="pipeline overrides for both searches")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)  # the space and pipeline paths, the bundled tasks
    import torch  # noqa: F401 - heavy imports before the clocks start
    import transformers  # noqa: F401
    import lm_eval  # noqa: F401
    import mlflow  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="search-cost-") as tmp:
        res = {}
        for pruner in [p.strip() for p in args.pruner.split(",")] or [""]:
            r = one_search(args, Path(tmp), pruner)
            res[f"pruned ({r['pruner']})"] = r
        res["unpruned"] = one_search(args, Path(tmp), "none")
    u = res["unpruned"]
    print(f"space {args.space}, model {args.model}, {args.n_trials} trials, seed {args.seed}"
          + (f", set {args.set!r}" if args.set else ""))
    for label, r in res.items():
        print(f"\n{label}: {r['complete']} complete, {r['pruned']} pruned; "
              f"{r['documents']} documents, {r['windows']} PPL windows, scoring {r['scoring_s']:.0f} s, "
              f"wall {r['wall_s']:.0f} s")
        for n, state, params, value, docs in r["trials"]:
            shown = f"{value:.4f}" if isinstance(value, float) else "-"
            print(f"  trial {n}: {state:8s} {params} avg_acc {shown} ({docs} documents)")
        b = r["best"]
        print(f"  best_acc: trial {b['trial']} avg_acc {b['avg_acc']:.4f} "
              f"{ {k[6:]: v for k, v in b.items() if k.startswith('param ')} }" if b else "  no completed trial")
    print()
    for label, p in res.items():
        if p is u:
            continue
        same = bool(p["best"] and u["best"]) and \
            {k: v for k, v in p["best"].items() if k.startswith("param ")} == \
            {k: v for k, v in u["best"].items() if k.startswith("param ")}
        print(f"{label} / unpruned: documents {p['documents'] / max(u['documents'], 1):.2f} (target <= 0.50), "
              f"PPL windows {p['windows'] / max(u['windows'], 1):.2f}, scoring time "
              f"{p['scoring_s'] / max(u['scoring_s'], 1e-9):.2f}, wall {p['wall_s'] / max(u['wall_s'], 1e-9):.2f}; "
              f"same best config: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
