"""Compare runs on the tracking server: summary, versus and ranking views.

Public API (what ``steps/compare.py`` calls)::

    from mlproject.compare import CompareSpec, build

    spec = CompareSpec.from_params(experiment="mistral-study", baseline="role:base")
    result = build(tracking_uri_or_client, spec, exclude_run_ids=[my_run_id])
    paths = result.write(out_dir)          # md / csv / json / html / png per spec.formats
    print(result.markdown())

Modules: ``spec`` (parameters), ``query`` (the only one importing MLflow: paged search →
``RunSet``), ``directions`` (which way is better), ``tables`` (the pure-pandas primitives the
views share: scores, lineage, baseline, deltas, code tasks' common problems), ``views`` (the
registry ``VIEWS`` and one module per view: its tables, blocks and plots; plus the settings and
trade-off parts every compare shows), ``render`` (block model, Markdown, HTML, plot helpers),
``document`` (the report's blocks in order; Markdown / HTML / PNG), ``core`` (``build`` /
``compute`` / ``CompareResult``). Adding a view: a module in ``views/`` and a line in
``VIEWS``. Importing this package is cheap: pandas, matplotlib and MLflow load on first use.
"""

from __future__ import annotations

from mlproject.compare.spec import FORMATS, VIEWS, CompareSpec

__all__ = ["FORMATS", "VIEWS", "CompareResult", "CompareSpec", "RunSet", "build", "compute"]


def __getattr__(name):
    if name in ("build", "compute", "CompareResult"):
        from mlproject.compare import core

        return getattr(core, name)
    if name == "RunSet":
        from mlproject.compare.query import RunSet

        return RunSet
    raise AttributeError(name)
