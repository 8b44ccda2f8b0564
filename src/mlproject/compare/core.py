"""``build(client_or_uri, spec) -> CompareResult``: query, compute the views, write outputs.

The views come from the registry (``mlproject.compare.views.VIEWS``): ``compute`` builds their
shared inputs once, lets each selected view add its tables, then adds the parts every compare
has (trade-offs, code tasks' common problems, evaluation settings)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from mlproject.compare import views
from mlproject.compare.directions import Directions
from mlproject.compare.query import RunSet
from mlproject.compare.spec import CompareSpec
from mlproject.compare.tables.baseline import Baseline, resolve_baseline
from mlproject.compare.tables.code_common import CommonSet, common_notes, common_problem_metrics, common_table
from mlproject.compare.tables.lineage import lineage
from mlproject.compare.tables.scores import Scores, select_metrics, task_candidates, task_scores
from mlproject.compare.views import Inputs, pareto, settings
from mlproject.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class CompareResult:
    """Everything a compare produced. ``tables`` (unrounded, tidy enough for CSV):

    summary, summary_tasks: compress-recover view (one row per run; one per run × task).
    versus, versus_summary: baseline vs each candidate (one row per candidate × metric).
    ranking, ranking_delta, ranking_lists: medals per benchmark and metric; deltas and
        speedups against the baseline; categories ("better on every metric", …).
    pareto: mean accuracy vs PPL / size with Pareto-front flags.
    code_common: per code task, the problems every compared run solved (times use them).
    settings: evaluation settings per run and how they differ from its reference.
    A table is absent when its view was not asked for or had nothing to show; a registered
    view adds its own tables (see its module).
    """

    spec: CompareSpec
    runset: RunSet
    tables: dict[str, pd.DataFrame]
    scores: Scores
    directions: Directions
    baseline: Baseline | None = None
    notes: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    #: code tasks: the problems every compared run solved, on which times are compared
    common: dict[str, CommonSet] = field(default_factory=dict)

    @property
    def setting_flags(self) -> dict[str, str]:
        """run id → the evaluation settings in which it differs from its reference (only those)."""
        t = self.tables.get("settings")
        if t is None or t.empty:
            return {}
        return {r.run_id: r.differs for r in t.itertuples() if r.differs}

    @cached_property
    def tidy(self) -> pd.DataFrame:
        """One row per (run, metric) with lineage columns (in-scope and lineage runs)."""
        return self.runset.tidy()

    def markdown(self, max_rows: int | None = None) -> str:
        from mlproject.compare import document

        return document.markdown(self, max_rows=max_rows)

    def html(self, images: dict[str, bytes] | None = None) -> str:
        from mlproject.compare import document

        return document.html(self, images=images)

    def write(self, out_dir, formats=None) -> list[Path]:
        """Write the requested formats (default: the spec's) under ``out_dir``; return paths.

        md → compare.md; csv → tidy.csv + <table>.csv; json → compare.json (spec, runs,
        tidy metrics, every table); html → compare.html (plots embedded); png → plots.
        """
        from mlproject.compare import document

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fmts = CompareSpec(formats=formats).formats if formats else self.spec.formats
        paths: list[Path] = []
        images: dict[str, bytes] = {}
        if "png" in fmts or "html" in fmts:
            images = document.plots(self)
        if "png" in fmts:
            for name, data in images.items():
                p = out / name
                p.write_bytes(data)
                paths.append(p)
        if "md" in fmts:
            p = out / "compare.md"
            p.write_text(document.markdown(self, images=list(images) if "png" in fmts else None),
                         encoding="utf-8")
            paths.append(p)
        if "html" in fmts:
            p = out / "compare.html"
            p.write_text(document.html(self, images=images), encoding="utf-8")
            paths.append(p)
        if "csv" in fmts:
            p = out / "tidy.csv"
            self.tidy.to_csv(p, index=False)
            paths.append(p)
            for name, df in self.tables.items():
                p = out / f"{name}.csv"
                _flat(df).to_csv(p, index=False)
                paths.append(p)
        if "json" in fmts:
            p = out / "compare.json"
            p.write_text(self.to_json(), encoding="utf-8")
            paths.append(p)
        return paths

    def to_json(self) -> str:
        runs = self.runset.runs.reset_index()
        head = {
            "spec": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in asdict(self.spec).items()},
            "baseline": None if self.baseline is None else {
                "text": self.baseline.text, "mode": self.baseline.mode,
                "label": self.baseline.label, "run_ids": self.baseline.run_ids},
            "notes": self.notes,
            "stats": self.stats,
        }
        parts = [json.dumps(head)[:-1],
                 ', "runs": ' + runs.to_json(orient="records"),
                 ', "metrics": ' + self.tidy[["run_id", "metric", "value"]].to_json(
                     orient="records"),
                 ', "tables": {']
        parts.append(", ".join(f"{json.dumps(k)}: {_flat(v).to_json(orient='records')}"
                               for k, v in self.tables.items()))
        parts.append("}}")
        return "".join(parts)


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Lists → '; '-joined strings (CSV/JSON friendly)."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object and out[c].map(lambda v: isinstance(v, list)).any():
            out[c] = out[c].map(lambda v: "; ".join(map(str, v)) if isinstance(v, list) else v)
    return out


def compute(runset: RunSet, spec: CompareSpec) -> CompareResult:
    """All views from a RunSet (pure pandas; no tracking server)."""
    runs = runset.runs
    chosen = views.selected(spec)
    # Code tasks: run times are compared on the problems all runs solved (logged averages are
    # over each run's own solved problems). The tidy table keeps the logged values.
    metrics, common = common_problem_metrics(runs, runset.metrics, runset.problems)
    notes = common_notes(common, explain=any(v.notes_common_problems for v in chosen))
    scores = task_scores(runs, metrics)
    inputs = Inputs(
        spec=spec, runset=runset, runs=runs, metrics=metrics, scores=scores,
        lineage=lineage(runs), directions=Directions(spec.directions),
        selected=select_metrics(spec.metrics, metrics.columns, scores) if spec.metrics else None,
        base=resolve_baseline(spec.baseline, runs, runset.order) if spec.baseline else None,
        notes=notes)
    for view in chosen:
        if view.prepare is not None:
            view.prepare(inputs)
    if inputs.base is not None:
        notes.extend(inputs.base.notes)

    tables: dict[str, pd.DataFrame] = {}
    for view in chosen:
        tables.update(view.compute(inputs))
    tables.update(pareto.compute(inputs))
    if runset.left_out:
        counts = ", ".join(f"{n} {st}" for st, n in sorted(runset.left_out.items()))
        notes.append(f"left out runs that did not finish ({counts}); compare them with status=all "
                     "(a RUNNING run whose process is gone: mlproject runs reap)")
    if common:
        tables["code_common"] = common_table(common)
    tables.update(settings.compute(inputs))
    if not len(inputs.scope):
        notes.append("no runs matched")
    return CompareResult(spec=spec, runset=runset, tables=tables, scores=scores,
                         directions=inputs.directions, baseline=inputs.base, notes=notes,
                         common=common)


#: Per-document results are one download per run: beyond this many runs compared against a
#: baseline, compare does not fetch them (10,000 downloads would take minutes) and says so.
MAX_DOCUMENT_RUNS = 500


def document_runs(runset: RunSet, spec: CompareSpec) -> list[str] | None:
    """The runs whose per-document results a compare needs, or None when it needs none: with a
    selected view that pairs documents (``View.uses_documents``) and a baseline (``baseline=``,
    or two runs: a view's ``prepare`` may pair them), the in-scope runs and the baseline runs
    that logged lm-eval task scores (``<task>/<score>`` metrics: the others have no documents)."""
    chosen = views.selected(spec)
    if not any(v.uses_documents for v in chosen):
        return None
    runs = runset.runs
    scope = list(runs.index[runs["in_scope"].astype(bool)])
    base_ids: list[str] = []
    if spec.baseline:
        try:
            base_ids = resolve_baseline(spec.baseline, runs, runset.order).run_ids
        except UserError:
            return None  # compute says what is wrong with it
    elif len(scope) != 2:
        return None
    keys = [k for ks in task_candidates(runset.metrics.columns).values() for k in ks]
    if not keys:
        return []
    scored = runset.metrics[keys].notna().any(axis=1)
    scored = scored.reindex(list(dict.fromkeys(scope + base_ids)), fill_value=False)
    return list(scored.index[scored.to_numpy(dtype=bool)])


def build(client_or_uri, spec: CompareSpec, *, exclude_run_ids=()) -> CompareResult:
    """Query the tracking server and compute every requested view.

    client_or_uri: an ``MlflowClient``, a tracking URI, or None (MLflow's environment).
    exclude_run_ids: runs to leave out (the compare step passes its own run id); runs
    tagged ``mlproject.step=compare`` are always left out.
    Raises UserError for bad input (unknown experiment or run, baseline matching nothing,
    a metric matching nothing, an invalid filter).
    """
    from mlproject.compare import query

    if not spec.experiments and not spec.runs:
        raise UserError("nothing to compare: pass experiment=<name>[,<name>…] or "
                        "runs=<run id>,<run id>…")
    t0 = time.perf_counter()
    runset = query.fetch_runs(client_or_uri, spec.experiments, spec.runs, spec.filter,
                              page_size=spec.page_size, parallel=spec.parallel,
                              exclude_run_ids=exclude_run_ids, statuses=spec.statuses,
                              cache=spec.cache)
    if any(v.uses_code_problems for v in views.selected(spec)) and query.code_tasks_of(runset.metrics):
        query.fetch_code_problems(client_or_uri, runset, parallel=spec.parallel)
    doc_runs = document_runs(runset, spec)
    if doc_runs is not None and len(doc_runs) > MAX_DOCUMENT_RUNS:
        doc_note = (f"per-document results not fetched: {len(doc_runs)} runs would need "
                    f"them (at most {MAX_DOCUMENT_RUNS}); significance uses the standard errors "
                    "and no flips are counted — narrow the compare (filter=…, runs=…) to pair "
                    "runs on their documents")
    else:
        doc_note = None
        if doc_runs:
            query.fetch_documents(client_or_uri, runset, doc_runs, parallel=spec.parallel)
    t1 = time.perf_counter()
    result = compute(runset, spec)
    t2 = time.perf_counter()
    if doc_note:
        result.notes.append(doc_note)
    result.stats = {
        "runs": int(runset.runs["in_scope"].sum()),
        "lineage_runs": int((~runset.runs["in_scope"].astype(bool)).sum()),
        "metrics": int(runset.metrics.shape[1]),
        "requests": runset.requests,
        "left_out": int(sum(runset.left_out.values())),
        "query_s": round(t1 - t0, 3),
        "tables_s": round(t2 - t1, 3),
        "runs_from_cache": int(runset.cache.get("from_cache", 0) or 0),
        "runs_fetched": int(runset.cache.get("fetched", 0) or 0),
    }
    log.info("compare: %(runs)d runs, %(requests)d requests, query %(query_s)ss, "
             "tables %(tables_s)ss", result.stats)
    return result
