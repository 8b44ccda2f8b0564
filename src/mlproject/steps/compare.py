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
from mlproject.params import shown_value
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
    if experiment is None and spec.runs:
        # Only runs named: record the comparison beside the first of them, never in an
        # experiment the user did not name (the default one would be created for it).
        experiment = tracking.experiment_name(tracking.run_experiment_id(spec.runs[0]))
    with tracking.step_run("compare", experiment=experiment, run_name=cfg.run_name or f"compare:{scope}",
                           log_env=False, parent=parent) as run:
        run.log_params({**{k: shown_value(cfg, k) for k in ("experiment", "runs", "filter", "baseline", "metrics",
                                                             "directions")},
                        "view": ",".join(spec.view), "format": ",".join(spec.formats),
                        "status": ",".join(spec.statuses)})
        # Query statistics are bookkeeping: MLflow's system/ namespace, apart from model metrics.
        stats = {f"{tracking.SYSTEM_PREFIX}compare/{k}": v for k, v in result.stats.items()
                 if isinstance(v, (int, float))}
        run.log_metrics(stats)
        run.set_description(_description(result, scope))
        with tempfile.TemporaryDirectory(prefix="mlproject-compare-") as tmp:
            paths = result.write(Path(tmp), spec.formats)
            run.log_artifacts(tmp)
            markdown = result.markdown()
            run.log_text(markdown, "report.md")
        return StepResult(step="compare", run_id=run.run_id, metrics=stats,
                          text=markdown + f"\nrun_id: {run.run_id}\n",
                          details={"markdown": markdown, "files": [p.name for p in paths], "stats": result.stats})


def _description(result, scope: str) -> str:
    """The compare run's description: what was compared, mismatched settings, the verdicts."""
    lines = [f"**compare** · {result.stats.get('runs', 0)} runs ({scope})"
             + (f" · baseline {result.baseline.label}" if result.baseline is not None else "")]
    flags = result.setting_flags
    if flags:
        lines.append("⚠ evaluation settings differ: " + "; ".join(
            f"{r.run}: {r.differs}" for r in result.tables["settings"].itertuples() if r.differs))
    vs = result.tables.get("versus_summary")
    if vs is not None and len(vs):
        for r in vs.itertuples():
            unit = " pts" if r.unit == "pts" else ""
            lines.append(f"{r.candidate}: {r.n_improved} of {r.n_tasks} tasks better, average change "
                         f"{r.avg_delta:+.2f}{unit}" + (" ⚠" if r.candidate_id in flags else ""))
    lines.append("Tables and plots: `compare.md` / `compare.html` (Artifacts tab).")
    return "  \n".join(lines) + "\n"
