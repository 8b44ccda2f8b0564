"""`compare`: query runs, build the summary / versus / ranking views, record them as a run.

The query and the tables are computed before the compare run is opened, so bad input
(unknown experiment, a baseline that matches nothing, a bad filter) creates no run at all.
The run holds every output format as artifacts (``compare.md`` also as ``report.md``, shown
by the MLflow UI's artifact viewer) and the query statistics as metrics.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlproject import tracking
from mlproject.config import CompareConfig


@dataclass
class CompareRunResult:
    run_id: str
    markdown: str
    files: list[str]
    stats: dict

    @property
    def text(self) -> str:
        """What the CLI prints: the Markdown tables."""
        return self.markdown + f"\nrun_id: {self.run_id}\n"


def run(cfg: CompareConfig) -> CompareRunResult:
    from mlproject.compare import build

    spec = cfg.spec()
    tracking.check_server(cfg.tracking_uri or None)
    result = build(None, spec)
    scope = ",".join(spec.experiments) or ",".join(r[:8] for r in spec.runs)
    experiment = spec.experiments[0] if spec.experiments else None
    if experiment and experiment.isdigit():
        experiment = tracking.experiment_name(experiment)
    with tracking.step_run("compare", experiment=experiment, run_name=cfg.run_name or f"compare:{scope}",
                           log_env=False) as run:
        run.log_params({"experiment": cfg.experiment, "runs": cfg.runs, "filter": cfg.filter,
                        "baseline": cfg.baseline, "view": ",".join(spec.view),
                        "metrics": cfg.metrics, "directions": cfg.directions,
                        "format": ",".join(spec.formats), "status": ",".join(spec.statuses)})
        run.log_metrics({f"compare/{k}": v for k, v in result.stats.items()
                         if isinstance(v, (int, float))})
        with tempfile.TemporaryDirectory(prefix="mlproject-compare-") as tmp:
            paths = result.write(Path(tmp), spec.formats)
            run.log_artifacts(tmp)
            markdown = result.markdown()
            run.log_text(markdown, "report.md")
        return CompareRunResult(run_id=run.run_id, markdown=markdown,
                                files=[p.name for p in paths], stats=result.stats)
