"""`compare`: query runs, build the summary / versus / ranking views, record them as a run.

The query and the tables are computed before the compare run is opened, so bad input
(unknown experiment, a baseline that matches nothing, a bad filter) creates no run at all.
The run holds every output format as artifacts (``compare.md`` also as ``report.md``, shown
by the MLflow UI's artifact viewer) and the query statistics as metrics.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlproject import tracking
from mlproject.config import CompareConfig
from mlproject.steps import StepResult


def check(cfg: CompareConfig, parent: tracking.Run | None = None, pending: frozenset[str] = frozenset()) -> None:
    """Cheap checks (the config validated views, formats and directions; the query itself
    needs the runs, so it happens in run())."""
    if parent is None:
        tracking.check_server(cfg.tracking_uri or None)


def run(cfg: CompareConfig, parent: tracking.Run | None = None) -> StepResult:
    """Query, tabulate, record. ``result.text`` is the Markdown (what the CLI prints);
    ``details`` holds ``markdown``, ``files`` (artifact names) and the query ``stats``."""
    from mlproject.compare import build

    spec = cfg.spec()
    check(cfg, parent)
    result = build(None, spec)
    scope = ",".join(spec.experiments) or ",".join(r[:8] for r in spec.runs)
    experiment = spec.experiments[0] if spec.experiments else None
    if experiment and experiment.isdigit():
        experiment = tracking.experiment_name(experiment)
    with tracking.step_run("compare", experiment=experiment, run_name=cfg.run_name or f"compare:{scope}",
                           log_env=False, parent=parent) as run:
        run.log_params({"experiment": cfg.experiment, "runs": cfg.runs, "filter": cfg.filter,
                        "baseline": cfg.baseline, "view": ",".join(spec.view),
                        "metrics": cfg.metrics, "directions": cfg.directions,
                        "format": ",".join(spec.formats), "status": ",".join(spec.statuses)})
        stats = {f"compare/{k}": v for k, v in result.stats.items() if isinstance(v, (int, float))}
        run.log_metrics(stats)
        with tempfile.TemporaryDirectory(prefix="mlproject-compare-") as tmp:
            paths = result.write(Path(tmp), spec.formats)
            run.log_artifacts(tmp)
            markdown = result.markdown()
            run.log_text(markdown, "report.md")
        return StepResult(step="compare", run_id=run.run_id, metrics=stats,
                          text=markdown + f"\nrun_id: {run.run_id}\n",
                          details={"markdown": markdown, "files": [p.name for p in paths], "stats": result.stats})
